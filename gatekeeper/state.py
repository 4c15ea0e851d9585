"""The one source of truth for live state: counters, the gate's books, and recent timings.

`/stats`, `/metrics` and the log lines all read `LiveState.snapshot()`, so they never disagree.
"""

import bisect
import math
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gatekeeper.gate import Gate, GateCounts
from gatekeeper.health import UpstreamHealth
from gatekeeper.policy.adaptive import LimitChangeKind
from gatekeeper.policy.admission import ServiceTimeEstimate
from gatekeeper.policy.outcomes import AttemptOutcome, HoldEnd, RejectReason, TaskOutcome
from gatekeeper.policy.quantiles import percentile

__all__ = [
    "AUDIO_BUCKETS",
    "DURATION_BUCKETS",
    "QUEUE_WAIT_BUCKETS",
    "HistogramData",
    "LiveState",
    "ServerBook",
    "ServerSnapshot",
    "Snapshot",
    "percentile",
]

# Transcriptions take from about a second (a short clip) to half an hour (a long meeting).
DURATION_BUCKETS: tuple[float, ...] = (
    0.5,
    1,
    2.5,
    5,
    10,
    20,
    30,
    60,
    120,
    180,
    300,
    450,
    600,
    900,
    1200,
    1800,
    2700,
    3600,
)
# Queue waits go from nothing (a free slot) to the 600 s queue timeout and beyond.
QUEUE_WAIT_BUCKETS: tuple[float, ...] = (
    0.001,
    0.005,
    0.01,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
    600,
    1200,
)
# Audio lengths: voice notes of seconds to meetings of hours.
AUDIO_BUCKETS: tuple[float, ...] = (5, 10, 30, 60, 120, 300, 600, 900, 1200, 1800, 3600, 7200)
_HOUR = 3600.0

# A prior for the service time before any task has finished: the seed's "a few minutes of
# audio on a 3090" lands around here; replaced by the first measurement.
SERVICE_TIME_PRIOR = 30.0
_RECENT = 512


