"""The GPU's truth (issue 13): a slot is free only when the Whisper server is done with it, and
an upload holds no slot.

Every test runs the gatekeeper over real sockets against the fake upstream, which counts the
tasks in flight at its end (`max_active`): the promise is measured where the GPU would be.
"""

import asyncio
import json

import aiohttp

from gatekeeper.app import STATE
from gatekeeper.clock import FakeClock
from gatekeeper.policy.outcomes import HoldEnd, RejectReason, TaskOutcome
from tests.conftest import GatekeeperFactory
from tests.fakes import FakeUpstream
from tests.waiting import until


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


async def _post(base: str, *, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/asr", data=b"audio", headers=headers) as response:
            return response.status, await response.read()


# -- a timed-out attempt keeps its slot --------------------------------------------------------


async def test_timed_out_task_keeps_its_slot_until_the_server_answers(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """The client gets its 504 at the deadline, but the next task reaches the server only once
    the server has answered the timed-out one (never two on a one-slot GPU)."""
    base, app = await start_gatekeeper(upstream.url, request_timeout=0.3, timeout_hold=30)
    slow = asyncio.create_task(_post(base, headers={"X-Fake-Hold": "slow"}))
    await upstream.wait_active(1)
    queued = asyncio.create_task(_post(base))
    await until(lambda: app[STATE].snapshot().queued_tasks == 1)
    status, body = await slow
    assert status == 504
    assert json.loads(body)["reason"] == "timeout"
    snap = app[STATE].snapshot()
    assert (snap.held_tasks, snap.active_tasks, snap.queued_tasks) == (1, 1, 1)
    assert snap.upstream_in_flight == 1  # still at the Whisper server
    assert len(upstream.seen) == 1  # the queued task has not been sent
    upstream.release("slow")  # the server finishes the abandoned task at last
    assert (await queued)[0] == 200
    assert upstream.max_active == 1
    snap = app[STATE].snapshot()
    assert snap.holds[HoldEnd.ANSWERED] == 1
    assert (snap.held_tasks, snap.active_tasks, snap.upstream_in_flight) == (0, 0, 0)
    assert snap.tasks[TaskOutcome.FAILED] == 1
    assert snap.tasks[TaskOutcome.SUCCESS] == 1


async def test_hold_ends_when_the_server_closes_the_connection(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """A server that drops the timed-out attempt's connection frees the slot at once."""
    base, app = await start_gatekeeper(upstream.url, request_timeout=0.3, timeout_hold=30)
    status, _ = await _post(base, headers={"X-Fake-Hold": "gone", "X-Fake-Reset": "1"})
    assert status == 504
    assert app[STATE].snapshot().held_tasks == 1
    upstream.release("gone")  # the fake now resets the connection without answering
    await until(lambda: app[STATE].snapshot().active_tasks == 0)
    assert app[STATE].snapshot().holds[HoldEnd.CLOSED] == 1


async def test_hold_is_bounded_logged_and_counted(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory, caplog
) -> None:  # type: ignore[no-untyped-def]
    """A server that never answers keeps the slot for ASR_TIMEOUT_HOLD, then the connection is
    cut; both ends of the hold are logged, and /stats and /metrics count it."""
    base, app = await start_gatekeeper(upstream.url, request_timeout=0.2, timeout_hold=0.4)
    status, _ = await _post(base, headers={"X-Fake-Hold": "never"})
    assert status == 504
    await until(lambda: app[STATE].snapshot().active_tasks == 0)
    await until(lambda: upstream.active == 0)  # the cut connection reached the server
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/stats") as r:
            stats = await r.json()
        async with session.get(f"{base}/metrics") as r:
            metrics = await r.text()
    assert stats["timeout_holds"] == {"answered": 0, "closed": 0, "expired": 1, "stopped": 0}
    assert stats["held_tasks"] == 0
    assert 'asr_gatekeeper_timeout_holds_total{end="expired"} 1.0' in metrics
    assert "asr_gatekeeper_held_tasks 0.0" in metrics
    messages = [r.getMessage() for r in caplog.records]
    assert any("超时任务仍在GPU上，保留槽位" in m for m in messages)
    assert any("超时任务已结束，释放槽位" in m for m in messages)


async def test_retry_after_a_timeout_waits_for_the_hold(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """With ASR_RETRY_ON_TIMEOUT the retry goes only after the server finished the first try."""
    base, app = await start_gatekeeper(
        upstream.url,
        request_timeout=0.3,
        timeout_hold=30,
        retry_on_timeout=True,
        max_retries=1,
        retry_delay=0,
        oom_cooldown=0,
    )
    task = asyncio.create_task(
        _post(base, headers={"X-Fake-Script": "hold=first,ok", "X-Request-ID": "t"})
    )
    await until(lambda: app[STATE].snapshot().held_tasks == 1)
    assert len(upstream.seen) == 1  # no second attempt while the first is on the GPU
    upstream.release("first")
    status, _ = await task
    assert status == 200
    assert len(upstream.seen) == 2
    assert upstream.max_active == 1
    assert app[STATE].snapshot().holds[HoldEnd.ANSWERED] == 1


async def test_client_that_leaves_a_timed_out_task_changes_nothing(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """A client gone mid-attempt does not shorten the hold: the slot waits for the server."""
    base, app = await start_gatekeeper(upstream.url, request_timeout=0.3, timeout_hold=30)
    leaving = asyncio.create_task(_post(base, headers={"X-Fake-Hold": "left"}))
    await upstream.wait_active(1)
    leaving.cancel()
    await until(lambda: app[STATE].snapshot().held_tasks == 1)
    assert app[STATE].snapshot().tasks[TaskOutcome.CANCELLED] == 1
    queued = asyncio.create_task(_post(base))
    await until(lambda: app[STATE].snapshot().queued_tasks == 1)
    upstream.release("left")
    assert (await queued)[0] == 200
    assert upstream.max_active == 1


# -- an upload holds no slot ---------------------------------------------------------------------


async def test_slow_upload_holds_no_slot(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """A client trickling its body shows as uploading; a normal task uses the one slot meanwhile
    and is answered before the upload is done."""
    base, app = await start_gatekeeper(upstream.url, client_body_timeout=5, upload_timeout=30)
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(base))
    writer.write(b"POST /asr HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab")
    await writer.drain()
    await until(lambda: app[STATE].snapshot().gate.uploading == 1)
    snap = app[STATE].snapshot()
    assert (snap.active_tasks, snap.queued_tasks) == (0, 0)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/stats") as r:
            assert (await r.json())["uploading_tasks"] == 1
        async with session.get(f"{base}/metrics") as r:
            assert "asr_gatekeeper_uploading_tasks 1.0" in await r.text()
    status, _ = await asyncio.wait_for(_post(base), 5)
    assert status == 200
    writer.write(b"cdefghij")  # the rest: now it queues, runs and is answered
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200")
    assert [s.size for s in upstream.seen] == [5, 10]
    snap = app[STATE].snapshot()
    assert snap.total_tasks == snap.tasks[TaskOutcome.SUCCESS] == 2


async def test_steady_trickle_ends_at_the_upload_timeout(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """One byte every 50 ms never trips the idle body timeout but meets ASR_UPLOAD_TIMEOUT:
    408 upload_timeout, and the task ends as a client error."""
    base, app = await start_gatekeeper(upstream.url, client_body_timeout=1, upload_timeout=0.4)
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(base))
    writer.write(b"POST /asr HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")

    async def trickle() -> None:
        for _ in range(200):
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.05)

    trickling = asyncio.create_task(trickle())
    try:
        answer = await asyncio.wait_for(reader.read(65536), 5)
    finally:
        trickling.cancel()
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["reason"] == "upload_timeout"
    snap = app[STATE].snapshot()
    assert snap.tasks[TaskOutcome.CLIENT_ERROR] == 1
    assert (snap.gate.uploading, snap.active_tasks) == (0, 0)
    assert upstream.seen == []


async def test_uploads_count_against_the_room(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """Uploads in progress are bounded by slots + queue: the next arrival is refused queue_full
    at once, before its body is read."""
    base, app = await start_gatekeeper(upstream.url, max_queue=1, client_body_timeout=5)
    writers = []
    for _ in range(2):
        _, writer = await asyncio.open_connection("127.0.0.1", _port(base))
        writer.write(b"POST /asr HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab")
        await writer.drain()
        writers.append(writer)
    await until(lambda: app[STATE].snapshot().gate.uploading == 2)
    status, body = await _post(base)
    assert status == 503
    assert json.loads(body)["reason"] == RejectReason.QUEUE_FULL.value
    for writer in writers:
        writer.close()
    await until(lambda: app[STATE].snapshot().gate.uploading == 0)
    snap = app[STATE].snapshot()
    assert snap.total_tasks == 2  # the refused arrival was never a task
    assert snap.tasks[TaskOutcome.CANCELLED] == 2


async def test_queue_timeout_counts_from_the_end_of_the_upload(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """An upload longer than ASR_QUEUE_TIMEOUT still gets its whole queue wait afterwards."""
    clock = FakeClock()
    base, app = await start_gatekeeper(
        upstream.url, clock=clock, queue_timeout=0.5, client_body_timeout=5
    )
    running = asyncio.create_task(_post(base, headers={"X-Fake-Hold": "busy"}))
    await upstream.wait_active(1)
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(base))
    writer.write(b"POST /asr HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\na")
    await writer.drain()
    await until(lambda: app[STATE].snapshot().gate.uploading == 1)
    clock.advance(0.7)  # the upload itself outlasts the queue timeout
    writer.write(b"b")
    await writer.drain()
    await until(lambda: app[STATE].snapshot().queued_tasks == 1)
    clock.advance(0.4)  # within 0.5 s of joining the queue: still waiting
    await asyncio.sleep(0)
    assert app[STATE].snapshot().queued_tasks == 1
    upstream.release("busy")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200")
    assert (await running)[0] == 200


# -- Expect: 100-continue ------------------------------------------------------------------------


async def _expect(base: str, head: bytes) -> bytes:
    """Send only the head of a request with `Expect: 100-continue`; what comes back first."""
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(base))
    try:
        writer.write(head)
        await writer.drain()
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    finally:
        writer.close()


async def test_expect_continue_is_refused_before_the_upload_when_the_queue_is_full(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """With no room, `Expect: 100-continue` gets 503 at once instead of `100 Continue`."""
    base, app = await start_gatekeeper(upstream.url, max_queue=0)
    running = asyncio.create_task(_post(base, headers={"X-Fake-Hold": "busy"}))
    await upstream.wait_active(1)
    head = await _expect(
        base,
        b"POST /asr HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\nExpect: 100-continue\r\n\r\n",
    )
    assert head.startswith(b"HTTP/1.1 503")
    assert b"X-Gatekeeper-Reason: queue_full" in head
    assert app[STATE].snapshot().rejected[RejectReason.QUEUE_FULL] == 1
    upstream.release("busy")
    assert (await running)[0] == 200


async def test_expect_continue_is_refused_when_the_body_is_too_large(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """A Content-Length over ASR_MAX_BODY_SIZE gets 413 at once instead of `100 Continue`."""
    base, _ = await start_gatekeeper(upstream.url, max_body_size=1000)
    head = await _expect(
        base,
        b"POST /asr HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n",
    )
    assert head.startswith(b"HTTP/1.1 413")


async def test_expect_continue_then_upload_and_no_expect_upstream(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """With room, the client gets `100 Continue`, sends its body, and the Whisper server never
    sees the Expect header (the gatekeeper already answered it)."""
    base, _ = await start_gatekeeper(upstream.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(base))
    writer.write(
        b"POST /asr HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100")
    writer.write(b"hello")
    await writer.drain()
    final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert final.startswith(b"HTTP/1.1 200")
    assert upstream.seen[0].size == 5
    assert "Expect" not in upstream.seen[0].headers


# -- only methods that carry work are tasks -------------------------------------------------------


async def test_options_head_get_on_task_paths_pass_straight_through(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory, caplog
) -> None:  # type: ignore[no-untyped-def]
    """A CORS preflight, HEAD or GET on /asr is answered while the only slot is busy, takes no
    slot and is not logged as a transcription."""
    base, app = await start_gatekeeper(upstream.url, max_queue=0)
    running = asyncio.create_task(_post(base, headers={"X-Fake-Hold": "busy"}))
    await upstream.wait_active(1)
    caplog.clear()
    async with aiohttp.ClientSession() as session:
        for method in ("OPTIONS", "HEAD", "GET"):
            async with session.request(method, f"{base}/asr") as r:
                assert r.status == 200, method
    assert app[STATE].snapshot().total_tasks == 1
    assert not any("开始转录" in r.getMessage() for r in caplog.records)
    upstream.release("busy")
    assert (await running)[0] == 200


async def test_task_methods_are_a_setting(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """ASR_TASK_METHODS=POST,PUT makes a PUT on a task path a task too."""
    base, app = await start_gatekeeper(upstream.url, task_methods="POST,put")
    async with aiohttp.ClientSession() as session:
        async with session.put(f"{base}/asr", data=b"x") as r:
            assert r.status == 200
            assert r.headers["X-Gatekeeper-Attempts"] == "1"
    assert app[STATE].snapshot().total_tasks == 1
