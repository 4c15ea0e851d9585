"""The memory figures `gatekeeper tune` recommends (#16): ASR_TASK_MEMORY_GIB and
ASR_TASK_MEMORY_PER_MINUTE_GIB for a card with ASR_GPU_MEMORY_GIB free, from its levels.

Pure functions, tested without sockets. Each audio length climbed alone says "c tasks of d
minutes fitted at once, c + 1 ran out of memory": a task of d minutes costs at most B / c and
more than B / (c + 1) of the card's B GiB. The figures are a line, base + per_minute × minutes,
chosen so that:

- **every success is explained**: c tasks of d minutes fit under the figures (c × cost ≤ B),
  so the gatekeeper admits what was seen to work;
- **every OOM is explained with a margin**: the set that ran out would need at least
  `MARGIN` more than the card (o × cost ≥ B × (1 + MARGIN)), so it is never admitted (less
  margin when the measurements leave less room: a set that ran out by 3 % gets under 3 %);
- **as close to what fitted as a line allows**: each length's cost as near B / c as the others
  let it be (the largest shortfall below B / c, in widths of that length's interval, is made
  least: a length known coarsely, one that fitted only alone, gives way to those known
  finely). Below B / c is the side that costs throughput, not an OOM; with two lengths the
  line goes through both points exactly. The top of what fitted is the safe end of each
  measured interval: the smallest figures that merely explain the OOMs would cost a 10-minute
  file 7.3 GiB on the simulator's card, whose truth is 10, and let two of them OOM;
- **the smallest among equals**: the least per-minute figure, then the least base. With one
  length nothing tells the base from the per-minute part: per_minute 0, base = B / c.

When the lengths do not fit one line (a longer file that fitted more often than a shorter one,
as with a server that skips silence), every OOM is still explained and the successes are
broken as little as possible (the figures allow fewer tasks than fitted: the safe side).
"""

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from gatekeeper.commands.tune.decide import LevelResult

__all__ = [
    "MARGIN",
    "DurationBound",
    "MemoryFigures",
    "MemoryRecommendation",
    "bound_from_levels",
    "memory_figures",
    "pool_memory_settings",
    "recommend_memory",
    "settings_line",
]

MARGIN: Final = 0.05
"""A set that ran out of memory must need at least this much more than the card under the
figures (the same margin as the gatekeeper's own learner)."""

_TOL: Final = 1e-9
_ROUNDING_BASE: Final = 0.001  # the figures are rounded down to these
_ROUNDING_PER_MINUTE: Final = 0.0001


@dataclass(frozen=True, slots=True)
class DurationBound:
    """What one audio length's climb showed: the most that fitted at once, the first OOM."""

    audio_seconds: float
    fitted: int
    """The highest level where every task succeeded (0: not even one)."""
    oom_at: int | None
    """The first level with an OOM (None: none ran out of memory)."""
    stopped: str | None = None
    """Why its climb stopped (`decide.stop_reason`'s words, or `max_level`)."""
    levels: tuple[LevelResult, ...] = ()

    @property
    def minutes(self) -> float:
        return self.audio_seconds / 60.0


def bound_from_levels(
    audio_seconds: float, levels: Sequence[LevelResult], stopped: str | None = None
) -> DurationBound:
    """The bound one climb gives: the highest clean level below the first failure, and the first
    level with an OOM (a level after the first failure counts for nothing)."""
    fitted, oom_at = 0, None
    for result in sorted(levels, key=lambda r: r.level):
        if result.oom:
            oom_at = result.level
            break
        if not result.clean:
            break
        fitted = result.level
    return DurationBound(audio_seconds, fitted, oom_at, stopped, tuple(levels))


@dataclass(frozen=True, slots=True)
class MemoryFigures:
    """A task's estimated peak: `base_gib + per_minute_gib × audio minutes`."""

    base_gib: float
    per_minute_gib: float
    consistent: bool = True
    """False when the lengths did not fit one line: the successes were given up for the OOMs."""

    def cost(self, minutes: float) -> float:
        return self.base_gib + self.per_minute_gib * minutes


# A constraint on (base, per_minute, z): a·base + b·per_minute + c·z ≥ r.
_Constraint = tuple[float, float, float, float]