@dataclass(frozen=True, slots=True)
class HistogramData:
    """A histogram as plain numbers: per-bucket (not cumulative) counts, sum and count."""

    buckets: tuple[float, ...]
    counts: tuple[int, ...]  # len(buckets) + 1: the last one is +Inf
    total: float
    count: int

    @classmethod
    def empty(cls, buckets: tuple[float, ...]) -> "HistogramData":
        return cls(buckets, (0,) * (len(buckets) + 1), 0.0, 0)

    def observe(self, value: float) -> "HistogramData":
        index = bisect.bisect_left(self.buckets, value)
        counts = list(self.counts)
        counts[index] += 1
        return HistogramData(self.buckets, tuple(counts), self.total + value, self.count + 1)

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, cumulative count) pairs as Prometheus wants them, ending with +Inf."""
        out, running = [], 0
        for bound, n in zip((*self.buckets, math.inf), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == math.inf else _le(bound), running))
        return out


def _le(bound: float) -> str:
    return repr(float(bound))


@dataclass(frozen=True, slots=True)
class ServerSnapshot:
    """One Whisper server at snapshot time."""

    name: str  # host:port
    url: str
    limit: int
    active: int
    usable: bool
    health: UpstreamHealth | None
    in_flight: int
    held: int
    oom_errors: int
    last_oom_wall: float | None
    attempts: dict[AttemptOutcome, int]
    limit_changes: dict[LimitChangeKind, int]
    adaptive: dict[str, object] | None
    memory: dict[str, object] | None = None

    @property
    def up(self) -> bool | None:
        return None if self.health is None else self.health.up


class ServerBook:
    """What the gatekeeper counts per Whisper server (mutable; read through the snapshot)."""

    __slots__ = (
        "attempts",
        "health",
        "held",
        "in_flight",
        "last_oom_monotonic",
        "last_oom_wall",
        "limit_changes",
        "name",
        "oom_errors",
        "url",
    )

    def __init__(self, name: str, url: str) -> None:
        self.name = name
        self.url = url
        self.health: UpstreamHealth | None = None
        self.in_flight = 0
        self.held = 0
        self.oom_errors = 0
        self.last_oom_wall: float | None = None
        self.last_oom_monotonic: float | None = None
        self.attempts: Counter[AttemptOutcome] = Counter()
        self.limit_changes: Counter[LimitChangeKind] = Counter()


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One consistent reading of everything the gatekeeper knows about itself."""

    gate: GateCounts
    total_tasks: int
    tasks: dict[TaskOutcome, int]
    rejected: dict[RejectReason, int]
    attempts: dict[AttemptOutcome, int]
    retries: dict[AttemptOutcome, int]
    oom_errors: int
    last_oom_wall: float | None
    last_oom_monotonic: float | None
    retry_delay_seconds_total: float
    mean_service_seconds: float
    recent_queue_waits: tuple[float, ...]
    recent_upstream_durations: tuple[float, ...]
    ooms_last_hour: int
    queue_wait: HistogramData
    upstream_duration: HistogramData
    task_duration: HistogramData
    upstream: UpstreamHealth | None
    """The background probe's latest verdict on the only server (None until the first check,
    and with several servers: each has its own in `servers`)."""
    upstream_in_flight: int
    limit_changes: dict[LimitChangeKind, int]
    adaptive: dict[str, object] | None = None
    """The adaptive limit's state (None when the limit is fixed)."""
    held_tasks: int = 0
    """Slots kept by timed-out attempts the Whisper server may still be computing (part of
    `gate.active`; their tasks have already ended)."""
    holds: dict[HoldEnd, int] = field(default_factory=dict)
    """Holds of timed-out attempts that ended, by how."""
    servers: tuple[ServerSnapshot, ...] = ()
    """Each Whisper server, in ASR_UPSTREAM_URL's order."""
    audio: HistogramData = field(default_factory=lambda: HistogramData.empty(AUDIO_BUCKETS))
    """Seconds of audio in the uploads whose length could be read."""
    audio_unknown: int = 0
    """Uploads whose audio length could not be read."""
    seconds_per_audio_second: float | None = None
    """Measured: seconds a slot is held per second of audio (None until measured)."""

    @property
    def active_tasks(self) -> int:
        return self.gate.active

    @property
    def queued_tasks(self) -> int:
        return self.gate.queued

    @property
    def upstream_up(self) -> bool | None:
        """A Whisper server accepted the last check (None before the first one)."""
        ups = [server.up for server in self.servers]
        if any(ups):
            return True
        return None if all(up is None for up in ups) else False

    @property
    def failed_tasks(self) -> int:
        return self.tasks[TaskOutcome.FAILED]

    @property
    def rejected_tasks(self) -> int:
        return sum(self.rejected.values())

    @property
    def success_rate(self) -> str:
        """succeeded ÷ (succeeded + failed), one decimal; "100.0%" before any task ended."""
        ok, bad = self.tasks[TaskOutcome.SUCCESS], self.tasks[TaskOutcome.FAILED]
        rate = 100.0 if ok + bad == 0 else 100.0 * ok / (ok + bad)
        return f"{rate:.1f}%"


