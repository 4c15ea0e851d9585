"""The adaptive limit: every OOM cuts it, stable stretches raise it, a ceiling forms where OOMs
of new tasks are the rule and goes as they age out, the rest is silent."""

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatekeeper.policy.adaptive import HISTORY_LENGTH, AdaptiveLimit, AdaptiveParams, LimitChange
from gatekeeper.policy.outcomes import AttemptOutcome
from gatekeeper.sim.memory import GpuCompute, GpuMemory

OK, OOM, CRASH = AttemptOutcome.OK, AttemptOutcome.OOM, AttemptOutcome.CRASH
SILENT = (AttemptOutcome.ERROR, AttemptOutcome.TIMEOUT, AttemptOutcome.CLIENT_ERROR)


@dataclass
class FakeTime:
    """A monotonic clock that moves only when told to."""

    t: float = 1_000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def _limit(initial: int = 2, **params: Any) -> tuple[AdaptiveLimit, FakeTime]:
    clock = FakeTime()
    values: dict[str, Any] = {"minimum": 1, "maximum": 8, **params}
    return AdaptiveLimit(AdaptiveParams(**values), initial=initial, now=clock), clock


def _stable_stretch(
    limit: AdaptiveLimit, clock: FakeTime, successes: int | None = None
) -> list[LimitChange]:
    """Feed `successes` (default: `stable_successes`) OKs at full load with a queue, spread
    evenly over `stable_seconds`."""
    if successes is None:
        successes = limit.params.stable_successes
    changes = []
    step = limit.params.stable_seconds / successes
    for _ in range(successes):
        clock.advance(step)
        change = limit.on_attempt(OK, in_flight=limit.limit, queue_waiting=True)
        if change is not None:
            changes.append(change)
    return changes


def _feed(
    limit: AdaptiveLimit,
    outcome: AttemptOutcome,
    in_flight: int,
    times: int,
    *,
    clock: FakeTime | None = None,
    every: float = 0.0,
    first_attempt: bool = True,
) -> list[LimitChange]:
    """`times` attempts ending with `outcome` at `in_flight`, `every` seconds apart."""
    changes = []
    for _ in range(times):
        if clock is not None:
            clock.advance(every)
        change = limit.on_attempt(
            outcome, in_flight=in_flight, queue_waiting=True, first_attempt=first_attempt
        )
        if change is not None:
            changes.append(change)
    return changes


# -- parameters -----------------------------------------------------------------------------


def test_defaults_are_the_measured_ones() -> None:
    """The defaults the docstring justifies: quick rises, a cut to 70 %, an hour's memory,
    and a ceiling only from five OOMs of new tasks making at least 35 % at a level."""
    p = AdaptiveParams()
    assert (p.minimum, p.maximum) == (1, 8)
    assert (p.stable_successes, p.stable_seconds) == (3, 30.0)
    assert (p.decrease_factor, p.fade_seconds, p.crash_holdoff_seconds) == (0.7, 3600.0, 300.0)
    assert (p.ceiling_ooms, p.ceiling_oom_share) == (5, 0.35)


@pytest.mark.parametrize(
    "params",
    [
        {"minimum": 0},
        {"minimum": 3, "maximum": 2},
        {"decrease_factor": 0.0},
        {"decrease_factor": 1.0},
        {"stable_successes": 0},
        {"stable_seconds": -1.0},
        {"fade_seconds": 0.0},
        {"crash_holdoff_seconds": -1.0},
        {"ceiling_ooms": 0},
        {"ceiling_oom_share": -0.01},
        {"ceiling_oom_share": 1.01},
        {"ceiling_oom_share": math.nan},
    ],
)
def test_bad_params_are_refused(params: dict[str, Any]) -> None:
    """Parameters that would break the rules are refused when built, naming the knob."""
    with pytest.raises(ValueError, match=next(iter(params))):
        AdaptiveParams(**params)


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_the_ceiling_share_bounds_are_allowed(share: float) -> None:
    """A share of 0 (the count alone decides) and of 1 (only a level that always OOMs) are
    valid settings."""
    assert AdaptiveParams(ceiling_oom_share=share, ceiling_ooms=1).ceiling_oom_share == share


@pytest.mark.parametrize("initial", [0, 9])
def test_initial_limit_must_be_within_bounds(initial: int) -> None:
    """The starting limit has to lie between the minimum and the maximum."""
    with pytest.raises(ValueError, match=r"outside 1\.\.8"):
        AdaptiveLimit(AdaptiveParams(maximum=8), initial=initial, now=FakeTime())


@pytest.mark.parametrize(
    ("limit", "factor", "minimum", "expected"),
    [
        (8, 0.7, 1, 5),
        (5, 0.7, 1, 3),
        (4, 0.7, 1, 2),
        (3, 0.7, 1, 2),
        (2, 0.7, 1, 1),
        (1, 0.7, 1, 1),  # never below the minimum
        (3, 0.7, 2, 2),
        (2, 0.7, 2, 2),
        (4, 0.9, 1, 3),  # a gentle factor still removes at least one slot
        (10, 0.5, 1, 5),
    ],
)
def test_decrease_is_multiplicative_at_least_one_and_bounded(
    limit: int, factor: float, minimum: int, expected: int
) -> None:
    """A cut is floor(limit × factor), at least one less than before, never below the minimum."""
    params = AdaptiveParams(minimum=minimum, maximum=10, decrease_factor=factor)
    assert params.decreased(limit) == expected


