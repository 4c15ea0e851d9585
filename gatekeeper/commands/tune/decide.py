"""What `gatekeeper tune` decides from its measurements: when to stop climbing, what to recommend.

Pure functions over `LevelResult`s, tested without sockets. Latency percentiles are
`gatekeeper.state.percentile` (nearest rank), the p50/p95 of `/stats` and the benchmark.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from gatekeeper.policy.outcomes import AttemptOutcome
from gatekeeper.policy.quantiles import percentile

__all__ = [
    "MIN_GAIN",
    "LevelResult",
    "Recommendation",
    "TaskSample",
    "gain_words",
    "pool_setting",
    "recommend",
    "stop_reason",
    "summarize",
]

MIN_GAIN: Final = 0.05
"""A level must add at least this much goodput over the one below to be worth its memory."""


@dataclass(frozen=True, slots=True)
class TaskSample:
    """What one task did: its outcome, how long it took and how much audio it carried."""

    outcome: AttemptOutcome
    seconds: float
    audio_seconds: float
    status: int | None = None


@dataclass(frozen=True, slots=True)
class LevelResult:
    """The measurements of one concurrency level."""

    level: int
    planned: int
    sent: int
    ok: int
    oom: int
    crash: int
    error: int
    timeout: int
    client_error: int
    p50: float | None
    p95: float | None
    wall_seconds: float
    audio_seconds_ok: float

    @property
    def server_errors(self) -> int:
        """Non-OOM server failures: 5xx answers and dropped connections."""
        return self.error + self.crash

    @property
    def clean(self) -> bool:
        """Every task sent succeeded: no OOM, no 5xx, no crash, no timeout, no 4xx."""
        return self.sent > 0 and self.ok == self.sent

    @property
    def success_rate(self) -> float:
        return self.ok / self.sent if self.sent else 0.0

    @property
    def goodput(self) -> float:
        """Audio-minutes transcribed successfully per minute of wall time."""
        return self.audio_seconds_ok / self.wall_seconds if self.wall_seconds > 0 else 0.0


def summarize(
    level: int, samples: Sequence[TaskSample], *, planned: int, wall_seconds: float
) -> LevelResult:
    """Fold the samples of one level into its result; latency percentiles over successes only
    (an OOM answers in milliseconds and would flatter the level)."""
    count = {o: sum(1 for s in samples if s.outcome is o) for o in AttemptOutcome}
    ok = tuple(s for s in samples if s.outcome is AttemptOutcome.OK)
    latencies = tuple(s.seconds for s in ok)
    return LevelResult(
        level=level,
        planned=planned,
        sent=len(samples),
        ok=count[AttemptOutcome.OK],
        oom=count[AttemptOutcome.OOM],
        crash=count[AttemptOutcome.CRASH],
        error=count[AttemptOutcome.ERROR],
        timeout=count[AttemptOutcome.TIMEOUT],
        client_error=count[AttemptOutcome.CLIENT_ERROR],
        p50=percentile(latencies, 0.5),
        p95=percentile(latencies, 0.95),
        wall_seconds=wall_seconds,
        audio_seconds_ok=math.fsum(s.audio_seconds for s in ok),
    )


def stop_reason(
    previous: LevelResult | None, current: LevelResult, *, min_gain: float = MIN_GAIN
) -> str | None:
    """Why not to climb above `current`, or None to go on.

    Any OOM, 5xx/crash or timeout means the server is past what it sustains; a 4xx means the
    requests themselves are wrong and nothing can be measured; goodput that did not grow by
    `min_gain` over the level below means more concurrency only adds memory risk.
    """
    if current.oom:
        return "oom"
    if current.server_errors:
        return "server_error"
    if current.timeout:
        return "timeout"
    if current.client_error or current.sent == 0:
        return "client_error"
    if previous is not None and current.goodput < previous.goodput * (1 + min_gain):
        return "no_gain"
    return None


@dataclass(frozen=True, slots=True)
class Recommendation:
    """The `ASR_MAX_CONCURRENT` to use (None when even one task at a time failed) and why."""

    max_concurrent: int | None
    reason: str


def recommend(
    levels: Sequence[LevelResult], *, tolerance: float = MIN_GAIN, max_level: int | None = None
) -> Recommendation:
    """The lowest clean level whose goodput is within `tolerance` of the best clean level.

    Only levels where every task succeeded count. Preferring the lowest of the near-best leaves
    memory headroom for files longer than the test's (the seed: "实际建议：2（留有余地）"):
    a level that adds less than `tolerance` is not worth its risk.
    """
    clean = [r for r in levels if r.clean]
    if not clean:
        return _nothing_to_recommend(levels)
    best = max(clean, key=lambda r: r.goodput)
    choice = min(
        (r for r in clean if r.goodput >= best.goodput * (1 - tolerance)), key=lambda r: r.level
    )
    by_level = {r.level: r for r in levels}
    parts = [_what_it_moved(choice, by_level.get(choice.level - 1))]
    if best is not choice:
        parts.append(
            f"{best.level} at a time was only {gain_words(choice, best)} faster: the lower level "
            "leaves memory headroom for longer files"
        )
    above = by_level.get(choice.level + 1)
    parts += _why_not_higher(choice, above, best=best, tolerance=tolerance, max_level=max_level)
    return Recommendation(choice.level, "; ".join(parts))


def pool_setting(recommendations: Sequence[Recommendation]) -> str | None:
    """`ASR_MAX_CONCURRENT` for a pool, one value per card in ASR_UPSTREAM_URL's order
    (`3,3,1`); None when a card has no recommendation (its limit cannot be guessed)."""
    limits = [r.max_concurrent for r in recommendations]
    if not limits or any(limit is None for limit in limits):
        return None
    return ",".join(str(limit) for limit in limits)


def _nothing_to_recommend(levels: Sequence[LevelResult]) -> Recommendation:
    what = _failure_words(levels[0]) if levels else "nothing was measured"
    return Recommendation(
        None,
        f"even one task at a time failed ({what}): fix the server, or test with shorter "
        "files, before choosing a concurrency",
    )


def _what_it_moved(choice: LevelResult, below: LevelResult | None) -> str:
    text = f"{choice.level} at a time moved {choice.goodput:.2f} audio-min/min with no failure"
    if below is not None and below.goodput > 0:
        text += f" ({gain_words(below, choice)} over {below.level})"
    return text


def _why_not_higher(
    choice: LevelResult,
    above: LevelResult | None,
    *,
    best: LevelResult,
    tolerance: float,
    max_level: int | None,
) -> list[str]:
    """Why the level above the choice is not recommended, when that can be said."""
    if above is not None and best is choice:
        if above.clean:
            gain = gain_words(choice, above)
            return [f"{above.level} at a time added less than {tolerance:.0%} ({gain})"]
        return [f"{above.level} at a time failed ({_failure_words(above)})"]
    if above is None and max_level is not None and choice.level >= max_level:
        return [f"--max-level {max_level} reached: the server may sustain more"]
    return []


def gain_words(base: LevelResult, other: LevelResult) -> str:
    """How much more goodput `other` moved than `base`, as a signed percentage (`+12%`)."""
    if base.goodput <= 0:
        return "n/a"
    return f"{other.goodput / base.goodput - 1:+.0%}"


def _failure_words(result: LevelResult) -> str:
    """What went wrong at a level, counted: `1 OOM, 2 5xx in 8 tasks`."""
    kinds = [
        (result.oom, "OOM"),
        (result.error, "5xx"),
        (result.crash, "dropped connection"),
        (result.timeout, "timeout"),
        (result.client_error, "4xx"),
    ]
    said = [f"{n} {word}" for n, word in kinds if n]
    return ", ".join(said) + f" in {result.sent} tasks" if said else "no task succeeded"
