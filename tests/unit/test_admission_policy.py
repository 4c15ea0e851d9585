"""The pure admission policy: start, queue or refuse, and the Retry-After estimate."""

import pytest

from gatekeeper.policy.admission import (
    Decision,
    ServiceTimeEstimate,
    decide,
    estimate_retry_after,
    queue_usage,
)
from gatekeeper.policy.outcomes import RejectReason

Q, T, S = RejectReason.QUEUE_FULL, RejectReason.QUEUE_TIMEOUT, RejectReason.SHUTTING_DOWN


@pytest.mark.parametrize(
    ("active", "queued", "limit", "max_queue", "shutting", "decision", "reason"),
    [
        (0, 0, 1, 10, False, Decision.START, None),
        (1, 0, 2, 10, False, Decision.START, None),
        (1, 0, 1, 10, False, Decision.QUEUE, None),
        (0, 1, 1, 10, False, Decision.QUEUE, None),  # a free slot, but someone waits first
        (2, 19, 2, 20, False, Decision.QUEUE, None),
        (2, 20, 2, 20, False, Decision.REJECT, Q),
        (1, 0, 1, 0, False, Decision.REJECT, Q),  # no queue at all
        (0, 0, 1, 0, False, Decision.START, None),
        (5, 0, 2, 10, False, Decision.QUEUE, None),  # limit lowered below the running count
        (0, 0, 1, 10, True, Decision.REJECT, S),
    ],
)
def test_decide(
    active: int,
    queued: int,
    limit: int,
    max_queue: int,
    shutting: bool,
    decision: Decision,
    reason: RejectReason | None,
) -> None:
    """Each situation gives the one decision a fair FIFO gate must make."""
    result = decide(
        active=active, queued=queued, limit=limit, max_queue=max_queue, shutting_down=shutting
    )
    assert (result.decision, result.reason) == (decision, reason)
    assert (result.active, result.queued) == (active, queued)


@pytest.mark.parametrize(
    ("queued", "max_queue", "text"),
    [
        (3, 20, "3/20 (15%)"),
        (20, 20, "20/20 (100%)"),
        (0, 10, "0/10 (0%)"),
        (1, 3, "1/3 (33%)"),
        (2, 3, "2/3 (67%)"),
        (0, 0, "0/0 (100%)"),
    ],
)
def test_queue_usage_matches_the_seed_format(queued: int, max_queue: int, text: str) -> None:
    """queue_usage is "queued/max (p%)" with p rounded to a whole number."""
    assert queue_usage(queued, max_queue) == text


@pytest.mark.parametrize(
    ("reason", "mean", "limit", "queued", "expected"),
    [
        (Q, 24.0, 2, 20, 12),  # one slot frees every 12 s on average
        (Q, 30.0, 1, 10, 30),
        (Q, 0.2, 4, 0, 1),  # never below 1
        (Q, 10_000.0, 1, 5, 120),  # never above 120
        (T, 10.0, 2, 3, 20),  # the queue ahead must drain: (3 + 1) × 5 s
        (S, 9.0, 3, 7, 3),
    ],
)
def test_retry_after_estimate(
    reason: RejectReason, mean: float, limit: int, queued: int, expected: int
) -> None:
    """Retry-After is the time until a slot or place likely frees, clamped to 1..120 s."""
    assert estimate_retry_after(reason=reason, mean_service=mean, limit=limit, queued=queued) == (
        expected
    )


def test_service_time_estimate_replaces_the_prior_and_then_smooths() -> None:
    """The first measurement replaces the prior; later ones move the mean part of the way."""
    estimate = ServiceTimeEstimate(30.0)
    first = estimate.observe(10.0)
    assert first.mean == 10.0
    assert first.samples == 1
    second = first.observe(20.0)
    assert second.mean == pytest.approx(12.0)
    assert second.samples == 2
