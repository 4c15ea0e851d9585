"""Scenario 4 — GPU goodput on the simulator under a realistic, overloading mix.

One seeded schedule (Poisson arrivals, audio log-uniform 10 s–10 min) is replayed against:
the simulator directly (no admission control), HAProxy at maxconn 1–4, the gatekeeper at a fixed
limit 1–4, and the adaptive gatekeeper (ASR_ADAPTIVE) started from a bad setting (1 and 8), each
time with a fresh simulator running `time_scale` times faster than real time. Two cards: the
default 24 GiB one (a task needs 2 + 0.8 GiB per audio minute, 18 GiB free) and one with half
the memory (see `CARDS`). Every delay of both proxies is the realistic one divided by the time
scale, so it is realistic in simulated time; all figures below are in simulated time.

Goodput: audio-minutes of successful transcriptions finished within the arrival window, per
simulated minute of that window. Queue wait: from the proxies' own logs (the gatekeeper's
`queue_wait=` per task, HAProxy's %Tw), for tasks that got a slot.
"""

import asyncio
import json
import re
import time
from dataclasses import dataclass
from typing import Any

from bench.httpclient import HttpError, Response, fetch
from bench.procs import Proc
from bench.scenarios.common import CONTENT_TYPE, Ctx, JsonDict, multipart_parts
from bench.workload import Arrival, mean_audio_seconds, schedule
from gatekeeper.policy.adaptive import AdaptiveParams
from gatekeeper.policy.quantiles import percentile

__all__ = [
    "CARDS",
    "Setup",
    "adaptive_settings",
    "answer_kind",
    "attempts_of",
    "run",
    "story_settings",
]

_QUEUE_TIMEOUT = 600.0  # seconds, the seed's and the SPEC's defaults, in simulated time
_REQUEST_TIMEOUT = 300.0
_RETRY_DELAY = 10.0
_ADAPTIVE = AdaptiveParams()  # the adaptive mode's defaults, as an operator gets them
_HEAD, _TAIL = multipart_parts()
_BODY = _HEAD + b"RIFF" + b"\0" * 1020 + _TAIL  # the simulator is steered by X-Sim-Audio-Seconds


CARDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "default": ("24 GiB, 6 reserved: 18 GiB for tasks", ()),
    # Half the card. The reservation is smaller too (a lighter/int8 model), so the longest file
    # of the mix (10 min: 2 + 8 GiB) still fits alone: with 6 GiB reserved, every file over
    # five minutes could never run and no setting could keep failures near zero.
    "half": (
        "12 GiB, 2 reserved: 10 GiB for tasks (the longest file just fits alone)",
        ("--total-gib", "12", "--reserved-gib", "2"),
    ),
}
"""Simulated cards: description, and the `gatekeeper sim` arguments that make it."""


@dataclass(frozen=True, slots=True)
class Setup:
    """One thing the schedule is replayed against."""

    kind: str  # direct | haproxy | gatekeeper
    limit: int | None = None  # the fixed limit, or where the adaptive gatekeeper starts
    card: str = "default"
    adaptive: bool = False
    cooldown_off: bool = False  # the gatekeeper with ASR_OOM_COOLDOWN=0 (admission + retries)

    @property
    def label(self) -> str:
        if self.kind == "direct":
            return f"direct, {self.card} card"
        mode = f"adaptive from {self.limit}" if self.adaptive else f"at {self.limit}"
        extra = ", cool-down off" if self.cooldown_off else ""
        return f"{self.kind} {mode}{extra}, {self.card} card"


def story_settings(limit: int, scale: float) -> dict[str, float | int]:
    """The gatekeeper's realistic settings, every duration divided by the time scale."""
    return {
        "max_concurrent": limit,
        "max_queue": 10 * limit,
        "queue_timeout": _QUEUE_TIMEOUT / scale,
        "request_timeout": _REQUEST_TIMEOUT / scale,
        "max_retries": 3,
        "retry_delay": _RETRY_DELAY / scale,
        "retry_jitter": 0.1,
        # ASR_OOM_WINDOW / ASR_OOM_COOLDOWN derive from the delay: 3× and 1.5× (30 s / 15 s).
    }


def adaptive_settings(start: int, maximum: int, scale: float) -> dict[str, object]:
    """The adaptive gatekeeper as an operator would run it: bounds 1…maximum, start `start`,
    every other adaptive knob at its default (the queue follows the limit, no cool-down),
    durations divided by the time scale."""
    settings: dict[str, object] = dict(story_settings(maximum, scale))
    del settings["max_queue"]
    settings.update(
        adaptive="true",
        min_concurrent=1,
        initial_concurrent=start,
        adaptive_stable_seconds=_ADAPTIVE.stable_seconds / scale,
        adaptive_fade_seconds=_ADAPTIVE.fade_seconds / scale,
    )
    return settings


