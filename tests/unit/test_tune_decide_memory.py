"""`gatekeeper tune`'s memory figures (#16) without sockets: from "c of these fitted at once,
c + 1 ran out of memory" to ASR_TASK_MEMORY_GIB and ASR_TASK_MEMORY_PER_MINUTE_GIB; the lines
and the pool's settings."""

import argparse
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatekeeper.commands.tune.args import TuneConfig, add_tune_arguments, config_from_args
from gatekeeper.commands.tune.decide import LevelResult, Recommendation
from gatekeeper.commands.tune.memory import (
    MARGIN,
    DurationBound,
    MemoryFigures,
    bound_from_levels,
    memory_figures,
    pool_memory_settings,
    recommend_memory,
)
from gatekeeper.commands.tune.report import (
    PoolReport,
    TuneReport,
    markdown_report,
    memory_lines,
    pool_lines,
)

# The simulator's default card: 24 GiB, 6 reserved, a task 2 GiB + 0.8 GiB per audio minute.
CARD = 18.0
TRUE_BASE, TRUE_PER_MINUTE = 2.0, 0.8


def _level(level: int, **failures: int) -> LevelResult:
    counts = {"oom": 0, "crash": 0, "error": 0, "timeout": 0, "client_error": 0, **failures}
    return LevelResult(
        level=level,
        planned=level,
        sent=level,
        ok=level - sum(counts.values()),
        p50=1.0,
        p95=1.0,
        wall_seconds=1.0,
        audio_seconds_ok=60.0,
        **counts,
    )


def _measured(
    seconds: float, base: float, per_minute: float, *, budget: float = CARD, max_level: int = 8
) -> DurationBound:
    """What a climb of one length would show on a card whose tasks truly cost this much."""
    cost = base + per_minute * seconds / 60.0
    fits = math.floor((budget + 1e-9) / cost)
    if fits >= max_level:
        return DurationBound(seconds, max_level, None, "max_level")
    return DurationBound(seconds, fits, fits + 1, "oom")


def _explains(
    figures: MemoryFigures, bound: DurationBound, budget: float = CARD, *, margin: float = 0.0
) -> bool:
    """The figures admit what fitted and keep out what ran out of memory (with `margin` to
    spare, as far as what fitted leaves room for it)."""
    cost = figures.cost(bound.minutes)
    if bound.fitted and bound.fitted * cost > budget + 1e-9:
        return False
    if bound.oom_at is None:
        return True
    need = budget * (1 + margin)
    if bound.fitted:
        need = min(need, budget * bound.oom_at / bound.fitted)
    return bound.oom_at * cost > budget and bound.oom_at * cost >= need - 1e-9


# -- one climb's bound ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("levels", "fitted", "oom_at"),
    [
        ([_level(n) for n in range(1, 7)] + [_level(7, oom=1)], 6, 7),
        ([_level(1), _level(2), _level(3, error=1)], 2, None),  # a 5xx: no memory bound
        ([_level(1, oom=1)], 0, 1),  # not even one fits
        ([_level(n) for n in range(1, 9)], 8, None),  # --max-level: more may fit
        ([], 0, None),
    ],
)
def test_a_climb_gives_the_most_that_fitted_and_the_first_oom(
    levels: list[LevelResult], fitted: int, oom_at: int | None
) -> None:
    bound = bound_from_levels(60.0, levels, "oom")
    assert (bound.fitted, bound.oom_at, bound.minutes) == (fitted, oom_at, 1.0)


# -- the figures ----------------------------------------------------------------------------------


def test_two_lengths_on_the_simulators_card_give_a_line_through_what_fitted() -> None:
    """1 min: 6 fitted, 7 ran out; 5 min: 3 fitted, 4 ran out. Each length is costed at what
    fitted (18 ÷ 6 = 3 GiB, 18 ÷ 3 = 6 GiB): 2.25 + 0.75 × minutes. The truth, 2 + 0.8, costs a
    1-minute file 2.8 GiB: whole tasks cannot tell 2.8 from 3 (six of either fit, seven do not),
    so the figures are off by that 0.2 GiB at 1 minute, spread over the 4 minutes between the
    lengths: 0.05 per minute, 0.25 on the base."""
    bounds = [DurationBound(60.0, 6, 7), DurationBound(300.0, 3, 4)]
    figures = memory_figures(bounds, CARD)
    assert figures == MemoryFigures(2.25, 0.75)
    assert figures.base_gib == pytest.approx(TRUE_BASE, abs=0.25 + 1e-9)
    assert figures.per_minute_gib == pytest.approx(TRUE_PER_MINUTE, abs=0.05 + 1e-9)
    assert all(_explains(figures, b, margin=MARGIN) for b in bounds)


