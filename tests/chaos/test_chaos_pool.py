"""Issue #15 under fault injection: several Whisper servers behind one gatekeeper.

The pool chaos run puts three chaos upstreams with different limits (3, 2, 1) behind one
gatekeeper, sends the usual seeded mix of client behaviours and per-request faults through it,
slows each server now and then, and kills one server mid-run (its listener closed and every
connection cut, as a crashed container) before restarting it on the same port. Every promise is
checked at each server: its own in-flight count never exceeds its own limit (work that goes on
after the gatekeeper hung up included), every client gets exactly one answer, the books
reconcile in total and per server, and no slot is left taken anywhere. The seed is printed
first; `CHAOS_SEED=<seed>` replays a run, `CHAOS_TASKS` / `CHAOS_SECONDS` make it a soak.

The run is made twice: fixed limits, and adaptive limits (each server's own, moving under the
OOMs it alone suffers; ASR_MAX_CONCURRENT is then each server's ceiling, checked at the server).

The focused tests pin the pool's own promises on a known scenario: a dead server's running
tasks are retried on another server and answered; an OOM on one server neither delays tasks
starting on another (its cool-down) nor moves the other's adaptive limit; and the two things
the pool run found in the core and that were fixed: a retry never goes back to a server found
down, and a full pool with a server down refuses arrivals before their upload.
"""

import asyncio
import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.chaos.chaos_upstream import ChaosPool, ChaosUpstream, answer_bytes
from tests.chaos.driver import (
    ChaosConfig,
    ClientResult,
    EventLog,
    Kill,
    Monitor,
    Monkey,
    Verdict,
    books,
    fd_report,
    get_json,
    run_clients,
    server_books_problems,
    settle,
    summary,
    verdict_text,
)
from tests.conftest import GatekeeperFactory
from tests.waiting import until

pytestmark = pytest.mark.chaos

_LIMITS = (3, 2, 1)


def _pool_config() -> ChaosConfig:
    # No random downtimes: the one kill is the crash. More clients than the single-server run,
    # for six slots instead of four.
    return ChaosConfig.from_env(default_tasks=700, pool=_LIMITS, downtime_every=None, clients=30)


# The adaptive mode moves each server's limit on its own (OOMs there cut it, calm raises it).
_ADAPTIVE = {
    "adaptive": True,
    "min_concurrent": 1,
    "initial_concurrent": 1,
    "adaptive_stable_successes": 5,
    "adaptive_stable_seconds": 0.5,
    "adaptive_fade_seconds": 2.0,
}


