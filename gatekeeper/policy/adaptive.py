"""The adaptive concurrency limit (ASR_ADAPTIVE): a number driven by OOMs, not by latency.

Pure policy, in the manner of Netflix's concurrency-limits `Limit`: fed one sample per upstream
attempt, it answers with the new limit; the gate (the mechanism) applies it. No asyncio, no
aiohttp; time comes from an injected monotonic clock so the tests drive hours in microseconds.

Why not latency: the time a transcription takes grows with the length of its audio, so a
10-minute file is "slow" and perfectly healthy. What actually hurts a Whisper server is running
out of GPU memory, and that the gatekeeper sees exactly (an `oom` outcome). The rules:

1. **OOM → down.** An OOM while `c` attempts were upstream cuts the limit multiplicatively
   (`floor(limit × decrease_factor)`, at least one less, never below `minimum`). The cut is
   also what lets the OOMed task's retry through: it waits for a slot ahead of the queue, and
   with fewer tasks on the card the memory it needs comes free.
2. **Stable → up by one.** After `stable_successes` successes that finished while tasks were
   waiting (there was demand the current limit could not serve) and while the GPU carried the
   whole limit, over at least `stable_seconds` at the current limit with no OOM, the limit rises
   by one — but never above `maximum` nor the ceiling.
3. **A ceiling where OOMs are the rule, fading.** The first attempt of every task (OOM or
   success) is remembered with the concurrency it ended at, for `fade_seconds`; retries are
   not, since a long file that OOMs three times while it waits for memory is one piece of
   evidence, not three. A level `c` where at least `ceiling_ooms` new tasks OOMed, and at
   least a `ceiling_oom_share` of them, is too high: the limit may not climb back to `c`
   (ceiling `c − 1`; the lowest such level counts). One OOM is not enough: with files of very
   different lengths an unlucky mix runs out of memory now and then at any concurrency above
   one, and the retry absorbs it. As the samples age out the ceiling goes, so a Whisper server
   that was fixed, upgraded or merely restarted (fragmented memory freed) is probed again.
4. **Only memory speaks.** A crash may be an OOM that killed the process (whisper.cpp aborts
   on a failed cudaMalloc) and cuts the limit, but at most once per `crash_holdoff_seconds`
   (one death resets every connection and refuses the retries until the restart) and without
   teaching a ceiling (a deploy or a bug crashes a server too). Errors, timeouts and client
   errors say nothing about GPU memory; a cancelled attempt is not a sample at all.
"""

import math
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from gatekeeper.policy.outcomes import AttemptOutcome

__all__ = ["HISTORY_LENGTH", "AdaptiveLimit", "AdaptiveParams", "LimitChange", "LimitChangeKind"]

HISTORY_LENGTH = 20
"""How many past changes `history` (and so /stats) keeps."""


class LimitChangeKind(StrEnum):
    """What moved the limit (the `reason` label of asr_gatekeeper_limit_changes_total)."""

    OOM = "oom"
    CRASH = "crash"
    STABLE = "stable"
    CEILING_FADED = "ceiling_faded"
    SHARED = "shared"  # replicas: another gatekeeper of the cluster moved the shared limit

    def reason(self, level: int | None = None) -> str:
        """The change's reason text: the kind, with the level it was measured at if any."""
        return self.value if level is None else f"{self.value}_at_{level}"


@dataclass(frozen=True, slots=True)
class LimitChange:
    """One change of the limit: what it was, what it is, why, and when (monotonic seconds).

    The same object is logged (`[ASR并发] 调整并发 old=… new=… reason=…`), shown in /stats and
    counted in metrics. `reason` is short snake_case: `oom_at_4`, `crash_at_3`, `stable_at_2`
    (the limit the stable stretch was measured at), `ceiling_faded`.
    """

    old: int
    new: int
    reason: str
    at: float
    cause: LimitChangeKind | None = field(default=None, compare=False)
    """The kind of change, as the algorithm decided it (None only in hand-made examples)."""

    @property
    def kind(self) -> LimitChangeKind:
        """The reason without its level: a label for metrics."""
        assert self.cause is not None, "a LimitChange from the algorithm always has a cause"
        return self.cause