def test_the_smallest_figures_that_explain_the_ooms_would_let_long_files_run_out() -> None:
    """Why each length is costed at the top of what it showed, not at the bottom: the line
    through the bottoms (just enough to keep the OOMed sets out) costs a 10-minute file 7.3 GiB,
    and two of them (truly 20 GiB) would be let onto the 18 GiB card."""
    bottom_1 = CARD * (1 + MARGIN) / 7
    bottom_5 = CARD * (1 + MARGIN) / 4
    per_minute = (bottom_5 - bottom_1) / 4
    smallest = MemoryFigures(bottom_1 - per_minute, per_minute)
    assert 2 * smallest.cost(10) <= CARD < 2 * (TRUE_BASE + TRUE_PER_MINUTE * 10)
    chosen = memory_figures([DurationBound(60.0, 6, 7), DurationBound(300.0, 3, 4)], CARD)
    assert chosen is not None
    assert 2 * chosen.cost(10) > CARD  # one 10-minute file at a time, as on the real card


@pytest.mark.parametrize(
    ("fitted", "oom_at", "budget", "base"),
    [(3, 4, 18.0, 6.0), (1, 2, 9.0, 9.0), (8, None, 18.0, 2.25), (2, 3, 12.0, 6.0)],
)
def test_one_length_gives_no_per_minute_and_the_budget_over_what_fitted(
    fitted: int, oom_at: int | None, budget: float, base: float
) -> None:
    """With one length nothing tells the base from the per-minute part: per minute 0 (the
    smallest), base = budget ÷ the highest level that fitted."""
    figures = memory_figures([DurationBound(300.0, fitted, oom_at)], budget)
    assert figures == MemoryFigures(base, 0.0)


def test_three_lengths_are_explained_and_land_near_the_truth() -> None:
    """60, 300 and 600 s on the simulator's card: no line goes through the top of all three
    (a 10-minute file fits only alone: its cost is known only between 9 and 18 GiB), so each
    length is kept as near what fitted as the others allow; every success and OOM explained."""
    bounds = [_measured(s, TRUE_BASE, TRUE_PER_MINUTE) for s in (60.0, 300.0, 600.0)]
    assert [(b.fitted, b.oom_at) for b in bounds] == [(6, 7), (3, 4), (1, 2)]
    figures = memory_figures(bounds, CARD)
    assert figures is not None
    assert figures.consistent
    assert all(_explains(figures, b, margin=MARGIN) for b in bounds)
    assert figures.base_gib == pytest.approx(TRUE_BASE, abs=0.25)
    assert figures.per_minute_gib == pytest.approx(TRUE_PER_MINUTE, abs=0.05)


@settings(max_examples=300, deadline=None)
@given(
    base=st.floats(0.1, 8.0),
    per_minute=st.floats(0.0, 3.0),
    budget=st.floats(6.0, 80.0),
    seconds=st.lists(
        st.sampled_from([10.0, 30.0, 60.0, 120.0, 300.0, 600.0]),
        min_size=1,
        max_size=4,
        unique=True,
    ),
)
def test_figures_explain_every_success_and_every_oom(
    base: float, per_minute: float, budget: float, seconds: list[float]
) -> None:
    """Whatever a card truly costs, the figures from its measured levels admit every set that
    fitted and keep out every set that ran out of memory, even after rounding down (a line,
    the truth, explains them all, so they are never reported inconsistent)."""
    bounds = [_measured(s, base, per_minute, budget=budget) for s in seconds]
    figures = memory_figures(bounds, budget)
    if not any(b.fitted for b in bounds):
        assert figures is None
        return
    assert figures is not None
    assert figures.consistent
    assert min(figures.base_gib, figures.per_minute_gib) >= 0
    assert all(_explains(figures, b, budget) for b in bounds)


def test_lengths_that_fit_no_line_keep_every_oom_out() -> None:
    """A longer file that fitted more often than a shorter one (a server skipping silence)
    fits no line with a per-minute part ≥ 0: every OOM is still explained, and fewer tasks
    than fitted are allowed (the safe side); the reason says so."""
    bounds = [DurationBound(60.0, 3, 4), DurationBound(300.0, 6, 7)]
    figures = memory_figures(bounds, CARD)
    assert figures is not None
    assert not figures.consistent
    assert all(b.oom_at is not None and b.oom_at * figures.cost(b.minutes) > CARD for b in bounds)
    assert 6 * figures.cost(5) > CARD  # the six 5-minute files are not all admitted
    reason = recommend_memory(bounds, CARD, "/sim/state").reason
    assert "do not fit one line" in reason