# -- OOM: down ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("initial", "in_flight", "new"),
    [
        (4, 4, 2),
        (8, 4, 5),  # cut from the limit, not from where it happened: no ceiling caps it
        (8, 8, 5),
        (3, 2, 2),
        (1, 1, 1),  # already at the minimum: nothing to cut
        (2, 1, 1),  # a file too big to run alone still leaves the minimum
    ],
)
def test_a_single_oom_cuts_but_teaches_no_ceiling(initial: int, in_flight: int, new: int) -> None:
    """One OOM at concurrency c <= limit cuts the limit multiplicatively; it is one unlucky mix,
    not evidence that c never fits, so no ceiling forms."""
    limit, clock = _limit(initial)
    change = limit.on_attempt(OOM, in_flight=in_flight, queue_waiting=False)
    assert limit.limit == new
    assert limit.ceiling is None
    if new == initial:
        assert change is None
    else:
        assert change == LimitChange(initial, new, f"oom_at_{in_flight}", clock.t)
        assert change.kind == "oom"


@pytest.mark.parametrize("first_attempt", [True, False])
def test_every_oom_within_the_limit_cuts_again(first_attempt: bool) -> None:
    """There is no holdoff for OOMs: each one at or below the limit cuts, down to the minimum,
    whether it ended a task's first attempt or a retry."""
    limit, clock = _limit(8)
    seen = []
    for _ in range(6):
        clock.advance(1)
        limit.on_attempt(
            OOM, in_flight=limit.limit, queue_waiting=True, first_attempt=first_attempt
        )
        seen.append(limit.limit)
    assert seen == [5, 3, 2, 1, 1, 1]
    assert [c.reason for c in limit.history] == ["oom_at_8", "oom_at_5", "oom_at_3", "oom_at_2"]
    assert limit.ceiling is None  # one OOM at each level: nowhere the rule


def test_oom_above_the_limit_only_restarts_the_stretch() -> None:
    """An OOM from an attempt that ran above the current limit (it started before an earlier
    cut) was answered by that cut: it cuts no more."""
    limit, clock = _limit(6)
    assert limit.on_attempt(OOM, in_flight=6, queue_waiting=True) is not None
    assert (limit.limit, limit.ceiling) == (4, None)
    # Tasks started before the cut end with OOMs at 6 and 5: no further cut.
    assert limit.on_attempt(OOM, in_flight=6, queue_waiting=True) is None
    assert limit.on_attempt(OOM, in_flight=5, queue_waiting=True, first_attempt=False) is None
    assert (limit.limit, limit.ceiling) == (4, None)
    assert limit.history == (LimitChange(6, 4, "oom_at_6", clock.t),)
    # An OOM at the current limit is news again.
    assert limit.on_attempt(OOM, in_flight=4, queue_waiting=True) is not None
    assert limit.limit == 2


def test_an_oom_restarts_the_stable_stretch() -> None:
    """Successes counted before an OOM do not count towards the next rise, not even when the
    OOM ran above the limit and cut nothing."""
    limit, clock = _limit(3)
    _stable_stretch(limit, clock, successes=limit.params.stable_successes - 1)
    assert limit.snapshot()["stable_successes"] == 2
    limit.on_attempt(OOM, in_flight=5, queue_waiting=True)  # above the limit: no cut
    assert limit.limit == 3
    assert limit.snapshot()["stable_successes"] == 0
    clock.advance(1_000)
    assert limit.on_attempt(OK, in_flight=3, queue_waiting=True) is None
    assert limit.snapshot()["stable_successes"] == 1


# -- stable: up by one ------------------------------------------------------------------------


def test_a_stable_stretch_raises_the_limit_by_one() -> None:
    """Three successes under backlog over thirty seconds raise the limit by exactly one."""
    limit, clock = _limit(2)
    changes = _stable_stretch(limit, clock)
    assert changes == [LimitChange(2, 3, "stable_at_2", clock.t)]
    assert limit.limit == 3
    # The next rise needs a whole new stretch at the new limit.
    clock.advance(limit.params.stable_seconds)
    assert limit.on_attempt(OK, in_flight=3, queue_waiting=True) is None
    assert limit.on_attempt(OK, in_flight=3, queue_waiting=True) is None
    assert limit.on_attempt(OK, in_flight=3, queue_waiting=True) == LimitChange(
        3, 4, "stable_at_3", clock.t
    )


def test_enough_successes_too_soon_wait_for_the_clock() -> None:
    """Many quick successes raise nothing before thirty seconds; `tick` raises it then."""
    limit, clock = _limit(2)
    for _ in range(20):
        clock.advance(1)
        assert limit.on_attempt(OK, in_flight=2, queue_waiting=True) is None
    assert limit.tick() is None
    clock.advance(9.5)  # 29.5 s at this limit
    assert limit.tick() is None
    clock.advance(0.5)
    assert limit.tick() == LimitChange(2, 3, "stable_at_2", clock.t)


def test_a_long_time_with_too_few_successes_raises_nothing() -> None:
    """Hours at a limit are not enough: the successes must be there too."""
    limit, clock = _limit(2)
    _stable_stretch(limit, clock, successes=limit.params.stable_successes - 1)
    clock.advance(10 * 3600)
    assert limit.tick() is None
    assert limit.on_attempt(OK, in_flight=2, queue_waiting=True) is not None


