"""The adaptive limit: OOMs cut it, stable stretches raise it, OOM ceilings fade, the rest is
silent."""

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatekeeper.adaptive import HISTORY_LENGTH, AdaptiveLimit, AdaptiveParams, LimitChange
from gatekeeper.outcomes import AttemptOutcome
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
    limit: AdaptiveLimit, clock: FakeTime, successes: int = 20
) -> list[LimitChange]:
    """Feed `successes` OKs at full load with a queue, spread over `stable_seconds`."""
    changes = []
    step = limit.params.stable_seconds / successes
    for _ in range(successes):
        clock.advance(step)
        change = limit.on_attempt(OK, in_flight=limit.limit, queue_waiting=True)
        if change is not None:
            changes.append(change)
    return changes


# -- parameters -----------------------------------------------------------------------------


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
    ],
)
def test_bad_params_are_refused(params: dict[str, Any]) -> None:
    """Parameters that would break the rules are refused when built, naming the knob."""
    with pytest.raises(ValueError, match=next(iter(params)).split("_")[0]):
        AdaptiveParams(**params)


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


# -- OOM: down, and remember where --------------------------------------------------------


@pytest.mark.parametrize(
    ("initial", "in_flight", "new", "ceiling"),
    [
        (4, 4, 2, 3),  # the multiplicative cut is below the learned ceiling
        (8, 4, 3, 3),  # the ceiling (OOM at 4 → 3) is below the cut (5)
        (3, 2, 1, 1),  # OOM with two running: at most one may run
        (1, 1, 1, 1),  # already at the minimum: nothing to cut
        (2, 1, 1, 1),  # a file too big to run alone still leaves the minimum
    ],
)
def test_oom_cuts_the_limit_and_learns_a_ceiling(
    initial: int, in_flight: int, new: int, ceiling: int
) -> None:
    """An OOM at concurrency c cuts the limit and caps it at c − 1 (never below the minimum)."""
    limit, clock = _limit(initial)
    change = limit.on_attempt(OOM, in_flight=in_flight, queue_waiting=False)
    assert limit.limit == new
    assert limit.ceiling == ceiling
    if new == initial:
        assert change is None
    else:
        assert change == LimitChange(initial, new, f"oom_at_{in_flight}", clock.t)
        assert change.kind == "oom"


def test_oom_above_the_limit_is_already_answered() -> None:
    """An OOM from an attempt that ran above the current limit is remembered but cuts no more."""
    limit, _ = _limit(6)
    assert limit.on_attempt(OOM, in_flight=6, queue_waiting=True) is not None
    assert (limit.limit, limit.ceiling) == (4, 5)
    # Tasks started before the cut end with OOMs at 6 and 5: no further cut.
    assert limit.on_attempt(OOM, in_flight=6, queue_waiting=True) is None
    assert limit.on_attempt(OOM, in_flight=5, queue_waiting=True) is None
    assert (limit.limit, limit.ceiling) == (4, 4)
    # An OOM at the current limit is news again.
    assert limit.on_attempt(OOM, in_flight=4, queue_waiting=True) is not None
    assert (limit.limit, limit.ceiling) == (2, 3)


def test_an_oom_restarts_the_stable_stretch() -> None:
    """Successes counted before an OOM do not count towards the next rise."""
    limit, clock = _limit(3)
    _stable_stretch(limit, clock, successes=19)
    limit.on_attempt(OOM, in_flight=5, queue_waiting=True)  # above the limit: no cut
    assert limit.limit == 3
    clock.advance(1_000)
    assert limit.on_attempt(OK, in_flight=3, queue_waiting=True) is None
    assert limit.snapshot()["stable_successes"] == 1


# -- stable: up by one ------------------------------------------------------------------------


def test_a_stable_stretch_raises_the_limit_by_one() -> None:
    """Twenty successes under backlog over five minutes raise the limit by exactly one."""
    limit, clock = _limit(2)
    changes = _stable_stretch(limit, clock)
    assert changes == [LimitChange(2, 3, "stable_at_2", clock.t)]
    assert limit.limit == 3
    # The next rise needs a whole new stretch at the new limit.
    assert limit.on_attempt(OK, in_flight=3, queue_waiting=True) is None
    assert _stable_stretch(limit, clock)[-1].reason == "stable_at_3"


