"""Scenario 5 — a heterogeneous pool of simulated GPUs behind one queue.

The pool (by default two 24 GiB cards and one 12 GiB card, `goodput.CARDS`' "default" and
"half") runs one `gatekeeper sim` per card. The goodput scenario's seeded workload is replayed
against it at the goodput scenario's arrival rate times the pool's capacity relative to one
default card (`CAPACITY`), so each card is as overloaded as the single card of section 4 was.
It is replayed against:

- HAProxy, `balance leastconn`, each card a server with its own `maxconn` (the card's limit)
  and `maxqueue` (10 × it); 503 once the backend's queue holds 10 × the limits' sum;
- the gatekeeper, `ASR_UPSTREAM_URL=url0,url1,url2` and `ASR_MAX_CONCURRENT=a,b,c` (the same
  limits, queue 10 × their sum);
- optionally the same gatekeeper with ASR_OOM_COOLDOWN=0;
- the adaptive gatekeeper over the pool (bounds 1 to `adaptive_maximum` on every card).

The ceiling: each card alone, given its share of the workload (the same seed at the base rate
times the card's capacity), replayed with the goodput scenario's own code against the same
kinds of setup at that card's limit; a card's best goodput, summed over the pool's cards. Every
delay is divided by the time scale as in section 4; all figures are in simulated time.
"""

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from bench.procs import HaproxyServer, Proc
from bench.scenarios import goodput
from bench.scenarios.common import Ctx, JsonDict
from bench.workload import Arrival, schedule

# The goodput scenario's replay, run record, row and log readers are reused as they are: the
# pool is measured exactly as a single card is, and its ceiling by the single-card code itself.
_RunData = goodput._RunData
_gatekeeper_waits = goodput._gatekeeper_waits
_haproxy_waits = goodput._haproxy_waits
_json = goodput._json
_one_setup = goodput._one_setup
_replay = goodput._replay
_row = goodput._row

__all__ = ["CAPACITY", "PoolSetup", "pool_rate", "run"]

CAPACITY: dict[str, float] = {"default": 1.0, "half": 0.75}
"""What a card can do relative to the default card: the ratio of the best single-card goodputs
(at most 1 % of tasks failing) under the goodput scenario's workload, section 4 of RESULTS.md:
half card 9.7 audio-min/min (limit 1), default card 12.4–12.9 (limit 2)."""


@dataclass(frozen=True, slots=True)
class PoolSetup:
    """One proxy in front of the whole pool."""

    kind: str  # haproxy | gatekeeper
    adaptive: bool = False
    start: int | None = None  # where the adaptive gatekeeper starts on every card
    cooldown_off: bool = False

    def label(self, limits: tuple[int, ...]) -> str:
        if self.adaptive:
            return f"{self.kind} adaptive from {self.start}, pool"
        extra = ", cool-down off" if self.cooldown_off else ""
        return f"{self.kind} at {','.join(map(str, limits))}{extra}, pool"

    def alone(self, card: str, limit: int) -> goodput.Setup:
        """The same setup in front of one card alone (its single-card counterpart)."""
        if self.adaptive:
            return goodput.Setup(self.kind, self.start, card, adaptive=True)
        return goodput.Setup(self.kind, limit, card, cooldown_off=self.cooldown_off)


def pool_rate(ctx: Ctx) -> float:
    """Arrivals per simulated minute for the pool: the single card's rate × the pool's capacity
    relative to one default card."""
    cfg = ctx.cfg
    return cfg.arrival_rate_per_minute * sum(CAPACITY[card] for card in cfg.pool_cards)


def _share_rate(ctx: Ctx, card: str) -> float:
    return ctx.cfg.arrival_rate_per_minute * CAPACITY[card]


def pool_setups(ctx: Ctx) -> list[PoolSetup]:
    cfg = ctx.cfg
    setups = [PoolSetup("haproxy"), PoolSetup("gatekeeper")]
    if cfg.pool_cooldown_off:
        setups.append(PoolSetup("gatekeeper", cooldown_off=True))
    setups += [PoolSetup("gatekeeper", adaptive=True, start=s) for s in cfg.pool_adaptive_starts]
    return setups


