"""Admission by GPU memory (issue #16), the pure parts: what a task costs, whether it fits,
how the figures are learned, with a fake `now`.

The last part checks the issue's core claim on a small discrete-event model of one card: a
learner started from a wrong guess gets close to what the true figures admit, with few OOMs.
Each task starts when the figures in use say it fits beside the running ones (first fit in
arrival order, a later task passing the head for a bounded time, as the gate does); its start
is an OOM when the TRUE peaks of the card's tasks exceed the budget (it is then not started,
the card starts nothing more until a task ends, and the task tries again later); a task runs
for a time proportional to its audio. The same loop with the true figures is the oracle.
"""

import functools
import heapq
import math
import random
import statistics
from collections import deque
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatekeeper.policy.memory import (
    UNKNOWN_AUDIO_SECONDS,
    MemoryLearner,
    MemoryModel,
    MemoryParams,
    fits,
)

BUDGET = 18.0
"""The simulator's default card: 24 GiB, 6 reserved."""
TRUE_CARD = MemoryModel(2.0, 0.8)
"""What a task really needs on the simulator's default card."""
FLAT_CARD = MemoryModel(6.0, 0.0)
"""The seed's story taken literally: 6 GiB whatever the length (hence a count of 3)."""
SEED_DEFAULTS = MemoryModel(6.0, 0.0)


@dataclass
class FakeTime:
    """A monotonic clock that moves only when told to."""

    t: float = 1_000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def _learner(
    start: MemoryModel = SEED_DEFAULTS, budget: float = BUDGET, **params: float
) -> tuple[MemoryLearner, FakeTime]:
    clock = FakeTime()
    learner = MemoryLearner(start, budget_gib=budget, now=clock, params=MemoryParams(**params))
    return learner, clock


def _set_cost(model: MemoryModel, audio: list[float | None]) -> float:
    return math.fsum(model.cost(a) for a in audio)


# -- cost --------------------------------------------------------------------------------------


def test_cost_is_base_plus_per_minute_times_minutes() -> None:
    model = MemoryModel(2.0, 0.8)
    assert model.cost(0) == pytest.approx(2.0)
    assert model.cost(60) == pytest.approx(2.8)
    assert model.cost(300) == pytest.approx(6.0)
    assert model.cost(90) == pytest.approx(3.2)
    assert MemoryModel(6.0).cost(3 * 3600) == 6.0, "per-minute 0: a count in disguise"


def test_an_unknown_length_is_costed_as_a_long_one() -> None:
    model = MemoryModel(2.0, 0.8)
    assert UNKNOWN_AUDIO_SECONDS == 3600.0
    assert model.cost(None) == pytest.approx(model.cost(UNKNOWN_AUDIO_SECONDS))
    assert model.cost(None) == pytest.approx(2.0 + 0.8 * 60)
    assert model.cost(None) > BUDGET, "an unreadable file runs alone on the default card"


def test_a_negative_length_costs_as_zero() -> None:
    model = MemoryModel(2.0, 0.8)
    assert model.cost(-30) == model.cost(0) == 2.0
    assert model.cost(-math.inf) == 2.0


def test_rounded_keeps_three_and_four_decimals() -> None:
    assert MemoryModel(2.123456, 0.876543).rounded() == MemoryModel(2.123, 0.8765)


# -- fit ---------------------------------------------------------------------------------------


def test_a_task_fits_beside_others_within_the_budget() -> None:
    assert fits(6.0, used=12.0, budget=18.0, running=2), "exactly full fits"
    assert fits(6.0, used=12.0 + 1e-12, budget=18.0, running=2), "float dust is forgiven"
    assert not fits(6.0, used=12.1, budget=18.0, running=2)
    assert fits(0.0, used=18.0, budget=18.0, running=3)


def test_a_task_bigger_than_the_card_runs_alone() -> None:
    assert fits(50.0, used=0.0, budget=18.0, running=0)
    assert not fits(50.0, used=0.5, budget=18.0, running=1), "not beside anyone"
    assert not fits(50.0, used=0.0, budget=18.0, running=1), "even beside a free task"


def test_nothing_fits_beside_a_task_over_the_budget() -> None:
    """A card running one task bigger than itself takes no other, however small."""
    assert not fits(0.1, used=50.0, budget=18.0, running=1)


