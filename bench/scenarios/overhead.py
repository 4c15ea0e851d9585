"""Scenario 1 — overhead: a small task on a fast upstream, concurrency within the limit.

Latency: requests timed one by one (`latency_concurrency` connections), in rounds that rotate
the references, so drift in the machine's load hits them all alike. Added latency is the
reference's percentile minus the direct percentile. Saturation: wrk (one thread) with
`rps_connections` keep-alive connections for `rps_seconds`, again in rotating rounds.
"""

from bench.procs import Proc
from bench.profile import ProfileRecorder, summarize_raw
from bench.scenarios.common import (
    Ctx,
    JsonDict,
    closed_loop,
    gatekeeper_variants,
    rotated,
    run_wrk,
)
from bench.stats import median, ms
from gatekeeper.policy.quantiles import percentile

__all__ = ["run"]


async def run(ctx: Ctx) -> JsonDict:
    cfg = ctx.cfg
    procs = ctx.procs
    limit = cfg.overhead_limit
    upstream = await procs.upstream()
    refs: dict[str, Proc] = {"direct": upstream}
    refs["haproxy"] = await procs.haproxy(
        upstream.port, maxconn=limit, maxqueue=10 * limit, timeout_queue=60, timeout_server=60
    )
    refs["nginx"] = await procs.nginx(upstream.port)
    refs["aiohttp_floor"] = await procs.aiohttp_floor(upstream.url)
    settings = {"max_concurrent": limit, "max_queue": 10 * limit}
    for name, extra in gatekeeper_variants(ctx):
        refs[name] = await procs.gatekeeper(upstream.url, {**settings, **extra})
    names = list(refs)

    ctx.say(f"overhead: warm-up ({cfg.warmup_requests} requests each)")
    for proc in refs.values():
        await closed_loop(proc.port, cfg.warmup_requests, cfg.latency_concurrency)

    latencies: dict[str, list[float]] = {name: [] for name in names}
    bad: dict[str, int] = dict.fromkeys(names, 0)
    for r in range(cfg.latency_rounds):
        ctx.say(f"overhead: latency round {r + 1}/{cfg.latency_rounds}")
        for name in rotated(names, r):
            loop = await closed_loop(refs[name].port, cfg.latency_requests, cfg.latency_concurrency)
            latencies[name] += loop.latencies
            bad[name] += loop.errors + sum(n for s, n in loop.statuses.items() if s != 200)

    rps: dict[str, list[JsonDict]] = {name: [] for name in names}
    for r in range(cfg.rps_rounds):
        ctx.say(f"overhead: saturation round {r + 1}/{cfg.rps_rounds} (wrk)")
        for name in rotated(names, r):
            rps[name].append(
                await run_wrk(
                    ctx, refs[name].port, seconds=cfg.rps_seconds, connections=cfg.rps_connections
                )
            )

    if ctx.profile:
        for name, _ in gatekeeper_variants(ctx):
            ctx.say(f"overhead: profiling {name} under wrk (py-spy, not measured)")
            raw = ctx.out / "profiles" / f"overhead-{name}.txt"
            raw.parent.mkdir(parents=True, exist_ok=True)
            async with ProfileRecorder(refs[name].pid, raw):
                await run_wrk(
                    ctx, refs[name].port, seconds=cfg.rps_seconds, connections=cfg.rps_connections
                )
            ctx.profiles[f"overhead/{name}"] = summarize_raw(raw)

    direct_p50 = percentile(tuple(latencies["direct"]), 0.5) or 0.0
    direct_p99 = percentile(tuple(latencies["direct"]), 0.99) or 0.0
    results: dict[str, JsonDict] = {}
    for name in names:
        p50 = percentile(tuple(latencies[name]), 0.5)
        p99 = percentile(tuple(latencies[name]), 0.99)
        rounds = [round(x["rps"], 1) for x in rps[name]]
        results[name] = {
            "requests_timed": len(latencies[name]),
            "bad_answers": bad[name],
            "latency_p50_ms": ms(p50),
            "latency_p99_ms": ms(p99),
            "added_p50_ms": None if p50 is None else ms(p50 - direct_p50),
            "added_p99_ms": None if p99 is None else ms(p99 - direct_p99),
            "rps": round(median(rounds) or 0.0, 1),
            "rps_rounds": rounds,
            "rps_non_2xx": sum(x["non_2xx"] for x in rps[name]),
            "rps_socket_errors": sum(x["socket_errors"] for x in rps[name]),
            "rps_latency_p50_ms": rps[name][-1]["latency_p50_ms"] if rps[name] else None,
            "peak_rss_mib": refs[name].peak_rss_mib(),
        }
    haproxy_rps = results["haproxy"]["rps"]
    for name in names:
        rps_here = results[name]["rps"]
        results[name]["rps_vs_haproxy"] = round(rps_here / haproxy_rps, 3) if haproxy_rps else None
    for proc in refs.values():
        await procs.kill(proc)
    return {
        "setup": {
            "path": "POST /asr, 256-byte multipart file",
            "upstream_handler_ms": 1.0,
            "limit": limit,
            "latency_concurrency": cfg.latency_concurrency,
            "latency_requests_per_round": cfg.latency_requests,
            "latency_rounds": cfg.latency_rounds,
            "rps_tool": "wrk -t1",
            "rps_connections": cfg.rps_connections,
            "rps_seconds": cfg.rps_seconds,
            "rps_rounds": cfg.rps_rounds,
        },
        "references": results,
    }