def test_enough_successes_too_soon_wait_for_the_clock() -> None:
    """Twenty quick successes raise nothing before five minutes; `tick` raises it then."""
    limit, clock = _limit(2)
    for _ in range(40):
        clock.advance(1)
        assert limit.on_attempt(OK, in_flight=2, queue_waiting=True) is None
    assert limit.tick() is None
    clock.advance(259)  # 299 s at this limit
    assert limit.tick() is None
    clock.advance(1)
    assert limit.tick() == LimitChange(2, 3, "stable_at_2", clock.t)


def test_a_long_time_with_too_few_successes_raises_nothing() -> None:
    """Hours at a limit are not enough: the successes must be there too."""
    limit, clock = _limit(2)
    _stable_stretch(limit, clock, successes=19)
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


def test_the_limit_never_rises_above_the_ceiling_until_it_fades() -> None:
    """At the learned ceiling a stable stretch waits; when the ceiling fades the limit rises."""
    limit, clock = _limit(4)
    limit.on_attempt(OOM, in_flight=4, queue_waiting=True)  # 4 → 2, ceiling 3
    assert _stable_stretch(limit, clock)[-1] == LimitChange(2, 3, "stable_at_2", clock.t)
    assert _stable_stretch(limit, clock) == []  # stable at 3, but 3 is the ceiling
    assert limit.limit == 3
    oom_at = clock.t - 2 * 300
    clock.t = oom_at + 3600 - 1
    assert limit.tick() is None
    clock.advance(1)
    assert limit.ceiling == 4
    assert limit.tick() == LimitChange(3, 4, "ceiling_faded", clock.t)


# -- the ceiling fades -----------------------------------------------------------------------


def test_the_ceiling_rises_by_one_per_fade_period_and_is_then_forgotten() -> None:
    """An OOM's memory fades one level an hour and disappears at the maximum."""
    limit, clock = _limit(6, maximum=6)
    limit.on_attempt(OOM, in_flight=3, queue_waiting=True)
    seen = []
    for _ in range(5):
        seen.append(limit.ceiling)
        clock.advance(3600)
    assert seen == [2, 3, 4, 5, None]


def test_a_new_oom_restarts_the_fade_from_the_lower_ceiling() -> None:
    """A later OOM keeps the lower of the faded and the new ceiling, fading from now."""
    limit, clock = _limit(8)
    limit.on_attempt(OOM, in_flight=3, queue_waiting=True)  # ceiling 2
    clock.advance(2 * 3600 + 10)  # faded to 4
    assert limit.ceiling == 4
    limit.on_attempt(OOM, in_flight=6, queue_waiting=True)  # 6 > limit: learns nothing lower
    assert limit.ceiling == 4
    clock.advance(3599)
    assert limit.ceiling == 4  # the fade clock restarted with the new OOM
    clock.advance(1)
    assert limit.ceiling == 5


# -- crashes and the silent outcomes ---------------------------------------------------------


def test_a_crash_cuts_once_per_holdoff_and_teaches_no_ceiling() -> None:
    """One dying server resets every connection: one cut, and no ceiling from a maybe-deploy."""
    limit, clock = _limit(6)
    change = limit.on_attempt(CRASH, in_flight=6, queue_waiting=True)
    assert change == LimitChange(6, 4, "crash_at_6", clock.t)
    assert change.kind == "crash"
    for _ in range(5):  # the other resets and the refused retries during the restart
        clock.advance(30)
        assert limit.on_attempt(CRASH, in_flight=1, queue_waiting=True) is None
    assert (limit.limit, limit.ceiling) == (4, None)
    clock.advance(150)  # 300 s after the first crash
    assert limit.on_attempt(CRASH, in_flight=4, queue_waiting=True) is not None
    assert limit.limit == 2