# -- learning ----------------------------------------------------------------------------------


def test_the_learner_starts_at_the_given_figures() -> None:
    learner, _ = _learner(MemoryModel(3.0, 0.5))
    assert learner.model == learner.start == MemoryModel(3.0, 0.5)
    assert learner.floor() == MemoryModel(learner.params.floor_gib, 0.0), "nothing to explain"
    assert learner.snapshot() == {
        "task_memory_gib": 3.0,
        "task_memory_per_minute_gib": 0.5,
        "started_from": {"task_memory_gib": 3.0, "task_memory_per_minute_gib": 0.5},
        "oom_sets_remembered": 0,
        "fitting_sets_remembered": 0,
        "changes": 0,
    }


def test_figures_step_down_after_stable_starts_with_memory_as_the_limit() -> None:
    learner, _ = _learner(MemoryModel(6.0, 1.0))
    ok = {"oom": False, "audio_seconds": [60.0, 120.0], "memory_was_limit": True}
    assert learner.observe_start(**ok) is None
    assert learner.observe_start(**ok) is None
    stepped = learner.observe_start(**ok)
    assert stepped == learner.model
    assert stepped == MemoryModel(pytest.approx(5.4), pytest.approx(0.9))
    for _ in range(2):
        assert learner.observe_start(**ok) is None
    assert learner.observe_start(**ok) == MemoryModel(pytest.approx(4.86), pytest.approx(0.81))
    assert learner.changes == 2


def test_no_step_down_while_memory_is_not_the_limit() -> None:
    """Starts with nobody held back by memory say nothing about the figures."""
    learner, _ = _learner()
    for _ in range(20):
        assert (
            learner.observe_start(oom=False, audio_seconds=[60.0], memory_was_limit=False) is None
        )
    assert learner.model == SEED_DEFAULTS


def test_an_interrupted_stretch_does_not_count() -> None:
    """Stable starts count toward a step only in a row: an OOM sets the count back."""
    learner, _ = _learner(MemoryModel(1.0, 0.0))
    ok = {"oom": False, "audio_seconds": [60.0], "memory_was_limit": True}
    learner.observe_start(**ok)
    learner.observe_start(**ok)
    learner.observe_start(oom=True, audio_seconds=[60.0] * 6, memory_was_limit=True)
    after_oom = learner.model
    learner.observe_start(**ok)
    learner.observe_start(**ok)
    assert learner.model == after_oom, "two stable starts since the OOM, not three"


def test_the_descent_never_goes_below_the_floor() -> None:
    learner, _ = _learner(MemoryModel(6.0, 1.0), floor_gib=0.5)
    for _ in range(3 * 200):
        learner.observe_start(oom=False, audio_seconds=[60.0], memory_was_limit=True)
    assert learner.model.base_gib == 0.5
    assert 0.0 <= learner.model.per_minute_gib < 1e-6
    assert learner.model.cost(600) >= 0.5


def test_an_oom_raises_the_figures_so_that_set_would_not_fit_again() -> None:
    """After an OOM the set that ran out costs at least budget × (1 + margin): the gate would
    not start it again."""
    learner, _ = _learner(MemoryModel(1.0, 0.0))
    oom_set: list[float | None] = [300.0, 300.0, 120.0, 30.0]
    assert _set_cost(learner.model, oom_set) < BUDGET
    new = learner.observe_start(oom=True, audio_seconds=oom_set, memory_was_limit=True)
    assert new is not None
    assert new == learner.model
    need = BUDGET * (1 + learner.params.margin)
    assert _set_cost(new, oom_set) >= need - 1e-6
    running, newcomer = oom_set[:-1], learner.model.cost(oom_set[-1])
    assert not fits(newcomer, used=_set_cost(new, running), budget=BUDGET, running=len(running))
    snapshot = learner.snapshot()
    assert snapshot["oom_sets_remembered"] == 1
    assert snapshot["changes"] == 1


def test_an_oom_with_unknown_lengths_counts_them_as_long() -> None:
    learner, _ = _learner(MemoryModel(0.5, 0.0))
    learner.observe_start(oom=True, audio_seconds=[None, 60.0], memory_was_limit=False)
    assert _set_cost(learner.model, [None, 60.0]) >= BUDGET * 1.05 - 1e-6


