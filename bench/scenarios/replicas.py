"""Scenario 7 — replicas (#17): what sharing each Whisper server's limit through Redis costs.

Four setups, each behind its own nginx (round robin, so every row pays the same proxy hop):
one gatekeeper without Redis (the baseline), three without Redis (today: each admits its own
limit), one with Redis, three with Redis sharing one limit. A real redis-server (Debian's
package) and the bench's fast upstream (about 1 ms a task), so that no GPU time hides the
coordination's own cost.

Coordination latency: at light load (one connection, far under the limit) requests are timed
one by one, in rounds that rotate the setups as the overhead scenario does. The coordination
cost is a Redis row's percentile minus the percentile of the same number of replicas without
Redis. Beside it, each replica's own `asr_gatekeeper_cluster_acquire_seconds` histogram (the
Redis round trip of every lease acquisition) over the timed requests, summed over the
replicas, its p50/p99 estimated from the buckets as Prometheus's `histogram_quantile` does;
and two floors from the bench to the same Redis: a PING, and the gatekeeper's own `Leases`
acquiring and releasing on the bench's idle event loop.

Refusal under a flood: as the overload scenario, a burst far above limit + queue over
keep-alive connections, while the upstream holds every task it receives; the upstream's count
of held tasks is then exactly what is in flight there, polled during the burst: sharing works
when it never exceeds the limit, with three replicas as with one. Each replica keeps its own
ASR_MAX_QUEUE, so three replicas sharing a limit admit limit + 3 × queue; without Redis each
admits limit + queue and the upstream sees three limits. After the drain every lease must be
back in Redis (each replica's /stats).
"""

import asyncio
import json
import math
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from bench.config import QUICK, BenchConfig
from bench.httpclient import Connection, HttpError, fetch
from bench.procs import Proc, find_tool, redis_url
from bench.scenarios.common import CONTENT_TYPE, SMALL_BODY, Ctx, JsonDict, closed_loop, rotated
from bench.stats import ms, summarize
from gatekeeper.cluster.leases import LeaseConfig, Leases
from gatekeeper.policy.quantiles import percentile

__all__ = ["SETUPS", "Setup", "bucket_quantile", "run"]

_ACQUIRE = "asr_gatekeeper_cluster_acquire_seconds"
_COUNTERS = (
    "asr_gatekeeper_cluster_redis_errors_total",
    "asr_gatekeeper_cluster_leases_lost_total",
)
_QUIET = 0.5  # seconds without any answer that end a burst once every task was sent
_SILENT = 5.0  # seconds without any answer that end it anyway (every connection is held)
_BURST_LIMIT = 180.0  # the whole burst, seconds
_POLL = 0.01  # seconds between two reads of the upstream's held count during a burst
_LEASES_BACK_WITHIN = 10.0  # seconds for every lease to be released after a drain
_PINGS = 2000  # floors' Redis round trips (a quarter in the quick run)
_FLOOR_LEASE = 2.0  # seconds: the floor's lease (its cluster's quiet time when new)
_FLOOR_SERVER = "127.0.0.1:1"  # the floor's leases name a server nobody uses
_QUICK_LEASE = 2.0  # ASR_REDIS_LEASE in the quick run: a new cluster's quiet time is one lease


@dataclass(frozen=True, slots=True)
class Setup:
    """Gatekeepers behind one nginx; with Redis they share one cluster (one set of limits)."""

    key: str
    label: str
    replicas: int
    redis: bool


SETUPS = (
    Setup("single", "1 gatekeeper, no Redis (baseline)", 1, False),
    Setup("three", "3 gatekeepers, no Redis (limits not shared)", 3, False),
    Setup("single_redis", "1 gatekeeper + Redis", 1, True),
    Setup("three_redis", "3 gatekeepers + Redis (one shared limit)", 3, True),
)
_FLOORS = {"direct": "direct (floor)", "nginx": "nginx → upstream (floor)"}
_SAME_REPLICAS_WITHOUT_REDIS = {"single_redis": "single", "three_redis": "three"}


@dataclass
class _Running:
    setup: Setup
    gatekeepers: list[Proc]
    nginx: Proc


# -- /metrics ------------------------------------------------------------------------------