class _Outcome:
    __slots__ = ("attempts", "audio", "done", "index", "kind", "status")

    def __init__(self, arrival: Arrival) -> None:
        self.index = arrival.index
        self.audio = arrival.audio_seconds
        self.status: int | None = None
        self.kind = "pending"  # ok | refused | oom | failed | error
        self.done = 0.0  # real seconds after the start
        self.attempts = 1


async def _replay(ctx: Ctx, port: int, arrivals: list[Arrival], scale: float) -> list[_Outcome]:
    """Send every arrival at its (scaled) time, each on its own connection, as a backend would."""
    per_task_limit = (
        _QUEUE_TIMEOUT + 4 * _REQUEST_TIMEOUT + (10 + 30 + 90 + 15) * _RETRY_DELAY / 10
    ) / scale + 30.0
    outcomes = [_Outcome(a) for a in arrivals]
    start = time.monotonic()

    async def one(arrival: Arrival, outcome: _Outcome) -> None:
        delay = start + arrival.at / scale - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        headers = (
            ("Content-Type", CONTENT_TYPE),
            ("X-Sim-Audio-Seconds", str(arrival.audio_seconds)),
            ("X-Request-ID", f"bench-{arrival.index}"),
        )
        try:
            response = await fetch(
                "127.0.0.1",
                port,
                "POST",
                "/asr?output=json",
                headers=headers,
                body=_BODY,
                within=per_task_limit,
            )
        except (HttpError, TimeoutError):
            outcome.kind = "error"
            outcome.done = time.monotonic() - start
            return
        outcome.done = time.monotonic() - start
        outcome.status = response.status
        outcome.attempts = attempts_of(response)
        outcome.kind = answer_kind(response)

    await asyncio.gather(*(one(a, o) for a, o in zip(arrivals, outcomes, strict=True)))
    return outcomes


def attempts_of(response: Response) -> int:
    """The gatekeeper's X-Gatekeeper-Attempts (1 for a direct answer or HAProxy's)."""
    return int(response.headers.get("x-gatekeeper-attempts", "1") or 1)


def answer_kind(response: Response) -> str:
    """ok, refused (503), oom (the server's OOM answer passed on), or failed."""
    if response.status == 200:
        return "ok"
    if response.status == 503:
        return "refused"
    if b"out of memory" in response.body.lower():
        return "oom"
    return "failed"


_GK_WAIT = re.compile(r"task_id=(bench-\d+)\b.*?\bqueue_wait=([0-9.]+)")


def _gatekeeper_waits(log: str) -> list[float]:
    waits: dict[str, float] = {}
    for line in log.splitlines():
        match = _GK_WAIT.search(line)
        if match:
            waits[match[1]] = float(match[2])
    return list(waits.values())


def _haproxy_waits(log: str) -> list[float]:
    waits = []
    for line in log.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0].startswith("bench-") and parts[2] != "503":
            tw = int(parts[1])
            if tw >= 0:
                waits.append(tw / 1000.0)
    return waits


async def _json(port: int, path: str) -> Any:
    response = await fetch("127.0.0.1", port, "GET", path)
    return json.loads(response.body)


@dataclass
class _RunData:
    """What one replay of the schedule against one setup left behind."""

    outcomes: list[_Outcome]
    waits: list[float]  # simulated seconds, tasks that got a slot
    sim_state: JsonDict
    gk_stats: JsonDict | None
    peak_rss_mib: float | None
    real_seconds: float