@pytest.mark.parametrize("outcome", SILENT)
def test_errors_timeouts_and_client_errors_say_nothing_about_memory(
    outcome: AttemptOutcome,
) -> None:
    """A non-OOM 5xx, a timeout or a 4xx neither cuts, nor counts, nor restarts the stretch."""
    limit, clock = _limit(4)
    _stable_stretch(limit, clock, successes=10)
    for _ in range(50):
        clock.advance(1)
        assert limit.on_attempt(outcome, in_flight=4, queue_waiting=True) is None
    assert (limit.limit, limit.ceiling) == (4, None)
    assert limit.snapshot()["stable_successes"] == 10


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
    limit.on_attempt(OOM, in_flight=4, queue_waiting=True)
    clock.advance(60)
    limit.on_attempt(OK, in_flight=2, queue_waiting=True)
    snap = limit.snapshot(wall_now=1_738_000_000.0)
    assert snap["limit"] == 2
    assert snap["ceiling"] == 3
    assert snap["ceiling_rises_in_seconds"] == 3540.0
    assert snap["stable_successes"] == 1
    assert snap["seconds_at_limit"] == 60.0
    assert snap["recent_ooms"] == [
        {"in_flight": 4, "seconds_ago": 60.0, "time": _iso(1_738_000_000.0 - 60)}
    ]
    assert snap["changes"] == [
        {
            "old": 4,
            "new": 2,
            "reason": "oom_at_4",
            "seconds_ago": 60.0,
            "time": _iso(1_738_000_000.0 - 60),
        }
    ]
    assert "time" not in limit.snapshot()["changes"][0]  # type: ignore[index]


def _iso(epoch: float) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(epoch).isoformat(timespec="seconds")


# -- invariants ------------------------------------------------------------------------------

_samples = st.one_of(
    st.tuples(
        st.just("attempt"),
        st.sampled_from(list(AttemptOutcome)),
        st.integers(min_value=1, max_value=12),
        st.booleans(),
    ),
    st.tuples(st.just("advance"), st.floats(min_value=0.0, max_value=5_000.0)),
    st.tuples(st.just("tick")),
)