@dataclass
class _Scrape:
    """The cluster's metrics of one or several replicas, summed over replicas and labels."""

    present: bool = False
    """Whether any replica exports the cluster's metrics (ASR_REDIS_URL in use)."""
    buckets: dict[float, float] = field(default_factory=dict)
    """`_ACQUIRE`'s cumulative bucket counts by upper bound."""
    count: float = 0.0
    total_seconds: float = 0.0
    counters: dict[str, float] = field(default_factory=dict)

    def add(self, text: str) -> None:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("asr_gatekeeper_cluster_"):
                    self.present = True
                if sample.name == _ACQUIRE + "_bucket":
                    le = float(sample.labels["le"])
                    self.buckets[le] = self.buckets.get(le, 0.0) + sample.value
                elif sample.name == _ACQUIRE + "_count":
                    self.count += sample.value
                elif sample.name == _ACQUIRE + "_sum":
                    self.total_seconds += sample.value
                elif sample.name in _COUNTERS:
                    self.counters[sample.name] = self.counters.get(sample.name, 0.0) + sample.value

    def since(self, before: "_Scrape") -> "_Scrape":
        """What happened between `before` and this scrape."""
        return _Scrape(
            present=self.present,
            buckets={le: n - before.buckets.get(le, 0.0) for le, n in self.buckets.items()},
            count=self.count - before.count,
            total_seconds=self.total_seconds - before.total_seconds,
            counters={k: v - before.counters.get(k, 0.0) for k, v in self.counters.items()},
        )


async def _scrape(gatekeepers: Iterable[Proc]) -> _Scrape:
    scrape = _Scrape()
    for proc in gatekeepers:
        response = await fetch("127.0.0.1", proc.port, "GET", "/metrics")
        if response.status != 200:
            raise RuntimeError(f"{proc.name}: GET /metrics answered {response.status}")
        scrape.add(response.body.decode())
    return scrape


def bucket_quantile(buckets: Sequence[tuple[float, float]], q: float) -> float | None:
    """The q-quantile of a histogram from its cumulative buckets [(upper bound, count)], as
    Prometheus's `histogram_quantile` estimates it: linear within the bucket the rank falls
    in (from 0 for the first); in the +Inf bucket, the highest finite bound. None if empty."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower, below = 0.0, 0.0
    for upper, cumulative in ordered:
        if cumulative >= rank and cumulative > below:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - below) / (cumulative - below)
        lower, below = upper, cumulative
    return lower


def _bucket_around(buckets: Sequence[tuple[float, float]], value: float | None) -> str | None:
    """The bucket an estimate lies in, "(lower, upper] ms": its resolution."""
    if value is None:
        return None
    bounds = sorted(le for le, _ in buckets)
    lower = 0.0
    for upper in bounds:
        if value <= upper:
            top = "+Inf" if math.isinf(upper) else f"{upper * 1000:g}"
            return f"({lower * 1000:g}, {top}] ms"
        lower = upper
    return None


def _acquire_figures(scrape: _Scrape) -> JsonDict:
    buckets = sorted(scrape.buckets.items())
    p50 = bucket_quantile(buckets, 0.5)
    p99 = bucket_quantile(buckets, 0.99)
    return {
        "acquisitions": round(scrape.count),
        "p50_ms": ms(p50),
        "p99_ms": ms(p99),
        "p50_bucket": _bucket_around(buckets, p50),
        "p99_bucket": _bucket_around(buckets, p99),
        "mean_ms": ms(scrape.total_seconds / scrape.count) if scrape.count else None,
        "buckets": [["+Inf" if math.isinf(le) else le, round(n)] for le, n in buckets],
    }


# -- the processes --------------------------------------------------------------------------


async def _start(ctx: Ctx, setup: Setup, upstream: Proc, redis: Proc) -> _Running:
    cfg = ctx.cfg
    settings: dict[str, object] = {
        "max_concurrent": cfg.burst_limit,
        "max_queue": cfg.burst_queue,
    }
    if setup.redis:
        # A cluster of its own per setup: the two Redis setups share the redis-server only.
        settings |= {"redis_url": redis_url(redis), "cluster": f"bench-{setup.key}"}
        lease = _redis_lease(cfg)
        if lease is not None:
            settings["redis_lease"] = lease
    gatekeepers = list(
        await asyncio.gather(
            *(ctx.procs.gatekeeper(upstream.url, settings) for _ in range(setup.replicas))
        )
    )
    nginx = await ctx.procs.nginx_pool([gk.port for gk in gatekeepers])
    return _Running(setup, gatekeepers, nginx)


async def _redis_round_trips(redis: Proc, count: int) -> tuple[JsonDict, str | None]:
    """PING from the bench to the same Redis, one at a time: a round trip and nothing else;
    and the server's version."""
    client = Redis.from_url(redis_url(redis))
    try:
        info = await client.info("server")  # the connection is opened outside the timing
        times = []
        for _ in range(count):
            began = time.perf_counter()
            await client.ping()
            times.append(time.perf_counter() - began)
    finally:
        await client.aclose()
    version = info.get("redis_version")
    return summarize(times), None if version is None else str(version)