async def _one_setup(ctx: Ctx, one: Setup, arrivals: list[Arrival]) -> _RunData:
    cfg = ctx.cfg
    scale = cfg.time_scale
    procs = ctx.procs
    setup, limit = one.kind, one.limit
    card_args = CARDS[one.card][1]
    sim = await procs.sim("--time-scale", str(scale), "--seed", str(ctx.seed), *card_args)
    proxy: Proc | None = None
    if setup == "haproxy":
        assert limit is not None
        proxy = await procs.haproxy(
            sim.port,
            maxconn=limit,
            maxqueue=10 * limit,
            timeout_queue=_QUEUE_TIMEOUT / scale,
            timeout_server=_REQUEST_TIMEOUT / scale,
            log_requests=True,
        )
    elif setup == "gatekeeper":
        assert limit is not None
        settings: dict[str, object] = (
            adaptive_settings(limit, cfg.adaptive_maximum, scale)
            if one.adaptive
            else dict(story_settings(limit, scale))
        )
        if one.cooldown_off:
            settings["oom_cooldown"] = 0
        proxy = await procs.gatekeeper(sim.url, settings)
    target = proxy or sim
    began = time.monotonic()
    outcomes = await _replay(ctx, target.port, arrivals, scale)
    real_seconds = time.monotonic() - began
    sim_state = await _json(sim.port, "/sim/state")
    gk_stats = await _json(proxy.port, "/stats") if setup == "gatekeeper" and proxy else None
    peak = proxy.peak_rss_mib() if setup == "gatekeeper" and proxy else None
    if proxy is not None:
        await procs.kill(proxy)
    await procs.kill(sim)
    if setup == "gatekeeper" and proxy is not None:
        waits = [w * scale for w in _gatekeeper_waits(proxy.log_text())]
    elif setup == "haproxy" and proxy is not None:
        waits = [w * scale for w in _haproxy_waits(proxy.log_text())]
    else:
        waits = [0.0 for o in outcomes if o.kind not in ("refused", "pending")]
    return _RunData(outcomes, waits, sim_state, gk_stats, peak, real_seconds)


def _row(ctx: Ctx, one: Setup, runs: list[_RunData]) -> JsonDict:
    """One table row from every repeat: counts summed, goodput averaged, waits pooled."""
    cfg = ctx.cfg
    window_real = cfg.sim_minutes * 60.0 / cfg.time_scale
    goodputs = []
    for run in runs:
        in_window = sum(o.audio for o in run.outcomes if o.kind == "ok" and o.done <= window_real)
        goodputs.append(round(in_window / 60.0 / cfg.sim_minutes, 2))
    outcomes = [o for run in runs for o in run.outcomes]
    ok = [o for o in outcomes if o.kind == "ok"]
    failed = [o for o in outcomes if o.kind in ("oom", "failed", "error")]
    refused = [o for o in outcomes if o.kind == "refused"]
    waits = tuple(w for run in runs for w in run.waits)
    attempts = sum(int(run.sim_state.get("tasks_started", 0)) for run in runs)
    ooms = sum(int(run.sim_state.get("ooms", 0)) for run in runs)
    decided = len(ok) + len(failed)
    p50 = percentile(waits, 0.5)
    p95 = percentile(waits, 0.95)
    peaks = [run.peak_rss_mib for run in runs if run.peak_rss_mib is not None]
    adaptive = [
        run.gk_stats["adaptive"]
        for run in runs
        if run.gk_stats is not None and run.gk_stats.get("adaptive")
    ]
    return {
        "setup": one.kind,
        "card": one.card,
        "adaptive": one.adaptive,
        "limit": None if one.adaptive else one.limit,
        "start_limit": one.limit if one.adaptive else None,
        "cooldown_off": one.cooldown_off,
        "label": one.label,
        "runs": len(runs),
        "goodput_audio_min_per_min": round(sum(goodputs) / len(goodputs), 2),
        "goodput_runs": goodputs,
        "audio_min_succeeded_total": round(sum(o.audio for o in ok) / 60.0, 1),
        "tasks": len(outcomes),
        "succeeded": len(ok),
        "failed": len(failed),
        "failed_oom": sum(1 for o in outcomes if o.kind == "oom"),
        "refused": len(refused),
        "success_rate_pct": round(100.0 * len(ok) / decided, 1) if decided else 100.0,
        "gpu_attempts": attempts,
        "oom_answers": ooms,
        "oom_rate_pct": round(100.0 * ooms / attempts, 1) if attempts else 0.0,
        "retried_tasks": sum(1 for o in outcomes if o.attempts > 1),
        "queue_wait_p50_s": None if p50 is None else round(p50, 1),
        "queue_wait_p95_s": None if p95 is None else round(p95, 1),
        "queue_waits_logged": len(waits),
        "max_active_on_gpu": max(int(run.sim_state.get("max_active_seen", 0)) for run in runs),
        "gatekeeper_stats": [
            {
                k: run.gk_stats.get(k)
                for k in (
                    "total_tasks",
                    "failed_tasks",
                    "rejected_tasks",
                    "oom_errors",
                    "success_rate",
                )
            }
            for run in runs
            if run.gk_stats is not None
        ]
        or None,
        "peak_rss_mib": max(peaks) if peaks else None,
        "real_seconds": round(sum(run.real_seconds for run in runs), 1),
        # The adaptive gatekeeper's path: where it ended, and every change (simulated seconds).
        "adaptive_runs": [
            {
                "final_limit": a.get("limit"),
                "ceiling": a.get("ceiling"),
                "changes": [f"{c['old']}→{c['new']} {c['reason']}" for c in a.get("changes", [])],
            }
            for a in adaptive
        ]
        or None,
    }