def memory_figures(
    bounds: Sequence[DurationBound],
    budget_gib: float,
    *,
    margin: float = MARGIN,
    rounded: bool = True,
) -> MemoryFigures | None:
    """The figures for a card with `budget_gib` free (see the module), rounded down (base to
    0.001 GiB, per minute to 0.0001: a success stays explained, and the margin keeps an OOM
    explained); None when no length fitted."""
    if budget_gib <= 0 or not any(b.fitted >= 1 for b in bounds):
        return None
    signs: list[_Constraint] = [(1.0, 0.0, 0.0, 0.0), (0.0, 1.0, 0.0, 0.0)]  # both ≥ 0
    # Phase 1: every success and every OOM explained; z = the largest shortfall below what
    # fitted (B / c), in widths of that length's interval, least. The margin is a wish: when
    # the measurements leave less room (a set that ran out by 3 %), it shrinks to what is left.
    for wish in (margin, margin / 2, margin / 5, 0.0):
        phase1 = [*signs, (0.0, 0.0, 1.0, 0.0)]
        for b in bounds:
            bottom = 0.0  # of this length's interval: its OOM's need, else nothing known
            if b.oom_at:
                floor = _oom_constraint(b, budget_gib, wish)
                phase1.append(floor)
                bottom = floor[3]
            if b.fitted >= 1:
                top = budget_gib / b.fitted
                width = max(top - bottom, _TOL)
                phase1 += [(-1.0, -b.minutes, 0.0, -top), (1.0, b.minutes, width, top)]
        best = _best(phase1)
        if best is not None:
            return _figures(best, consistent=True, rounded=rounded)
    # Phase 2: the OOMs explained; z = how far the successes must be broken (≥ 1), least.
    ooms = [_oom_constraint(b, budget_gib, margin) for b in bounds if b.oom_at]
    phase2 = [*signs, *ooms, (0.0, 0.0, 1.0, 1.0)]
    phase2 += [(-1.0, -b.minutes, budget_gib / b.fitted, 0.0) for b in bounds if b.fitted >= 1]
    best = _best(phase2)
    if best is None:  # pragma: no cover - phase 2 is always feasible (costs high enough)
        return None
    return _figures(best, consistent=False, rounded=rounded)


def _oom_constraint(bound: DurationBound, budget: float, margin: float) -> _Constraint:
    """o tasks of d minutes ran out: o × cost ≥ B × (1 + margin), at least a hair above B (what
    rounding the figures down could take off), and never above what fitted (B / c: with
    c ≥ 1 / margin the margin would contradict the success)."""
    assert bound.oom_at is not None
    hair = bound.oom_at * (_ROUNDING_BASE + _ROUNDING_PER_MINUTE * bound.minutes) * 1.01
    need = max(budget * (1.0 + margin), budget + hair) / bound.oom_at
    if bound.fitted >= 1:
        need = min(need, budget / bound.fitted)
    return (1.0, bound.minutes, 0.0, need)


def _best(constraints: Sequence[_Constraint]) -> tuple[float, float, float] | None:
    """The feasible vertex with the least z, then the least per minute, then the least base;
    None when nothing is feasible. Three variables, a handful of constraints: every vertex
    (three constraints tight) is visited, as the gatekeeper's learner does in two."""
    best: tuple[float, float, float] | None = None
    for x in _vertices(constraints):
        if best is None or _key(x) < _key(best):
            best = x
    return best


def _key(x: tuple[float, float, float]) -> tuple[float, float, float]:
    return (round(x[2], 9), round(x[1], 9), round(x[0], 9))


def _vertices(constraints: Sequence[_Constraint]) -> Iterator[tuple[float, float, float]]:
    for rows in itertools.combinations(constraints, 3):
        x = _solve(rows)
        if x is not None and all(
            a * x[0] + b * x[1] + c * x[2] >= r - _TOL * max(1.0, abs(r))
            for a, b, c, r in constraints
        ):
            yield x


def _solve(rows: Sequence[_Constraint]) -> tuple[float, float, float] | None:
    """The point where three constraints are tight (Cramer's rule); None if they do not meet."""
    (a1, b1, c1, r1), (a2, b2, c2, r2), (a3, b3, c3, r3) = rows

    def det(m: Sequence[Sequence[float]]) -> float:
        return (
            m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
            - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
        )

    d = det(((a1, b1, c1), (a2, b2, c2), (a3, b3, c3)))
    if abs(d) < 1e-12:
        return None
    x = det(((r1, b1, c1), (r2, b2, c2), (r3, b3, c3))) / d
    y = det(((a1, r1, c1), (a2, r2, c2), (a3, r3, c3))) / d
    z = det(((a1, b1, r1), (a2, b2, r2), (a3, b3, r3))) / d
    return x, y, z


