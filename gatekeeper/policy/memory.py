"""Admission by GPU memory (ASR_GPU_MEMORY_GIB): what a task costs, whether it fits, and how the
figures are learned.

Pure policy, like the adaptive count: no asyncio, no aiohttp, time injected.

**Cost.** The seed's rule is about memory: "最大并发数 = (GPU总显存 − 系统预留) / 单个转录峰值显存".
A task's peak is estimated as `base + per_minute × audio minutes` (ASR_TASK_MEMORY_GIB,
ASR_TASK_MEMORY_PER_MINUTE_GIB). A file whose length could not be read is costed as a long one
(`UNKNOWN_AUDIO_SECONDS`): never refused for that, but never squeezed beside others either.

**Fit.** A task starts on a card only when the estimated peaks of the card's running tasks plus
its own fit in the card's budget; a task bigger than the whole card runs alone (it may still
fit: the estimate can be wrong, and refusing it forever would be worse).

**Learning** (ASR_ADAPTIVE). Every task that starts on a card is a piece of evidence about the
set of tasks running there at that moment (the simulator and real servers allocate the big
buffers when a task starts): an OOM says "these together did not fit", a start that went well
says "these fitted". The learner keeps the OOM sets of the last `fade_seconds` and chooses the
cheapest figures that explain every one of them with a margin: a two-variable linear programme
(minimise the cost of a typical task subject to `n·base + minutes·per_minute ≥ budget × (1 +
margin)` for each OOM set), solved exactly by visiting the vertices; the typical task of the
objective is a long one of the recent ones, so a per-minute figure is learned only when OOMs
demand it. With no OOM to explain, the
figures come down from where they started, a step after each stretch of successes that ran with
the memory full and tasks waiting (the same "probe while there is demand" as the adaptive
count). An OOM stops the descent where it was: the probe restarts from the figures that
explained it.
"""

import itertools
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "UNKNOWN_AUDIO_SECONDS",
    "MemoryLearner",
    "MemoryModel",
    "MemoryParams",
    "fits",
]

UNKNOWN_AUDIO_SECONDS = 3600.0
"""The length an unreadable file is costed at: an hour, a long meeting."""

_EPS = 1e-9


@dataclass(frozen=True, slots=True)
class MemoryModel:
    """A task's estimated peak GPU memory from the length of its audio."""

    base_gib: float
    per_minute_gib: float = 0.0

    def cost(self, audio_seconds: float | None) -> float:
        """Estimated peak in GiB; an unknown length counts as `UNKNOWN_AUDIO_SECONDS`."""
        seconds = UNKNOWN_AUDIO_SECONDS if audio_seconds is None else max(0.0, audio_seconds)
        return self.base_gib + self.per_minute_gib * seconds / 60.0

    def rounded(self) -> "MemoryModel":
        return MemoryModel(round(self.base_gib, 3), round(self.per_minute_gib, 4))


def fits(cost: float, *, used: float, budget: float, running: int) -> bool:
    """Whether a task of `cost` GiB may start beside `running` tasks using `used` of `budget`.

    A task alone always may: bigger than the card or not, refusing it forever helps nobody.
    """
    return running == 0 or used + cost <= budget + _EPS


@dataclass(frozen=True, slots=True)
class MemoryParams:
    """How the learner moves (defaults suit a card that runs a few tasks at once)."""

    margin: float = 0.05
    """Figures explain each OOM with this much to spare: the set that ran out would now need
    `budget × (1 + margin)`."""
    step: float = 0.9
    """Without OOMs, each stable stretch multiplies the figures by this."""
    stable_starts: int = 3
    """Starts that went well while memory was the limit (a task waited that did not fit), with
    no OOM between, before the figures come down a step."""
    fade_seconds: float = 3600.0
    """OOM sets older than this are forgotten (a restarted server is probed again)."""
    floor_gib: float = 0.25
    """The base never goes below this: a task always costs something."""


@dataclass(frozen=True, slots=True)
class _Evidence:
    """One set of tasks that ran out of memory together: its size and its minutes of audio."""

    tasks: int
    minutes: float
    at: float


def _covers(big: _Evidence, small: _Evidence) -> bool:
    """`big` has at least the tasks and the minutes of `small`."""
    return big.tasks >= small.tasks and big.minutes >= small.minutes - 1e-9


def _cheapest(
    lower: list[tuple[float, float, float]],
    upper: list[tuple[float, float, float]],
    base_min: float,
    weight: float,
) -> tuple[float, float] | None:
    """min base + weight × per_minute subject to a·b + c·p ≥ r (lower), ≤ r (upper), b ≥
    base_min, p ≥ 0: a two-variable linear programme, solved by visiting its vertices."""

    def feasible(b: float, p: float) -> bool:
        return (
            b >= base_min - _EPS
            and p >= -_EPS
            and all(a * b + c * p >= r - 1e-6 for a, c, r in lower)
            and all(a * b + c * p <= r + 1e-6 for a, c, r in upper)
        )

    lines = [*lower, *upper, (1.0, 0.0, base_min), (0.0, 1.0, 0.0)]
    best: tuple[float, float] | None = None
    for (a1, c1, r1), (a2, c2, r2) in itertools.combinations(lines, 2):
        det = a1 * c2 - a2 * c1
        if abs(det) < 1e-12:
            continue
        b = (r1 * c2 - r2 * c1) / det
        p = (a1 * r2 - a2 * r1) / det
        if feasible(b, p) and (best is None or b + weight * p < best[0] + weight * best[1]):
            best = (b, p)
    return best