@settings(max_examples=300, deadline=None)
@given(
    minimum=st.integers(min_value=1, max_value=3),
    extra=st.integers(min_value=0, max_value=5),
    factor=st.floats(min_value=0.1, max_value=0.95),
    successes=st.integers(min_value=1, max_value=4),
    stable_seconds=st.floats(min_value=0.0, max_value=600.0),
    fade=st.floats(min_value=1.0, max_value=7_200.0),
    start=st.integers(min_value=0, max_value=5),
    steps=st.lists(_samples, max_size=150),
)
def test_invariants_hold_for_any_sequence_of_samples(
    minimum: int,
    extra: int,
    factor: float,
    successes: int,
    stable_seconds: float,
    fade: float,
    start: int,
    steps: list[tuple[Any, ...]],
) -> None:
    """For any samples and clock moves: minimum ≤ limit ≤ maximum; a ceiling, when one holds,
    lies in [minimum, maximum) and the limit never exceeds it; every change is recorded, chained
    and either a cut caused by an OOM or crash sample or a rise of exactly one, at least
    `stable_seconds` after the previous change and the last OOM; errors, timeouts and client
    errors never change anything."""
    params = AdaptiveParams(
        minimum=minimum,
        maximum=minimum + extra,
        decrease_factor=factor,
        stable_successes=successes,
        stable_seconds=stable_seconds,
        fade_seconds=fade,
    )
    clock = FakeTime()
    limit = AdaptiveLimit(params, initial=min(minimum + start, params.maximum), now=clock)
    quiet_since = clock.t  # last change or OOM: a rise needs stable_seconds after it
    for step in steps:
        before = limit.limit
        change: LimitChange | None = None
        if step[0] == "advance":
            clock.advance(step[1])
        elif step[0] == "tick":
            change = limit.tick()
        else:
            _, outcome, in_flight, waiting = step
            change = limit.on_attempt(outcome, in_flight=in_flight, queue_waiting=waiting)
            if outcome in SILENT:
                assert change is None
        assert params.minimum <= limit.limit <= params.maximum
        ceiling = limit.ceiling
        if ceiling is not None:
            assert params.minimum <= ceiling < params.maximum
            assert limit.limit <= ceiling
        if change is None:
            assert limit.limit == before
        else:
            assert limit.history[-1] == change
            assert (change.old, change.new, change.at) == (before, limit.limit, clock.t)
            if change.new > change.old:
                assert change.new == change.old + 1
                assert clock.t - quiet_since >= stable_seconds
            else:
                assert step[0] == "attempt"
                assert step[1] in (OOM, CRASH)
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
    out of memory at once. A backlog of 5-minute files never runs dry.
    """

    limit: AdaptiveLimit
    clock: FakeTime
    memory: GpuMemory = field(default_factory=GpuMemory)
    compute: GpuCompute = field(default_factory=GpuCompute)
    running: set[str] = field(default_factory=set)
    next_id: int = 0
    hold_until: float = 0.0
    trajectory: list[tuple[float, int]] = field(default_factory=list)
    oom_levels: list[int] = field(default_factory=list)

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
                self.limit.on_attempt(OK, in_flight=in_flight, queue_waiting=True)
                self.running.discard(task)
                self.memory.release(task)
            if self.clock.t >= next_tick:
                self.limit.tick()
                next_tick = self.clock.t + _TICK
            self.trajectory.append((self.clock.t, self.limit.limit))

    def _start_tasks(self) -> None:
        while len(self.running) < self.limit.limit and self.clock.t >= self.hold_until:
            self.next_id += 1
            task = f"t{self.next_id}"
            if not self.memory.try_allocate(task, self.memory.need_gib(_FIVE_MINUTES)):
                in_flight = len(self.running) + 1
                self.oom_levels.append(in_flight)
                self.limit.on_attempt(OOM, in_flight=in_flight, queue_waiting=True)
                self.hold_until = self.clock.t + _OOM_COOLDOWN
                return
            self.running.add(task)
            self.compute.add(task, _FIVE_MINUTES * _RTF, self.clock.t)

    def share_at(self, level: int, start: float, end: float) -> float:
        """Fraction of [start, end) spent at `level`."""
        at_level = 0.0
        points = [p for p in self.trajectory if start <= p[0] < end]
        for (t0, value), (t1, _) in itertools.pairwise(points):
            if value == level:
                at_level += t1 - t0
        return at_level / (end - start)


@pytest.mark.parametrize("initial", [1, 8])
def test_the_loop_converges_to_what_fits_and_reprobes_after_the_fade(initial: int) -> None:
    """On the default card (3 five-minute tasks fit, 4 OOM) the limit settles at 3 from below
    and from above, stays there for the fade period, then probes 4 once and comes back."""
    clock = FakeTime(0.0)
    limit = AdaptiveLimit(AdaptiveParams(maximum=8), initial=initial, now=clock)
    card = _Card(limit, clock)
    end = 4.5 * 3600
    card.run_until(end)

    assert set(card.oom_levels) == {4}  # it never tried beyond the first level that failed
    history = list(limit.history)
    first_oom = next(i for i, c in enumerate(history) if c.kind == "oom")
    if initial == 1:  # climbed one stable stretch at a time until memory ran out
        assert [c.reason for c in history[:first_oom]] == [f"stable_at_{n}" for n in (1, 2, 3)]
    # From then on: settle at 3; an hour after each OOM probe 4 once, OOM, climb back to 3.
    settle = history[first_oom:]
    if settle[0].new != 3:
        assert (settle[0].old, settle[0].new, settle[1].new) == (4, 2, 3)
        assert settle[1].at - settle[0].at < 10 * 60
        settle = settle[1:]
    assert settle[0].new == 3
    cycles = [settle[i : i + 3] for i in range(1, len(settle), 3)]
    assert len(cycles) >= 3
    for probe, oom, back in (c for c in cycles if len(c) == 3):
        assert (probe.reason, probe.old, probe.new) == ("ceiling_faded", 3, 4)
        assert (oom.reason, oom.old, oom.new) == ("oom_at_4", 4, 2)
        assert (back.reason, back.old, back.new) == ("stable_at_2", 2, 3)
        assert back.at - oom.at < 10 * 60
    oom_times = [c.at for c in history if c.kind == "oom"]
    assert all(b - a == pytest.approx(3600, abs=_TICK) for a, b in itertools.pairwise(oom_times))
    assert card.share_at(3, history[first_oom].at, end) > 0.85
