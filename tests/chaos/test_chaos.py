"""Fault injection: thousands of tasks through the gatekeeper while everything around it fails.

CI runs a short run (CHAOS_TASKS, default 2000); a soak is the same test with a bigger count or a
time budget, e.g. `CHAOS_TASKS=100000 pytest -m chaos -s` or `CHAOS_SECONDS=1800`. The seed is
printed first; `CHAOS_SEED=<seed>` replays the same tasks, faults and client behaviours.
See docs/reliability.md for what each check proves.
"""

import asyncio
import contextlib
import dataclasses
import gc
import itertools
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gatekeeper.sim.server import OnDisconnect
from tests.chaos.chaos_upstream import ChaosUpstream, answer_bytes
from tests.chaos.driver import (
    ChaosConfig,
    ClientResult,
    EventLog,
    Monitor,
    Monkey,
    Round,
    Verdict,
    books,
    fd_report,
    get_json,
    run_clients,
    settle,
    summary,
    verdict_text,
)
from tests.conftest import GatekeeperFactory
from tests.processes import gatekeeper_process
from tests.waiting import until

pytestmark = pytest.mark.chaos

# Every fault and every client behaviour a CI-sized run must have met, or it proves nothing.
_NEEDED = (
    *(f"oom:{style}" for style in ("pytorch", "fastapi", "bare", "ctranslate2", "whispercpp")),
    "oom:openai",
    "ok",
    "stream",
    "trickle",
    "err",
    "busy",
    "client",
    "reset_upload",
    "reset_answer",
    "hang",
    "overrun",
    "downtime",
    *("normal", "chunked", "slow_upload", "stall_upload", "too_large_cl", "too_large_chunked"),
    *("left_mid_queued", "left_mid_uploading", "left_mid_running", "left_mid_retry"),
    *("left_queued", "left_running", "left_retry_delay"),  # as the gatekeeper saw them
    *("200", "4xx_relayed", "5xx_relayed", "502_crash", "504_timeout", "cut_by_upstream"),
    *("503_queue_full", "503_queue_timeout", "408_body_timeout"),
)
_ROUND = 5000  # tasks per round in a soak: leak figures are taken between rounds


# The adaptive mode moves the limit under the same chaos (OOMs lower it, calm raises it); a
# quarter of the tasks is enough to make it go up and down many times.
_ADAPTIVE = {
    "adaptive": True,
    "min_concurrent": 1,
    "initial_concurrent": 2,
    "adaptive_stable_successes": 5,
    "adaptive_stable_seconds": 0.5,
    "adaptive_fade_seconds": 2.0,
}


# A fixed limit without the seed's cool-down: tasks give their slot away during retry delays
# and take one back ahead of the queue (or are refused with queue_timeout when none frees).
_NO_COOLDOWN = {"oom_cooldown": 0}


