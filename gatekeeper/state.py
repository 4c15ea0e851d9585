"""The one source of truth for live state: counters, the gate's books, and recent timings.

`/stats`, `/metrics` and the log lines all read `LiveState.snapshot()`, so they never disagree.
"""

from collections import Counter, deque
from dataclasses import dataclass, field

from gatekeeper.admission import ServiceTimeEstimate
from gatekeeper.gate import Gate, GateCounts
from gatekeeper.outcomes import AttemptOutcome, RejectReason, TaskOutcome

__all__ = ["LiveState", "Snapshot", "TaskRecord"]

# A prior for the service time before any task has finished: the seed's "a few minutes of
# audio on a 3090" lands around here; replaced by the first measurement.
SERVICE_TIME_PRIOR = 30.0
_RECENT = 512


@dataclass
class TaskRecord:
    """What happened to one task, kept while it lives and summarised when it ends."""

    task_id: str
    method: str
    path: str
    arrived: float
    started: float | None = None
    attempts: int = 0
    outcomes: list[AttemptOutcome] = field(default_factory=list)
    retry_delay_total: float = 0.0
    cooldown: float = 0.0
    client_gone: bool = False


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

    @property
    def active_tasks(self) -> int:
        return self.gate.active

    @property
    def queued_tasks(self) -> int:
        return self.gate.queued

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

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
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

    def task_admitted(self) -> None:
        self.total_tasks += 1

    def task_rejected(self, reason: RejectReason) -> None:
        self.rejected[reason] += 1

    def task_ended(self, outcome: TaskOutcome) -> None:
        self.tasks[outcome] += 1

    def queue_waited(self, seconds: float) -> None:
        self.queue_waits.append(seconds)

    def attempt_ended(
        self, outcome: AttemptOutcome, seconds: float, *, wall: float, monotonic: float
    ) -> None:
        self.attempts[outcome] += 1
        self.upstream_durations.append(seconds)
        if outcome is AttemptOutcome.OOM:
            self.oom_errors += 1
            self.last_oom_wall = wall
            self.last_oom_monotonic = monotonic

    def retry_scheduled(self, outcome: AttemptOutcome, delay: float) -> None:
        self.retries[outcome] += 1
        self.retry_delay_seconds_total += delay

    def slot_held(self, seconds: float) -> None:
        """A task gave its slot back after `seconds`: feeds the Retry-After estimate."""
        self.service = self.service.observe(seconds)

    def snapshot(self) -> Snapshot:
        return Snapshot(
            gate=self.gate.counts(),
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
        )