@pytest.mark.parametrize(
    ("in_flight", "queue_waiting"),
    [
        (2, False),  # no backlog: a higher limit would not have helped
        (1, True),  # a slot idle (e.g. held through a retry delay): the limit was not tested
    ],
)
def test_successes_that_prove_nothing_do_not_count(in_flight: int, queue_waiting: bool) -> None:
    """Only a success at full load with tasks waiting counts towards a rise."""
    limit, clock = _limit(2)
    for _ in range(100):
        clock.advance(10)
        assert limit.on_attempt(OK, in_flight=in_flight, queue_waiting=queue_waiting) is None
    assert limit.limit == 2
    assert limit.snapshot()["stable_successes"] == 0


def test_the_limit_never_rises_above_the_maximum() -> None:
    """A stable stretch at the maximum changes nothing."""
    limit, clock = _limit(3, maximum=3)
    assert _stable_stretch(limit, clock, successes=50) == []
    clock.advance(3600)
    assert limit.tick() is None
    assert limit.limit == 3


# -- the ceiling: where OOMs of new tasks are the rule ----------------------------------------


@pytest.mark.parametrize(
    ("ooms", "oks", "ceiling"),
    [
        (4, 0, None),  # one short of ceiling_ooms, however high the share
        (5, 0, 3),
        (5, 9, 3),  # 5 of 14 = 36 % >= 35 %
        (5, 10, None),  # 5 of 15 = 33 %: the level mostly works
        (5, 100, None),  # many successes at the level keep the share low
        (20, 37, 3),  # 20 of 57 = 35.1 %
        (20, 38, None),  # 20 of 58 = 34.5 %
    ],
)
def test_repeated_ooms_of_new_tasks_at_a_level_teach_a_ceiling(
    ooms: int, oks: int, ceiling: int | None
) -> None:
    """A level c where at least `ceiling_ooms` first attempts OOMed, making at least
    `ceiling_oom_share` of the first attempts that ended at c, gets the ceiling c − 1."""
    limit, clock = _limit(8)
    _feed(limit, OK, 4, oks, clock=clock, every=1)
    cuts = _feed(limit, OOM, 4, ooms, clock=clock, every=1)
    # The first two cut (8 → 5 → 3); the rest ran above the limit and only add evidence.
    assert [(c.old, c.new) for c in cuts] == [(8, 5), (5, 3)]
    assert limit.ceiling == ceiling
    assert limit.ceiling == ceiling  # reading it changes nothing


def test_the_ceiling_appears_with_the_ooms_that_make_it() -> None:
    """Level by level the evidence adds up: no ceiling at four OOMs, ceiling 3 at the fifth."""
    limit, clock = _limit(3)
    seen = []
    for _ in range(6):
        clock.advance(10)
        limit.on_attempt(OOM, in_flight=4, queue_waiting=True)  # above the limit: no cut
        seen.append(limit.ceiling)
    assert seen == [None, None, None, None, 3, 3]
    assert limit.limit == 3
    assert limit.history == ()


def test_the_ceiling_caps_the_cut_of_the_oom_that_completes_it() -> None:
    """An OOM that makes its level bad cuts to the ceiling when that is below the usual cut."""
    limit, clock = _limit(4)
    _feed(limit, OOM, 5, 4, clock=clock, every=10)  # above the limit: evidence, no cut
    assert (limit.limit, limit.ceiling) == (4, None)
    for _ in range(4):  # 4 → 8 in four stable stretches (level 5 is not bad yet)
        _stable_stretch(limit, clock)
    assert limit.limit == 8
    # A task that ends while only five run OOMs: 8 would cut to 5, but 5 is now forbidden.
    change = limit.on_attempt(OOM, in_flight=5, queue_waiting=True)
    assert change == LimitChange(8, 4, "oom_at_5", clock.t)
    assert limit.ceiling == 4


@pytest.mark.parametrize(
    ("initial", "in_flight", "new", "ceiling"),
    [
        (4, 4, 2, 3),  # the multiplicative cut is below the learned ceiling
        (8, 4, 3, 3),  # the ceiling (OOM at 4 → 3) is below the cut (5)
        (3, 2, 1, 1),  # OOM with two running: at most one may run
        (1, 1, 1, 1),  # already at the minimum: nothing to cut, and never below it
        (2, 1, 1, 1),  # a file too big to run alone still leaves the minimum
    ],
)
def test_with_ceiling_ooms_one_a_single_oom_teaches_the_ceiling(
    initial: int, in_flight: int, new: int, ceiling: int
) -> None:
    """`ceiling_ooms=1` gives back the strict rule: one OOM at c caps the limit at c − 1."""
    limit, _ = _limit(initial, ceiling_ooms=1)
    limit.on_attempt(OOM, in_flight=in_flight, queue_waiting=False)
    assert (limit.limit, limit.ceiling) == (new, ceiling)