@pytest.mark.parametrize("mode", ["fixed", "no_cooldown", "adaptive", "adaptive_queue"])
async def test_chaos_in_process(
    start_gatekeeper: GatekeeperFactory, tmp_path: Path, mode: str
) -> None:
    """Thousands of tasks under every upstream and client fault: the promise holds, every client
    gets one answer of the right kind, the books reconcile, and nothing leaks between rounds."""
    cfg = ChaosConfig.from_env(default_tasks=2000)
    if mode != "fixed":
        cfg = dataclasses.replace(cfg, tasks=max(200, cfg.tasks // 4))
    print(f"\nchaos {mode} seed {cfg.seed} (replay with CHAOS_SEED={cfg.seed})", flush=True)
    spool = tmp_path / "spool"
    spool.mkdir()
    upstream = ChaosUpstream(limit=cfg.limit)
    await upstream.start()
    extra: dict[str, dict[str, Any]] = {
        "adaptive": _ADAPTIVE,
        "adaptive_queue": _ADAPTIVE,
        "no_cooldown": _NO_COOLDOWN,
    }
    settings = {**cfg.gatekeeper_settings(str(spool)), **extra.get(mode, {})}
    if mode == "adaptive_queue":
        # No ASR_MAX_QUEUE: the queue follows the moving limit (10 places a slot), so a cut
        # shrinks it under tasks already waiting; the bound is the queue at the highest limit.
        del settings["max_queue"]
        cfg = dataclasses.replace(cfg, max_queue=10 * cfg.limit)
    base, _app = await start_gatekeeper(
        upstream.url, seed=cfg.seed, health_interval=0.2, **settings
    )
    events = EventLog()
    verdict = Verdict(cfg, upstream, events)
    rounds: list[Round] = []
    began = time.monotonic()
    stop_at = None if cfg.seconds is None else began + cfg.seconds
    warm = min(cfg.tasks, max(100, min(cfg.tasks // 10, 10_000)))
    size = _ROUND if cfg.tasks > 3 * _ROUND else max(1, -(-(cfg.tasks - warm) // 2))
    edges = [0, warm, *range(warm + size, cfg.tasks, size), cfg.tasks]
    monitor = Monitor(base, cfg, upstream)
    try:
        with events.attached():
            monitor.start()
            for number, (first, end) in enumerate(itertools.pairwise(edges)):
                if stop_at is not None and time.monotonic() >= stop_at:
                    break
                round_began = time.monotonic()
                monkey = Monkey(upstream, cfg, salt=str(number))
                monkey.start()
                results = await run_clients(
                    base, cfg, upstream, range(first, end), deadline=stop_at
                )
                await monkey.stop()
                await settle(base, upstream)
                for result in results:
                    verdict.judge(result)
                    upstream.forget(result.spec.request_id)
                rounds.append(_measure(number, len(results), time.monotonic() - round_began, spool))
                print(_round_line(rounds[-1], verdict, monitor), flush=True)
                if len(verdict.violations) > 200:
                    break
            await monitor.stop()
            stats, metrics = await books(base)
    finally:
        await monitor.stop()
        await upstream.stop()
    elapsed = time.monotonic() - began
    verdict.reconcile(stats, metrics, admitted_refusals=False)
    # The upstream's own account first: it names the tasks in flight when the limit broke.
    verdict.violations.extend(upstream.violations[:20])
    for problem in monitor.problems[:20]:
        verdict.fail(None, f"while running: {problem}")
    _check_leaks(verdict, rounds, spool, cfg)
    for line in events.errors[:10]:
        verdict.fail(None, f"error logged: {line}")
    if verdict.results >= 1500:
        gaps = verdict.coverage_gaps(needed=_NEEDED)
        if gaps:
            verdict.fail(None, f"the run never exercised: {', '.join(gaps)}")
    print(
        summary(
            {
                "mode": mode,
                "seed": cfg.seed,
                "tasks": verdict.results,
                "seconds": round(elapsed, 1),
                "tasks_per_second": round(verdict.results / elapsed, 1),
                "upstream_max_in_flight": upstream.max_in_flight,
                "limit": cfg.limit,
                "upstream_orphans": upstream.orphans_total,
                "gatekeeper_max_active_seen": monitor.max_active,
                "gatekeeper_max_queued_seen": monitor.max_queued,
                "stats_readings": monitor.readings,
                "upstream_attempts": verdict.arrivals,
                "downtimes": len(upstream.downtimes),
                "attempts_per_server": verdict.server_figures,
                "ok_bytes": verdict.ok_bytes_client,
                **verdict.figures(),
                "limit_changes": events.counts["LIMIT_CHANGED"],
                "stats": {k: stats[k] for k in _STATS_SHOWN},
                "rounds": [r.__dict__ for r in rounds],
            }
        ),
        flush=True,
    )
    assert not verdict.violations, verdict_text(cfg, verdict, upstream)


_STATS_SHOWN = (
    "total_tasks",
    "succeeded_tasks",
    "failed_tasks",
    "client_error_tasks",
    "cancelled_tasks",
    "rejected_after_queueing_tasks",
    "rejected_by_reason",
    "upstream_attempts",
    "retries",
    "oom_errors",
)


def _measure(number: int, tasks: int, seconds: float, spool: Path) -> Round:
    gc.collect()
    fds, sockets, _ = fd_report("self", str(spool))
    return Round(
        name=f"round {number}",
        tasks=tasks,
        seconds=round(seconds, 1),
        fds=fds,
        sockets=sockets,
        asyncio_tasks=len(asyncio.all_tasks()),
    )


def _round_line(r: Round, verdict: Verdict, monitor: Monitor) -> str:
    return (
        f"{r.name}: {r.tasks} tasks in {r.seconds} s, fds {r.fds} (sockets {r.sockets}), "
        f"asyncio tasks {r.asyncio_tasks}, violations so far {len(verdict.violations)}, "
        f"max active seen {monitor.max_active}"
    )


def _check_leaks(verdict: Verdict, rounds: list[Round], spool: Path, cfg: ChaosConfig) -> None:
    """No spool file left open or on disk; fds and asyncio tasks do not grow after round 0."""
    _, _, spooled = fd_report("self", str(spool))
    if spooled:
        verdict.fail(None, f"{len(spooled)} spool files still open: {spooled[:3]}")
    if list(spool.iterdir()):
        verdict.fail(None, f"spool directory not empty: {list(spool.iterdir())[:3]}")
    if len(rounds) < 2:
        return
    base = rounds[0]
    # Idle keep-alive connections between gatekeeper and upstream may differ by a few.
    slack = 2 * (cfg.limit + 4)
    for later in rounds[1:]:
        if later.fds - later.sockets > base.fds - base.sockets:
            verdict.fail(None, f"non-socket fds grew: {base} -> {later}")
        if later.fds > base.fds + slack:
            verdict.fail(None, f"open fds grew by more than {slack}: {base.fds} -> {later.fds}")
        if later.asyncio_tasks > base.asyncio_tasks + slack:
            verdict.fail(None, f"asyncio tasks grew: {base.asyncio_tasks} -> {later.asyncio_tasks}")


# -- a real process: traffic, leaks between rounds, and a SIGTERM drain mid-flow ---------------

_GRACE = 10.0
_FINAL_FLUSH = 1.0  # gatekeeper.server: what aiohttp gets after our own drain


async def _read_log(stream: asyncio.StreamReader, events: EventLog, lines: list[str]) -> None:
    stopped = "[ASR并发] 网关已停止"
    while line := (await stream.readline()).decode(errors="replace"):
        lines.append(line)
        events.note_line(line)
        if stopped in line:
            events.counts["stopped_at_ms"] = int(time.monotonic() * 1000)


async def test_chaos_sigterm_drain(tmp_path: Path) -> None:
    """A real `gatekeeper serve` under chaos: no fd or spool leaks between rounds; on SIGTERM
    mid-flow every admitted task completes, newcomers get 503 shutting_down, and it exits 0."""
    base_cfg = ChaosConfig.from_env(default_tasks=2000)
    per_round = max(150, min(600, base_cfg.tasks // 8))
    cfg = dataclasses.replace(base_cfg, limit=2, max_queue=12, queue_timeout=3.0, clients=16)
    print(f"\nchaos drain seed {cfg.seed} (replay with CHAOS_SEED={cfg.seed})", flush=True)
    spool = tmp_path / "spool"
    spool.mkdir()
    upstream = ChaosUpstream(limit=cfg.limit)
    await upstream.start()
    events = EventLog()
    lines: list[str] = []
    flags = [*cfg.gatekeeper_flags(str(spool)), "--shutdown-grace", str(_GRACE)]
    flags += ["--health-interval", "0.2"]
    rounds: list[Round] = []
    terminated = stopped = 0.0
    try:
        async with gatekeeper_process(upstream.url, *flags) as (proc, base):
            assert proc.stderr is not None
            reader = asyncio.create_task(_read_log(proc.stderr, events, lines))
            verdict = Verdict(cfg, upstream, events)
            monitor = Monitor(base, cfg, upstream)
            monitor.start()
            for number in range(2):
                began = time.monotonic()
                monkey = Monkey(upstream, cfg, salt=f"drain{number}")
                monkey.start()
                indices = range(number * per_round, (number + 1) * per_round)
                results = await run_clients(base, cfg, upstream, indices)
                await monkey.stop()
                await settle(base, upstream)
                for result in results:
                    verdict.judge(result)
                    upstream.forget(result.spec.request_id)
                # A task's spool file closes as it ends; one still open by now is a leak,
                # reported below.
                with contextlib.suppress(TimeoutError):
                    await until(lambda: not fd_report(proc.pid, str(spool))[2], within=2)
                fds, sockets, spooled = fd_report(proc.pid, str(spool))
                rounds.append(
                    Round(
                        f"round {number}",
                        len(results),
                        round(time.monotonic() - began, 1),
                        fds,
                        sockets,
                        0,
                    )
                )
                print(_round_line(rounds[-1], verdict, monitor), flush=True)
                if spooled:
                    verdict.fail(None, f"spool files open at rest: {spooled[:3]}")
            stats, metrics = await books(base)
            # The log comes through a pipe and may lag behind /stats.
            verdict.reconcile(stats, metrics, admitted_refusals=False, log_complete=False)

            # Traffic keeps coming; SIGTERM lands in the middle of it.
            drain = Verdict(cfg, upstream, events)
            first = 2 * per_round
            clients = asyncio.create_task(
                run_clients(
                    base,
                    cfg,
                    upstream,
                    range(first, first + 10 * per_round),
                    deadline=time.monotonic() + 1.5,
                    connector=lambda: aiohttp.TCPConnector(limit=0, force_close=True),
                )
            )
            await asyncio.sleep(1.0)
            terminated = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            results = await clients
            code = await asyncio.wait_for(proc.wait(), _GRACE + _FINAL_FLUSH + 10)
            took = time.monotonic() - terminated
            await monitor.stop()
            await reader
            stopped = events.counts["stopped_at_ms"] / 1000

            def refused_ok(result: ClientResult) -> bool:
                # 503 shutting_down for whoever arrived after the signal; after the listener
                # closed, nobody is there to answer (connection refused).
                if result.status is None:
                    return bool(stopped) and result.started >= stopped - 0.05
                return result.started >= terminated - 0.2

            drain.shutting_down_allowed = refused_ok
            for result in results:
                drain.judge(result)
                late = [s for s in upstream.by_id.get(result.spec.request_id, [])]
                if result.started > terminated + 0.2 and late:
                    drain.fail(result, "arrived after SIGTERM, yet reached the upstream")
    finally:
        await upstream.stop()
    drain_figures = drain.figures()
    if code != 0:
        drain.fail(None, f"exit status {code}")
    if took > _GRACE + _FINAL_FLUSH:
        drain.fail(None, f"took {took:.1f} s to exit after SIGTERM (grace {_GRACE} s)")
    if not stopped:
        drain.fail(None, "no '网关已停止' line: the drain did not finish")
    if drain.tally["503_shutting_down"] == 0:
        drain.fail(None, "nobody arrived during the drain (no 503 shutting_down)")
    if list(spool.iterdir()):
        drain.fail(None, f"spool directory not empty after exit: {list(spool.iterdir())[:3]}")
    if rounds[1].fds - rounds[1].sockets > rounds[0].fds - rounds[0].sockets:
        drain.fail(None, f"non-socket fds grew between rounds: {rounds}")
    drain.violations[:0] = verdict.violations + upstream.violations[:20] + monitor.problems[:20]
    for line in events.errors[:10]:
        drain.fail(None, f"error logged: {line.strip()}")
    print(
        summary(
            {
                "seed": cfg.seed,
                "tasks_before_sigterm": verdict.results,
                "tasks_around_sigterm": drain.results,
                "exit_status": code,
                "exit_seconds_after_sigterm": round(took, 2),
                "upstream_max_in_flight": upstream.max_in_flight,
                "limit": cfg.limit,
                "upstream_orphans": upstream.orphans_total,
                "rounds": [r.__dict__ for r in rounds],
                "before": verdict.figures()["results"],
                "around_sigterm": drain_figures["results"],
            }
        ),
        flush=True,
    )
    assert not drain.violations, verdict_text(cfg, drain, upstream)


# -- bugs the chaos run found (fixed in 7f7ebec), kept as one-request regression tests ---------


@pytest.mark.parametrize(
    "plan", ["reset_answer:200:200000", "trickle:1500:4096"], ids=["reset", "timeout"]
)
async def test_answer_cut_by_the_upstream_counts_as_failed(
    start_gatekeeper: GatekeeperFactory, plan: str
) -> None:
    """A 200 the upstream breaks off mid-body reaches the client cut and counts as failed."""
    upstream = ChaosUpstream(limit=1)
    await upstream.start()
    try:
        base, _ = await start_gatekeeper(upstream.url, request_timeout=0.5)
        async with aiohttp.ClientSession() as session:
            headers = {"X-Request-ID": "cut", "X-Chaos-Plan": plan}
            async with session.post(f"{base}/asr", data=b"audio", headers=headers) as response:
                assert response.status == 200  # the headers were relayed before the break
                with pytest.raises(aiohttp.ClientPayloadError):
                    await response.read()
            stats = await get_json(session, f"{base}/stats")
    finally:
        await upstream.stop()
    assert stats["cancelled_tasks"] == 0  # the client never left
    assert stats["failed_tasks"] == 1
    assert stats["success_rate"] == "0.0%"


async def test_small_answer_broken_by_the_upstream_is_retried(
    start_gatekeeper: GatekeeperFactory,
) -> None:
    """A short answer the upstream breaks off before the client saw a byte is retried."""
    upstream = ChaosUpstream(limit=1)
    await upstream.start()
    try:
        base, _ = await start_gatekeeper(upstream.url, retry_delay=0.01)
        async with aiohttp.ClientSession() as session:
            headers = {"X-Request-ID": "small", "X-Chaos-Plan": "reset_answer:200:4096,ok:0:16"}
            async with session.post(f"{base}/asr", data=b"audio", headers=headers) as response:
                body = await response.read()
    finally:
        await upstream.stop()
    assert response.status == 200
    assert response.headers["X-Gatekeeper-Attempts"] == "2"
    assert body == answer_bytes("small", 2, 16)


async def test_task_still_uploading_when_grace_ends_gets_503() -> None:
    """A queued task whose body is still arriving when the grace period ends gets 503."""
    upstream = ChaosUpstream(limit=1)
    await upstream.start()
    flags = ["--max-concurrent", "1", "--shutdown-grace", "0.5", "--request-timeout", "30"]
    try:
        async with (
            gatekeeper_process(upstream.url, *flags) as (proc, base),
            aiohttp.ClientSession() as session,
        ):
            running = asyncio.ensure_future(
                session.post(
                    f"{base}/asr", data=b"x", headers={"X-Request-ID": "a", "X-Chaos-Plan": "hang"}
                )
            )
            await upstream.event("arrived", "a", 1).wait()
            reader, writer = await asyncio.open_connection("127.0.0.1", int(base.rsplit(":")[-1]))
            try:
                writer.write(b"POST /asr HTTP/1.1\r\nHost: g\r\nContent-Length: 10\r\n\r\n12345")
                await writer.drain()

                async def uploading() -> bool:
                    doc: dict[str, Any] = await get_json(session, f"{base}/stats")
                    return bool(doc["uploading_tasks"] == 1)

                await until(uploading, every=0.02)  # behind the hung task, half its body sent
                proc.send_signal(signal.SIGTERM)
                # The grace period ends with the body half sent: the answer (and the end of the
                # connection) comes then, without waiting for the rest of the body.
                answer = await asyncio.wait_for(reader.read(), 3)
            finally:
                writer.close()
                running.cancel()
                await asyncio.gather(running, return_exceptions=True)
    finally:
        await upstream.stop()
    assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
    assert b"shutting_down" in answer


# -- issue #13: an attempt that timed out is still on the GPU --------------------------------


@pytest.mark.parametrize("on_disconnect", list(OnDisconnect))
async def test_chaos_upstream_counts_work_that_outlives_its_connection(
    on_disconnect: OnDisconnect,
) -> None:
    """The chaos upstream counts a computation whose connection closed until its time is up,
    or, with on_disconnect=stop, only until the connection closes."""
    upstream = ChaosUpstream(limit=1, on_disconnect=on_disconnect)
    await upstream.start()
    try:
        async with aiohttp.ClientSession() as session:
            headers = {"X-Request-ID": "gone", "X-Chaos-Plan": "overrun:400:16"}
            call = asyncio.ensure_future(session.post(f"{upstream.url}/asr", headers=headers))
            await upstream.event("arrived", "gone", 1).wait()
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await call
            await upstream.event("answered", "gone", 1).wait()  # the handler saw the hang-up
            [served] = upstream.by_id["gone"]
            if on_disconnect is OnDisconnect.CONTINUE:
                assert (upstream.in_flight, served.orphaned) == (1, True)
                await until(lambda: upstream.in_flight == 0)
                assert served.ended - served.started >= 0.4
            else:
                assert (upstream.in_flight, served.orphaned) == (0, False)
                assert served.ended - served.started < 0.4
    finally:
        await upstream.stop()
    assert served.cut


async def test_a_timed_out_attempt_keeps_its_slot_while_the_upstream_computes(
    start_gatekeeper: GatekeeperFactory,
) -> None:
    """With one slot, a task queued behind an attempt that timed out reaches the Whisper server
    only once the server is done computing the first, while the first client gets its 504 at
    the deadline."""
    upstream = ChaosUpstream(limit=1)
    await upstream.start()
    timeout, work = 0.5, 0.8  # the overrun ends well within the default hold (= timeout)
    try:
        base, _ = await start_gatekeeper(upstream.url, max_concurrent=1, request_timeout=timeout)
        async with aiohttp.ClientSession() as session:

            async def post(request_id: str, plan: str) -> tuple[int, float]:
                headers = {"X-Request-ID": request_id, "X-Chaos-Plan": plan}
                async with session.post(f"{base}/asr", data=b"audio", headers=headers) as r:
                    await r.read()
                    return r.status, time.monotonic()

            slow = asyncio.ensure_future(post("overrun", f"overrun:{int(work * 1000)}:16"))
            await upstream.event("arrived", "overrun", 1).wait()
            queued = asyncio.ensure_future(post("queued", "ok:0:16"))
            (slow_status, slow_answered), (queued_status, _) = await asyncio.gather(slow, queued)
            await until(lambda: upstream.in_flight == 0)
    finally:
        await upstream.stop()
    [first], [second] = upstream.by_id["overrun"], upstream.by_id["queued"]
    assert (slow_status, queued_status) == (504, 200)
    assert slow_answered < first.started + work  # the 504 does not wait for the GPU
    assert upstream.max_in_flight == 1, (
        f"upstream max in flight {upstream.max_in_flight} (limit 1): the queued task arrived "
        f"{second.started - first.started:.2f} s after the timed-out one, which computed for "
        f"{first.ended - first.started:.2f} s; {upstream.violations}"
    )