class LiveState:
    """Counters the proxy updates as tasks move; read only through `snapshot()`."""

    def __init__(
        self,
        gate: Gate,
        *,
        now: Callable[[], float],
        servers: Sequence[tuple[str, str]] = (("upstream:80", "http://upstream"),),
    ) -> None:
        self.gate = gate
        self._now = now  # monotonic clock, for "in the last hour"
        self.servers = [ServerBook(name, url) for name, url in servers]
        # The adaptive limits' states at snapshot time, per server (the limiter sets this;
        # None: fixed).
        self.adaptive_view: Callable[[int], dict[str, object] | None] = lambda server: None
        self.memory_view: Callable[[int], dict[str, object] | None] = lambda server: None
        self.audio = HistogramData.empty(AUDIO_BUCKETS)
        self.audio_unknown = 0
        self.seconds_per_audio_second: float | None = None
        self.upstream_in_flight = 0
        self.limit_changes: Counter[LimitChangeKind] = Counter()
        self.held_tasks = 0
        self.holds: Counter[HoldEnd] = Counter()
        self.oom_times: deque[float] = deque()
        self.queue_wait = HistogramData.empty(QUEUE_WAIT_BUCKETS)
        self.upstream_duration = HistogramData.empty(DURATION_BUCKETS)
        self.task_duration = HistogramData.empty(DURATION_BUCKETS)
        self.total_tasks = 0
        self.tasks: Counter[TaskOutcome] = Counter()
        self.rejected: Counter[RejectReason] = Counter()
        self.attempts: Counter[AttemptOutcome] = Counter()
        self.retries: Counter[AttemptOutcome] = Counter()
        self.oom_errors = 0
        self.last_oom_wall: float | None = None
        self.last_oom_monotonic: float | None = None
        self.retry_delay_seconds_total = 0.0
        self.service = ServiceTimeEstimate(SERVICE_TIME_PRIOR)
        self.queue_waits: deque[float] = deque(maxlen=_RECENT)
        self.upstream_durations: deque[float] = deque(maxlen=_RECENT)

    def set_upstream(self, server: int, health: UpstreamHealth) -> None:
        """The background probe's latest verdict on one server."""
        self.servers[server].health = health

    def upstream_began(self, server: int) -> None:
        """An attempt is being sent to `server`."""
        self.upstream_in_flight += 1
        self.servers[server].in_flight += 1

    def oom_elsewhere(self, server: int, *, wall: float, monotonic: float) -> None:
        """Replicas: another gatekeeper's task ran out of memory on `server` (at these times):
        the card's last OOM (its cool-down) moves; this replica's counts do not."""
        book = self.servers[server]
        if book.last_oom_monotonic is None or monotonic > book.last_oom_monotonic:
            book.last_oom_monotonic, book.last_oom_wall = monotonic, wall
        if self.last_oom_monotonic is None or monotonic > self.last_oom_monotonic:
            self.last_oom_monotonic, self.last_oom_wall = monotonic, wall

    def limit_changed(self, kind: LimitChangeKind, server: int) -> None:
        """A server's adaptive limit moved, for this kind of reason."""
        self.limit_changes[kind] += 1
        self.servers[server].limit_changes[kind] += 1

    def upstream_ended(self, server: int) -> None:
        self.upstream_in_flight -= 1
        self.servers[server].in_flight -= 1

    def hold_began(self, server: int) -> None:
        """A timed-out attempt keeps its slot while the Whisper server may still be on it."""
        self.held_tasks += 1
        self.servers[server].held += 1

    def hold_ended(self, end: HoldEnd, server: int) -> None:
        self.held_tasks -= 1
        self.servers[server].held -= 1
        self.holds[end] += 1

    def task_admitted(self) -> None:
        self.total_tasks += 1

    def task_rejected(self, reason: RejectReason) -> None:
        self.rejected[reason] += 1

    def task_ended(self, outcome: TaskOutcome, seconds: float | None = None) -> None:
        """A task ended; `seconds` (arrival to end) when it reached the Whisper server."""
        self.tasks[outcome] += 1
        if seconds is not None:
            self.task_duration = self.task_duration.observe(seconds)

    def audio_read(self, seconds: float | None) -> None:
        """The length of a task's audio, or None when it could not be read."""
        if seconds is None:
            self.audio_unknown += 1
        else:
            self.audio = self.audio.observe(seconds)

    def mean_audio_seconds(self) -> float:
        """The mean length of the audio read so far (60 s before any)."""
        return self.audio.total / self.audio.count if self.audio.count else 60.0

    def slot_held_for_audio(self, held: float, audio_seconds: float) -> None:
        """A task held its slot `held` seconds for `audio_seconds` of audio (its throughput)."""
        if audio_seconds <= 0:
            return
        ratio = held / audio_seconds
        old = self.seconds_per_audio_second
        self.seconds_per_audio_second = ratio if old is None else old + 0.2 * (ratio - old)

    def queue_waited(self, seconds: float) -> None:
        self.queue_waits.append(seconds)
        self.queue_wait = self.queue_wait.observe(seconds)

    def attempt_ended(
        self,
        outcome: AttemptOutcome,
        seconds: float,
        *,
        server: int,
        wall: float,
        monotonic: float,
    ) -> None:
        book = self.servers[server]
        self.attempts[outcome] += 1
        book.attempts[outcome] += 1
        self.upstream_durations.append(seconds)
        self.upstream_duration = self.upstream_duration.observe(seconds)
        if outcome is AttemptOutcome.OOM:
            self.oom_errors += 1
            book.oom_errors += 1
            self.last_oom_wall = book.last_oom_wall = wall
            self.last_oom_monotonic = book.last_oom_monotonic = monotonic
            self.oom_times.append(monotonic)

    def retry_scheduled(self, outcome: AttemptOutcome, delay: float) -> None:
        self.retries[outcome] += 1
        self.retry_delay_seconds_total += delay

    def slot_held(self, seconds: float) -> None:
        """A task gave its slot back after `seconds`: feeds the Retry-After estimate."""
        self.service = self.service.observe(seconds)

    def snapshot(self) -> Snapshot:
        horizon = self._now() - _HOUR
        while self.oom_times and self.oom_times[0] < horizon:
            self.oom_times.popleft()
        gate = self.gate.counts()
        servers = tuple(
            ServerSnapshot(
                name=book.name,
                url=book.url,
                limit=slots.limit,
                active=slots.active,
                usable=slots.usable,
                health=book.health,
                in_flight=book.in_flight,
                held=book.held,
                oom_errors=book.oom_errors,
                last_oom_wall=book.last_oom_wall,
                attempts={o: book.attempts[o] for o in AttemptOutcome},
                limit_changes={k: book.limit_changes[k] for k in LimitChangeKind},
                adaptive=self.adaptive_view(i),
                memory=self.memory_view(i),
            )
            for i, (book, slots) in enumerate(zip(self.servers, gate.servers, strict=True))
        )
        return Snapshot(
            gate=gate,
            total_tasks=self.total_tasks,
            tasks={o: self.tasks[o] for o in TaskOutcome},
            rejected={r: self.rejected[r] for r in RejectReason},
            attempts={o: self.attempts[o] for o in AttemptOutcome},
            retries={o: self.retries[o] for o in AttemptOutcome},
            oom_errors=self.oom_errors,
            last_oom_wall=self.last_oom_wall,
            last_oom_monotonic=self.last_oom_monotonic,
            retry_delay_seconds_total=self.retry_delay_seconds_total,
            mean_service_seconds=self.service.mean,
            recent_queue_waits=tuple(self.queue_waits),
            recent_upstream_durations=tuple(self.upstream_durations),
            ooms_last_hour=len(self.oom_times),
            queue_wait=self.queue_wait,
            upstream_duration=self.upstream_duration,
            task_duration=self.task_duration,
            upstream=servers[0].health if len(servers) == 1 else None,
            adaptive=servers[0].adaptive if len(servers) == 1 else _pool_adaptive(servers),
            upstream_in_flight=self.upstream_in_flight,
            limit_changes=dict(self.limit_changes),
            held_tasks=self.held_tasks,
            holds={end: self.holds[end] for end in HoldEnd},
            servers=servers,
            audio=self.audio,
            audio_unknown=self.audio_unknown,
            seconds_per_audio_second=self.seconds_per_audio_second,
        )


def _pool_adaptive(servers: tuple[ServerSnapshot, ...]) -> dict[str, object] | None:
    """The adaptive limits of several servers in one view: their sum and each server's limit
    (each server's whole state is under `upstreams`)."""
    if any(server.adaptive is None for server in servers):
        return None
    return {
        "limit": sum(server.limit for server in servers),
        "limits": {server.name: server.limit for server in servers},
    }