def test_retries_ooms_cut_but_are_no_evidence_for_the_ceiling() -> None:
    """A long file that OOMs again while it waits for memory is one piece of evidence: its
    retries cut the limit like any OOM, but neither their OOMs nor their successes are
    samples for the ceiling."""
    limit, clock = _limit(8)
    cuts = _feed(limit, OOM, 4, 10, clock=clock, every=1, first_attempt=False)
    assert [(c.old, c.new, c.reason) for c in cuts] == [(8, 5, "oom_at_4"), (5, 3, "oom_at_4")]
    assert limit.ceiling is None
    # Retries that succeed at 4 do not dilute the first attempts' OOMs either.
    _feed(limit, OK, 4, 50, clock=clock, every=1, first_attempt=False)
    _feed(limit, OOM, 4, 4, clock=clock, every=1)
    assert limit.ceiling is None
    _feed(limit, OOM, 4, 1, clock=clock, every=1)
    assert limit.ceiling == 3


def test_crashes_and_silent_outcomes_are_no_samples() -> None:
    """Crashes, errors, timeouts and client errors neither count as OOMs at a level nor
    dilute the OOMs there."""
    limit, clock = _limit(3, crash_holdoff_seconds=0.0)
    for outcome in (CRASH, *SILENT):
        _feed(limit, outcome, 4, 20, clock=clock, every=1)
    _feed(limit, OOM, 4, 4, clock=clock, every=1)
    assert limit.ceiling is None  # twenty crashes at 4 are not OOMs at 4
    for outcome in (CRASH, *SILENT):
        _feed(limit, outcome, 4, 20, clock=clock, every=1)
    _feed(limit, OOM, 4, 1, clock=clock, every=1)
    assert limit.ceiling == 3  # 5 OOMs out of 5 samples, the rest were not samples


@pytest.mark.parametrize(
    ("levels", "ceiling"),
    [
        ({6: (5, 0), 3: (5, 0)}, 2),  # both bad: the lower one counts
        ({3: (5, 0), 6: (5, 0)}, 2),  # whatever the order they came in
        ({6: (5, 0), 3: (5, 10)}, 5),  # level 3 mostly works
        ({6: (5, 0), 3: (4, 0)}, 5),  # level 3 has too few OOMs
        ({6: (5, 0), 7: (5, 0), 2: (5, 100)}, 5),
        ({8: (5, 0)}, 7),
    ],
)
def test_the_lowest_bad_level_wins(levels: dict[int, tuple[int, int]], ceiling: int) -> None:
    """With several bad levels the ceiling sits just under the lowest; levels are counted
    apart (successes at 3 say nothing about 6)."""
    limit, clock = _limit(1)  # every OOM runs above the limit: evidence only, no cuts
    for level, (ooms, oks) in levels.items():
        _feed(limit, OK, level, oks, clock=clock, every=1)
        _feed(limit, OOM, level, ooms, clock=clock, every=1)
    assert limit.ceiling == ceiling
    assert limit.limit == 1


@pytest.mark.parametrize(("level", "ceiling"), [(9, None), (5, None), (4, None), (3, 2)])
def test_a_ceiling_at_the_maximum_or_above_is_none(level: int, ceiling: int | None) -> None:
    """A ceiling that does not hold the limit below the maximum is reported as none."""
    limit, clock = _limit(1, maximum=3)
    _feed(limit, OOM, level, 5, clock=clock, every=1)
    assert limit.ceiling == ceiling


@pytest.mark.parametrize("level", [1, 2])
def test_the_ceiling_is_never_below_the_minimum(level: int) -> None:
    """OOMs at or below the minimum pin the ceiling to the minimum, not under it."""
    limit, clock = _limit(2, minimum=2)
    _feed(limit, OOM, level, 5, clock=clock, every=1)
    assert (limit.limit, limit.ceiling) == (2, 2)


def test_snapshot_with_a_ceiling_pinned_to_the_minimum() -> None:
    """/stats must not fail when the ceiling sits at the minimum because of OOMs at it."""
    limit, clock = _limit(2, minimum=2)
    _feed(limit, OOM, 2, 5, clock=clock, every=1)
    snap = limit.snapshot()
    assert snap["ceiling"] == 2
    rises_in = snap["ceiling_rises_in_seconds"]
    assert isinstance(rises_in, float)
    assert 3596.0 <= rises_in <= 3600.0  # the first of the five leaves first, the last last


# -- the ceiling goes as its samples age out --------------------------------------------------


def test_the_ceiling_goes_when_its_ooms_are_older_than_the_fade() -> None:
    """Samples are kept for `fade_seconds`: the ceiling holds while enough of its OOMs are
    younger than that, and goes the moment too few are left (no new OOM needed)."""
    limit, clock = _limit(3)
    start = clock.t
    _feed(limit, OOM, 4, 6, clock=clock, every=100)  # at start + 100 … start + 600
    assert limit.ceiling == 3
    clock.t = start + 100 + 3600 - 0.001
    assert limit.ceiling == 3  # all six still count
    clock.t = start + 100 + 3600
    assert limit.ceiling == 3  # the first one went, five are left
    clock.t = start + 200 + 3600 - 0.001
    assert limit.ceiling == 3
    clock.t = start + 200 + 3600
    assert limit.ceiling is None  # four left: below ceiling_ooms
    clock.advance(10 * 3600)
    assert limit.ceiling is None
    assert limit.snapshot()["ceiling_rises_in_seconds"] is None