def setups_for(ctx: Ctx) -> list[Setup]:
    """Every setup of this run, card by card, in table order."""
    cfg = ctx.cfg
    setups: list[Setup] = []
    for card in cfg.cards:
        setups.append(Setup("direct", card=card))
        setups += [Setup("haproxy", limit, card) for limit in cfg.limits]
        setups += [Setup("gatekeeper", limit, card) for limit in cfg.limits]
        if card in cfg.cooldown_off_cards:
            setups += [Setup("gatekeeper", limit, card, cooldown_off=True) for limit in cfg.limits]
        setups += [Setup("gatekeeper", start, card, adaptive=True) for start in cfg.adaptive_starts]
    return setups


async def run(ctx: Ctx) -> JsonDict:
    cfg = ctx.cfg
    arrivals = schedule(
        seed=ctx.seed, rate_per_minute=cfg.arrival_rate_per_minute, minutes=cfg.sim_minutes
    )
    setups = setups_for(ctx)
    runs: dict[Setup, list[_RunData]] = {one: [] for one in setups}
    # Every repeat goes through all setups (drift hits all alike); `goodput_parallel` replays run
    # side by side, each against its own simulator and proxy processes.
    pending = [(repeat, one) for repeat in range(cfg.goodput_repeats) for one in setups]
    total = len(pending)
    done = 0

    async def replay(repeat: int, one: Setup) -> None:
        nonlocal done
        result = await _one_setup(ctx, one, arrivals)
        runs[one].append(result)
        done += 1
        ctx.say(
            f"goodput {done}/{total}: {len(arrivals)} tasks, {cfg.sim_minutes:g} simulated min, "
            f"{one.label} (run {repeat + 1}/{cfg.goodput_repeats}) in {result.real_seconds:.0f} s"
        )

    width = max(1, cfg.goodput_parallel)
    for first in range(0, total, width):
        await asyncio.gather(*(replay(r, one) for r, one in pending[first : first + width]))
    rows = [_row(ctx, one, runs[one]) for one in setups]
    offered = sum(a.audio_seconds for a in arrivals) / 60.0 / cfg.sim_minutes
    return {
        "setup": {
            "seed": ctx.seed,
            "time_scale": cfg.time_scale,
            "simulated_minutes": cfg.sim_minutes,
            "arrivals": len(arrivals),
            "arrival_rate_per_min": cfg.arrival_rate_per_minute,
            "audio": "log-uniform 10 s – 10 min, mean "
            f"{mean_audio_seconds() / 60:.1f} min (this draw: "
            f"{sum(a.audio_seconds for a in arrivals) / len(arrivals) / 60:.2f} min)",
            "offered_audio_min_per_min": round(offered, 1),
            "simulator": "a task needs 2 + 0.8 GiB per audio minute, rtf 0.1, parallel gain "
            "0.3, max speed-up 2",
            "cards": {card: CARDS[card][0] for card in cfg.cards},
            "adaptive_settings": f"ASR_ADAPTIVE=true, bounds 1…{cfg.adaptive_maximum}, started "
            "at " + " and ".join(str(s) for s in cfg.adaptive_starts) + "; every adaptive "
            f"setting at its default ({_ADAPTIVE.stable_successes} stable successes, "
            f"{_ADAPTIVE.stable_seconds:g} s stable, OOMs remembered "
            f"{_ADAPTIVE.fade_seconds:g} s — durations divided by the time scale; the "
            "queue follows the limit, 10 per slot; no cool-down)",
            "parallel": cfg.goodput_parallel,
            "gatekeeper_settings": "max_queue 10×limit, queue_timeout 600 s, request_timeout "
            "300 s, max_retries 3, retry_delay 10 s (OOM: 10/30/90 s), jitter 0.1, "
            "OOM window 30 s / cool-down 15 s — all divided by the time scale",
            "haproxy_settings": "maxconn L, maxqueue 10×L (503 beyond), timeout queue 600 s, "
            "timeout server 300 s — divided by the time scale; no retries",
            "client": "one connection per task, no retry of refusals",
            "repeats": cfg.goodput_repeats,
        },
        "rows": rows,
    }