def _figures(x: tuple[float, float, float], *, consistent: bool, rounded: bool) -> MemoryFigures:
    base, per_minute = max(0.0, x[0]), max(0.0, x[1])
    if rounded:
        base = math.floor(base / _ROUNDING_BASE + 1e-6) * _ROUNDING_BASE
        per_minute = math.floor(per_minute / _ROUNDING_PER_MINUTE + 1e-6) * _ROUNDING_PER_MINUTE
        base, per_minute = round(base, 3), round(per_minute, 4)
    return MemoryFigures(base, per_minute, consistent=consistent)


# -- the recommendation --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemoryRecommendation:
    """Admission by memory for one card: its budget, the figures, the count cap, and why.

    With the budget unknown (`budget_gib` None) the figures are given per GiB of it
    (`per_budget`): they scale with the budget, the levels do not depend on it."""

    budget_gib: float | None
    budget_from: str | None
    """Where the budget came from: `--gpu-memory-gib`, `/sim/state`, or None (unknown)."""
    figures: MemoryFigures | None
    per_budget: MemoryFigures | None
    max_concurrent: int | None
    """ASR_MAX_CONCURRENT beside the figures: a cap only, the most that fitted at once."""
    bounds: tuple[DurationBound, ...]
    reason: str

    @property
    def settings(self) -> str | None:
        """The line to copy (`ASR_GPU_MEMORY_GIB=18 ASR_TASK_MEMORY_GIB=…`), when there is one."""
        if self.figures is None or self.budget_gib is None or self.max_concurrent is None:
            return None
        return settings_line(
            [_gib(self.budget_gib)],
            [_gib(self.figures.base_gib)],
            [_gib(self.figures.per_minute_gib)],
            [str(self.max_concurrent)],
        )

    def to_json(
        self, level_json: Callable[[LevelResult], dict[str, object]] | None = None
    ) -> dict[str, object]:
        """The recommendation as JSON; with `level_json`, each length's levels too."""
        figures, per_budget = self.figures, self.per_budget
        return {
            "gpu_memory_gib": self.budget_gib,
            "gpu_memory_from": self.budget_from,
            "task_memory_gib": figures.base_gib if figures else None,
            "task_memory_per_minute_gib": figures.per_minute_gib if figures else None,
            "max_concurrent": self.max_concurrent,
            "per_gib_of_budget": (
                {
                    "task_memory_gib": round(per_budget.base_gib, 6),
                    "task_memory_per_minute_gib": round(per_budget.per_minute_gib, 6),
                }
                if per_budget is not None and self.budget_gib is None
                else None
            ),
            "explains_every_measurement": figures.consistent if figures else None,
            "settings": self.settings,
            "durations": [
                {
                    "audio_seconds": round(b.audio_seconds, 3),
                    "fitted": b.fitted,
                    "oom_at": b.oom_at,
                    "stopped_because": b.stopped,
                    **({"levels": [level_json(r) for r in b.levels]} if level_json else {}),
                }
                for b in self.bounds
            ],
            "reason": self.reason,
        }


def settings_line(
    budgets: Sequence[str],
    bases: Sequence[str],
    per_minutes: Sequence[str],
    caps: Sequence[str],
) -> str:
    """`ASR_GPU_MEMORY_GIB=… ASR_TASK_MEMORY_GIB=… ASR_TASK_MEMORY_PER_MINUTE_GIB=…
    ASR_MAX_CONCURRENT=…`, each one value when every card has the same, else a list."""
    return " ".join(
        f"{name}={_one_or_list(values)}"
        for name, values in (
            ("ASR_GPU_MEMORY_GIB", budgets),
            ("ASR_TASK_MEMORY_GIB", bases),
            ("ASR_TASK_MEMORY_PER_MINUTE_GIB", per_minutes),
            ("ASR_MAX_CONCURRENT", caps),
        )
    )


def _one_or_list(values: Sequence[str]) -> str:
    return values[0] if len(set(values)) == 1 else ",".join(values)


def _gib(value: float) -> str:
    return f"{round(value, 4):g}"