def test_the_margin_shrinks_to_what_the_measurements_leave() -> None:
    """5 + 2 GiB per minute on 27 GiB: four 1-minute files (28 GiB) ran out by under 4 %, and the
    lengths around them leave no room for 5 %: the figures still keep those four out."""
    bounds = [_measured(s, 5.0, 2.0, budget=27.0) for s in (10.0, 60.0, 120.0)]
    figures = memory_figures(bounds, 27.0)
    assert figures is not None
    assert figures.consistent
    assert all(_explains(figures, b, 27.0) for b in bounds)
    assert not all(_explains(figures, b, 27.0, margin=MARGIN) for b in bounds)


def test_a_length_that_never_fits_is_costed_above_the_card() -> None:
    """A 10-minute file that ran out of memory alone must cost more than the card; with no
    length that fitted there is nothing to recommend."""
    bounds = [DurationBound(60.0, 6, 7), DurationBound(600.0, 0, 1)]
    figures = memory_figures(bounds, CARD)
    assert figures is not None
    assert figures.cost(10) > CARD
    assert memory_figures([DurationBound(600.0, 0, 1)], CARD) is None
    nothing = recommend_memory([DurationBound(600.0, 0, 1)], CARD, "/sim/state")
    assert (nothing.figures, nothing.settings, nothing.max_concurrent) == (None, None, None)
    assert nothing.reason.startswith("no figures: no length fitted even alone")


# -- the recommendation ---------------------------------------------------------------------------


def test_the_recommendation_carries_the_line_to_copy_and_the_cap() -> None:
    """The settings line, with ASR_MAX_CONCURRENT as a cap only: the most that fitted at once."""
    rec = recommend_memory(
        [DurationBound(60.0, 6, 7), DurationBound(300.0, 3, 4)], CARD, "/sim/state", max_level=8
    )
    assert rec.settings == (
        "ASR_GPU_MEMORY_GIB=18 ASR_TASK_MEMORY_GIB=2.25 ASR_TASK_MEMORY_PER_MINUTE_GIB=0.75 "
        "ASR_MAX_CONCURRENT=6"
    )
    assert "1 min: 6 fitted at once, 7 ran out of memory" in rec.reason
    assert "5 min: 3 fitted at once, 4 ran out of memory" in rec.reason
    assert "ASR_MAX_CONCURRENT 6 only caps" in rec.reason
    document = rec.to_json()
    assert document["task_memory_gib"] == 2.25
    assert document["gpu_memory_from"] == "/sim/state"
    assert document["per_gib_of_budget"] is None
    assert document["durations"] == [
        {"audio_seconds": 60.0, "fitted": 6, "oom_at": 7, "stopped_because": None},
        {"audio_seconds": 300.0, "fitted": 3, "oom_at": 4, "stopped_because": None},
    ]
    [line, why] = memory_lines(rec)[1:]
    assert line == rec.settings
    assert why.startswith("  why: 1 min:")


def test_a_length_that_fits_only_alone_is_called_coarse() -> None:
    rec = recommend_memory([DurationBound(60.0, 6, 7), DurationBound(600.0, 1, 2)], CARD, None)
    assert "10 min fitted only alone, which says little" in rec.reason


def test_the_max_level_reached_is_said() -> None:
    rec = recommend_memory([DurationBound(10.0, 8, None, "max_level")], CARD, None, max_level=8)
    assert "--max-level 8 reached: more may fit" in rec.reason


def test_without_the_budget_the_figures_are_per_gib_of_it() -> None:
    """A real server cannot say how much memory it leaves to tasks: the figures are given per
    GiB of it (the levels do not depend on it), and the operator is told to give it."""
    bounds = [DurationBound(60.0, 6, 7), DurationBound(300.0, 3, 4)]
    rec = recommend_memory(bounds, None, None)
    assert (rec.figures, rec.settings, rec.budget_from) == (None, None, None)
    assert rec.per_budget is not None
    assert rec.per_budget.base_gib * CARD == pytest.approx(2.25)
    assert rec.per_budget.per_minute_gib * CARD == pytest.approx(0.75)
    [first, _] = memory_lines(rec)
    assert "give --gpu-memory-gib" in first
    assert "ASR_TASK_MEMORY_GIB = 0.125 × it" in first
    assert rec.to_json()["per_gib_of_budget"] == {
        "task_memory_gib": 0.125,
        "task_memory_per_minute_gib": 0.041667,
    }


