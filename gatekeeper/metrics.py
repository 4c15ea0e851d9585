"""Prometheus metrics, built at scrape time from one snapshot of the live state.

Nothing is counted twice: the collector reads `LiveState.snapshot()`, the same object `/stats`
and the log lines use, so the three views can never disagree. Each app gets its own registry
(never the global one), so several gatekeepers in one test process do not share numbers.
"""

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from gatekeeper.cluster.coordinator import ClusterSnapshot
from gatekeeper.policy.adaptive import LimitChangeKind
from gatekeeper.policy.outcomes import AttemptOutcome, HoldEnd, RejectReason, TaskOutcome
from gatekeeper.state import HistogramData, Snapshot

__all__ = ["PREFIX", "ClusterCollector", "SnapshotCollector", "create_registry"]

PREFIX = "asr_gatekeeper_"
GIB = 2**30


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, value=value)


def _counter(name: str, doc: str, label: str, values: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(PREFIX + name, doc, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family


def _histogram(name: str, doc: str, data: HistogramData) -> HistogramMetricFamily:
    return HistogramMetricFamily(
        PREFIX + name, doc, buckets=data.cumulative(), sum_value=data.total
    )


class SnapshotCollector(Collector):
    """Emits every gatekeeper metric from one snapshot taken at scrape time."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        gate = snap.gate
        yield _gauge("max_concurrent", "Tasks allowed upstream at once.", gate.limit)
        yield _gauge(
            "active_tasks",
            "Slots taken: tasks upstream, cooling down, or in a retry delay with a cool-down, and "
            "timed-out attempts the Whisper server may still be computing (held_tasks).",
            gate.active,
        )
        yield _gauge(
            "held_tasks",
            "Slots kept after a timeout (the client has its 504) until the Whisper server answers "
            "or closes, at most ASR_TIMEOUT_HOLD.",
            snap.held_tasks,
        )
        yield _gauge(
            "uploading_tasks",
            "Tasks whose upload is still being received: no slot yet, but counted against the "
            "queue's room when new tasks arrive.",
            gate.uploading,
        )
        yield _gauge(
            "upstream_in_flight",
            "Attempts at the Whisper server right now (active minus tasks waiting in their slot).",
            snap.upstream_in_flight,
        )
        yield _gauge("queued_tasks", "Admitted tasks waiting for a slot.", gate.queued)
        yield _gauge(
            "retrying_tasks",
            "Admitted tasks between two attempts: in their retry delay, or waiting (ahead of the "
            "queue) for a slot to retry. They hold no slot.",
            gate.retrying,
        )
        yield _gauge("max_queue", "Tasks allowed to wait before refusals start.", gate.max_queue)
        yield from _per_server(snap)
        yield _gauge("shutting_down", "1 while draining after SIGTERM.", int(gate.shutting_down))
        yield _counter(
            "tasks_total",
            "Tasks that ended, by outcome; a task counts from the start of its upload. "
            "outcome=rejected: refused with 503 after its upload began (no queue place once the "
            "upload was in, queue timeout, retry without a slot, shutdown); refusals at arrival "
            "are counted in rejected_total only.",
            "outcome",
            {o.value: snap.tasks[o] for o in TaskOutcome},
        )
        yield _counter(
            "rejected_total",
            "Refusals (503 服务繁忙), by reason.",
            "reason",
            {r.value: snap.rejected[r] for r in RejectReason},
        )
        yield _counter(
            "retries_total",
            "Retries scheduled, by the outcome that caused them.",
            "outcome",
            {o.value: snap.retries[o] for o in AttemptOutcome if o.is_failure},
        )
        yield _counter(
            "timeout_holds_total",
            "Holds of a timed-out attempt's slot that ended, by how: answered, closed (by the "
            "Whisper server), expired (ASR_TIMEOUT_HOLD; the connection was cut), stopped "
            "(shutdown).",
            "end",
            {end.value: snap.holds.get(end, 0) for end in HoldEnd},
        )
        yield _histogram(
            "queue_wait_seconds",
            "Time from joining the queue (the upload received) to getting a slot.",
            snap.queue_wait,
        )
        yield _histogram(
            "upstream_duration_seconds",
            "Duration of one upstream attempt, upload included.",
            snap.upstream_duration,
        )
        yield _histogram(
            "audio_seconds",
            "Seconds of audio in each task's upload (those whose length could be read).",
            snap.audio,
        )
        unreadable = CounterMetricFamily(
            PREFIX + "audio_unreadable",
            "Uploads whose audio length could not be read (costed as a long file).",
        )
        unreadable.add_metric([], snap.audio_unknown)
        yield unreadable
        yield _histogram(
            "task_duration_seconds",
            "Time from arrival to the end of a task that reached the Whisper server.",
            snap.task_duration,
        )


def _per_server(snap: Snapshot) -> Iterator[Metric]:
    """The metrics kept per Whisper server, labelled upstream="host:port"."""
    label = ["upstream"]
    up = GaugeMetricFamily(
        PREFIX + "upstream_up",
        "1 when the Whisper server accepted its last health check (busy counts), else 0.",
        labels=label,
    )
    limit = GaugeMetricFamily(
        PREFIX + "upstream_max_concurrent",
        "The server's limit now (the adaptive one included); max_concurrent is their sum.",
        labels=label,
    )
    active = GaugeMetricFamily(
        PREFIX + "upstream_active_tasks",
        "Slots taken on the server (held ones included); active_tasks is their sum.",
        labels=label,
    )
    last_oom = GaugeMetricFamily(
        PREFIX + "last_oom_timestamp_seconds",
        "Unix time of the server's last out-of-memory answer (0: none yet).",
        labels=label,
    )
    oom = CounterMetricFamily(
        PREFIX + "oom_errors", "Attempts that ended in out-of-memory, per server.", labels=label
    )
    attempts = CounterMetricFamily(
        PREFIX + "upstream_attempts",
        "Attempts sent to a Whisper server, by outcome.",
        labels=["upstream", "outcome"],
    )
    changes = CounterMetricFamily(
        PREFIX + "limit_changes",
        "Changes of a server's adaptive limit, by what caused them.",
        labels=["upstream", "reason"],
    )
    memory = {
        key: GaugeMetricFamily(PREFIX + f"upstream_{key}_bytes", doc, labels=label)
        for key, doc in (
            ("memory_budget", "The card's GPU memory for tasks (ASR_GPU_MEMORY_GIB)."),
            ("memory_used", "GPU memory the running tasks' estimated peaks hold."),
            ("task_memory", "A task's estimated peak whatever its length (set or learned)."),
            ("task_memory_per_minute", "Extra estimated peak per minute of audio."),
        )
    }
    for server in snap.servers:
        name = [server.name]
        if server.memory is not None:
            view = server.memory
            for key, field in (
                ("memory_budget", "budget"),
                ("memory_used", "used"),
                ("task_memory", "task_memory_gib"),
                ("task_memory_per_minute", "task_memory_per_minute_gib"),
            ):
                gib = view[field]
                assert isinstance(gib, float | int)
                memory[key].add_metric(name, gib * GIB)
        up.add_metric(name, 1 if server.up else 0)
        limit.add_metric(name, server.limit)
        active.add_metric(name, server.active)
        last_oom.add_metric(name, server.last_oom_wall or 0.0)
        oom.add_metric(name, server.oom_errors)
        for outcome in AttemptOutcome:
            attempts.add_metric([server.name, outcome.value], server.attempts.get(outcome, 0))
        for kind in LimitChangeKind:
            changes.add_metric([server.name, kind.value], server.limit_changes.get(kind, 0))
    yield from (up, limit, active, last_oom, oom, attempts, changes)
    if any(server.memory is not None for server in snap.servers):
        yield from memory.values()


class ClusterCollector(Collector):
    """Replicas (ASR_REDIS_URL): this replica's leases and how Redis answers."""

    def __init__(self, snapshot: Callable[[], ClusterSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        counters = snap.counters
        yield _gauge(
            "cluster_redis_up",
            "1 while Redis answers this replica (its last call succeeded), else 0: no new task "
            "starts here and tasks beyond the queue are refused coordination_unavailable.",
            1 if snap.redis_up is not False else 0,
        )
        renewals = CounterMetricFamily(
            PREFIX + "cluster_lease_renewals",
            "Renewal rounds of this replica's leases (and heartbeat) that Redis answered.",
        )
        renewals.add_metric([], counters.renewals)
        yield renewals
        yield _counter(
            "cluster_leases_lost",
            "Leases this replica held and lost without releasing them: expired (it was paused, "
            "or Redis lost them, longer than ASR_REDIS_LEASE) or unconfirmed (Redis unreachable "
            "that long). Another replica may have used the slot meanwhile.",
            "reason",
            snap.lost,
        )
        errors = CounterMetricFamily(
            PREFIX + "cluster_redis_errors",
            "Redis calls of this replica that failed or took longer than ASR_REDIS_TIMEOUT.",
        )
        errors.add_metric([], counters.redis_errors)
        yield errors
        held = GaugeMetricFamily(
            PREFIX + "cluster_leases_held",
            "Leases (slots shared with the other replicas) this replica holds, per server.",
            labels=["upstream"],
        )
        for server, n in snap.held.items():
            held.add_metric([server], n)
        yield held
        yield _histogram(
            "cluster_acquire_seconds",
            "Round trip of one lease acquisition at Redis: the coordination a task pays.",
            snap.acquire,
        )


def create_registry(
    snapshot: Callable[[], Snapshot], *, cluster: Callable[[], ClusterSnapshot] | None = None
) -> CollectorRegistry:
    """A registry of this app's own, holding the snapshot collector (and, with replicas, the
    cluster's)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    if cluster is not None:
        registry.register(ClusterCollector(cluster))
    return registry
