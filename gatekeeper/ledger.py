"""The ledger: every task gets exactly one outcome, booked in one place.

A task is opened when its upload begins (it counts in `total_tasks` from then) and ended once,
by whichever path ends it; ending it twice is a bug and raises, so a new exit path can neither
forget a task nor count it twice (the books: total = ended + in progress, see /stats).
"""

from collections.abc import Callable
from dataclasses import dataclass, field

from gatekeeper.policy.outcomes import AttemptOutcome, TaskOutcome
from gatekeeper.state import LiveState

__all__ = ["Ledger", "TaskAlreadyEnded", "TaskRecord"]


class TaskAlreadyEnded(RuntimeError):
    """A task's outcome was booked a second time (a bug in an exit path)."""


@dataclass(eq=False)
class TaskRecord:
    """What happened to one task, kept while it lives and summarised when it ends."""

    task_id: str
    method: str
    path: str
    arrived: float
    _ledger: "Ledger" = field(repr=False)
    queued_at: float | None = None
    """When its upload was in and it joined the queue (or took a free slot)."""
    started: float | None = None
    attempts: int = 0
    outcomes: list[AttemptOutcome] = field(default_factory=list)
    retry_delay_total: float = 0.0
    cooldown: float = 0.0
    held: float = 0.0
    """Seconds the task held a slot so far (not its retry delays, when it gave the slot back)."""
    held_since: float | None = None
    upstreams: list[str] = field(default_factory=list)
    """The server (host:port) of each attempt, in order."""
    audio: float | None = None
    """Seconds of audio in the upload (None: not read yet, or unreadable)."""
    outcome: TaskOutcome | None = None

    @property
    def audio_text(self) -> str:
        """The audio length as answers and logs show it: `12.35`, or `unknown`."""
        return "unknown" if self.audio is None else f"{self.audio:.2f}"

    def end(self, outcome: TaskOutcome) -> None:
        """Book the task's one outcome; raise TaskAlreadyEnded the second time."""
        if self.outcome is not None:
            raise TaskAlreadyEnded(
                f"task {self.task_id} ended as {outcome.value} after {self.outcome.value}"
            )
        self.outcome = outcome
        self._ledger._book(self, outcome)


class Ledger:
    """Opens tasks and books their outcomes into the live state."""

    def __init__(self, state: LiveState, *, now: Callable[[], float]) -> None:
        self._state = state
        self._now = now

    def now(self) -> float:
        """The ledger's clock (monotonic seconds), for the times a record keeps."""
        return self._now()

    def open(self, task_id: str, method: str, path: str) -> TaskRecord:
        """A task begins (its upload starts): it counts in total_tasks from now on."""
        self._state.task_admitted()
        return TaskRecord(task_id, method, path, self._now(), self)

    def _book(self, record: TaskRecord, outcome: TaskOutcome) -> None:
        # Task durations cover the tasks that got a slot (reached the runner).
        seconds = None if record.started is None else self._now() - record.arrived
        self._state.task_ended(outcome, seconds)