def test_new_ooms_at_the_level_keep_the_ceiling() -> None:
    """The window slides: the ceiling holds as long as `ceiling_ooms` OOMs at the level are
    younger than `fade_seconds`, however long ago the first of them was."""
    limit, clock = _limit(3)
    for _ in range(20):  # one every twenty minutes for over six hours: three per hour
        _feed(limit, OOM, 4, 1, clock=clock, every=1200)
        assert limit.ceiling is None
    seen = []
    for _ in range(12):  # one every ten minutes: six per hour
        _feed(limit, OOM, 4, 1, clock=clock, every=600)
        seen.append(limit.ceiling)
    assert seen == [None] * 2 + [3] * 10  # with the two from the sparse hour before
    clock.advance(3600 - 4 * 600 - 1)  # the newest five are all younger than an hour
    assert limit.ceiling == 3
    clock.advance(1)
    assert limit.ceiling is None


def test_old_successes_leaving_the_window_raise_the_share() -> None:
    """Successes age out like OOMs: a level whose OOMs were diluted by old successes becomes
    bad once those successes are older than `fade_seconds`."""
    limit, clock = _limit(3)
    start = clock.t
    _feed(limit, OK, 4, 10, clock=clock, every=1)  # at start + 1 … start + 10
    clock.t = start + 1_000
    _feed(limit, OOM, 4, 5, clock=clock, every=1)
    assert limit.ceiling is None  # 5 of 15 = 33 %
    clock.t = start + 1 + 3600 - 0.001
    assert limit.ceiling is None
    clock.t = start + 1 + 3600
    assert limit.ceiling == 3  # the oldest success left: 5 of 14 = 36 %


def test_the_limit_waits_at_the_ceiling_and_rises_when_it_fades() -> None:
    """At the learned ceiling a stable stretch waits; when the ceiling goes the limit rises at
    once, reasoned `ceiling_faded`; the next rise is an ordinary stable one."""
    limit, clock = _limit(8)
    first_oom = clock.t + 1
    cuts = _feed(limit, OOM, 4, 5, clock=clock, every=1)
    assert [(c.old, c.new) for c in cuts] == [(8, 5), (5, 3)]
    assert (limit.limit, limit.ceiling) == (3, 3)
    assert _stable_stretch(limit, clock) == []  # stable at 3, but 3 is the ceiling
    assert _stable_stretch(limit, clock) == []
    clock.t = first_oom + 3600 - 1
    assert limit.tick() is None
    clock.advance(1)
    assert limit.ceiling is None
    assert limit.tick() == LimitChange(3, 4, "ceiling_faded", clock.t)
    assert _stable_stretch(limit, clock) == [LimitChange(4, 5, "stable_at_4", clock.t)]


def test_a_rise_the_ceiling_never_held_is_an_ordinary_stable_one() -> None:
    """`ceiling_faded` names only a rise the ceiling held back: a stretch that was stable only
    after the ceiling went is an ordinary `stable_at_N`."""
    limit, clock = _limit(8)
    _feed(limit, OOM, 4, 5, clock=clock, every=1)
    assert (limit.limit, limit.ceiling) == (3, 3)
    clock.advance(3600)  # the ceiling went while nothing was waiting
    assert limit.ceiling is None
    assert _stable_stretch(limit, clock) == [LimitChange(3, 4, "stable_at_3", clock.t)]


# -- crashes and the silent outcomes ---------------------------------------------------------


def test_a_crash_cuts_once_per_holdoff_and_teaches_no_ceiling() -> None:
    """One dying server resets every connection: one cut, and no ceiling from a maybe-deploy."""
    limit, clock = _limit(6)
    change = limit.on_attempt(CRASH, in_flight=6, queue_waiting=True)
    assert change == LimitChange(6, 4, "crash_at_6", clock.t)
    assert change.kind == "crash"
    for _ in range(5):  # the other resets and the refused retries during the restart
        clock.advance(30)
        assert limit.on_attempt(CRASH, in_flight=4, queue_waiting=True) is None
    assert (limit.limit, limit.ceiling) == (4, None)
    clock.advance(150)  # 300 s after the first crash
    assert limit.on_attempt(CRASH, in_flight=4, queue_waiting=True) is not None
    assert (limit.limit, limit.ceiling) == (2, None)


def test_a_crash_is_not_held_back_by_an_oom_nor_holds_one_back() -> None:
    """The crash holdoff concerns crashes only: OOMs inside it still cut, and an OOM does not
    start a holdoff for the next crash."""
    limit, clock = _limit(8)
    assert limit.on_attempt(OOM, in_flight=8, queue_waiting=True) is not None  # 8 → 5
    clock.advance(1)
    assert limit.on_attempt(CRASH, in_flight=5, queue_waiting=True) is not None  # 5 → 3
    clock.advance(1)
    assert limit.on_attempt(OOM, in_flight=3, queue_waiting=True) is not None  # 3 → 2
    assert [c.reason for c in limit.history] == ["oom_at_8", "crash_at_5", "oom_at_3"]


@pytest.mark.parametrize("outcome", SILENT)
def test_errors_timeouts_and_client_errors_say_nothing_about_memory(
    outcome: AttemptOutcome,
) -> None:
    """A non-OOM 5xx, a timeout or a 4xx neither cuts, nor counts, nor restarts the stretch."""
    limit, clock = _limit(4)
    _stable_stretch(limit, clock, successes=limit.params.stable_successes - 1)
    for _ in range(50):
        clock.advance(1)
        assert limit.on_attempt(outcome, in_flight=4, queue_waiting=True) is None
    assert (limit.limit, limit.ceiling) == (4, None)
    assert limit.snapshot()["stable_successes"] == limit.params.stable_successes - 1
    # The stretch kept running through them: the next success completes it.
    assert limit.on_attempt(OK, in_flight=4, queue_waiting=True) is not None