def test_every_remembered_oom_set_stays_explained() -> None:
    learner, clock = _learner(MemoryModel(0.5, 0.0))
    sets: list[list[float | None]] = [
        [600.0, 600.0],
        [30.0] * 7,
        [300.0, 60.0, 60.0, 120.0],
    ]
    for oom_set in sets:
        clock.advance(10)
        learner.observe_start(oom=True, audio_seconds=oom_set, memory_was_limit=True)
    for oom_set in sets:
        assert _set_cost(learner.model, oom_set) >= BUDGET * 1.05 - 1e-6
    assert learner.snapshot()["oom_sets_remembered"] == 3


def test_oom_sets_fade_after_fade_seconds() -> None:
    """`tick` lets an OOM set go once it is older than `fade_seconds`; the figures come back
    to where the descent was (here: the start, since no stable stretch came between)."""
    learner, clock = _learner(MemoryModel(1.0, 0.0), fade_seconds=600)
    raised = learner.observe_start(oom=True, audio_seconds=[300.0] * 4, memory_was_limit=True)
    assert raised is not None
    assert raised.cost(300) > 1.0
    clock.advance(599)
    assert learner.tick() is None
    assert learner.model == raised
    clock.advance(2)
    assert learner.tick() == MemoryModel(1.0, 0.0)
    assert learner.model == MemoryModel(1.0, 0.0)
    assert learner.snapshot()["oom_sets_remembered"] == 0
    assert learner.tick() is None, "nothing left to fade"


def test_only_the_old_sets_fade() -> None:
    learner, clock = _learner(MemoryModel(0.5, 0.0), fade_seconds=600)
    learner.observe_start(oom=True, audio_seconds=[30.0] * 10, memory_was_limit=True)
    clock.advance(300)
    learner.observe_start(oom=True, audio_seconds=[600.0, 600.0], memory_was_limit=True)
    clock.advance(301)
    learner.tick()
    assert learner.snapshot()["oom_sets_remembered"] == 1
    assert _set_cost(learner.model, [600.0, 600.0]) >= BUDGET * 1.05 - 1e-6


def test_the_snapshot_reports_rounded_figures_and_the_start() -> None:
    learner, _ = _learner(MemoryModel(2.0, 0.3))
    learner.observe_start(oom=True, audio_seconds=[200.0, 400.0, 50.0], memory_was_limit=True)
    snapshot = learner.snapshot()
    assert set(snapshot) == {
        "task_memory_gib",
        "task_memory_per_minute_gib",
        "started_from",
        "oom_sets_remembered",
        "fitting_sets_remembered",
        "changes",
    }
    model = learner.model.rounded()
    assert snapshot["task_memory_gib"] == model.base_gib
    assert snapshot["task_memory_per_minute_gib"] == model.per_minute_gib
    assert snapshot["started_from"] == {"task_memory_gib": 2.0, "task_memory_per_minute_gib": 0.3}


def _long_recent_tasks(learner: MemoryLearner) -> None:
    """Tasks of 15 minutes started alone: the typical task of the objective is a long one."""
    for _ in range(20):
        learner.observe_start(oom=False, audio_seconds=[900.0], memory_was_limit=False)


def test_a_set_that_fitted_bounds_the_figures_from_above() -> None:
    """Four 5-minute files ran out of memory together. Explained by the base alone (4.725 GiB
    each: the cheapest for long tasks), five 30-second files would cost 23.6 GiB; once those
    five have run together, the figures must let them fit: 3.475 + 0.25/min does both."""
    alone, _ = _learner(MemoryModel(0.25, 0.0))
    _long_recent_tasks(alone)
    alone.observe_start(oom=True, audio_seconds=[300.0] * 4, memory_was_limit=False)
    assert alone.model == MemoryModel(pytest.approx(4.725), 0.0)
    assert _set_cost(alone.model, [30.0] * 5) > BUDGET

    learner, _ = _learner(MemoryModel(0.25, 0.0))
    _long_recent_tasks(learner)
    learner.observe_start(oom=True, audio_seconds=[300.0] * 4, memory_was_limit=False)
    changed = learner.observe_start(oom=False, audio_seconds=[30.0] * 5, memory_was_limit=False)
    assert changed == MemoryModel(pytest.approx(3.475), pytest.approx(0.25))
    assert _set_cost(learner.model, [30.0] * 5) <= BUDGET + 1e-6
    assert _set_cost(learner.model, [300.0] * 4) >= BUDGET * 1.05 - 1e-6
    assert learner.snapshot()["fitting_sets_remembered"] == 1