@dataclass(frozen=True, slots=True)
class AdaptiveParams:
    """The knobs of the adaptive limit; defaults suit one GPU where a task takes 10 s to 30 min.

    - `minimum` / `maximum` (ASR_MIN_CONCURRENT / ASR_MAX_CONCURRENT): hard bounds. 1 is the seed
      guide's safe start ("从保守开始：并发=1"); the maximum is the operator's "never more than".
    - `decrease_factor` 0.7: on a box that runs 2–8 tasks this always removes at least one slot
      and from 4 upwards about a third, enough to get back under the memory line in one step
      without collapsing to 1 (AIMD's usual 0.5 would halve a 2 to 1 and a 3 to 1).
    - `stable_successes` 3 and `stable_seconds` 30: every OOM cuts, so the limit must climb
      back quickly or it spends most of its time below the level that works. Measured with the
      benchmark's goodput scenario (`python -m bench --scenarios goodput`, two seeds, both
      cards): 20 successes and 300 s kept the default card at one or two tasks and lost a
      tenth of its goodput or more; 5 and 60 s still lost about 5 %; 3 and 30 s gave the most,
      with no task lost; 1 and 10 s was no better and noisier.
    - `fade_seconds` 3600: samples are remembered for an hour, so a level that OOMs most of
      the time is tried again about once an hour, while a repaired or restarted server is used
      fully again within the hour.
    - `ceiling_ooms` 5 and `ceiling_oom_share` 0.35: a ceiling needs repeated OOMs of *new*
      tasks at a level that OOMs at least 35 % of the time. With files of 10 s to 10 min
      an unlucky mix runs out of memory now and then at any level above one, and a retry
      absorbs it; the level that gives the most goodput on the benchmark's default card OOMs
      about one new task in six. Three OOMs or a quarter made early, small samples (two long
      files arriving together) pin the limit at one for an hour.
    - `crash_holdoff_seconds` 300: a dying server resets every open connection and refuses the
      retries during its restart; that is one event, not one per task, so crashes cut the limit
      at most once per five minutes (the OOM retry schedule's 10 + 30 + 90 s fits inside).
    """

    minimum: int = 1
    maximum: int = 8
    decrease_factor: float = 0.7
    stable_successes: int = 3
    stable_seconds: float = 30.0
    fade_seconds: float = 3600.0
    crash_holdoff_seconds: float = 300.0
    ceiling_ooms: int = 5
    ceiling_oom_share: float = 0.35

    def __post_init__(self) -> None:
        if self.minimum < 1:
            raise ValueError(f"minimum must be >= 1, got {self.minimum}")
        if self.maximum < self.minimum:
            raise ValueError(f"maximum ({self.maximum}) must be >= minimum ({self.minimum})")
        if not 0 < self.decrease_factor < 1:
            raise ValueError(f"decrease_factor must be in (0, 1), got {self.decrease_factor}")
        if self.stable_successes < 1:
            raise ValueError(f"stable_successes must be >= 1, got {self.stable_successes}")
        if not self.stable_seconds >= 0:
            raise ValueError(f"stable_seconds must be >= 0, got {self.stable_seconds}")
        if not self.fade_seconds > 0:
            raise ValueError(f"fade_seconds must be > 0, got {self.fade_seconds}")
        if not self.crash_holdoff_seconds >= 0:
            raise ValueError(
                f"crash_holdoff_seconds must be >= 0, got {self.crash_holdoff_seconds}"
            )
        if self.ceiling_ooms < 1:
            raise ValueError(f"ceiling_ooms must be >= 1, got {self.ceiling_ooms}")
        if not 0 <= self.ceiling_oom_share <= 1:
            raise ValueError(f"ceiling_oom_share must be in [0, 1], got {self.ceiling_oom_share}")

    def decreased(self, limit: int) -> int:
        """The limit after one multiplicative cut: at least one less, never below `minimum`."""
        return max(self.minimum, min(limit - 1, math.floor(limit * self.decrease_factor)))