# -- history and snapshot --------------------------------------------------------------------


def test_history_keeps_the_last_changes_in_order() -> None:
    """The history is a chain of the last twenty changes, oldest first."""
    limit, clock = _limit(1, maximum=2, fade_seconds=1.0)
    for _ in range(30):
        _stable_stretch(limit, clock)
        clock.advance(1)
        limit.on_attempt(OOM, in_flight=2, queue_waiting=True)
    history = limit.history
    assert len(history) == HISTORY_LENGTH
    assert all(a.new == b.old for a, b in itertools.pairwise(history))
    assert history[-1].new == limit.limit == 1
    assert {c.reason for c in history} == {"stable_at_1", "oom_at_2"}


def test_snapshot_shows_limit_ceiling_progress_and_changes_with_times() -> None:
    """The /stats view names the limit, the ceiling, the stretch so far and dated changes."""
    limit, clock = _limit(4)
    limit.on_attempt(OOM, in_flight=4, queue_waiting=True)  # 4 → 2
    _feed(limit, OOM, 4, 4, clock=clock, every=10)  # above the limit: the ceiling forms
    clock.advance(60)
    limit.on_attempt(OK, in_flight=2, queue_waiting=True)
    snap = limit.snapshot(wall_now=1_738_000_000.0)
    assert snap["limit"] == 2
    assert (snap["minimum"], snap["maximum"]) == (1, 8)
    assert snap["ceiling"] == 3
    assert snap["ceiling_rises_in_seconds"] == 3540.0  # the last OOM at 4 is 60 s old
    assert snap["stable_successes"] == 1
    assert snap["stable_successes_needed"] == 3
    assert snap["seconds_at_limit"] == 60.0  # the stretch restarted with the last OOM
    assert snap["stable_seconds_needed"] == 30.0
    assert snap["recent_ooms"] == [
        {"in_flight": 4, "seconds_ago": float(ago), "time": _iso(1_738_000_000.0 - ago)}
        for ago in (100, 90, 80, 70, 60)
    ]
    assert snap["changes"] == [
        {
            "old": 4,
            "new": 2,
            "reason": "oom_at_4",
            "seconds_ago": 100.0,
            "time": _iso(1_738_000_000.0 - 100),
        }
    ]
    assert "time" not in limit.snapshot()["changes"][0]  # type: ignore[index]


def test_ceiling_rises_in_seconds_is_an_upper_bound() -> None:
    """The countdown runs to when the last OOM above the ceiling leaves the window; by then
    the ceiling has gone (earlier, if its level ran out of OOMs first)."""
    limit, clock = _limit(1)
    assert limit.snapshot()["ceiling_rises_in_seconds"] is None
    _feed(limit, OOM, 4, 5, clock=clock, every=10)
    _feed(limit, OOM, 6, 1, clock=clock, every=100)  # a lone OOM higher up, later
    snap = limit.snapshot()
    assert snap["ceiling"] == 3
    assert snap["ceiling_rises_in_seconds"] == 3600.0
    clock.advance(1000)
    assert limit.snapshot()["ceiling_rises_in_seconds"] == 2600.0
    clock.advance(2600 - 141)
    assert limit.ceiling == 3
    clock.advance(1)  # the first OOM at 4 leaves: four are not enough
    assert limit.ceiling is None
    snap = limit.snapshot()
    assert (snap["ceiling"], snap["ceiling_rises_in_seconds"]) == (None, None)


def _iso(epoch: float) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(epoch).isoformat(timespec="seconds")


# -- invariants ------------------------------------------------------------------------------

_samples = st.one_of(
    st.tuples(
        st.just("attempt"),
        # OKs and OOMs are the samples: draw them most often, so that levels go bad.
        st.sampled_from([OK, OK, OK, OOM, OOM, OOM, CRASH, *SILENT]),
        st.integers(min_value=1, max_value=6),
        st.booleans(),
        st.booleans(),
    ),
    st.tuples(
        st.just("advance"),
        st.one_of(
            st.floats(min_value=0.0, max_value=60.0),
            st.floats(min_value=0.0, max_value=5_000.0),
        ),
    ),
    st.tuples(st.just("tick")),
)


def _expected_ceiling(
    samples: list[tuple[float, int, bool]], now: float, params: AdaptiveParams
) -> int | None:
    """The ceiling rule restated: the lowest level with enough OOMs, and a large enough share
    of them, among the first attempts of the last `fade_seconds`."""
    recent = [(c, oom) for at, c, oom in samples if at > now - params.fade_seconds]
    for level in sorted({c for c, _ in recent}):
        attempts = sum(1 for c, _ in recent if c == level)
        ooms = sum(1 for c, oom in recent if c == level and oom)
        if ooms >= params.ceiling_ooms and ooms >= params.ceiling_oom_share * attempts:
            ceiling = max(params.minimum, level - 1)
            return None if ceiling >= params.maximum else ceiling
    return None


