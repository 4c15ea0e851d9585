"""`gatekeeper tune`'s decisions without sockets: when to stop climbing, what to recommend.

And what a level's p50/p95 mean: the nearest rank over its successes, as in `/stats`.
"""

import pytest

from gatekeeper.commands.tune.decide import (
    LevelResult,
    Recommendation,
    TaskSample,
    pool_setting,
    recommend,
    stop_reason,
    summarize,
)
from gatekeeper.policy.outcomes import AttemptOutcome
from gatekeeper.policy.quantiles import percentile


def _level(level: int, goodput: float, *, sent: int = 8, **failures: int) -> LevelResult:
    """A level whose tasks all succeeded unless `failures` says otherwise."""
    counts = {"oom": 0, "crash": 0, "error": 0, "timeout": 0, "client_error": 0, **failures}
    return LevelResult(
        level=level,
        planned=sent,
        sent=sent,
        ok=sent - sum(counts.values()),
        p50=1.0,
        p95=1.0,
        wall_seconds=60.0,
        audio_seconds_ok=goodput * 60.0,
        **counts,
    )


# -- the rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("previous", "current", "reason"),
    [
        (None, _level(1, 10.0), None),
        (_level(1, 10.0), _level(2, 13.0), None),
        (_level(1, 10.0), _level(2, 10.5), None),  # exactly +5 %: still worth it
        (_level(1, 10.0), _level(2, 10.4), "no_gain"),
        (_level(2, 13.0), _level(3, 12.0), "no_gain"),
        (_level(3, 16.0), _level(4, 20.0, oom=1), "oom"),
        (_level(3, 16.0), _level(4, 20.0, error=1), "server_error"),
        (_level(3, 16.0), _level(4, 20.0, crash=2), "server_error"),
        (_level(3, 16.0), _level(4, 20.0, timeout=1), "timeout"),
        (None, _level(1, 0.0, client_error=8), "client_error"),
    ],
)
def test_stop_rule(previous: LevelResult | None, current: LevelResult, reason: str | None) -> None:
    """Climbing stops at any OOM, 5xx, crash, timeout or 4xx, or at less than 5 % more goodput."""
    assert stop_reason(previous, current) == reason


@pytest.mark.parametrize(
    ("levels", "expected", "words"),
    [
        ([_level(1, 10), _level(2, 13), _level(3, 16), _level(4, 0, sent=4, oom=1)], 3, "4 at a"),
        ([_level(1, 10), _level(2, 13), _level(3, 16), _level(4, 15.8)], 3, "less than 5% (-1%)"),
        ([_level(1, 10), _level(2, 13), _level(3, 16), _level(4, 16.5)], 3, "4 at a time was only"),
        ([_level(1, 10), _level(2, 13), _level(3, 13.5), _level(4, 13.2)], 2, "only +4% faster"),
        ([_level(1, 10), _level(2, 0, sent=2, oom=1)], 1, "failed (1 OOM in 2 tasks)"),
        ([_level(1, 10), _level(2, 13)], 2, "--max-level 2 reached"),
        ([_level(1, 0, sent=1, oom=1)], None, "even one task at a time failed (1 OOM"),
        ([_level(1, 0, sent=1, error=1)], None, "1 5xx in 1 tasks"),
    ],
)
def test_recommendation(levels: list[LevelResult], expected: int | None, words: str) -> None:
    """The lowest clean level within 5 % of the best goodput is recommended, with a reason."""
    rec = recommend(levels, max_level=2)
    assert rec.max_concurrent == expected
    assert words in rec.reason


# -- one level's summary -----------------------------------------------------------------------


def test_level_latency_is_the_nearest_rank_over_successes() -> None:
    """A level's p50/p95 are measured durations of its successes (an OOM's quick answer is left
    out), at the nearest rank — the same numbers `/stats` gives for the same durations."""
    ok = [TaskSample(AttemptOutcome.OK, float(s), 300.0) for s in range(1, 21)]
    oom = TaskSample(AttemptOutcome.OOM, 0.01, 300.0, status=500)
    result = summarize(4, [*ok, oom], planned=24, wall_seconds=60.0)
    assert (result.p50, result.p95) == (10.0, 19.0)  # interpolating would give 10.5 and 19.05
    durations = tuple(float(s) for s in range(1, 21))
    assert (result.p50, result.p95) == (percentile(durations, 0.5), percentile(durations, 0.95))
    assert (result.sent, result.ok, result.oom, result.planned) == (21, 20, 1, 24)
    assert result.goodput == pytest.approx(20 * 300.0 / 60.0)


def test_a_level_without_successes_has_no_latency() -> None:
    """Only failures: no p50/p95 and no goodput, and the level is not clean."""
    failed = [TaskSample(AttemptOutcome.TIMEOUT, 600.0, 300.0)]
    result = summarize(1, failed, planned=1, wall_seconds=600.0)
    assert (result.p50, result.p95, result.goodput, result.clean) == (None, None, 0.0, False)


# -- a pool (#15) ------------------------------------------------------------------------------


def test_a_pool_gets_one_value_per_card_in_order() -> None:
    """Each card's own recommendation, in ASR_UPSTREAM_URL's order, even when they agree."""
    cards = [recommend([_level(1, 1.0), _level(2, 2.0), _level(3, 3.0, oom=1)])]
    cards.append(recommend([_level(1, 1.0), _level(2, 0.9)]))
    cards.append(Recommendation(2, "measured elsewhere"))
    assert pool_setting(cards) == "2,1,2"
    assert pool_setting([Recommendation(3, "a"), Recommendation(3, "b")]) == "3,3"


def test_a_pool_with_a_card_without_a_recommendation_has_no_setting() -> None:
    """A card that failed even at one task leaves the pool without a setting: its limit is
    never guessed."""
    failed = recommend([_level(1, 0.0, oom=8)])
    assert failed.max_concurrent is None
    assert pool_setting([Recommendation(3, "fits three"), failed]) is None
    assert pool_setting([]) is None
