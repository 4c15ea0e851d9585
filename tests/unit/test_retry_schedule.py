"""The pure retry schedule: which outcomes retry, and the seed's delays."""

import pytest

from gatekeeper.policy.outcomes import AttemptOutcome as O
from gatekeeper.policy.retry import RetryPolicy, base_delay, parse_retry_after

POLICY = RetryPolicy(max_retries=3, base=10.0, jitter=0.0)


@pytest.mark.parametrize(
    ("outcome", "delays"),
    [(O.OOM, [10, 30, 90]), (O.CRASH, [10, 30, 90]), (O.ERROR, [5, 10, 20])],
)
def test_seed_delays_at_the_default_base(outcome: O, delays: list[float]) -> None:
    """At ASR_RETRY_DELAY=10: errors wait 5/10/20 s, OOM and crashes 10/30/90 s."""
    assert [base_delay(outcome, k, 10.0) for k in (1, 2, 3)] == delays


def test_delays_scale_with_the_base() -> None:
    """Every delay derives from the one base value."""
    assert [base_delay(O.OOM, k, 0.1) for k in (1, 2, 3)] == pytest.approx([0.1, 0.3, 0.9])
    assert [base_delay(O.ERROR, k, 0.1) for k in (1, 2, 3)] == pytest.approx([0.05, 0.1, 0.2])


@pytest.mark.parametrize("unit", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_jitter_stays_within_its_bounds(unit: float) -> None:
    """The jitter factor is uniform(1 − j, 1 + j): 0 maps to the low end, 1 to the high end."""
    policy = RetryPolicy(max_retries=3, base=10.0, jitter=0.1)
    delay = policy.delay(O.OOM, 2, unit_random=unit)
    assert 27.0 <= delay <= 33.0
    assert delay == pytest.approx(30.0 * (0.9 + 0.2 * unit))


def test_upstream_retry_after_raises_the_delay_up_to_a_cap() -> None:
    """An upstream Retry-After lengthens a short delay, never shortens, and is capped at 300 s."""
    assert POLICY.delay(O.ERROR, 1, unit_random=0.5, upstream_retry_after=12) == 12
    assert POLICY.delay(O.OOM, 3, unit_random=0.5, upstream_retry_after=1) == 90
    assert POLICY.delay(O.ERROR, 1, unit_random=0.5, upstream_retry_after=10_000) == 300


@pytest.mark.parametrize(
    ("outcome", "attempts", "expected"),
    [
        (O.OOM, 1, True),
        (O.CRASH, 3, True),
        (O.ERROR, 3, True),
        (O.ERROR, 4, False),  # 1 attempt + 3 retries used up
        (O.CLIENT_ERROR, 1, False),
        (O.OK, 1, False),
        (O.TIMEOUT, 1, False),
    ],
)
def test_which_outcomes_retry(outcome: O, attempts: int, expected: bool) -> None:
    """oom, crash and error retry up to ASR_MAX_RETRIES times; 4xx and timeouts never do."""
    assert POLICY.should_retry(outcome, attempts) is expected


def test_timeouts_retry_only_when_asked() -> None:
    """ASR_RETRY_ON_TIMEOUT=true makes timeouts retry, waiting like a crash."""
    policy = RetryPolicy(max_retries=1, base=10.0, jitter=0.0, retry_on_timeout=True)
    assert policy.should_retry(O.TIMEOUT, 1)
    assert not policy.should_retry(O.TIMEOUT, 2)
    assert policy.delay(O.TIMEOUT, 1, unit_random=0.5) == 10


def test_no_retries_when_max_is_zero() -> None:
    """ASR_MAX_RETRIES=0 never retries."""
    assert not RetryPolicy(max_retries=0, base=10, jitter=0).should_retry(O.OOM, 1)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("12", 12.0),
        (" 3.5 ", 3.5),
        (None, None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", None),
        ("-1", None),
        ("nan", None),
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    """Seconds are understood; dates, negatives and garbage are ignored."""
    assert parse_retry_after(value) == seconds


NEXT = RetryPolicy(max_retries=2, base=10, jitter=0, retry_on_timeout=False)


@pytest.mark.parametrize(
    ("outcome", "attempts_done", "client_gone", "expected"),
    [
        (O.OK, 1, False, None),
        (O.CLIENT_ERROR, 1, False, None),
        (O.TIMEOUT, 1, False, None),
        (O.OOM, 1, False, 10.0),
        (O.CRASH, 2, False, 30.0),
        (O.ERROR, 1, False, 5.0),
        (O.OOM, 3, False, None),  # no retries left
        (O.OOM, 1, True, None),  # nobody left to answer
    ],
)
def test_next_delay_is_the_one_decision_after_an_attempt(
    outcome: O, attempts_done: int, client_gone: bool, expected: float | None
) -> None:
    """Deliver (None) or retry after d, from the outcome, the attempt and the client alone."""
    draws: list[float] = []

    def unit_random() -> float:
        draws.append(0.5)
        return 0.5

    delay = NEXT.next_delay(
        outcome, attempts_done, client_gone=client_gone, unit_random=unit_random
    )
    assert delay == expected
    assert len(draws) == (0 if expected is None else 1)  # randomness only for a retry