@settings(max_examples=300, deadline=None)
@given(
    minimum=st.integers(min_value=1, max_value=3),
    extra=st.integers(min_value=0, max_value=5),
    factor=st.floats(min_value=0.1, max_value=0.95),
    successes=st.integers(min_value=1, max_value=4),
    stable_seconds=st.floats(min_value=0.0, max_value=120.0),
    fade=st.one_of(st.floats(min_value=1.0, max_value=7_200.0), st.just(3_600.0)),
    ceiling_ooms=st.integers(min_value=1, max_value=4),
    share=st.one_of(st.floats(min_value=0.0, max_value=1.0), st.sampled_from([0.35, 0.5, 0.7])),
    start=st.integers(min_value=0, max_value=5),
    steps=st.lists(_samples, min_size=10, max_size=150),
)
def test_invariants_hold_for_any_sequence_of_samples(
    minimum: int,
    extra: int,
    factor: float,
    successes: int,
    stable_seconds: float,
    fade: float,
    ceiling_ooms: int,
    share: float,
    start: int,
    steps: list[tuple[Any, ...]],
) -> None:
    """For any samples and clock moves: minimum ≤ limit ≤ maximum; the ceiling is exactly the
    rule applied to the first attempts' OKs and OOMs of the last `fade_seconds` (retries,
    crashes and the silent outcomes are no samples) and lies in [minimum, maximum); every
    change is recorded and chained; a rise is of exactly one, at least `stable_seconds` after
    the previous change and the last OOM, and never above the ceiling; an OOM at most at the
    limit cuts it to `decreased(limit)` capped by the ceiling, one above it changes nothing; a
    crash cuts by one `decreased` step or not at all; errors, timeouts and client errors never
    change anything."""
    params = AdaptiveParams(
        minimum=minimum,
        maximum=minimum + extra,
        decrease_factor=factor,
        stable_successes=successes,
        stable_seconds=stable_seconds,
        fade_seconds=fade,
        ceiling_ooms=ceiling_ooms,
        ceiling_oom_share=share,
    )
    clock = FakeTime()
    limit = AdaptiveLimit(params, initial=min(minimum + start, params.maximum), now=clock)
    samples: list[tuple[float, int, bool]] = []
    quiet_since = clock.t  # last change or OOM: a rise needs stable_seconds after it
    for step in steps:
        before = limit.limit
        change: LimitChange | None = None
        if step[0] == "advance":
            clock.advance(step[1])
        elif step[0] == "tick":
            change = limit.tick()
        else:
            _, outcome, in_flight, waiting, first = step
            if first and outcome in (OK, OOM):
                samples.append((clock.t, in_flight, outcome is OOM))
            change = limit.on_attempt(
                outcome, in_flight=in_flight, queue_waiting=waiting, first_attempt=first
            )
            if outcome in SILENT:
                assert change is None
        assert params.minimum <= limit.limit <= params.maximum
        ceiling = limit.ceiling
        assert ceiling == _expected_ceiling(samples, clock.t, params)
        if ceiling is not None:
            assert params.minimum <= ceiling < params.maximum
        if step[0] == "attempt" and step[1] is OOM:
            if step[2] > before:
                assert limit.limit == before
            else:
                cut = params.decreased(before)
                assert limit.limit == (cut if ceiling is None else max(minimum, min(cut, ceiling)))
        if step[0] == "attempt" and step[1] is CRASH:
            assert limit.limit in (before, params.decreased(before))
        if change is None:
            assert limit.limit == before
        else:
            assert limit.history[-1] == change
            assert (change.old, change.new, change.at) == (before, limit.limit, clock.t)
            if change.new > change.old:
                assert change.new == change.old + 1
                assert clock.t - quiet_since >= stable_seconds
                assert ceiling is None or change.new <= ceiling
                assert change.reason in (f"stable_at_{before}", "ceiling_faded")
            else:
                assert step[0] == "attempt"
                assert step[1] in (OOM, CRASH)
                assert change.reason == f"{step[1]}_at_{step[2]}"
            quiet_since = clock.t
        if step[0] == "attempt" and step[1] is OOM:
            quiet_since = clock.t
    history = limit.history
    assert all(a.new == b.old for a, b in itertools.pairwise(history))


# -- the loop on a simulated card ------------------------------------------------------------

_FIVE_MINUTES = 300.0
_RTF = 0.1
_OOM_COOLDOWN = 15.0  # the gatekeeper's default: a new task after an OOM waits this long
_TICK = 5.0