def test_a_pool_card_gets_its_values_without_a_line_to_copy() -> None:
    rec = recommend_memory([DurationBound(300.0, 2, 3)], 12.0, "--gpu-memory-gib")
    [line, _] = memory_lines(rec, card="gpu1:9000")
    assert line.startswith("gpu1:9000 by memory: 12 GiB free (from --gpu-memory-gib); a task 6 GiB")
    assert "ASR_MAX_CONCURRENT=" not in line


def test_the_pool_line_has_one_value_per_card_or_one_for_all() -> None:
    big = recommend_memory([DurationBound(60.0, 6, 7), DurationBound(300.0, 3, 4)], 18.0, None)
    small = recommend_memory([DurationBound(60.0, 3, 4), DurationBound(300.0, 1, 2)], 9.0, None)
    assert pool_memory_settings([big, small]) == (
        "ASR_GPU_MEMORY_GIB=18,9 ASR_TASK_MEMORY_GIB=2.25,1.5 "
        "ASR_TASK_MEMORY_PER_MINUTE_GIB=0.75,1.5 ASR_MAX_CONCURRENT=6,3"
    )
    assert pool_memory_settings([big, big]) == (
        "ASR_GPU_MEMORY_GIB=18 ASR_TASK_MEMORY_GIB=2.25 ASR_TASK_MEMORY_PER_MINUTE_GIB=0.75 "
        "ASR_MAX_CONCURRENT=6"
    )
    unknown = recommend_memory([DurationBound(300.0, 3, 4)], None, None)
    assert pool_memory_settings([big, unknown]) is None
    assert pool_memory_settings([big, None]) is None
    assert pool_memory_settings([]) is None


# -- the flag -------------------------------------------------------------------------------------


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_tune_arguments(parser)
    return parser.parse_args(list(argv))


def test_gpu_memory_is_one_value_for_all_cards_or_one_per_card() -> None:
    one = config_from_args(_args("http://a,http://b", "--gpu-memory-gib", "18"))
    assert [one.gpu_memory_for(u) for u in one.urls] == [18.0, 18.0]
    each = config_from_args(_args("http://a,http://b", "--gpu-memory-gib", "18,9.5"))
    assert [each.gpu_memory_for(u) for u in each.urls] == [18.0, 9.5]
    assert config_from_args(_args("http://a")).gpu_memory_for("http://a") is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("x", "GiB separated by commas"),
        ("0", "more than 0 GiB"),
        ("nan", "more than 0 GiB"),
        ("18,9,6", "3 values for 2 card(s)"),
    ],
)
def test_bad_gpu_memory_is_refused(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_args(_args("http://a,http://b", "--gpu-memory-gib", value))


def test_a_pool_with_a_card_of_unknown_memory_has_no_memory_line() -> None:
    """The count still gets its pool line; the memory line needs every card's budget."""
    config = TuneConfig(urls=("http://a:1", "http://b:1"), api="asr", audio=())
    count = Recommendation(3, "3 at a time moved the most")
    known = recommend_memory([DurationBound(300.0, 3, 4)], 18.0, "--gpu-memory-gib")
    unknown = recommend_memory([DurationBound(300.0, 3, 4)], None, None)
    cards = tuple(
        TuneReport(config, url, "2026-01-01T00:00:00", (), "oom", count, memory)
        for url, memory in zip(config.urls, (known, unknown), strict=True)
    )
    pool = PoolReport(config, "2026-01-01T00:00:00", cards)
    lines = pool_lines(pool)
    assert "ASR_MAX_CONCURRENT=3,3" in lines
    assert lines[-1].startswith("  no memory settings for the pool: no figures for b:1 (give")
    document = pool.to_json()["recommendation"]
    assert isinstance(document, dict)
    assert document["memory"]["settings"] is None
    assert document["memory"]["task_memory_gib"] == [6.0, None]
    markdown = markdown_report(pool)
    assert "no memory settings for the pool" in markdown
    assert "18 GiB free, a task 6 GiB + 0 GiB per audio minute, at most 3 at once." in markdown
    assert "the card's free memory is unknown" in markdown
