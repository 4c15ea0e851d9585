"""Pure retry policy: whether to try again after an attempt, and how long to wait first.

The schedule is one function of (outcome, retry number) → delay; the caller does the waiting.
Delays derive from the one base `ASR_RETRY_DELAY` d (SPEC "Outcomes, retries, delays"):
- `oom` and `crash`: d × 3^(k−1) → 10, 30, 90 s at d = 10 (the GPU or container needs time);
- `error`: d/2 × 2^(k−1) → 5, 10, 20 s at d = 10.
"""

from collections.abc import Callable
from dataclasses import dataclass

from gatekeeper.policy.outcomes import AttemptOutcome

__all__ = ["RETRY_AFTER_CAP", "RetryPolicy", "base_delay", "parse_retry_after"]

RETRY_AFTER_CAP = 300.0

_RETRYABLE = frozenset({AttemptOutcome.OOM, AttemptOutcome.CRASH, AttemptOutcome.ERROR})


def base_delay(outcome: AttemptOutcome, retry_number: int, base: float) -> float:
    """The delay before retry `retry_number` (1, 2, 3, …) after `outcome`, before jitter."""
    k = max(1, retry_number)
    if outcome in (AttemptOutcome.OOM, AttemptOutcome.CRASH):
        return float(base * 3 ** (k - 1))
    return float(base / 2 * 2 ** (k - 1))


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from an upstream `Retry-After` given in seconds; None when absent or a date.

    HTTP dates are rare from Whisper servers and would need a wall clock to interpret; they are
    ignored rather than guessed at.
    """
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if seconds != seconds or seconds < 0:  # NaN or negative
        return None
    return seconds


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how long to wait before another attempt of the same task."""

    max_retries: int
    base: float
    jitter: float
    retry_on_timeout: bool = False

    def should_retry(self, outcome: AttemptOutcome, attempts_done: int) -> bool:
        """True when `outcome` of attempt number `attempts_done` earns another attempt."""
        if attempts_done > self.max_retries:
            return False
        if outcome is AttemptOutcome.TIMEOUT:
            return self.retry_on_timeout
        return outcome in _RETRYABLE

    def next_delay(
        self,
        outcome: AttemptOutcome,
        attempts_done: int,
        *,
        client_gone: bool,
        unit_random: Callable[[], float],
        upstream_retry_after: float | None = None,
    ) -> float | None:
        """The one decision after an attempt: None to deliver its answer (a success, a client
        error, a failure not worth another try, no retries left, or nobody left to answer),
        else the seconds to wait before the next attempt. `unit_random` is drawn only then."""
        if client_gone or not self.should_retry(outcome, attempts_done):
            return None
        return self.delay(
            outcome,
            attempts_done,
            unit_random=unit_random(),
            upstream_retry_after=upstream_retry_after,
        )

    def delay(
        self,
        outcome: AttemptOutcome,
        retry_number: int,
        *,
        unit_random: float,
        upstream_retry_after: float | None = None,
    ) -> float:
        """Seconds to wait before retry `retry_number`.

        `unit_random` is a uniform sample from [0, 1] supplied by the caller (injected
        randomness); it becomes the jitter factor uniform(1 − j, 1 + j). An upstream Retry-After
        raises the delay to at least its value, capped at 300 s.
        """
        # A timed-out attempt that is retried waits like a crash: the GPU may still be busy.
        kind = AttemptOutcome.CRASH if outcome is AttemptOutcome.TIMEOUT else outcome
        factor = 1.0 - self.jitter + 2.0 * self.jitter * min(1.0, max(0.0, unit_random))
        seconds = base_delay(kind, retry_number, self.base) * factor
        if upstream_retry_after is not None:
            seconds = max(seconds, min(upstream_retry_after, RETRY_AFTER_CAP))
        return seconds