def single_setups(ctx: Ctx, pool: list[PoolSetup]) -> list[goodput.Setup]:
    """Every single-card counterpart of the pool's setups, each (card, limit) once."""
    cfg = ctx.cfg
    pairs = dict.fromkeys(zip(cfg.pool_cards, cfg.pool_limits, strict=True))
    return list(dict.fromkeys(one.alone(card, limit) for card, limit in pairs for one in pool))


@dataclass
class _PoolRun:
    data: _RunData  # sim_state: the cards' counters summed (max_active_seen: the highest)
    cards: list[JsonDict]  # each card's /sim/state


async def _one_pool(ctx: Ctx, one: PoolSetup, arrivals: list[Arrival]) -> _PoolRun:
    cfg = ctx.cfg
    scale = cfg.time_scale
    procs = ctx.procs
    limits = cfg.pool_limits
    sims = await asyncio.gather(
        *(
            procs.sim(
                "--time-scale",
                str(scale),
                "--seed",
                str(ctx.seed + i),
                *goodput.CARDS[card][1],
            )
            for i, card in enumerate(cfg.pool_cards)
        )
    )
    story = goodput.story_settings(sum(limits), scale)
    proxy: Proc
    if one.kind == "haproxy":
        proxy = await procs.haproxy_pool(
            [
                HaproxyServer(sim.port, limit, 10 * limit)
                for sim, limit in zip(sims, limits, strict=True)
            ],
            queue_total=10 * sum(limits),
            balance="leastconn",
            timeout_queue=story["queue_timeout"],
            timeout_server=story["request_timeout"],
            log_requests=True,
        )
    else:
        settings: dict[str, object]
        if one.adaptive:
            assert one.start is not None
            settings = goodput.adaptive_settings(one.start, cfg.adaptive_maximum, scale)
        else:
            settings = dict(story)  # max_queue: 10 × the limits' sum
            settings["max_concurrent"] = ",".join(map(str, limits))
        if one.cooldown_off:
            settings["oom_cooldown"] = 0
        proxy = await procs.gatekeeper(",".join(sim.url for sim in sims), settings)
    began = time.monotonic()
    outcomes = await _replay(ctx, proxy.port, arrivals, scale)
    real_seconds = time.monotonic() - began
    states: list[JsonDict] = [await _json(sim.port, "/sim/state") for sim in sims]
    gk = one.kind == "gatekeeper"
    gk_stats = await _json(proxy.port, "/stats") if gk else None
    peak = proxy.peak_rss_mib() if gk else None
    await procs.kill(proxy)
    for sim in sims:
        await procs.kill(sim)
    log = proxy.log_text()
    waits = [w * scale for w in (_gatekeeper_waits(log) if gk else _haproxy_waits(log))]
    summed: JsonDict = {
        key: sum(int(s.get(key, 0)) for s in states) for key in ("tasks_started", "ooms")
    }
    summed["max_active_seen"] = max(int(s.get("max_active_seen", 0)) for s in states)
    return _PoolRun(_RunData(outcomes, waits, summed, gk_stats, peak, real_seconds), states)


def _adaptive_paths(runs: list[_PoolRun]) -> list[JsonDict] | None:
    """Where each card's adaptive limit ended, per run (from /stats `upstreams`)."""
    paths = []
    for run in runs:
        stats = run.data.gk_stats or {}
        ends = []
        for upstream in stats.get("upstreams") or []:
            adaptive = upstream.get("adaptive") or {}
            ends.append(adaptive.get("limit", upstream.get("max_concurrent")))
        paths.append({"final_limits": ends})
    return paths or None