def test_a_task_alone_is_no_fitting_set() -> None:
    learner, _ = _learner()
    learner.observe_start(oom=False, audio_seconds=[600.0], memory_was_limit=False)
    assert learner.snapshot()["fitting_sets_remembered"] == 0


def test_only_the_sets_that_say_most_are_kept() -> None:
    """A fitting set below another one says nothing more; an OOM set above another neither."""
    learner, _ = _learner(MemoryModel(0.5, 0.0))
    learner.observe_start(oom=False, audio_seconds=[60.0] * 3, memory_was_limit=False)
    learner.observe_start(oom=False, audio_seconds=[60.0] * 2, memory_was_limit=False)
    assert learner.snapshot()["fitting_sets_remembered"] == 1
    learner.observe_start(oom=False, audio_seconds=[120.0] * 4, memory_was_limit=False)
    assert learner.snapshot()["fitting_sets_remembered"] == 1, "the larger set replaces it"
    learner.observe_start(oom=True, audio_seconds=[600.0] * 6, memory_was_limit=False)
    learner.observe_start(oom=True, audio_seconds=[600.0] * 5, memory_was_limit=False)
    assert learner.snapshot()["oom_sets_remembered"] == 1, "the smaller OOM set replaces it"


def test_an_oom_overrules_a_fitting_set_at_or_above_it() -> None:
    """The newer word wins: an OOM set beneath a set that fitted (the card changed, or the
    evidence was noisy) makes the learner forget that fitting set, and a set that fits at or
    above a remembered OOM set is not trusted."""
    learner, _ = _learner(MemoryModel(0.5, 0.0))
    learner.observe_start(oom=False, audio_seconds=[60.0] * 5, memory_was_limit=False)
    assert learner.snapshot()["fitting_sets_remembered"] == 1
    learner.observe_start(oom=True, audio_seconds=[60.0] * 4, memory_was_limit=False)
    assert learner.snapshot()["fitting_sets_remembered"] == 0
    assert _set_cost(learner.model, [60.0] * 4) >= BUDGET * 1.05 - 1e-6
    learner.observe_start(oom=False, audio_seconds=[60.0] * 5, memory_was_limit=False)
    assert learner.snapshot()["fitting_sets_remembered"] == 0


def test_fitting_sets_fade_too() -> None:
    learner, clock = _learner(MemoryModel(0.5, 0.0), fade_seconds=600)
    learner.observe_start(oom=False, audio_seconds=[60.0] * 3, memory_was_limit=False)
    clock.advance(601)
    learner.tick()
    assert learner.snapshot()["fitting_sets_remembered"] == 0


_AUDIO = st.one_of(st.none(), st.floats(min_value=0.0, max_value=7200.0))


@given(
    start=st.builds(
        MemoryModel,
        st.floats(min_value=0.25, max_value=20.0),
        st.floats(min_value=0.0, max_value=3.0),
    ),
    sets=st.lists(st.lists(_AUDIO, min_size=1, max_size=8), min_size=1, max_size=6),
)
def test_the_figures_explain_every_oom_and_respect_the_floor(
    start: MemoryModel, sets: list[list[float | None]]
) -> None:
    learner, clock = _learner(start)
    for oom_set in sets:
        clock.advance(1)
        learner.observe_start(oom=True, audio_seconds=oom_set, memory_was_limit=True)
        model = learner.model
        assert model.base_gib >= learner.params.floor_gib - 1e-9
        assert model.per_minute_gib >= 0.0
    floor = learner.floor()
    for oom_set in sets:
        assert _set_cost(floor, oom_set) >= BUDGET * 1.05 - 1e-5
        assert _set_cost(learner.model, oom_set) >= BUDGET * 1.05 - 1e-5


# -- convergence: a card simulated with the true figures -----------------------------------------