def recommend_memory(
    bounds: Sequence[DurationBound],
    budget_gib: float | None,
    budget_from: str | None,
    *,
    max_level: int | None = None,
) -> MemoryRecommendation:
    """The figures for this card (or per GiB of its budget when that is unknown), the cap, and
    the reason in operator words."""
    bounds = tuple(bounds)
    per_budget = memory_figures(bounds, 1.0, rounded=False)
    figures = memory_figures(bounds, budget_gib) if budget_gib is not None else None
    cap = max((b.fitted for b in bounds), default=0) or None
    if per_budget is None:
        what = "; ".join(_bound_words(b) for b in bounds) or "nothing was measured"
        reason = f"no figures: no length fitted even alone ({what})"
        return MemoryRecommendation(budget_gib, budget_from, None, None, None, bounds, reason)
    reason = _reason(bounds, budget_gib, figures or per_budget, cap, max_level)
    return MemoryRecommendation(budget_gib, budget_from, figures, per_budget, cap, bounds, reason)


def _reason(
    bounds: Sequence[DurationBound],
    budget: float | None,
    figures: MemoryFigures,
    cap: int | None,
    max_level: int | None,
) -> str:
    card = f"{_gib(budget)} GiB" if budget is not None else "the card's free memory"
    measured = "; ".join(_bound_words(b) for b in bounds)
    lengths = {round(b.audio_seconds, 3) for b in bounds if b.fitted >= 1}
    if len(lengths) == 1:
        [b] = [b for b in bounds if b.fitted >= 1][:1]
        how = (
            f"one length only: a task costs {card} ÷ {b.fitted} whatever its length; give two "
            "lengths far apart that each fit a few at once (--durations 60,300) to tell the "
            "base from the per-minute part"
        )
    else:
        tops = ", ".join(f"{_minutes(b)} {card} ÷ {b.fitted}" for b in bounds if b.fitted >= 1)
        how = f"each length costed as near what fitted as a line allows ({tops})"
        alone = [_minutes(b).rstrip(":") for b in bounds if b.fitted == 1]
        if alone:
            how += (
                f"; {', '.join(alone)} fitted only alone, which says little (between half the "
                "card and all of it): a length that fits two to four at once gives sharper figures"
            )
    parts = [measured, how]
    if not figures.consistent:
        parts.append(
            "the lengths do not fit one line (did a longer file fit more often? a server that "
            "skips silence needs real speech: --audio): every OOM is explained, and fewer tasks "
            "are allowed than fitted"
        )
    elif any(b.oom_at is not None for b in bounds):
        parts.append(
            f"under these figures every set that ran out of memory needs at least {MARGIN:.0%} "
            "more than the card"
        )
    if cap is not None:
        capped = f"ASR_MAX_CONCURRENT {cap} only caps: the most that fitted at once"
        if max_level is not None and cap >= max_level:
            capped += f" (--max-level {max_level} reached: more may fit)"
        parts.append(capped)
    return "; ".join(parts)


def _minutes(bound: DurationBound) -> str:
    return f"{bound.minutes:g} min:"


def _bound_words(bound: DurationBound) -> str:
    text = f"{_minutes(bound)} {bound.fitted} fitted at once"
    if bound.oom_at is not None:
        return f"{text}, {bound.oom_at} ran out of memory"
    if bound.stopped == "max_level":
        return f"{text} (--max-level)"
    if bound.stopped and bound.stopped not in ("no_gain",):
        return f"{text}, then {bound.stopped.replace('_', ' ')}"
    return text


def pool_memory_settings(recommendations: Sequence[MemoryRecommendation | None]) -> str | None:
    """The pool's line, one value per card in ASR_UPSTREAM_URL's order (one when all agree);
    None when a card has no figures or no budget."""
    if not recommendations:
        return None
    rows = []
    for rec in recommendations:
        if rec is None or rec.figures is None or rec.budget_gib is None:
            return None
        if rec.max_concurrent is None:  # pragma: no cover - figures imply a fitted level
            return None
        rows.append(
            (
                _gib(rec.budget_gib),
                _gib(rec.figures.base_gib),
                _gib(rec.figures.per_minute_gib),
                str(rec.max_concurrent),
            )
        )
    budgets, bases, per_minutes, caps = zip(*rows, strict=True)
    return settings_line(budgets, bases, per_minutes, caps)