class AdaptiveLimit:
    """The current concurrency limit, learned from the outcomes of upstream attempts.

    Call `on_attempt` once per finished upstream attempt and `tick` now and then (every few
    seconds); apply any returned `LimitChange` to the gate. Not thread-safe (one event loop).
    """

    def __init__(self, params: AdaptiveParams, *, initial: int, now: Callable[[], float]) -> None:
        """Start at `initial` (within the bounds) with no OOM remembered."""
        if not params.minimum <= initial <= params.maximum:
            raise ValueError(
                f"initial limit {initial} is outside {params.minimum}..{params.maximum}"
            )
        self._params = params
        self._now = now
        self._limit = initial
        # The stable stretch at the current limit.
        self._since = now()
        self._successes = 0
        self._held_by_ceiling = False
        # First attempts of the last fade_seconds: (ended at, in flight then, was an OOM), and
        # their counts per level, kept in step so the ceiling never rescans the window.
        self._samples: deque[tuple[float, int, bool]] = deque()
        self._attempts_at: Counter[int] = Counter()
        self._ooms_at: Counter[int] = Counter()
        self._last_crash_cut: float | None = None
        self._ooms: deque[tuple[int, float]] = deque(maxlen=HISTORY_LENGTH)
        self._history: deque[LimitChange] = deque(maxlen=HISTORY_LENGTH)

    # -- reading ----------------------------------------------------------------------------

    @property
    def params(self) -> AdaptiveParams:
        return self._params

    @property
    def limit(self) -> int:
        """How many tasks may be upstream at once now."""
        return self._limit

    @property
    def ceiling(self) -> int | None:
        """The highest limit allowed by the OOMs of the last `fade_seconds`; None when none holds.

        Derived from the samples and the clock rather than stored, so a gatekeeper that got no
        traffic for hours still reports the right value.
        """
        return self._ceiling_at_time(self._now())

    @property
    def history(self) -> tuple[LimitChange, ...]:
        """The last `HISTORY_LENGTH` changes, oldest first."""
        return tuple(self._history)

    def snapshot(self, *, wall_now: float | None = None) -> dict[str, object]:
        """The state for /stats. With `wall_now` (epoch seconds read together with the
        monotonic clock) each change and OOM also gets a local ISO 8601 `time`."""
        now = self._now()
        p = self._params
        ceiling = self._ceiling_at_time(now)
        rises_in = None
        if ceiling is not None:
            # At the latest when the last OOM at or above the forbidden level leaves the window.
            # (Any OOM sample when the ceiling is pinned at the minimum, below the bad level.)
            ooms = [(c, at) for at, c, oom in self._samples if oom]
            last = max((at for c, at in ooms if c > ceiling), default=max(at for _, at in ooms))
            rises_in = round(max(0.0, last + p.fade_seconds - now), 1)

        def stamp(at: float) -> dict[str, object]:
            out: dict[str, object] = {"seconds_ago": round(now - at, 1)}
            if wall_now is not None:
                out["time"] = _local_iso(wall_now - (now - at))
            return out

        return {
            "limit": self._limit,
            "minimum": p.minimum,
            "maximum": p.maximum,
            "ceiling": ceiling,
            "ceiling_rises_in_seconds": rises_in,
            "stable_successes": self._successes,
            "stable_successes_needed": p.stable_successes,
            "seconds_at_limit": round(now - self._since, 1),
            "stable_seconds_needed": p.stable_seconds,
            "recent_ooms": [{"in_flight": c, **stamp(at)} for c, at in self._ooms],
            "changes": [
                {"old": ch.old, "new": ch.new, "reason": ch.reason, **stamp(ch.at)}
                for ch in self._history
            ],
        }

    # -- feeding ----------------------------------------------------------------------------

    def on_attempt(
        self,
        outcome: AttemptOutcome,
        *,
        in_flight: int,
        queue_waiting: bool,
        first_attempt: bool = True,
    ) -> LimitChange | None:
        """Learn from one finished upstream attempt; return the change it caused, if any.

        `in_flight` is how many attempts were upstream when this one ended, itself included
        (the concurrency an OOM happened at); `queue_waiting` whether tasks were waiting for a
        slot at that moment.

        - OK counts towards the stable stretch only when tasks were waiting *and* the GPU
          carried the whole limit (`in_flight >= limit`): an idle slot proves nothing about it.
        - OOM cuts and teaches the ceiling — unless it happened at a concurrency the limit
          already forbids (`in_flight > limit`: an attempt that started before an earlier cut),
          which was answered by that cut (a first attempt's OOM still counts as a sample).
        - CRASH cuts like an OOM at most once per `crash_holdoff_seconds` and teaches no ceiling.
        - ERROR (a non-memory 5xx: undecodable audio, a model bug — ASR_OOM_PATTERNS is there if
          a server hides its OOMs), TIMEOUT (long audio or a slow GPU: latency is not our
          signal) and CLIENT_ERROR (the request was wrong; the GPU did no real work) change
          nothing, neither down nor towards a rise.
        """
        now = self._now()
        match outcome:
            case AttemptOutcome.OOM:
                return self._on_oom(in_flight, now, sample=first_attempt)
            case AttemptOutcome.CRASH:
                return self._on_crash(in_flight, now)
            case AttemptOutcome.OK:
                if first_attempt:
                    self._sample(now, in_flight, oom=False)
                if queue_waiting and in_flight >= self._limit:
                    self._successes += 1
                return self._maybe_rise(now)
            case _:
                return None

    def note_oom(self, in_flight: int, *, sample: bool) -> None:
        """Replicas: another gatekeeper's attempt ran out of memory at `in_flight` (the card's
        tasks, all replicas together). Remembered for the ceiling (and shown in /stats) like
        an OOM here; the cut itself arrives as the shared limit (`adopt`)."""
        now = self._now()
        self._ooms.append((in_flight, now))
        if sample:
            self._sample(now, in_flight, oom=True)

    def adopt(self, limit: int) -> LimitChange | None:
        """Take the limit another replica of the cluster decided (moved into the bounds): the
        replicas share one limit per server, the last decision wins."""
        p = self._params
        return self._set(min(max(limit, p.minimum), p.maximum), LimitChangeKind.SHARED, self._now())

    def tick(self) -> LimitChange | None:
        """Let time act: a stable stretch that waited only for its minimum duration, or for the
        ceiling to fade, raises the limit now. Call it every few seconds."""
        return self._maybe_rise(self._now())

    # -- rules ------------------------------------------------------------------------------

    def _on_oom(self, in_flight: int, now: float, *, sample: bool) -> LimitChange | None:
        p = self._params
        self._ooms.append((in_flight, now))
        if sample:
            self._sample(now, in_flight, oom=True)
        if in_flight > self._limit:
            # Already answered by an earlier cut; the stretch restarts all the same.
            self._restart_stretch(now)
            return None
        new = p.decreased(self._limit)
        ceiling = self._ceiling_at_time(now)
        if ceiling is not None:
            new = min(new, ceiling)
        return self._set(max(p.minimum, new), LimitChangeKind.OOM, now, level=in_flight)

    def _on_crash(self, in_flight: int, now: float) -> LimitChange | None:
        last = self._last_crash_cut
        if last is not None and now - last < self._params.crash_holdoff_seconds:
            return None
        self._last_crash_cut = now
        return self._set(
            self._params.decreased(self._limit), LimitChangeKind.CRASH, now, level=in_flight
        )

    def _maybe_rise(self, now: float) -> LimitChange | None:
        p = self._params
        stable = self._successes >= p.stable_successes and now - self._since >= p.stable_seconds
        if not stable or self._limit >= p.maximum:
            return None
        ceiling = self._ceiling_at_time(now)
        if ceiling is not None and self._limit >= ceiling:
            self._held_by_ceiling = True
            return None
        if self._held_by_ceiling:
            return self._set(self._limit + 1, LimitChangeKind.CEILING_FADED, now)
        return self._set(self._limit + 1, LimitChangeKind.STABLE, now, level=self._limit)

    def _set(
        self, new: int, kind: LimitChangeKind, now: float, *, level: int | None = None
    ) -> LimitChange | None:
        """Move to `new` (a decision already within the bounds) and start a new stretch."""
        self._restart_stretch(now)
        if new == self._limit:
            return None
        change = LimitChange(self._limit, new, kind.reason(level), now, kind)
        self._limit = new
        self._history.append(change)
        return change

    def _restart_stretch(self, now: float) -> None:
        self._since = now
        self._successes = 0
        self._held_by_ceiling = False

    def _sample(self, now: float, in_flight: int, *, oom: bool) -> None:
        self._samples.append((now, in_flight, oom))
        self._attempts_at[in_flight] += 1
        self._ooms_at[in_flight] += oom

    def _ceiling_at_time(self, now: float) -> int | None:
        """c − 1 for the lowest concurrency c at which, within the last fade_seconds, attempts
        that ended with exactly c upstream OOMed at least `ceiling_ooms` times and in at least
        a `ceiling_oom_share` of cases; None when no level was that bad."""
        p = self._params
        samples = self._samples
        while samples and samples[0][0] <= now - p.fade_seconds:
            _, c, oom = samples.popleft()
            self._attempts_at[c] -= 1
            self._ooms_at[c] -= oom
        ooms, attempts = self._ooms_at, self._attempts_at
        bad = [
            c
            for c, n in ooms.items()
            if n >= p.ceiling_ooms and n >= p.ceiling_oom_share * attempts[c]
        ]
        if not bad:
            return None
        ceiling = max(p.minimum, min(bad) - 1)
        return None if ceiling >= p.maximum else ceiling


def _local_iso(epoch_seconds: float) -> str:
    """Local ISO 8601 time, seconds precision (as `last_oom` in /stats)."""
    return datetime.fromtimestamp(epoch_seconds).isoformat(timespec="seconds")