_TASKS = 2_000
_WINDOW = 20
"""How far into the queue first fit looks (the gate's queue)."""
_BACKFILL_SECONDS = 120.0
"""ASR_BACKFILL_SECONDS' default: the head is passed for at most this long."""
_SECONDS_PER_AUDIO_SECOND = 0.2
"""A task runs for a fifth of its audio's length."""


@dataclass
class _Run:
    starts: list[tuple[float, float]] = field(default_factory=list)  # (time, audio seconds)
    ooms: list[float] = field(default_factory=list)  # time of each start that ran out

    def figures(self) -> tuple[float, float]:
        """Audio minutes started per minute, and OOMs per start, in the last part: from the
        middle start to the point where the queue begins to drain."""
        first, last = len(self.starts) // 2, len(self.starts) - _WINDOW
        t0, t1 = self.starts[first][0], self.starts[last][0]
        minutes = math.fsum(audio for _, audio in self.starts[first:last]) / 60.0
        ooms = sum(1 for t in self.ooms if t0 <= t < t1)
        return minutes / ((t1 - t0) / 60.0), ooms / (last - first)


def _stream(n: int, seed: int = 1) -> list[float]:
    """Audio lengths log-uniform between 10 s and 10 min, as the benchmark's workload."""
    rng = random.Random(seed)
    low, high = math.log(10.0), math.log(600.0)
    return [math.exp(rng.uniform(low, high)) for _ in range(n)]


def _run(
    audio: list[float],
    truth: MemoryModel,
    *,
    model: MemoryModel | None = None,
    learner: MemoryLearner | None = None,
    clock: FakeTime | None = None,
    cap: int = 64,
) -> _Run:
    """Every task queued at once (a backlog); one card of `BUDGET`, at most `cap` tasks.

    The figures in use are the learner's, else `model`. Running tasks keep the cost they were
    charged at their start (as the gate does)."""
    assert (model is None) != (learner is None)
    clock = clock or FakeTime(0.0)
    run = _Run()
    queue = deque(range(len(audio)))
    running: list[tuple[float, int, float]] = []  # heap of (end, task, charged)
    head, head_passed_at = -1, None
    while queue:
        while queue:
            figures = learner.model if learner is not None else model
            assert figures is not None
            used = math.fsum(charged for _, _, charged in running)

            def fit(task: int, figures: MemoryModel = figures, used: float = used) -> bool:
                cost = figures.cost(audio[task])
                return len(running) < cap and fits(
                    cost, used=used, budget=BUDGET, running=len(running)
                )

            if queue[0] != head:
                head, head_passed_at = queue[0], None
            chosen = head if fit(head) else None
            if chosen is None and (
                head_passed_at is None or clock.t - head_passed_at < _BACKFILL_SECONDS
            ):
                chosen = next(
                    (queue[j] for j in range(1, min(_WINDOW, len(queue))) if fit(queue[j])), None
                )
                if chosen is not None and head_passed_at is None:
                    head_passed_at = clock.t
            if chosen is None:
                break
            beside: list[float | None] = [audio[task] for _, task, _ in running]
            beside.append(audio[chosen])
            if running and _set_cost(truth, beside) > BUDGET + 1e-9:
                run.ooms.append(clock.t)
                if learner is not None:
                    learner.observe_start(oom=True, audio_seconds=beside, memory_was_limit=True)
                break  # the card cools down: nothing more starts until a task ends
            queue.remove(chosen)
            end = clock.t + _SECONDS_PER_AUDIO_SECOND * audio[chosen]
            heapq.heappush(running, (end, chosen, figures.cost(audio[chosen])))
            run.starts.append((clock.t, audio[chosen]))
            if learner is not None:
                learner.observe_start(oom=False, audio_seconds=beside, memory_was_limit=bool(queue))
        assert running, "an empty card always takes the head"
        now = running[0][0]
        while running and running[0][0] <= now:
            heapq.heappop(running)
        clock.t = now
        if learner is not None:
            learner.tick()
    return run


def test_the_oracle_loop_never_runs_out_of_memory() -> None:
    """The loop itself: with the true figures there is no OOM, and on the flat card memory
    admission is exactly a count limit of 3."""
    audio = _stream(400)
    assert not _run(audio, TRUE_CARD, model=TRUE_CARD).ooms
    flat = _run(audio, FLAT_CARD, model=FLAT_CARD)
    count_3 = _run(audio, FLAT_CARD, model=MemoryModel(0.0), cap=3)
    assert not flat.ooms
    assert not count_3.ooms
    assert flat.starts == count_3.starts
    too_low = _run(audio, TRUE_CARD, model=MemoryModel(1.0))
    assert too_low.ooms, "figures too low run out of memory"


