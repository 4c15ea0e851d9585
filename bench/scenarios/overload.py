"""Scenario 3 — overload: a burst of tasks at limit 2, queue 20, against the admission proxies.

The upstream holds every task it receives until the burst is over, so exactly limit + queue
tasks can be admitted, whatever the timing: that count is a correctness check. The burst goes
over `burst_connections` keep-alive connections as fast as answers come back (the connections
whose task was admitted stay blocked on it). A separate probe process times GET /metrics and
GET /health throughout. Once no answer has come for a moment, the hold is released and the
admitted tasks must all succeed.
"""

import asyncio
import json
import math
import sys
import time
from collections import Counter

from bench.httpclient import Connection, HttpError, fetch
from bench.procs import REPO, Proc
from bench.profile import ProfileRecorder, summarize_raw
from bench.scenarios.common import (
    CONTENT_TYPE,
    SMALL_BODY,
    Ctx,
    JsonDict,
    gatekeeper_variants,
    rotated,
)
from bench.stats import summarize

__all__ = ["run"]

_QUIET = 0.5  # seconds without any answer that end the burst
_BURST_LIMIT = 180.0  # the whole burst, seconds


class _Burst:
    def __init__(self) -> None:
        self.sent_at: list[float] = []
        self.refusals: list[float] = []
        self.refused_at: list[float] = []
        self.statuses: Counter[int] = Counter()
        self.reasons: Counter[str] = Counter()
        self.errors = 0
        self.answered = 0
        self.last_answer = 0.0
        self.start = 0.0


async def _burst(port: int, tasks: int, connections: int, upstream_port: int) -> _Burst:
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
                burst.answered += 1
                burst.last_answer = now
                burst.statuses[response.status] += 1
                if response.status == 503:
                    burst.refusals.append(now - began)
                    burst.refused_at.append(time.monotonic())
                    burst.reasons[response.headers.get("x-gatekeeper-reason", "-")] += 1
        finally:
            await conn.close()

    burst.start = time.perf_counter()
    burst.last_answer = burst.start
    workers = [asyncio.create_task(worker()) for _ in range(connections)]
    deadline = burst.start + _BURST_LIMIT
    try:
        while time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
            if all(w.done() for w in workers):
                break
            quiet = time.perf_counter() - burst.last_answer
            if remaining <= 0 and quiet >= _QUIET:
                break
        await fetch("127.0.0.1", upstream_port, "POST", "/bench/release")
        async with asyncio.timeout(120):
            await asyncio.gather(*workers)
    finally:
        for w in workers:
            w.cancel()
        await fetch("127.0.0.1", upstream_port, "POST", "/bench/hold")
    return burst


async def _start_probe(ctx: Ctx, port: int) -> asyncio.subprocess.Process:
    probe = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.probe",
        "--port",
        str(port),
        "--interval",
        "0.01",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    assert probe.stdout is not None
    async with asyncio.timeout(30):
        await probe.stdout.readline()  # "ready"
    await asyncio.sleep(0.2)
    return probe


async def _stop_probe(probe: asyncio.subprocess.Process) -> JsonDict:
    assert probe.stdin is not None
    probe.stdin.close()
    async with asyncio.timeout(30):
        out, _ = await probe.communicate()
    lines = out.decode().strip().splitlines()
    data: JsonDict = json.loads(lines[-1]) if lines else {}
    return data


def _probe_summary(probe: JsonDict, start: float, end: float) -> JsonDict:
    """Latency of the probes that began during the burst [start, end] (monotonic clock)."""
    summary: JsonDict = {}
    for path, samples in probe.get("latencies", {}).items():
        during = [lat for began, lat in samples if start <= began <= end]
        summary[path] = summarize(during)
    summary["statuses"] = probe.get("statuses", {})
    summary["errors"] = probe.get("errors", 0)
    return summary