class MemoryLearner:
    """Learns one card's memory figures from OOMs and successes; answers the model to use."""

    def __init__(
        self,
        start: MemoryModel,
        *,
        budget_gib: float,
        now: Callable[[], float],
        params: MemoryParams | None = None,
    ) -> None:
        self.start = start
        self.budget = budget_gib
        self.params = params or MemoryParams()
        self._now = now
        self._probe = start  # where the descent has got to
        # Only the sets that say most are kept: an OOM set with no smaller OOM set beneath it
        # (fewer tasks and fewer minutes), a fitting set with no larger fitting set above it.
        self._ooms: list[_Evidence] = []
        self._fits: list[_Evidence] = []
        self._stable = 0
        # The lengths of recent tasks: their mean weighs the per-minute figure in the objective
        # (the cost of a typical task).
        self._recent_minutes: deque[float] = deque(maxlen=128)
        self.model = start
        self.changes = 0

    def observe_start(
        self,
        *,
        oom: bool,
        audio_seconds: Sequence[float | None],
        memory_was_limit: bool,
    ) -> MemoryModel | None:
        """A task started on the card beside others: `audio_seconds` of every task running
        there then, itself included. `oom`: it ran out of memory. `memory_was_limit`: a task
        waited that did not fit (there was demand the figures held back). Returns the new
        model when it changed."""
        minutes = [
            (UNKNOWN_AUDIO_SECONDS if s is None else max(0.0, s)) / 60.0 for s in audio_seconds
        ]
        if minutes:
            self._recent_minutes.append(minutes[-1])
        evidence = _Evidence(len(minutes), math.fsum(minutes), self._now())
        if oom:
            self._add_oom(evidence)
            self._stable = 0
            self._probe = self.model  # the descent stops here; the OOM set lifts the floor
            return self._update()
        changed = len(minutes) > 1 and self._add_fit(evidence)
        if memory_was_limit:
            self._stable += 1
            if self._stable >= self.params.stable_starts:
                self._stable = 0
                step = self.params.step
                self._probe = MemoryModel(
                    max(self.params.floor_gib, self._probe.base_gib * step),
                    self._probe.per_minute_gib * step,
                )
                return self._update()
        return self._update() if changed else None

    def _add_oom(self, new: _Evidence) -> None:
        # A fitting set at or above an OOM set contradicts it (the card changed, or the
        # evidence was noisy): the newer word wins.
        self._fits = [f for f in self._fits if not _covers(f, new)]
        self._ooms = [o for o in self._ooms if not _covers(o, new)]
        self._ooms.append(new)

    def _add_fit(self, new: _Evidence) -> bool:
        """Keep a fitting set when no kept one covers it; True when the frontier changed."""
        if any(_covers(f, new) for f in self._fits):
            return False
        if any(_covers(new, o) for o in self._ooms):
            return False  # an OOM set at or below it says otherwise: not trusted
        self._fits = [f for f in self._fits if not _covers(new, f)]
        self._fits.append(new)
        return True

    def adopt(self, model: MemoryModel) -> MemoryModel | None:
        """Take the figures another replica of the cluster learned (the last word wins): the
        descent goes on from them, and this replica's own evidence still holds the floor."""
        self._probe = model
        self._stable = 0
        if model == self.model:
            return None
        self.model = model
        self.changes += 1
        return model

    def tick(self) -> MemoryModel | None:
        """Let evidence older than `fade_seconds` go; the new model when that changed it."""
        horizon = self._now() - self.params.fade_seconds
        ooms = [o for o in self._ooms if o.at >= horizon]
        fits = [f for f in self._fits if f.at >= horizon]
        if len(ooms) == len(self._ooms) and len(fits) == len(self._fits):
            return None
        self._ooms, self._fits = ooms, fits
        return self._update()

    def floor(self) -> MemoryModel:
        """The cheapest figures that explain every remembered OOM with the margin and let every
        remembered fitting set fit (those that would contradict the OOMs are set aside)."""
        base_min = self.params.floor_gib
        if not self._ooms:
            return MemoryModel(base_min, 0.0)
        need = self.budget * (1.0 + self.params.margin)
        lower = [(float(o.tasks), o.minutes, need) for o in self._ooms]
        upper = [(float(f.tasks), f.minutes, self.budget) for f in self._fits]
        weight = max(math.fsum(self._recent_minutes) / max(1, len(self._recent_minutes)), 0.1)
        while True:
            best = _cheapest(lower, upper, base_min, weight)
            if best is not None or not upper:
                break
            upper = upper[1:]  # contradictory evidence: the oldest fitting set goes first
        if best is None:  # unbounded only along a ray; explain by the base alone
            return MemoryModel(max(base_min, max(r / a for a, _, r in lower)), 0.0)
        return MemoryModel(max(base_min, best[0]), max(0.0, best[1]))

    def _update(self) -> MemoryModel | None:
        floor = self.floor()
        model = MemoryModel(
            max(floor.base_gib, self._probe.base_gib),
            max(floor.per_minute_gib, self._probe.per_minute_gib),
        )
        if model == self.model:
            return None
        self.model = model
        self.changes += 1
        return model

    def snapshot(self) -> dict[str, object]:
        """The state for /stats."""
        model = self.model.rounded()
        return {
            "task_memory_gib": model.base_gib,
            "task_memory_per_minute_gib": model.per_minute_gib,
            "started_from": {
                "task_memory_gib": self.start.base_gib,
                "task_memory_per_minute_gib": self.start.per_minute_gib,
            },
            "oom_sets_remembered": len(self._ooms),
            "fitting_sets_remembered": len(self._fits),
            "changes": self.changes,
        }