def _floor_config(redis: Proc) -> LeaseConfig:
    return LeaseConfig(
        redis_url(redis), "bench-floor", lease_seconds=_FLOOR_LEASE, timeout_seconds=0.5
    )


async def _begin_floor_quiet_time(redis: Proc) -> None:
    """A cluster new to Redis grants nothing for one lease (Redis that starts empty), counted
    from its first call: make that call now, so the quiet time has passed when it is timed."""
    async with Leases(_floor_config(redis)) as leases:
        lease = await leases.acquire(_FLOOR_SERVER, 1)
        if lease is not None:
            await leases.release(lease)


async def _lease_round_trips(redis: Proc, count: int) -> JsonDict:
    """The gatekeeper's own `Leases` from the bench's idle loop: acquire, then release, one at a
    time on a cluster of their own. What an acquisition costs with nothing else on the loop."""
    acquires, releases = [], []
    async with Leases(_floor_config(redis)) as leases:
        # Until its quiet time is over (see `_begin_floor_quiet_time`).
        deadline = time.monotonic() + 3 * _FLOOR_LEASE
        while (first := await leases.acquire(_FLOOR_SERVER, 1)) is None:
            if time.monotonic() > deadline:
                raise RuntimeError("the floor's cluster granted no lease after its quiet time")
            await asyncio.sleep(0.05)
        await leases.release(first)
        for _ in range(count):
            began = time.perf_counter()
            lease = await leases.acquire(_FLOOR_SERVER, 1)
            acquired = time.perf_counter()
            if lease is None:
                raise RuntimeError("the floor's lease was refused: is the cluster's slot leaked?")
            await leases.release(lease)
            acquires.append(acquired - began)
            releases.append(time.perf_counter() - acquired)
    return {"acquire": summarize(acquires), "release": summarize(releases)}


async def _leases_held(gatekeepers: Iterable[Proc]) -> int | None:
    """Leases the replicas hold, from each one's /stats (None without a cluster there)."""
    held: int | None = None
    for proc in gatekeepers:
        response = await fetch("127.0.0.1", proc.port, "GET", "/stats")
        cluster = json.loads(response.body).get("cluster") if response.status == 200 else None
        if isinstance(cluster, dict) and isinstance(cluster.get("leases_held"), int):
            held = (held or 0) + cluster["leases_held"]
    return held


async def _leases_back(gatekeepers: list[Proc], within: float) -> int | None:
    """Poll until the replicas hold no lease (or `within` passes): what they still hold."""
    deadline = time.monotonic() + within
    while True:
        held = await _leases_held(gatekeepers)
        if not held or time.monotonic() > deadline:
            return held
        await asyncio.sleep(0.05)


# -- the flood ------------------------------------------------------------------------------


class _Burst:
    def __init__(self) -> None:
        self.refusals: list[float] = []
        self.statuses: Counter[int] = Counter()
        self.reasons: Counter[str] = Counter()
        self.errors = 0
        self.last_answer = 0.0
        self.first_refusal: float | None = None
        self.last_refusal = 0.0
        self.max_held = 0
        self.held_reads = 0
        self.sent = 0


async def _held(conn: Connection) -> int:
    """Tasks the upstream holds now: while it holds, exactly the tasks in flight there."""
    response = await conn.request("GET", "/bench/state")
    held: int = json.loads(response.body)["held"]
    return held