@pytest.mark.parametrize("mode", ["fixed", "adaptive"])
async def test_chaos_pool(start_gatekeeper: GatekeeperFactory, tmp_path: Path, mode: str) -> None:
    """A random mix through a heterogeneous pool with one server killed and restarted: each
    server's limit holds at that server, every client gets one answer, the books reconcile in
    total and per server, no slot leaks, and the restarted server is used again."""
    cfg = _pool_config()
    if mode == "adaptive":
        cfg = dataclasses.replace(cfg, tasks=max(200, cfg.tasks // 2))
    print(f"\nchaos pool {mode} seed {cfg.seed} (replay with CHAOS_SEED={cfg.seed})", flush=True)
    spool = tmp_path / "spool"
    spool.mkdir()
    pool = ChaosPool.of(cfg.pool)
    await pool.start()
    events = EventLog()
    verdict = Verdict(cfg, pool, events)
    monkey = Monkey(pool, cfg, salt="pool")
    kill = Kill(pool, cfg)
    monitor: Monitor | None = None
    try:
        base, _app = await start_gatekeeper(
            pool.url,
            seed=cfg.seed,
            health_interval=0.1,
            **cfg.gatekeeper_settings(str(spool)),
            **(_ADAPTIVE if mode == "adaptive" else {}),
        )
        monitor = Monitor(base, cfg, pool)
        began = time.monotonic()
        deadline = None if cfg.seconds is None else began + cfg.seconds
        with events.attached():
            async with aiohttp.ClientSession() as session:
                await until(lambda: _all_up(session, base), within=5, every=0.02)
            monitor.start()
            monkey.start()
            results = await run_clients(
                base, cfg, pool, range(cfg.tasks), deadline=deadline, on_result=kill.note
            )
            await monkey.stop()
            await kill.stop()
            await settle(base, pool)
            # After the restart: the victim's requests, as the judged tasks are forgotten.
            victim_after = _arrivals_since(pool, kill)
            fate_of_the_cut = _fate_of_the_cut(pool, kill, results)
            for result in results:
                verdict.judge(result)
                pool.forget(result.spec.request_id)
            await monitor.stop()
            stats, metrics = await books(base)
    finally:
        if monitor is not None:
            await monitor.stop()
        await monkey.stop()
        await kill.stop()
        await pool.stop()
    elapsed = time.monotonic() - began
    verdict.reconcile(stats, metrics, admitted_refusals=False)
    # Each server's own account first: it names the tasks in flight when its limit broke.
    verdict.violations.extend(pool.violations[:20])
    for problem in monitor.problems[:20]:
        verdict.fail(None, f"while running: {problem}")
    for line in events.errors[:10]:
        verdict.fail(None, f"error logged: {line}")
    for line in events.started_while_down[:10]:
        verdict.fail(None, f"a server the probe found down got a new task: {line}")
    for line in events.refused_while_down[:10]:
        verdict.fail(None, f"an attempt went to a server the probe found down: {line}")
    _check_kill(verdict, kill, events, victim_after)
    _check_spool(verdict, spool)
    for member in pool.members:
        if member.arrivals == 0:
            verdict.fail(None, f"server {member.name} (limit {member.limit}) received no task")
    print(
        summary(
            {
                "mode": f"pool {mode}",
                "seed": cfg.seed,
                "limits": cfg.pool,
                "tasks": verdict.results,
                "seconds": round(elapsed, 1),
                "tasks_per_second": round(verdict.results / elapsed, 1),
                "kill": {
                    **kill.figures(),
                    "victim_arrivals_after_restart": victim_after,
                    "cut_tasks": fate_of_the_cut,
                },
                "crashes_logged": {f"{u} {e}": n for (u, e), n in events.crashes.items()},
                "per_server": {
                    m.name: {
                        "limit": m.limit,
                        "max_in_flight": m.max_in_flight,
                        "orphans": m.orphans_total,
                        **verdict.server_figures.get(m.name, {}),
                    }
                    for m in pool.members
                },
                **verdict.figures(),
                "stats": {k: stats[k] for k in ("total_tasks", "upstream_attempts", "retries")},
            }
        ),
        flush=True,
    )
    assert not verdict.violations, verdict_text(cfg, verdict, pool)


async def _all_up(session: aiohttp.ClientSession, base: str) -> bool:
    doc: dict[str, Any] = await get_json(session, f"{base}/stats")
    return all(server["up"] is True for server in doc.get("upstreams", []))


def _arrivals_since(pool: ChaosPool, kill: Kill) -> int:
    """Requests the killed server received after it came back."""
    if kill.back_at is None:
        return 0
    back_at = kill.back_at
    return sum(
        1
        for served in (s for arrivals in pool.by_id.values() for s in arrivals)
        if served.server == kill.victim.index and served.started >= back_at
    )


def _fate_of_the_cut(pool: ChaosPool, kill: Kill, results: list[ClientResult]) -> list[str]:
    """What became of the tasks the crash cut: their requests (arrival@server step) and the
    answer."""
    answers = {r.spec.request_id: r for r in results}
    lines = []
    for cut in kill.cut:
        result = answers.get(cut.request_id)
        answer = (
            "?"
            if result is None
            else (
                "left"
                if result.left
                else f"{result.status} {result.headers.get('X-Gatekeeper-Reason', '')} "
                f"attempts={result.headers.get('X-Gatekeeper-Attempts')} {result.error or ''}"
            )
        )
        arrivals = " ".join(
            f"{s.arrival}@{s.server}:{s.step}" for s in pool.by_id.get(cut.request_id, [])
        )
        kind = "" if result is None else result.spec.kind
        lines.append(f"{cut.request_id} ({kind}): {arrivals} -> {answer}")
    return lines


def _check_kill(verdict: Verdict, kill: Kill, events: EventLog, victim_after: int) -> None:
    """The crash happened mid-run, cut running work, was seen, and the server came back."""
    name = kill.victim.name
    if kill.killed_at is None or kill.back_at is None:
        verdict.fail(None, f"the run ended before the kill of {name} and its restart")
        return
    if not kill.cut or not all(served.crashed for served in kill.cut):
        verdict.fail(None, f"the kill of {name} cut no running request")
    if events.by_upstream[("UPSTREAM_DOWN", name)] == 0:
        verdict.fail(None, f"no 'Whisper服务不可用' line for {name} while it was down")
    if events.by_upstream[("UPSTREAM_UP", name)] == 0:
        verdict.fail(None, f"no 'Whisper服务已恢复' line for {name} after it came back")
    if victim_after == 0:
        verdict.fail(None, f"{name} came back but received no task afterwards")


def _check_spool(verdict: Verdict, spool: Path) -> None:
    _, _, spooled = fd_report("self", str(spool))
    if spooled:
        verdict.fail(None, f"{len(spooled)} spool files still open: {spooled[:3]}")
    if list(spool.iterdir()):
        verdict.fail(None, f"spool directory not empty: {list(spool.iterdir())[:3]}")


# -- focused: one promise of the pool each, on a known scenario --------------------------------


async def _post(
    session: aiohttp.ClientSession, base: str, request_id: str, plan: str
) -> tuple[int, dict[str, str], bytes, float]:
    """One task; (status, headers, body, when it was sent)."""
    sent = time.monotonic()
    headers = {"X-Request-ID": request_id, "X-Chaos-Plan": plan}
    async with session.post(f"{base}/asr", data=b"audio", headers=headers) as response:
        return response.status, dict(response.headers), await response.read(), sent


async def _stats(session: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    doc: dict[str, Any] = await get_json(session, f"{base}/stats")
    return doc


def _books_hold(stats: dict[str, Any], pool: ChaosPool, events: EventLog) -> None:
    problems, figures = server_books_problems(stats, pool, events)
    assert not problems, f"{problems} ({figures})"


async def test_a_dead_servers_running_tasks_are_retried_elsewhere_and_answered(
    start_gatekeeper: GatekeeperFactory,
) -> None:
    """A server killed while tasks run on it: each of those tasks is retried on the other
    server and answered 200 with the other server's answer; the dead server gets no new task
    while its probe says down, and is used again once it is back."""
    pool = ChaosPool.of((3, 2))
    await pool.start()
    events = EventLog()
    try:
        base, _ = await start_gatekeeper(
            pool.url,
            max_concurrent="3,2",
            health_interval=0.05,
            retry_delay=0.05,
            retry_jitter=0,
            request_timeout=10,
        )
        with events.attached():
            async with aiohttp.ClientSession() as session:
                await until(lambda: _all_up(session, base), within=5, every=0.02)
                # Long first attempts (cut by the crash), quick second ones.
                plan = "ok:3000:16,ok:0:64"
                running = [
                    asyncio.ensure_future(_post(session, base, f"run{i}", plan)) for i in range(2)
                ]
                for i in range(2):
                    await pool.event("arrived", f"run{i}", 1).wait()
                victim = max(pool.members, key=lambda m: len(m.working()))
                other = pool.members[1 - victim.index]
                on_victim = sorted(served.request_id for served in victim.working())
                killed = time.monotonic()
                victim.go_down()
                answers = dict(
                    zip(
                        ("run0", "run1"),
                        await asyncio.wait_for(asyncio.gather(*running), 10),
                        strict=True,
                    )
                )
                for request_id in on_victim:
                    status, headers, body, _ = answers[request_id]
                    first, second = pool.by_id[request_id]
                    assert (first.server, first.crashed) == (victim.index, True)
                    assert second.server == other.index, f"{request_id} retried on the dead server"
                    assert status == 200, f"{request_id}: {status} {body[:200]!r}"
                    assert headers["X-Gatekeeper-Attempts"] == "2"
                    assert body == answer_bytes(request_id, 2, 64)
                    assert second.started - killed < 1.0  # a crash retry, not a 3 s wait

                # While it is down: marked down, /health still ok, new tasks go to the other.
                async def victim_down() -> bool:
                    doc = await _stats(session, base)
                    return bool(doc["upstreams"][victim.index]["up"] is False)

                await until(victim_down, within=5, every=0.02)
                async with session.get(f"{base}/health") as health:
                    assert health.status == 200
                    assert (await health.json())["status"] == "ok"
                fresh = await asyncio.gather(
                    *(_post(session, base, f"fresh{i}", "ok:50:16") for i in range(2))
                )
                assert [status for status, *_ in fresh] == [200, 200]
                assert [s.server for i in range(2) for s in pool.by_id[f"fresh{i}"]] == [
                    other.index,
                    other.index,
                ]

                # Back on its port: used again without restarting the gatekeeper.
                await victim.come_back()

                async def victim_up() -> bool:
                    doc = await _stats(session, base)
                    return bool(doc["upstreams"][victim.index]["up"] is True)

                await until(victim_up, within=5, every=0.02)
                back = await asyncio.gather(
                    *(_post(session, base, f"back{i}", "ok:300:16") for i in range(5))
                )
                assert [status for status, *_ in back] == [200] * 5
                assert any(
                    s.server == victim.index for i in range(5) for s in pool.by_id[f"back{i}"]
                ), "the restarted server got none of five tasks sent at once"
                await settle(base, pool)
                stats = await _stats(session, base)
    finally:
        await pool.stop()
    _books_hold(stats, pool, events)
    assert events.by_upstream[("UPSTREAM_DOWN", victim.name)] >= 1
    assert events.by_upstream[("UPSTREAM_UP", victim.name)] >= 1
    assert not events.started_while_down
    assert [m.max_in_flight <= m.limit for m in pool.members] == [True, True], pool.violations


_COOLDOWN = 1.0


async def test_an_oom_on_one_server_never_delays_a_task_starting_on_another(
    start_gatekeeper: GatekeeperFactory,
) -> None:
    """After an OOM on one server, tasks that start on the other server start at once (no
    cool-down line names it, and they reach it without waiting); a task that starts on the
    server that ran out of memory waits the cool-down there (the check can see a delay)."""
    pool = ChaosPool.of((2, 2))
    await pool.start()
    events = EventLog(keep=True)
    try:
        base, _ = await start_gatekeeper(
            pool.url,
            max_concurrent="2,2",
            health_interval=0.05,
            retry_delay=0.2,
            retry_jitter=0,
            oom_cooldown=_COOLDOWN,
            oom_window=10,
        )
        with events.attached():
            async with aiohttp.ClientSession() as session:
                await until(lambda: _all_up(session, base), within=5, every=0.02)
                oomer = asyncio.ensure_future(_post(session, base, "oomer", "oom:pytorch,ok:0:16"))
                await pool.event("answered", "oomer", 1).wait()
                oom_server = pool.members[pool.by_id["oomer"][0].server]
                other = pool.members[1 - oom_server.index]
                # Right after the OOM: two tasks that keep the other server busy for a while.
                busy = [
                    asyncio.ensure_future(_post(session, base, f"busy{i}", "ok:1500:16"))
                    for i in range(2)
                ]
                for i in range(2):
                    await pool.event("arrived", f"busy{i}", 1).wait()
                assert (await oomer)[0] == 200
                # The other server is full: the next task starts on the one that ran out of
                # memory, inside its OOM window.
                late = await _post(session, base, "late", "ok:0:16")
                sent = {
                    f"busy{i}": result[3] for i, result in enumerate(await asyncio.gather(*busy))
                }
                stats = await _stats(session, base)
    finally:
        await pool.stop()
    on_other = [f"busy{i}" for i in range(2) if pool.by_id[f"busy{i}"][0].server == other.index]
    assert on_other, "no task started on the other server after the OOM"
    for request_id in on_other:
        [served] = pool.by_id[request_id]
        assert served.started - sent[request_id] < _COOLDOWN / 2, f"{request_id} was held back"
    cooled = [fields for event, fields, _ in events.records if event.name == "COOLDOWN"]
    assert all(fields.get("upstream") == oom_server.name for fields in cooled), cooled
    assert not [f for f in cooled if f.get("task_id") in on_other]
    # The control: the cool-down is real on the server that ran out of memory.
    [late_served] = pool.by_id["late"]
    assert late[0] == 200
    assert late_served.server == oom_server.index
    assert late_served.started - late[3] >= 0.8 * _COOLDOWN
    assert any(f.get("task_id") == "late" for f in cooled)
    rows = stats["upstreams"]
    assert (rows[oom_server.index]["oom_errors"], rows[other.index]["oom_errors"]) == (1, 0)
    assert rows[other.index]["last_oom"] is None
    _books_hold(stats, pool, events)


async def test_an_oom_on_one_server_leaves_the_others_adaptive_limit_alone(
    start_gatekeeper: GatekeeperFactory,
) -> None:
    """Adaptive mode: an OOM cuts the limit of the server that ran out of memory only; the
    other keeps its limit (in /stats, /metrics and the log) and runs that many tasks at once."""
    pool = ChaosPool.of((3, 3))
    await pool.start()
    events = EventLog(keep=True)
    try:
        base, _ = await start_gatekeeper(
            pool.url,
            max_concurrent="3,3",
            health_interval=0.05,
            retry_delay=0.05,
            retry_jitter=0,
            adaptive=True,
            min_concurrent=1,
            initial_concurrent=3,
        )
        with events.attached():
            async with aiohttp.ClientSession() as session:
                await until(lambda: _all_up(session, base), within=5, every=0.02)
                status, *_ = await _post(session, base, "oomer", "oom:pytorch,ok:0:16")
                assert status == 200
                oom_server = pool.members[pool.by_id["oomer"][0].server]
                other = pool.members[1 - oom_server.index]
                after_oom = await _stats(session, base)
                cut = after_oom["upstreams"][oom_server.index]["max_concurrent"]
                assert cut < 3
                assert after_oom["upstreams"][other.index]["max_concurrent"] == 3
                # As many tasks as both servers take now: the other runs three at once.
                for member in pool.members:
                    member.max_in_flight = 0
                fill = await asyncio.gather(
                    *(_post(session, base, f"fill{i}", "ok:400:16") for i in range(3 + cut))
                )
                assert [s for s, *_ in fill] == [200] * (3 + cut)
                await settle(base, pool)
                stats, metrics = await books(base)
    finally:
        await pool.stop()
    assert other.max_in_flight == 3, f"the other server ran {other.max_in_flight} at most"
    assert oom_server.max_in_flight <= cut
    assert stats["upstreams"][other.index]["max_concurrent"] == 3
    changes = [f for event, f, _ in events.records if event.name == "LIMIT_CHANGED"]
    assert changes, "no 调整并发 line after the OOM"
    assert all(f.get("upstream") == oom_server.name for f in changes), changes
    other_changes = [
        line
        for line in metrics.splitlines()
        if line.startswith("asr_gatekeeper_limit_changes_total{")
        and f'upstream="{other.name}"' in line
        and not line.rstrip().endswith(" 0.0")
    ]
    assert not other_changes, other_changes
    _books_hold(stats, pool, events)


# -- what the pool chaos run found in the core, fixed ----------------------------------------


async def test_a_retry_never_goes_to_a_server_found_down(
    start_gatekeeper: GatekeeperFactory,
) -> None:
    """A task cut by a server's death while the other server is busy: once the probe has found
    the dead server down, the task's retries wait for a usable server (the other frees up soon)
    instead of going back to the dead one; it is answered 200 by the other server."""
    pool = ChaosPool.of((1, 1))
    await pool.start()
    events = EventLog()
    try:
        base, _ = await start_gatekeeper(
            pool.url,
            max_concurrent="1,1",
            health_interval=0.05,
            retry_delay=0.1,
            retry_jitter=0,
            request_timeout=10,
        )
        with events.attached():
            async with aiohttp.ClientSession() as session:
                await until(lambda: _all_up(session, base), within=5, every=0.02)
                cut = asyncio.ensure_future(_post(session, base, "cut", "ok:5000:4,ok:0:16"))
                await pool.event("arrived", "cut", 1).wait()
                busy = asyncio.ensure_future(_post(session, base, "busy", "ok:600:4"))
                await pool.event("arrived", "busy", 1).wait()
                [first] = pool.by_id["cut"]
                victim = pool.members[first.server]
                victim.go_down()
                status, headers, body, _ = await cut
                await busy
    finally:
        await pool.stop()
    assert not events.refused_while_down, events.refused_while_down
    assert status == 200, f"{status} {headers.get('X-Gatekeeper-Reason')} {body[:200]!r}"
    assert [s.server for s in pool.by_id["cut"]] == [victim.index, 1 - victim.index]


async def test_with_a_server_down_a_full_pool_refuses_arrivals_before_their_upload(
    start_gatekeeper: GatekeeperFactory,
) -> None:
    """One server of two down, the other busy and the queue full: a newcomer is refused
    queue_full on arrival, as with one server (#13), not after its upload."""
    pool = ChaosPool.of((1, 1))
    await pool.start()
    try:
        base, _ = await start_gatekeeper(
            pool.url, max_concurrent="1,1", max_queue=1, health_interval=0.05, queue_timeout=30
        )
        async with aiohttp.ClientSession() as session:
            await until(lambda: _all_up(session, base), within=5, every=0.02)
            pool.members[1].go_down()

            async def down() -> bool:
                return bool((await _stats(session, base))["upstreams"][1]["up"] is False)

            await until(down, within=5, every=0.02)
            running = asyncio.ensure_future(_post(session, base, "running", "ok:800:4"))
            await pool.event("arrived", "running", 1).wait()
            queued = asyncio.ensure_future(_post(session, base, "queued", "ok:0:4"))

            async def one_queued() -> bool:
                return bool((await _stats(session, base))["queued_tasks"] == 1)

            await until(one_queued, within=5, every=0.02)
            status, headers, _, _ = await _post(session, base, "late", "ok:0:4")
            stats = await _stats(session, base)
            await asyncio.gather(running, queued)
    finally:
        await pool.stop()
    assert (status, headers.get("X-Gatekeeper-Reason")) == (503, "queue_full")
    assert stats["rejected_after_queueing_tasks"] == 0, stats["rejected_by_reason"]


def test_pool_config_is_the_single_server_one_with_a_pool() -> None:
    """The pool run's settings: one limit per server, the sum where a total is asked."""
    cfg = ChaosConfig(seed=1, tasks=10, pool=_LIMITS)
    settings = cfg.gatekeeper_settings("/tmp")
    assert settings["max_concurrent"] == "3,2,1"
    assert (cfg.limits, cfg.total_limit) == (_LIMITS, 6)
    upstreams = cfg.upstreams()
    assert isinstance(upstreams, ChaosPool)
    assert [m.limit for m in upstreams.members] == [3, 2, 1]
    single = ChaosConfig(seed=1, tasks=10).upstreams()
    assert isinstance(single, ChaosUpstream)
    assert single.members == (single,)


async def test_a_pool_numbers_a_tasks_requests_across_its_servers() -> None:
    """A retry that lands on another server goes on with the task's plan (step 2, not 1)."""
    pool = ChaosPool.of((1, 1))
    await pool.start()
    try:
        async with aiohttp.ClientSession() as session:
            headers = {"X-Request-ID": "t", "X-Chaos-Plan": "busy:0,ok:0:16"}
            statuses = []
            for member in pool.members:
                async with session.post(f"{member.url}/asr", headers=headers) as response:
                    statuses.append(response.status)
                    body = await response.read()
    finally:
        await pool.stop()
    assert statuses == [503, 200]
    assert body == answer_bytes("t", 2, 16)
    assert [(s.arrival, s.server) for s in pool.by_id["t"]] == [(1, 0), (2, 1)]
    assert [m.arrivals for m in pool.members] == [1, 1]


async def test_a_killed_server_refuses_connections_and_counts_the_cut_ones() -> None:
    """go_down closes the listener and cuts every connection; a connection that carried no
    request yet counts as cut without a request; come_back listens on the same port."""
    upstream = ChaosUpstream(limit=1)
    await upstream.start()
    try:
        # Accepted by the kernel (maybe not yet by the server): cut all the same.
        reader, writer = await asyncio.open_connection("127.0.0.1", upstream.port)
        upstream.go_down()
        with contextlib.suppress(ConnectionResetError):
            await reader.read()
        writer.close()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", upstream.port)
        assert upstream.cut_without_request == 1
        await upstream.come_back()
        async with aiohttp.ClientSession() as session:
            headers = {"X-Request-ID": "x", "X-Chaos-Plan": "ok:0:4"}
            async with session.post(f"{upstream.url}/asr", headers=headers) as response:
                assert response.status == 200
    finally:
        await upstream.stop()
    assert upstream.arrivals == 1
    assert len(upstream.downtimes) == 1