def _pool_row(ctx: Ctx, one: PoolSetup, runs: list[_PoolRun]) -> JsonDict:
    cfg = ctx.cfg
    limits = cfg.pool_limits
    total = one.start if one.adaptive else sum(limits)
    base = goodput.Setup(one.kind, total, "pool", one.adaptive, one.cooldown_off)
    row = _row(ctx, base, [run.data for run in runs])
    row.update(
        label=one.label(limits),
        limit=None,
        limits=None if one.adaptive else list(limits),
        max_active_on_gpu=None,
        per_card=[
            {
                "card": card,
                "limit": None if one.adaptive else limit,
                "tasks_started": sum(int(run.cards[i].get("tasks_started", 0)) for run in runs),
                "tasks_done": sum(int(run.cards[i].get("tasks_done", 0)) for run in runs),
                "ooms": sum(int(run.cards[i].get("ooms", 0)) for run in runs),
                "max_active_seen": max(int(run.cards[i].get("max_active_seen", 0)) for run in runs),
            }
            for i, (card, limit) in enumerate(zip(cfg.pool_cards, limits, strict=True))
        ],
    )
    if one.adaptive:
        row["adaptive_runs"] = _adaptive_paths(runs)
    return row


def _single_key(row: JsonDict) -> tuple[str, str, int | None, bool, bool]:
    return (
        row["card"],
        row["setup"],
        row["start_limit"] if row["adaptive"] else row["limit"],
        bool(row["adaptive"]),
        bool(row["cooldown_off"]),
    )


def _ceiling(
    ctx: Ctx, pool: list[PoolSetup], rows: list[JsonDict], singles: list[JsonDict]
) -> JsonDict:
    """Each card's best single-card goodput, summed; and each pool row against its own setup
    card by card (the same setup in front of each card alone, summed)."""
    cfg = ctx.cfg
    by = {_single_key(r): r for r in singles}
    per_card = []
    for card, limit in zip(cfg.pool_cards, cfg.pool_limits, strict=True):
        own = [by[_single_key_of(one.alone(card, limit))] for one in pool]
        best = max(own, key=lambda r: r["goodput_audio_min_per_min"])
        per_card.append(
            {
                "card": card,
                "limit": limit,
                "best": best["label"],
                "goodput_audio_min_per_min": best["goodput_audio_min_per_min"],
                "success_rate_pct": best["success_rate_pct"],
            }
        )
    ceiling = round(sum(c["goodput_audio_min_per_min"] for c in per_card), 2)
    for one, row in zip(pool, rows, strict=True):
        alone = round(
            sum(
                by[_single_key_of(one.alone(card, limit))]["goodput_audio_min_per_min"]
                for card, limit in zip(cfg.pool_cards, cfg.pool_limits, strict=True)
            ),
            2,
        )
        goodput_ = row["goodput_audio_min_per_min"]
        row["card_by_card_goodput"] = alone
        row["vs_card_by_card"] = round(goodput_ / alone, 3) if alone else None
        row["vs_ceiling"] = round(goodput_ / ceiling, 3) if ceiling else None
    return {"goodput_audio_min_per_min": ceiling, "per_card": per_card}


def _single_key_of(one: goodput.Setup) -> tuple[str, str, int | None, bool, bool]:
    return (one.card, one.kind, one.limit, one.adaptive, one.cooldown_off)