_SEEDS = (1, 2, 3)


@functools.cache
def _best(truth: MemoryModel, seed: int) -> float:
    """What the truth admits in the same loop: the true figures as an oracle; on the flat card
    that is exactly a count limit of 3 (18 / 6), today's rule."""
    audio = _stream(_TASKS, seed)
    if truth.per_minute_gib == 0:
        cap = round(BUDGET / truth.base_gib)
        return _run(audio, truth, model=MemoryModel(0.0), cap=cap).figures()[0]
    return _run(audio, truth, model=truth).figures()[0]


def _learned(truth: MemoryModel, start: MemoryModel) -> tuple[float, float]:
    """The learner's throughput as a share of the oracle's and its OOMs per start, each the
    mean over `_SEEDS` (one seed alone can be an outlier either way)."""
    ratios, oom_rates = [], []
    for seed in _SEEDS:
        clock = FakeTime(0.0)
        learner = MemoryLearner(start, budget_gib=BUDGET, now=clock)
        run = _run(_stream(_TASKS, seed), truth, learner=learner, clock=clock)
        throughput, oom_rate = run.figures()
        best = _best(truth, seed)
        ratios.append(throughput / best)
        oom_rates.append(oom_rate)
        print(
            f"truth {truth}, start {start}, seed {seed}: {throughput:.2f} audio-min/min "
            f"against {best:.2f} ({throughput / best:.3f}), OOMs on {oom_rate:.1%} of starts; "
            f"learned {learner.model.rounded()}"
        )
    return statistics.fmean(ratios), statistics.fmean(oom_rates)


_SHORT = {
    # (truth, start): the figures measured (3 seeds × 2,000 tasks), where the learner falls
    # short; the lead tunes the learner (issue #16). Per seed, from the seed's defaults:
    # 0.926/0.935/0.941 of the oracle, OOMs 2.4/2.6/1.7 %; from 1 GiB: 0.909/0.937/0.921,
    # 1.5/1.7/3.0 %.
    (TRUE_CARD, SEED_DEFAULTS): "0.934 of the oracle, but OOMs on 2.2 % of starts",
    (TRUE_CARD, MemoryModel(1.0, 0.0)): "0.922 of the oracle, but OOMs on 2.1 % of starts",
}


def _case(truth: MemoryModel, start: MemoryModel, name: str) -> object:
    shortfall = _SHORT.get((truth, start))
    marks = []
    if shortfall is not None:
        marks.append(pytest.mark.xfail(strict=True, reason=f"the learner falls short: {shortfall}"))
    return pytest.param(truth, start, id=name, marks=marks)


@pytest.mark.parametrize(
    ("truth", "start"),
    [
        _case(TRUE_CARD, SEED_DEFAULTS, "default-card-from-seed-defaults"),
        _case(TRUE_CARD, MemoryModel(1.0, 0.0), "default-card-from-too-low"),
        _case(TRUE_CARD, MemoryModel(10.0, 1.0), "default-card-from-too-high"),
        _case(FLAT_CARD, SEED_DEFAULTS, "flat-card-from-seed-defaults"),
        _case(FLAT_CARD, MemoryModel(1.0, 0.0), "flat-card-from-too-low"),
        _case(FLAT_CARD, MemoryModel(10.0, 1.0), "flat-card-from-too-high"),
    ],
)
def test_the_learner_gets_close_to_the_truth(truth: MemoryModel, start: MemoryModel) -> None:
    """After a while the learned figures admit at least 90 % of what the true figures admit,
    with OOMs on fewer than 2 % of the starts. On the flat card (the length does not matter)
    no worse than a count limit of 3: at least 98 % of it (the learner pays for its probes)."""
    ratio, oom_rate = _learned(truth, start)
    print(f"mean: {ratio:.3f} of the oracle, OOMs on {oom_rate:.2%} of starts")
    assert oom_rate < 0.02
    assert ratio >= (0.98 if truth.per_minute_gib == 0 else 0.90)