async def _burst(port: int, tasks: int, connections: int, upstream: Proc) -> _Burst:
    """`tasks` held tasks through `port` as fast as answers come; the upstream's held count
    is read all along. Once answers stop, the hold is released and the admitted drain."""
    burst = _Burst()
    remaining = tasks
    headers = (("Content-Type", CONTENT_TYPE), ("X-Bench-Hold", "1"))

    async def worker() -> None:
        nonlocal remaining
        conn = Connection("127.0.0.1", port)
        try:
            while remaining > 0:
                remaining -= 1
                began = time.perf_counter()
                try:
                    response = await conn.request("POST", "/asr", headers=headers, body=SMALL_BODY)
                except HttpError:
                    burst.errors += 1
                    continue
                now = time.perf_counter()
                burst.last_answer = now
                burst.statuses[response.status] += 1
                if response.status == 503:
                    burst.refusals.append(now - began)
                    burst.first_refusal = burst.first_refusal or now
                    burst.last_refusal = now
                    burst.reasons[response.headers.get("x-gatekeeper-reason", "-")] += 1
        finally:
            await conn.close()

    state = Connection("127.0.0.1", upstream.port)
    start = time.perf_counter()
    burst.last_answer = start
    workers = [asyncio.create_task(worker()) for _ in range(connections)]
    deadline = start + _BURST_LIMIT
    try:
        while time.perf_counter() < deadline:
            burst.max_held = max(burst.max_held, await _held(state))
            burst.held_reads += 1
            if all(w.done() for w in workers):
                break
            quiet = time.perf_counter() - burst.last_answer
            if (remaining <= 0 and quiet >= _QUIET) or quiet >= _SILENT:
                break
            await asyncio.sleep(_POLL)
        burst.max_held = max(burst.max_held, await _held(state))  # before the release
        await fetch("127.0.0.1", upstream.port, "POST", "/bench/release")
        async with asyncio.timeout(120):
            await asyncio.gather(*workers)
    finally:
        for w in workers:
            w.cancel()
        await state.close()
        await fetch("127.0.0.1", upstream.port, "POST", "/bench/hold")
    burst.sent = tasks - max(0, remaining)
    return burst


def _expected_admitted(setup: Setup, limit: int, queue: int) -> int:
    """Shared: one limit and a queue per replica; not shared: a limit and a queue each."""
    if setup.redis:
        return limit + setup.replicas * queue
    return setup.replicas * (limit + queue)


def _connections(refusing: int, setup: Setup, limit: int, queue: int) -> int:
    """Connections of a flood: as many as the overload scenario's flood keeps free to be refused
    (its connections less one limit and queue), plus one for every task this setup admits, so
    every setup is refused over the same number of connections."""
    return refusing - (limit + queue) + _expected_admitted(setup, limit, queue)


async def _flood(ctx: Ctx, running: _Running, upstream: Proc) -> JsonDict:
    cfg = ctx.cfg
    setup = running.setup
    expected = _expected_admitted(setup, cfg.burst_limit, cfg.burst_queue)
    connections = _connections(cfg.burst_connections, setup, cfg.burst_limit, cfg.burst_queue)
    burst = await _burst(running.nginx.port, cfg.burst_tasks, connections, upstream)
    leases_left = await _leases_back(running.gatekeepers, _LEASES_BACK_WITHIN)
    admitted = burst.statuses.get(200, 0)
    refused = burst.statuses.get(503, 0)
    others = {str(s): n for s, n in burst.statuses.items() if s not in (200, 503)}
    span = (
        burst.last_refusal - burst.first_refusal
        if burst.first_refusal is not None and burst.last_refusal > burst.first_refusal
        else None
    )
    return {
        "tasks": cfg.burst_tasks,
        "sent": burst.sent,
        "connections": connections,
        "admitted": admitted,
        "expected_admitted": expected,
        "refused": refused,
        "refusal_rate_pct": round(100 * refused / cfg.burst_tasks, 2),
        "other_statuses": others,
        "client_errors": burst.errors,
        "admitted_as_expected": admitted == expected
        and refused == cfg.burst_tasks - expected
        and not others
        and burst.errors == 0
        and burst.sent == cfg.burst_tasks,
        "refusal_reasons": dict(burst.reasons),
        "refusal_latency": summarize(burst.refusals),
        "refusals_per_s": round(refused / span, 1) if span else None,
        "max_in_flight_at_upstream": burst.max_held,
        "upstream_reads": burst.held_reads,
        "limit": cfg.burst_limit,
        "limit_held": burst.max_held <= cfg.burst_limit,
        "leases_left_after_drain": leases_left,
    }