async def run(ctx: Ctx) -> JsonDict:
    cfg = ctx.cfg
    rate = pool_rate(ctx)
    arrivals = schedule(seed=ctx.seed, rate_per_minute=rate, minutes=cfg.sim_minutes)
    shares = {
        card: schedule(
            seed=ctx.seed, rate_per_minute=_share_rate(ctx, card), minutes=cfg.sim_minutes
        )
        for card in dict.fromkeys(cfg.pool_cards)
    }
    pool = pool_setups(ctx)
    singles = single_setups(ctx, pool)
    pool_runs: dict[PoolSetup, list[_PoolRun]] = {one: [] for one in pool}
    single_runs: dict[goodput.Setup, list[_RunData]] = {one: [] for one in singles}
    # Every repeat goes through every setup, pool and single cards interleaved; `pool_parallel`
    # replays run side by side, each with its own simulators and proxy.
    every: list[PoolSetup | goodput.Setup] = [*pool, *singles]
    pending = [(repeat, one) for repeat in range(cfg.pool_repeats) for one in every]
    total = len(pending)
    done = 0

    async def replay(repeat: int, one: PoolSetup | goodput.Setup) -> None:
        nonlocal done
        if isinstance(one, PoolSetup):
            result = await _one_pool(ctx, one, arrivals)
            pool_runs[one].append(result)
            what, n, seconds = one.label(cfg.pool_limits), len(arrivals), result.data.real_seconds
        else:
            data = await _one_setup(ctx, one, shares[one.card])
            single_runs[one].append(data)
            what, n, seconds = f"{one.label} alone", len(shares[one.card]), data.real_seconds
        done += 1
        ctx.say(
            f"pool {done}/{total}: {n} tasks, {cfg.sim_minutes:g} simulated min, {what} "
            f"(run {repeat + 1}/{cfg.pool_repeats}) in {seconds:.0f} s"
        )

    width = max(1, cfg.pool_parallel)
    for first in range(0, total, width):
        await asyncio.gather(*(replay(r, one) for r, one in pending[first : first + width]))
    rows = [_pool_row(ctx, one, pool_runs[one]) for one in pool]
    single_rows = []
    for one in singles:
        row = _row(ctx, one, single_runs[one])
        row["arrival_rate_per_min"] = _share_rate(ctx, one.card)
        single_rows.append(row)
    ceiling = _ceiling(ctx, pool, rows, single_rows)
    return {
        "setup": _describe(ctx, rate, arrivals, shares),
        "rows": rows,
        "single_card_rows": single_rows,
        "ceiling": ceiling,
    }


def _offered(arrivals: list[Arrival], minutes: float) -> float:
    return round(sum(a.audio_seconds for a in arrivals) / 60.0 / minutes, 1)


def _describe(
    ctx: Ctx, rate: float, arrivals: list[Arrival], shares: dict[str, list[Arrival]]
) -> dict[str, Any]:
    cfg = ctx.cfg
    limits = ",".join(map(str, cfg.pool_limits))
    return {
        "seed": ctx.seed,
        "time_scale": cfg.time_scale,
        "simulated_minutes": cfg.sim_minutes,
        "cards": list(cfg.pool_cards),
        "card_descriptions": {card: goodput.CARDS[card][0] for card in cfg.pool_cards},
        "limits": list(cfg.pool_limits),
        "capacity": {card: CAPACITY[card] for card in cfg.pool_cards},
        "pool_capacity": sum(CAPACITY[card] for card in cfg.pool_cards),
        "arrival_rate_per_min": round(rate, 2),
        "arrivals": len(arrivals),
        "offered_audio_min_per_min": _offered(arrivals, cfg.sim_minutes),
        "shares": {
            card: {
                "arrival_rate_per_min": round(_share_rate(ctx, card), 2),
                "arrivals": len(share),
                "offered_audio_min_per_min": _offered(share, cfg.sim_minutes),
            }
            for card, share in shares.items()
        },
        "repeats": cfg.pool_repeats,
        "parallel": cfg.pool_parallel,
        "haproxy_settings": f"balance leastconn; server i: maxconn L_i, maxqueue 10×L_i "
        f"(L = {limits}); 503 once the backend's queue holds 10 × {sum(cfg.pool_limits)}; "
        "timeout queue 600 s, timeout server 300 s — divided by the time scale; no retries",
        "gatekeeper_settings": f"ASR_UPSTREAM_URL=the three simulators, ASR_MAX_CONCURRENT="
        f"{limits}, max_queue 10 × {sum(cfg.pool_limits)}, queue_timeout 600 s, request_timeout "
        "300 s, max_retries 3, retry_delay 10 s, jitter 0.1, OOM window 30 s / cool-down 15 s "
        "per card — all divided by the time scale",
        "adaptive_settings": f"ASR_ADAPTIVE=true, bounds 1…{cfg.adaptive_maximum} on every "
        "card, started at " + " and ".join(str(s) for s in cfg.pool_adaptive_starts) + "; "
        "every other adaptive setting at its default, as in section 4",
        "client": "one connection per task, no retry of refusals",
    }
