"""Pure admission policy: who may start, who waits, who is refused, and what we tell them.

No asyncio, no aiohttp: `gate.py` owns the waiting; this module only decides. Decisions are frozen
dataclasses so the same object can be logged, put in headers and counted.
"""

import math
from dataclasses import dataclass
from enum import StrEnum

from gatekeeper.policy.outcomes import RejectReason

__all__ = [
    "RETRY_AFTER_MAX",
    "RETRY_AFTER_MIN",
    "Admission",
    "Decision",
    "ServiceTimeEstimate",
    "decide",
    "estimate_retry_after",
    "queue_usage",
    "work_ahead_steps",
]

RETRY_AFTER_MIN = 1
RETRY_AFTER_MAX = 120


class Decision(StrEnum):
    START = "start"  # a slot is free and nobody waits ahead
    QUEUE = "queue"  # wait first-in first-out for a slot
    REJECT = "reject"  # 503 服务繁忙


@dataclass(frozen=True, slots=True)
class Admission:
    """What happens to one arriving task, with the facts the decision was made on."""

    decision: Decision
    reason: RejectReason | None
    active: int
    queued: int
    limit: int
    max_queue: int

    @property
    def queue_usage(self) -> str:
        return queue_usage(self.queued, self.max_queue)


def decide(
    *, active: int, queued: int, limit: int, max_queue: int, shutting_down: bool
) -> Admission:
    """Admit, queue or refuse one arriving task.

    A task may start at once only when a slot is free *and* nobody is waiting (first-in
    first-out: a newcomer never overtakes the queue). Otherwise it waits if the queue has room.
    """
    if shutting_down:
        decision, reason = Decision.REJECT, RejectReason.SHUTTING_DOWN
    elif active < limit and queued == 0:
        decision, reason = Decision.START, None
    elif queued < max_queue:
        decision, reason = Decision.QUEUE, None
    else:
        decision, reason = Decision.REJECT, RejectReason.QUEUE_FULL
    return Admission(decision, reason, active, queued, limit, max_queue)


def work_ahead_steps(
    *, reason: RejectReason, seconds_per_audio_second: float, audio_ahead: float, tasks_ahead: int
) -> float:
    """Retry-After from the audio queued ahead and the measured throughput (seconds a slot is
    held per second of audio): the slot-seconds of work ahead, in the units
    `estimate_retry_after` takes as `mean_service` with `queued` = `tasks_ahead`."""
    work = max(0.0, seconds_per_audio_second) * max(0.0, audio_ahead)
    if reason is RejectReason.QUEUE_TIMEOUT:
        return work / max(1, tasks_ahead + 1)  # × (tasks_ahead + 1) steps: all of it
    return work / max(1, tasks_ahead)  # one queued task's worth frees a place


def queue_usage(queued: int, max_queue: int) -> str:
    """The seed's `"queued/max_queue (p%)"`, p rounded to a whole number."""
    pct = 100.0 if max_queue == 0 else 100.0 * queued / max_queue
    return f"{queued}/{max_queue} ({round(pct)}%)"


@dataclass(frozen=True, slots=True)
class ServiceTimeEstimate:
    """An exponentially weighted mean of how long a task holds its slot.

    Before any task has finished, `prior` stands in (a guess, replaced by the first measurement).
    """

    mean: float
    samples: int = 0
    alpha: float = 0.2

    def observe(self, seconds: float) -> "ServiceTimeEstimate":
        seconds = max(0.0, seconds)
        if self.samples == 0:
            return ServiceTimeEstimate(seconds, 1, self.alpha)
        mean = self.mean + self.alpha * (seconds - self.mean)
        return ServiceTimeEstimate(mean, self.samples + 1, self.alpha)


def estimate_retry_after(
    *, reason: RejectReason, mean_service: float, limit: int, queued: int
) -> int:
    """Whole seconds a refused client should wait before trying again, clamped to 1..120.

    With `limit` slots each busy about `mean_service` seconds, one slot frees (and the queue
    moves up by one place) every `mean_service / limit` seconds on average:
    - queue full: a queue place is likely free after one such step;
    - queue timeout: the client already waited its turn; coming back later only helps once the
      queue ahead of it has drained, `(queued + 1)` steps;
    - shutting down: the replacement process needs about one step to take over the work.
    """
    step = max(0.0, mean_service) / max(1, limit)
    steps = queued + 1 if reason is RejectReason.QUEUE_TIMEOUT else 1
    estimate = step * steps
    if not math.isfinite(estimate):  # NaN or infinite: no useful guess, say the most
        return RETRY_AFTER_MAX if estimate == estimate else RETRY_AFTER_MIN
    return min(RETRY_AFTER_MAX, max(RETRY_AFTER_MIN, math.ceil(min(estimate, 1e9))))