def _median_flood(runs: list[JsonDict]) -> JsonDict:
    """The burst with the median refusal p99 stands for the setup, with every burst's p99; a
    burst that broke a check stands instead (its counts are the row's), and every check and
    the highest count in flight cover all bursts."""
    wrong = [r for r in runs if not (r["admitted_as_expected"] and r["limit_held"])]
    ordered = sorted(runs, key=lambda r: r["refusal_latency"]["p99_ms"] or math.inf)
    lefts = [r["leases_left_after_drain"] for r in runs if r["leases_left_after_drain"] is not None]
    return {
        **(wrong[0] if wrong else ordered[len(ordered) // 2]),
        "bursts": len(runs),
        "refusal_p99_per_burst_ms": [r["refusal_latency"]["p99_ms"] for r in runs],
        "admitted_as_expected": all(r["admitted_as_expected"] for r in runs),
        "max_in_flight_at_upstream": max(r["max_in_flight_at_upstream"] for r in runs),
        "limit_held": all(r["limit_held"] for r in runs),
        "leases_left_after_drain": max(lefts) if lefts else None,
    }


# -- the scenario ---------------------------------------------------------------------------


def _redis_lease(cfg: BenchConfig) -> float | None:
    """ASR_REDIS_LEASE of the Redis setups: the default (None) in the full run. A cluster new to
    Redis starts no task for one lease (Redis that starts empty), which the Redis setups' first
    warm-up request waits out; the quick run (CI) shortens it to keep within its budget."""
    return _QUICK_LEASE if cfg.name == QUICK.name else None


def _latency_sizes(cfg: BenchConfig) -> tuple[int, int]:
    """(warm-up, timed requests a round) for every setup: the overhead scenario's, halved in
    the quick run (CI), where six setups at once would be its longest step and only the
    harness, not the figures, is checked."""
    if cfg.name == QUICK.name:
        return cfg.warmup_requests // 2, cfg.latency_requests // 2
    return cfg.warmup_requests, cfg.latency_requests


def _latency_row(
    name: str, latencies: list[float], bad: int, base_p50: float, base_p99: float
) -> JsonDict:
    p50 = percentile(tuple(latencies), 0.5)
    p99 = percentile(tuple(latencies), 0.99)
    return {
        "label": _FLOORS.get(name, name),
        "requests_timed": len(latencies),
        "bad_answers": bad,
        "latency_p50_ms": ms(p50),
        "latency_p99_ms": ms(p99),
        "added_p50_ms": None if p50 is None else ms(p50 - base_p50),
        "added_p99_ms": None if p99 is None else ms(p99 - base_p99),
    }


async def run(ctx: Ctx) -> JsonDict:
    cfg = ctx.cfg
    procs = ctx.procs
    find_tool("redis-server")  # ToolMissing says which Debian package, before anything starts
    ctx.say("replicas: starting redis-server")
    redis = await procs.redis_server()
    await _begin_floor_quiet_time(redis)
    upstream = await procs.upstream()
    nginx_floor = await procs.nginx(upstream.port)
    ctx.say("replicas: starting 8 gatekeepers (4 setups) behind nginx")
    started = await asyncio.gather(*(_start(ctx, s, upstream, redis) for s in SETUPS))
    running = {r.setup.key: r for r in started}
    ports = {"direct": upstream.port, "nginx": nginx_floor.port}
    ports |= {key: r.nginx.port for key, r in running.items()}
    names = list(ports)

    warmup, requests = _latency_sizes(cfg)
    ctx.say(f"replicas: warm-up ({warmup} requests each)")
    for port in ports.values():
        await closed_loop(port, warmup, cfg.latency_concurrency)
    floor_calls = _PINGS // 4 if cfg.name == QUICK.name else _PINGS
    ctx.say(f"replicas: the floors ({floor_calls} Redis PINGs, lease acquisitions and releases)")
    ping, version = await _redis_round_trips(redis, floor_calls)
    bare = await _lease_round_trips(redis, floor_calls)
    before = {key: await _scrape(r.gatekeepers) for key, r in running.items()}
    latencies: dict[str, list[float]] = {name: [] for name in names}
    bad: dict[str, int] = dict.fromkeys(names, 0)
    for r in range(cfg.latency_rounds):
        ctx.say(f"replicas: latency round {r + 1}/{cfg.latency_rounds}")
        for name in rotated(names, r):
            loop = await closed_loop(ports[name], requests, cfg.latency_concurrency)
            latencies[name] += loop.latencies
            bad[name] += loop.errors + sum(n for s, n in loop.statuses.items() if s != 200)
    after = {key: await _scrape(r.gatekeepers) for key, r in running.items()}

    base = latencies["single"]
    base_p50 = percentile(tuple(base), 0.5) or 0.0
    base_p99 = percentile(tuple(base), 0.99) or 0.0
    latency: dict[str, JsonDict] = {}
    for name in names:
        row = _latency_row(name, latencies[name], bad[name], base_p50, base_p99)
        setup = next((s for s in SETUPS if s.key == name), None)
        if setup is not None:
            row |= {"label": setup.label, "replicas": setup.replicas, "redis": setup.redis}
            delta = after[name].since(before[name])
            row["cluster_metrics"] = delta.present
            if setup.redis:
                row["acquire"] = _acquire_figures(delta)
                row["redis_errors"] = round(
                    delta.counters.get("asr_gatekeeper_cluster_redis_errors_total", 0.0)
                )
                row["leases_lost"] = round(
                    delta.counters.get("asr_gatekeeper_cluster_leases_lost_total", 0.0)
                )
                plain = _SAME_REPLICAS_WITHOUT_REDIS[name]
                ours, theirs = latencies[name], latencies[plain]
                p50, p99 = percentile(tuple(ours), 0.5), percentile(tuple(ours), 0.99)
                q50, q99 = percentile(tuple(theirs), 0.5), percentile(tuple(theirs), 0.99)
                row["coordination_p50_ms"] = ms(p50 - q50) if p50 and q50 else None
                row["coordination_p99_ms"] = ms(p99 - q99) if p99 and q99 else None
                row["versus"] = plain
        latency[name] = row

    flood_runs: dict[str, list[JsonDict]] = {s.key: [] for s in SETUPS}
    await fetch("127.0.0.1", upstream.port, "POST", "/bench/hold")
    for r in range(max(1, cfg.burst_rounds)):
        for key in rotated([s.key for s in SETUPS], r):
            ctx.say(
                f"replicas: flood of {cfg.burst_tasks} tasks at limit {cfg.burst_limit}, queue "
                f"{cfg.burst_queue} a replica through {running[key].setup.label} "
                f"(burst {r + 1}/{cfg.burst_rounds})"
            )
            flood_runs[key].append(await _flood(ctx, running[key], upstream))
    flood = {
        key: {
            "label": running[key].setup.label,
            "replicas": running[key].setup.replicas,
            "redis": running[key].setup.redis,
            **_median_flood(runs),
        }
        for key, runs in flood_runs.items()
    }
    rss = {key: [gk.peak_rss_mib() for gk in r.gatekeepers] for key, r in running.items()}
    for each in running.values():
        for proc in (each.nginx, *each.gatekeepers):
            await procs.kill(proc)
    for proc in (nginx_floor, upstream, redis):
        await procs.kill(proc)
    for key, peaks in rss.items():
        latency[key]["peak_rss_mib"] = peaks
    return {
        "setup": {
            "path": "POST /asr, 256-byte multipart file",
            "upstream_handler_ms": 1.0,
            "limit": cfg.burst_limit,
            "queue_per_replica": cfg.burst_queue,
            "front": "nginx, round robin over the setup's gatekeepers (keepalive 64)",
            "redis": "redis-server on loopback, no persistence; one cluster name per setup; "
            + (
                "ASR_REDIS_LEASE and ASR_REDIS_TIMEOUT at their defaults"
                if _redis_lease(cfg) is None
                else f"ASR_REDIS_LEASE={_redis_lease(cfg):g}, ASR_REDIS_TIMEOUT at its default"
            )
            + "; a new cluster starts no task for one lease, which the warm-up waits out",
            "latency_concurrency": cfg.latency_concurrency,
            "latency_requests_per_round": requests,
            "latency_rounds": cfg.latency_rounds,
            "burst_tasks": cfg.burst_tasks,
            "burst_connections": cfg.burst_connections,
            "bursts": cfg.burst_rounds,
            "redis_ping": ping,
            "bare_leases": bare,
            "redis_version": version,
        },
        "latency": latency,
        "flood": flood,
    }
