"""Hostile and broken clients: stalled uploads, smuggling attempts, header floods, idle sockets."""

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from gatekeeper.app import STATE
from gatekeeper.policy.outcomes import TaskOutcome
from tests.conftest import GatekeeperFactory
from tests.fakes import FakeUpstream
from tests.waiting import until


async def _raw(port: int, data: bytes, *, read_for: float = 5.0) -> bytes:
    """Send raw bytes, return everything the server answers until it closes or goes quiet."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    chunks = []
    try:
        async with asyncio.timeout(read_for):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
    except TimeoutError:
        pass
    writer.close()
    return b"".join(chunks)


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.") else 0


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


async def test_stalled_upload_gets_408_and_frees_its_place(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """A client that stops sending its body gets 408 after the body timeout; its place frees."""
    base, app = await start_gatekeeper(upstream.url, client_body_timeout=0.3, max_queue=0)
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(base))
    writer.write(b"POST /asr HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\npartial")
    await writer.drain()
    # Uploading: it holds no slot, but the only place (limit 1 + queue 0) is promised to it.
    await until(lambda: app[STATE].snapshot().gate.uploading == 1)
    assert app[STATE].snapshot().active_tasks == 0
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/asr", data=b"x") as response:
            assert response.status == 503  # the staller holds the only place meanwhile
    head = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 408")
    assert json.loads(head.split(b"\r\n\r\n", 1)[1])["reason"] == "client_body_timeout"
    snap = app[STATE].snapshot()
    assert (snap.active_tasks, snap.queued_tasks, snap.gate.uploading) == (0, 0, 0)
    assert snap.tasks[TaskOutcome.CLIENT_ERROR] == 1
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/asr", data=b"x") as response:
            assert response.status == 200
    assert len(upstream.seen) == 1


async def test_slow_but_steady_upload_is_accepted(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """An upload slower overall than the body timeout is fine while data keeps coming."""
    base, _ = await start_gatekeeper(upstream.url, client_body_timeout=0.3)

    async def trickle() -> AsyncIterator[bytes]:
        for _ in range(6):
            await asyncio.sleep(0.1)
            yield b"x" * 100

    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/asr", data=trickle()) as response:
            assert response.status == 200
            assert (await response.json())["size"] == 600


@pytest.mark.parametrize(
    "head",
    [
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        b"Content-Length: 5\r\nContent-Length: 6\r\n",
        b"Content-Length: -5\r\n",
        b"Content-Length: 5x\r\n",
        b"Transfer-Encoding: chunked, identity\r\n",
        b"Transfer-Encoding: xchunked\r\n",
        b"Transfer-Encoding : chunked\r\n",
    ],
    ids=["cl-and-te", "two-lengths", "negative", "garbage-length", "te-list", "te-unknown",
         "space-before-colon"],
)  # fmt: skip
async def test_ambiguous_framing_is_refused_and_never_forwarded(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory, head: bytes
) -> None:
    """Conflicting or malformed Content-Length/Transfer-Encoding is refused with 400 (smuggling)."""
    base, app = await start_gatekeeper(upstream.url)
    answer = await _raw(
        _port(base),
        b"POST /asr HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n0\r\n\r\nGET /x HTTP/1.1\r\n\r\n",
    )
    assert _status(answer) == 400, answer[:200]
    assert answer.count(b"HTTP/1.") == 1  # the smuggled second request is never parsed
    assert upstream.seen == []
    assert app[STATE].snapshot().total_tasks == 0


async def test_header_flood_is_refused_and_service_continues(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """Thousands of headers, or one enormous one, are refused; later requests are served."""
    base, _ = await start_gatekeeper(upstream.url)
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(5000))
    answer = await _raw(_port(base), b"POST /asr HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert _status(answer) in (400, 431), answer[:100]
    huge = b"X-Big: " + b"a" * 200_000 + b"\r\n"
    answer = await _raw(_port(base), b"POST /asr HTTP/1.1\r\nHost: x\r\n" + huge + b"\r\n")
    assert _status(answer) in (400, 431), answer[:100]
    assert upstream.seen == []
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/asr", data=b"x") as response:
            assert response.status == 200


async def test_thousands_of_idle_connections_do_not_block_health(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """With 2,000 idle client connections open, /health and a task still answer."""
    base, _ = await start_gatekeeper(upstream.url)
    port = _port(base)
    idle = []
    try:
        for _ in range(2000):
            idle.append(await asyncio.open_connection("127.0.0.1", port))
        async with aiohttp.ClientSession() as session:
            await until(lambda: True)
            async with asyncio.timeout(5):
                async with session.get(f"{base}/health") as response:
                    assert response.status in (200, 503)
                    assert "upstream" in await response.json()
                async with session.post(f"{base}/asr", data=b"x") as response:
                    assert response.status == 200
    finally:
        for _, writer in idle:
            writer.close()


async def test_garbled_chunked_body_is_refused_and_frees_its_place(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """An upload with an invalid chunk is refused, never reaches upstream, frees its place."""
    base, app = await start_gatekeeper(upstream.url, client_body_timeout=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(base))
    writer.write(
        b"POST /asr HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    )
    await writer.drain()
    await until(lambda: app[STATE].snapshot().total_tasks == 1)  # admitted, body under way
    writer.write(b"zz\r\nmore\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    # aiohttp's parser stops the body at the bad chunk; the body timeout then ends the task.
    assert _status(answer) in (400, 408), answer[:200]
    assert upstream.seen == []
    await until(lambda: app[STATE].snapshot().active_tasks == 0)
    snap = app[STATE].snapshot()
    assert snap.queued_tasks == 0
    assert snap.tasks[TaskOutcome.CLIENT_ERROR] + snap.tasks[TaskOutcome.CANCELLED] == 1


async def test_client_hanging_up_mid_upload_is_never_forwarded(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """A client that closes the connection half-way through its body leaves no trace upstream."""
    base, app = await start_gatekeeper(upstream.url)
    _, writer = await asyncio.open_connection("127.0.0.1", _port(base))
    writer.write(b"POST /asr HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"a" * 5000)
    await writer.drain()
    await until(lambda: app[STATE].snapshot().total_tasks == 1)
    writer.close()
    await until(lambda: app[STATE].snapshot().tasks[TaskOutcome.CANCELLED] == 1)
    snap = app[STATE].snapshot()
    assert (snap.active_tasks, snap.queued_tasks) == (0, 0)
    assert upstream.seen == []
