"""The central promise over real sockets: at most N upstream, FIFO queue, honest refusals."""

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from gatekeeper.app import PROXY, STATE
from gatekeeper.policy.outcomes import TaskOutcome
from tests.conftest import GatekeeperFactory
from tests.fakes import FakeUpstream
from tests.waiting import until


async def _post(
    session: aiohttp.ClientSession, url: str, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    async with session.post(url, data=b"audio", headers=headers) as response:
        return response.status, dict(response.headers), await response.read()


async def test_limit_and_queue_admit_exactly_l_plus_q(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """200 simultaneous tasks at limit 2 and queue 20: 22 are served, 178 refused, upstream ≤ 2."""
    base, app = await start_gatekeeper(upstream.url, max_concurrent=2, max_queue=20)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        calls = [
            asyncio.create_task(
                _post(session, f"{base}/asr?output=json", **{"X-Fake-Hold": "hold"})
            )
            for _ in range(200)
        ]
        await until(lambda: app[STATE].snapshot().rejected_tasks >= 178, within=10)
        await upstream.wait_active(2)
        snap = app[STATE].snapshot()
        assert (snap.active_tasks, snap.queued_tasks) == (2, 20)
        upstream.release("hold")
        results = await asyncio.gather(*calls)
    served = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 503]
    assert (len(served), len(refused)) == (22, 178)
    assert upstream.max_active == 2
    assert len(upstream.seen) == 22
    _status, headers, body = refused[0]
    assert headers["X-Gatekeeper-Reason"] == "queue_full"
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    assert 1 <= int(headers["Retry-After"]) <= 120
    doc = json.loads(body)
    assert doc == {
        "error": "服务繁忙",
        "reason": "queue_full",
        "retry_after": int(headers["Retry-After"]),
        "queue_usage": "20/20 (100%)",
    }
    assert "X-Request-ID" in headers
    snap = app[STATE].snapshot()
    assert (snap.total_tasks, snap.rejected_tasks, snap.active_tasks, snap.queued_tasks) == (
        22,
        178,
        0,
        0,
    )
    print(
        f"200 tasks, limit 2, queue 20: upstream max {upstream.max_active}, "
        f"{len(served)} admitted, {len(refused)} refused"
    )


async def test_queue_is_first_in_first_out(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """Queued tasks reach the upstream in the order they arrived."""
    base, app = await start_gatekeeper(upstream.url, max_concurrent=1, max_queue=10)
    async with aiohttp.ClientSession() as session:
        first = asyncio.create_task(
            _post(session, f"{base}/asr", **{"X-Fake-Hold": "hold", "X-Request-ID": "first"})
        )
        await upstream.wait_active(1)
        later = []
        for i in range(5):
            later.append(
                asyncio.create_task(_post(session, f"{base}/asr", **{"X-Request-ID": f"t{i}"}))
            )
            await until(lambda n=i + 1: app[STATE].snapshot().queued_tasks == n)  # type: ignore[misc]
        upstream.release("hold")
        await asyncio.gather(first, *later)
    assert [s.headers["X-Request-ID"] for s in upstream.seen] == [
        "first",
        "t0",
        "t1",
        "t2",
        "t3",
        "t4",
    ]


async def test_retry_after_follows_measured_service_time(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """Retry-After is derived from how long tasks held their slot, not a constant."""
    base, app = await start_gatekeeper(upstream.url, max_concurrent=1, max_queue=0)
    state = app[STATE]
    state.service = state.service.observe(40.0)  # as if one task had taken 40 s
    async with aiohttp.ClientSession() as session:
        held = asyncio.create_task(_post(session, f"{base}/asr", **{"X-Fake-Hold": "hold"}))
        await upstream.wait_active(1)
        status, headers, _ = await _post(session, f"{base}/asr")
        assert status == 503
        assert headers["Retry-After"] == "40"
        state.service = state.service.observe(0.0).observe(0.0).observe(0.0)
        status, headers, _ = await _post(session, f"{base}/asr")
        assert headers["Retry-After"] == str(int(-(-state.service.mean // 1)))
        assert headers["Retry-After"] != "40"
        upstream.release("hold")
        assert (await held)[0] == 200


async def test_non_task_paths_pass_while_queue_is_full(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """GET /docs is proxied straight through while every slot and queue place is taken."""
    base, app = await start_gatekeeper(upstream.url, max_concurrent=1, max_queue=1)
    async with aiohttp.ClientSession() as session:
        held = [
            asyncio.create_task(_post(session, f"{base}/asr", **{"X-Fake-Hold": "hold"}))
            for _ in range(2)
        ]
        await upstream.wait_active(1)
        await until(lambda: app[STATE].snapshot().queued_tasks == 1)
        assert (await _post(session, f"{base}/asr"))[0] == 503
        async with session.get(f"{base}/docs?x=1") as response:
            assert response.status == 200
            assert (await response.json())["path"] == "/docs?x=1"
        upstream.release("hold")
        assert [r[0] for r in await asyncio.gather(*held)] == [200, 200]


async def test_queue_timeout_refuses_with_reason(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """A task that waits longer than ASR_QUEUE_TIMEOUT gets 503 queue_timeout and never runs."""
    base, app = await start_gatekeeper(upstream.url, max_concurrent=1, queue_timeout=0.2)
    async with aiohttp.ClientSession() as session:
        held = asyncio.create_task(_post(session, f"{base}/asr", **{"X-Fake-Hold": "hold"}))
        await upstream.wait_active(1)
        status, headers, body = await _post(session, f"{base}/asr", **{"X-Request-ID": "late"})
        assert status == 503
        assert headers["X-Gatekeeper-Reason"] == "queue_timeout"
        assert json.loads(body)["reason"] == "queue_timeout"
        upstream.release("hold")
        await held
    assert [s.headers.get("X-Request-ID") for s in upstream.seen].count("late") == 0
    snap = app[STATE].snapshot()
    assert snap.queued_tasks == 0
    assert snap.rejected_tasks == 1


async def test_disconnect_while_queued_never_reaches_upstream(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """A client that hangs up while queued leaves the queue at once and is never sent upstream."""
    base, app = await start_gatekeeper(upstream.url, max_concurrent=1, max_queue=5)
    async with aiohttp.ClientSession() as session:
        held = asyncio.create_task(_post(session, f"{base}/asr", **{"X-Fake-Hold": "hold"}))
        await upstream.wait_active(1)
        port = int(base.rsplit(":", 1)[1])
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /asr HTTP/1.1\r\nHost: x\r\nX-Request-ID: quitter\r\n"
            b"Content-Length: 5\r\n\r\naudio"
        )
        await writer.drain()
        await until(lambda: app[STATE].snapshot().queued_tasks == 1)
        writer.close()
        await until(lambda: app[STATE].snapshot().queued_tasks == 0)
        upstream.release("hold")
        assert (await held)[0] == 200
        assert (await _post(session, f"{base}/asr"))[0] == 200
    assert "quitter" not in [s.headers.get("X-Request-ID") for s in upstream.seen]
    snap = app[STATE].snapshot()
    assert snap.tasks[TaskOutcome.CANCELLED] == 1


async def test_disconnect_while_running_keeps_the_slot(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """A client that hangs up mid-transcription keeps its slot until the upstream finishes."""
    base, app = await start_gatekeeper(upstream.url, max_concurrent=1, max_queue=5)
    port = int(base.rsplit(":", 1)[1])
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /asr HTTP/1.1\r\nHost: x\r\nX-Fake-Hold: hold\r\nContent-Length: 5\r\n\r\naudio"
    )
    await writer.drain()
    await upstream.wait_active(1)
    writer.close()
    async with aiohttp.ClientSession() as session:
        second = asyncio.create_task(_post(session, f"{base}/asr", **{"X-Request-ID": "second"}))
        # Queued, not started: the first task's slot outlived its client (a freed slot would
        # have let the second one straight in).
        await until(lambda: app[STATE].snapshot().queued_tasks == 1)
        snap = app[STATE].snapshot()
        assert (snap.active_tasks, snap.queued_tasks) == (1, 1)
        assert len(upstream.seen) == 1
        upstream.release("hold")
        assert (await second)[0] == 200
    assert upstream.max_active == 1
    assert not app[PROXY].runners
    snap = app[STATE].snapshot()
    assert snap.tasks[TaskOutcome.CANCELLED] == 1
    assert snap.tasks[TaskOutcome.SUCCESS] == 1


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_body_over_the_limit_gets_413(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory, chunked: bool
) -> None:
    """A body over ASR_MAX_BODY_SIZE is refused with 413 and never reaches the upstream."""
    base, app = await start_gatekeeper(upstream.url, max_body_size=1000)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 500

    async with aiohttp.ClientSession() as session:
        data = body() if chunked else b"x" * 5000
        async with session.post(f"{base}/asr", data=data) as response:
            assert response.status == 413
            doc = await response.json()
        assert doc["reason"] == "body_too_large"
        async with session.post(f"{base}/asr", data=b"x" * 1000) as response:
            assert response.status == 200
    assert len(upstream.seen) == 1
    assert app[STATE].snapshot().active_tasks == 0