async def _measure(ctx: Ctx, proc: Proc, upstream: Proc) -> JsonDict:
    cfg = ctx.cfg
    probe = await _start_probe(ctx, proc.port)
    try:
        mono_start = time.monotonic()
        burst = await _burst(proc.port, cfg.burst_tasks, cfg.burst_connections, upstream.port)
    finally:
        probe_data = await _stop_probe(probe)
    mono_end = max(burst.refused_at) if burst.refused_at else time.monotonic()
    expected = cfg.burst_limit + cfg.burst_queue
    admitted = burst.statuses.get(200, 0)
    refused = burst.statuses.get(503, 0)
    others = {str(s): n for s, n in burst.statuses.items() if s not in (200, 503)}
    refusal_span = mono_end - mono_start
    return {
        "tasks": cfg.burst_tasks,
        "admitted": admitted,
        "expected_admitted": expected,
        "refused": refused,
        "expected_refused": cfg.burst_tasks - expected,
        "other_statuses": others,
        "client_errors": burst.errors,
        "admitted_exactly": admitted == expected
        and refused == cfg.burst_tasks - expected
        and not others
        and burst.errors == 0,
        "refusal_reasons": dict(burst.reasons),
        "refusal_latency": summarize(burst.refusals),
        "refusals_per_s": round(refused / refusal_span, 1) if refusal_span > 0 else None,
        "burst_seconds": round(refusal_span, 3),
        "probes_during_burst": _probe_summary(probe_data, mono_start, mono_end),
        "peak_rss_mib": proc.peak_rss_mib(),
    }


async def run(ctx: Ctx) -> JsonDict:
    cfg = ctx.cfg
    procs = ctx.procs
    upstream = await procs.upstream()
    await fetch("127.0.0.1", upstream.port, "POST", "/bench/hold")
    settings = {"max_concurrent": cfg.burst_limit, "max_queue": cfg.burst_queue}
    starters: dict[str, dict[str, str]] = {"haproxy": {}, **dict(gatekeeper_variants(ctx))}
    bursts: dict[str, list[JsonDict]] = {name: [] for name in starters}
    for r in range(max(1, cfg.burst_rounds)):
        for name in rotated(list(starters), r):
            ctx.say(
                f"overload: {cfg.burst_tasks} tasks at limit {cfg.burst_limit}, "
                f"queue {cfg.burst_queue} through {name} (burst {r + 1}/{cfg.burst_rounds})"
            )
            if name == "haproxy":
                proc = await procs.haproxy(
                    upstream.port,
                    maxconn=cfg.burst_limit,
                    maxqueue=cfg.burst_queue,
                    timeout_queue=600,
                    timeout_server=600,
                )
            else:
                proc = await procs.gatekeeper(upstream.url, {**settings, **starters[name]})
            bursts[name].append(await _measure(ctx, proc, upstream))
            await procs.kill(proc)
    results = {name: _median_burst(runs) for name, runs in bursts.items()}
    for name, extra in starters.items():
        if ctx.profile and name != "haproxy":
            ctx.say(f"overload: profiling {name} during a burst (py-spy, not measured)")
            proc = await procs.gatekeeper(upstream.url, {**settings, **extra})
            raw = ctx.out / "profiles" / f"overload-{name}.txt"
            raw.parent.mkdir(parents=True, exist_ok=True)
            async with ProfileRecorder(proc.pid, raw):
                for _ in range(3):  # one burst lasts about a second: too few samples alone
                    await _burst(proc.port, cfg.burst_tasks, cfg.burst_connections, upstream.port)
            ctx.profiles[f"overload/{name}"] = summarize_raw(raw)
            await procs.kill(proc)
    await procs.kill(upstream)
    floor = results["haproxy"]["refusal_latency"]["p99_ms"]
    for res in results.values():
        p99 = res["refusal_latency"]["p99_ms"]
        res["refusal_p99_vs_haproxy"] = round(p99 / floor, 2) if p99 and floor else None
    return {
        "setup": {
            "tasks": cfg.burst_tasks,
            "connections": cfg.burst_connections,
            "limit": cfg.burst_limit,
            "queue": cfg.burst_queue,
            "bursts": cfg.burst_rounds,
            "upstream": "holds every admitted task until the burst is over",
            "probe": "separate process; GET /metrics then GET /health every 10 ms",
            "haproxy": "maxconn 2, maxqueue 20, 503 once queue(backend) >= 20, "
            "/metrics = prometheus-exporter, /health = monitor-uri",
        },
        "references": results,
    }


def _median_burst(runs: list[JsonDict]) -> JsonDict:
    """The burst with the median refusal p99 stands for the reference, with every burst's p99
    and the admission check of every burst; a burst that admitted wrongly stands instead (the
    row then shows its counts), and one without refusals counts as the slowest."""
    wrong = [run for run in runs if not run["admitted_exactly"]]
    ordered = sorted(runs, key=lambda run: run["refusal_latency"]["p99_ms"] or math.inf)
    return {
        **(wrong[0] if wrong else ordered[len(ordered) // 2]),
        "bursts": len(runs),
        "refusal_p99_per_burst_ms": [run["refusal_latency"]["p99_ms"] for run in runs],
        "admitted_exactly": all(run["admitted_exactly"] for run in runs),
    }
