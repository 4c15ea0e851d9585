"""Pure arithmetic: the longest one task can take, so a proxy in front never gives up first.

nginx's `proxy_read_timeout` counts from when it sent the request to the first byte of the
answer, and the gatekeeper sends nothing until the task's final answer. So nginx must be
willing to wait the gatekeeper's whole worst case, or it answers 504 while the gatekeeper (and
the GPU) still work on the task.

The worst case of one task, from arrival at the gatekeeper to the first byte of its answer:

    queue_timeout                        waiting for a slot, from the end of the upload
  + oom_cooldown                         a task that starts just after an OOM waits once
  + (max_retries + 1) × request_timeout  every attempt runs into its deadline
  + the longest delay before each retry  the OOM/crash schedule d·3^(k−1), jitter at its top
  + max_retries × request_timeout        without a cool-down only: after each delay, the wait
                                         for a slot to retry in
  + max_retries × timeout_hold           with ASR_RETRY_ON_TIMEOUT only: a timed-out attempt
                                         is retried once the Whisper server is done with it

The upload itself comes before all this (bounded by ASR_UPLOAD_TIMEOUT): nginx's read timeout
starts once it has sent the whole request, and nginx buffers the upload and sends it at once.
Without ASR_RETRY_ON_TIMEOUT a timed-out attempt's hold does not delay its answer (the 504
goes out at the deadline); it only keeps the slot, which the queue timeout already bounds.

Every attempt counts in full even though timeouts are not retried by default: an attempt can
take almost `request_timeout` and then end in a 500 that is retried. An upstream `Retry-After`
can raise each delay to at least its value, capped at 300 s; `worst_case_with_retry_after`
includes that cap and is the true upper bound. The delays come from `RetryPolicy` itself, so
this arithmetic cannot drift from the schedule the gatekeeper really uses.

With the seed's cool-down (ASR_OOM_COOLDOWN > 0) a task keeps its slot through its retry
delays. Without it (ASR_OOM_COOLDOWN=0, the adaptive mode's default) the task gives its slot
back during a delay and waits for one again afterwards, ahead of the queue. Usually a slot frees
within one attempt's time; when retries pile up the wait is cut at `request_timeout` and the
task is refused (`queue_timeout`), so that term is bounded too.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

from gatekeeper.policy.outcomes import AttemptOutcome
from gatekeeper.policy.retry import RETRY_AFTER_CAP, RetryPolicy

if TYPE_CHECKING:
    from gatekeeper.settings import Settings

__all__ = ["RETRY_AFTER_CAP", "TaskBudget", "from_settings", "task_budget"]

# Every outcome that may be retried (timeouts only with ASR_RETRY_ON_TIMEOUT, on the crash
# schedule); the budget takes the longest of their delays for each retry.
_RETRIED = (
    AttemptOutcome.OOM,
    AttemptOutcome.CRASH,
    AttemptOutcome.ERROR,
    AttemptOutcome.TIMEOUT,
)


@dataclass(frozen=True, slots=True)
class TaskBudget:
    """The worst case of one task, part by part, in seconds."""

    queue_timeout: float
    oom_cooldown: float
    attempts: int
    request_timeout: float
    retry_delays: tuple[float, ...]
    """The longest delay before retry 1, 2, … (schedule and jitter at their top)."""
    retry_delays_with_retry_after: tuple[float, ...]
    """The same, each raised to the 300 s cap an upstream Retry-After may push it to."""
    retry_hold: float = 0.0
    """Before each retry, the longest wait for the Whisper server to finish a timed-out attempt
    (ASR_TIMEOUT_HOLD with ASR_RETRY_ON_TIMEOUT, else 0)."""

    @property
    def attempts_seconds(self) -> float:
        """Every attempt running into ASR_REQUEST_TIMEOUT."""
        return self.attempts * self.request_timeout

    @property
    def retry_slot_wait_seconds(self) -> float:
        """Without a cool-down, before every retry, waiting for a slot (at most one
        request_timeout each); with one the task keeps its slot and never waits."""
        if self.oom_cooldown > 0:
            return 0.0
        return (self.attempts - 1) * self.request_timeout

    @property
    def retry_hold_seconds(self) -> float:
        """With ASR_RETRY_ON_TIMEOUT: every retry waits out a hold first."""
        return (self.attempts - 1) * self.retry_hold

    @property
    def retry_delay_seconds(self) -> float:
        return sum(self.retry_delays)

    @property
    def retry_delay_seconds_with_retry_after(self) -> float:
        return sum(self.retry_delays_with_retry_after)

    @property
    def worst_case(self) -> float:
        """Seconds until the answer when the Whisper server sends no Retry-After."""
        return self._fixed + self.retry_delay_seconds

    @property
    def worst_case_with_retry_after(self) -> float:
        """The upper bound: as `worst_case`, every retry delay raised to the Retry-After cap."""
        return self._fixed + self.retry_delay_seconds_with_retry_after

    @property
    def _fixed(self) -> float:
        return (
            self.queue_timeout
            + self.oom_cooldown
            + self.attempts_seconds
            + self.retry_slot_wait_seconds
            + self.retry_hold_seconds
        )

    def limit(self, *, upstream_retry_after: bool = True) -> float:
        """The worst case a proxy timeout must exceed (`upstream_retry_after`: include the cap)."""
        return self.worst_case_with_retry_after if upstream_retry_after else self.worst_case

    def covered_by(self, proxy_timeout: float, *, upstream_retry_after: bool = True) -> bool:
        """True when a proxy waiting `proxy_timeout` seconds never gives up before the task."""
        return proxy_timeout > self.limit(upstream_retry_after=upstream_retry_after)


def task_budget(
    *,
    queue_timeout: float,
    request_timeout: float,
    max_retries: int,
    retry_delay: float,
    retry_jitter: float,
    oom_cooldown: float,
    retry_on_timeout: bool = False,
    timeout_hold: float = 0.0,
) -> TaskBudget:
    """The worst case of one task for these settings (plain numbers, as in Settings)."""
    policy = RetryPolicy(
        max_retries=max_retries, base=retry_delay, jitter=retry_jitter, retry_on_timeout=True
    )
    delays = tuple(
        max(policy.delay(outcome, k, unit_random=1.0) for outcome in _RETRIED)
        for k in range(1, max_retries + 1)
    )
    capped = tuple(
        max(
            policy.delay(outcome, k, unit_random=1.0, upstream_retry_after=RETRY_AFTER_CAP)
            for outcome in _RETRIED
        )
        for k in range(1, max_retries + 1)
    )
    return TaskBudget(
        queue_timeout=queue_timeout,
        oom_cooldown=oom_cooldown,
        attempts=max_retries + 1,
        request_timeout=request_timeout,
        retry_delays=delays,
        retry_delays_with_retry_after=capped,
        retry_hold=timeout_hold if retry_on_timeout else 0.0,
    )


def from_settings(settings: "Settings") -> TaskBudget:
    """The worst case of one task under the gatekeeper's settings."""
    return task_budget(
        queue_timeout=settings.queue_timeout,
        request_timeout=settings.request_timeout,
        max_retries=settings.max_retries,
        retry_delay=settings.retry_delay,
        retry_jitter=settings.retry_jitter,
        oom_cooldown=settings.oom_cooldown_s,
        retry_on_timeout=settings.retry_on_timeout,
        timeout_hold=settings.timeout_hold_s,
    )