@dataclass
class _Card:
    """The default simulator's card, driven by the same pure models the simulator uses.

    24 GiB, 6 reserved, 2 + 0.8 GiB per audio minute: three 5-minute tasks fit, a fourth runs
    out of memory at once. A backlog of 5-minute files never runs dry. Every attempt is a first
    attempt (the OOMed task goes back to the backlog).
    """

    limit: AdaptiveLimit
    clock: FakeTime
    memory: GpuMemory = field(default_factory=GpuMemory)
    compute: GpuCompute = field(default_factory=GpuCompute)
    running: set[str] = field(default_factory=set)
    next_id: int = 0
    hold_until: float = 0.0
    trajectory: list[tuple[float, int, int | None]] = field(default_factory=list)
    oom_levels: list[int] = field(default_factory=list)
    oom_times: list[float] = field(default_factory=list)
    changes: list[LimitChange] = field(default_factory=list)

    def run_until(self, end: float) -> None:
        next_tick = self.clock.t
        while self.clock.t < end:
            self._start_tasks()
            wake = min((self.compute.seconds_until(t) for t in self.running), default=math.inf)
            step = min(wake, next_tick - self.clock.t, end - self.clock.t)
            if self.hold_until > self.clock.t:
                step = min(step, self.hold_until - self.clock.t)
            self.clock.advance(max(step, 0.0))
            finished = self.compute.advance(self.clock.t)
            in_flight = len(self.running)  # tasks that finish together ran together
            for task in finished:
                self._record(self.limit.on_attempt(OK, in_flight=in_flight, queue_waiting=True))
                self.running.discard(task)
                self.memory.release(task)
            if self.clock.t >= next_tick:
                self._record(self.limit.tick())
                next_tick = self.clock.t + _TICK
            self.trajectory.append((self.clock.t, self.limit.limit, self.limit.ceiling))

    def _start_tasks(self) -> None:
        while len(self.running) < self.limit.limit and self.clock.t >= self.hold_until:
            self.next_id += 1
            task = f"t{self.next_id}"
            if not self.memory.try_allocate(task, self.memory.need_gib(_FIVE_MINUTES)):
                in_flight = len(self.running) + 1
                self.oom_levels.append(in_flight)
                self.oom_times.append(self.clock.t)
                self._record(self.limit.on_attempt(OOM, in_flight=in_flight, queue_waiting=True))
                self.hold_until = self.clock.t + _OOM_COOLDOWN
                return
            self.running.add(task)
            self.compute.add(task, _FIVE_MINUTES * _RTF, self.clock.t)

    def _record(self, change: LimitChange | None) -> None:
        if change is not None:
            self.changes.append(change)

    def share_at(self, level: int, start: float, end: float) -> float:
        """Fraction of [start, end) spent at `level`."""
        at_level = 0.0
        points = [p[:2] for p in self.trajectory if start <= p[0] < end]
        for (t0, value), (t1, _) in itertools.pairwise(points):
            if value == level:
                at_level += t1 - t0
        return at_level / (end - start)


@pytest.mark.parametrize("initial", [1, 8])
def test_the_loop_converges_to_what_fits_and_reprobes_after_the_fade(initial: int) -> None:
    """On the default card (3 five-minute tasks fit, a 4th OOMs) with the default parameters
    the limit finds 3 from below and from above; every probe of 4 OOMs and is cut back, until
    level 4 has OOMed `ceiling_ooms` times and the ceiling 3 holds the limit there; an hour
    after the first of those OOMs the ceiling goes and 4 is probed again, never more than
    `ceiling_ooms` times an hour. Once settled, most of the time is spent at 3, never at 1."""
    clock = FakeTime(0.0)
    params = AdaptiveParams(maximum=8)
    limit = AdaptiveLimit(params, initial=initial, now=clock)
    card = _Card(limit, clock)
    end = 4.5 * 3600
    card.run_until(end)
    n, fade = params.ceiling_ooms, params.fade_seconds
    ooms, changes = card.oom_times, card.changes

    assert set(card.oom_levels) == {4}  # it never tried beyond the first level that failed
    if initial == 1:  # climbed one stable stretch at a time until memory ran out
        assert [c.reason for c in changes[:4]] == [
            *(f"stable_at_{level}" for level in (1, 2, 3)),
            "oom_at_4",
        ]
        assert changes[2].at < 5 * 60  # quickly: stretches are 3 successes / 30 s
    else:  # cut from 8 by the first OOMs, multiplicatively: 8 → 5 → 3
        assert [(c.old, c.new, c.reason) for c in changes[:2]] == [
            (8, 5, "oom_at_4"),
            (5, 3, "oom_at_4"),
        ]

    # Before the ceiling: each probe of 4 is cut to 2 and climbs back to 3 within minutes.
    learned = ooms[n - 1]
    assert learned - ooms[0] < 10 * 60
    probes = [c for c in changes if c.at <= learned and (c.old, c.new) == (4, 2)]
    assert len(probes) >= n - 2
    for probe in probes:
        back = next(c for c in changes if c.at > probe.at)
        assert (back.old, back.new, back.reason) == (2, 3, "stable_at_2")
        assert back.at - probe.at < 2 * 60

    # The ceiling: none until level 4 has OOMed n times; then 3, holding the limit at 3 with
    # no OOM until the first of those n OOMs is an hour old.
    faded = ooms[0] + fade
    assert all(ceiling is None for t, _, ceiling in card.trajectory if t < learned)
    held = [(value, ceiling) for t, value, ceiling in card.trajectory if learned < t < faded]
    assert held
    assert all(ceiling == 3 for _, ceiling in held)
    assert {value for value, _ in held} == {2, 3}  # back from the last cut, then held at 3
    assert not [t for t in ooms if learned < t < faded]
    assert card.share_at(3, learned + 2 * 60, faded) > 0.99

    # After the fade: 4 is probed again at once, and again every hour after that.
    assert ooms[n] == pytest.approx(faded, abs=_TICK)
    reprobe = next(c for c in changes if c.at >= faded)
    assert (reprobe.old, reprobe.new, reprobe.reason) == (3, 4, "ceiling_faded")
    assert all(b - a >= fade for a, b in zip(ooms, ooms[n:], strict=False))
    assert len(ooms) >= 4 * n

    settled = [value for t, value, _ in card.trajectory if t > ooms[0]]
    assert min(settled) == 2  # a cut from 4 or 3 never collapses to 1
    assert card.share_at(3, ooms[0], end) > 0.85
