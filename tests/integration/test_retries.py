"""Retries, delays and the OOM cool-down, with an injected clock so nothing really waits."""

import asyncio
import json
from dataclasses import dataclass, field

import aiohttp
import pytest

from gatekeeper.app import PROXY, STATE
from gatekeeper.clock import FakeClock
from gatekeeper.drain import DrainReport, end_grace
from gatekeeper.policy.outcomes import AttemptOutcome, RejectReason, TaskOutcome
from tests.conftest import GatekeeperFactory
from tests.fakes import OOM_TEXT, FakeUpstream, big_error_body
from tests.waiting import until


@dataclass
class GatedClock(FakeClock):
    """A fake clock whose sleeps block until the test opens the gate."""

    opened: asyncio.Event = field(default_factory=asyncio.Event)
    sleeping: int = 0

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.sleeping += 1
        try:
            await self.opened.wait()
        finally:
            self.sleeping -= 1
        self.advance(seconds)


async def _quitter(base: str) -> asyncio.StreamWriter:
    """Send task "quitter" (an OOM, then a success) on a raw connection the test can close."""
    port = int(base.rsplit(":", 1)[1])
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /asr HTTP/1.1\r\nHost: x\r\nX-Fake-Script: oom,ok\r\nX-Request-ID: quitter\r\n"
        b"Content-Length: 5\r\n\r\naudio"
    )
    await writer.drain()
    return writer


@dataclass
class SteppedClock(FakeClock):
    """A fake clock whose n-th sleep (from 0) ends only when the test calls `end(n)`; time
    itself moves only when the test calls `advance()`."""

    started: int = 0
    _ends: dict[int, asyncio.Event] = field(default_factory=dict)

    def _end(self, n: int) -> asyncio.Event:
        return self._ends.setdefault(n, asyncio.Event())

    def end(self, n: int) -> None:
        self._end(n).set()

    async def sleep(self, seconds: float) -> None:
        n = self.started
        self.started += 1
        self.sleeps.append(seconds)
        await self._end(n).wait()


async def _task(
    base: str, script: str, rid: str, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{base}/asr",
            data=b"the same audio bytes",
            headers={"X-Fake-Script": script, "X-Request-ID": rid, **headers},
        ) as response,
    ):
        return response.status, dict(response.headers), await response.read()


async def test_oom_then_success_waits_the_oom_delay(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """A transient OOM is retried after d × 1 and the client only sees the transcription."""
    clock = FakeClock()
    base, app = await start_gatekeeper(upstream.url, clock=clock, retry_jitter=0)
    status, headers, _body = await _task(base, "oom,ok", "t1")
    assert status == 200
    assert headers["X-Gatekeeper-Attempts"] == "2"
    assert clock.sleeps == [10.0]
    assert {s.sha256 for s in upstream.seen} == {upstream.seen[0].sha256}  # identical replay
    assert len(upstream.seen) == 2
    snap = app[STATE].snapshot()
    assert snap.oom_errors == 1
    assert snap.last_oom_wall is not None
    assert snap.retries[AttemptOutcome.OOM] == 1
    assert snap.tasks[TaskOutcome.SUCCESS] == 1
    assert snap.failed_tasks == 0


async def test_oom_until_retries_run_out_relays_the_last_answer(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """After 1 + 3 OOM attempts (10/30/90 s apart) the client gets the upstream's answer as is."""
    clock = FakeClock()
    base, app = await start_gatekeeper(upstream.url, clock=clock, retry_jitter=0)
    status, headers, body = await _task(base, "oom", "t1")
    assert (status, body.decode()) == (500, OOM_TEXT)
    assert headers["X-Gatekeeper-Attempts"] == "4"
    assert clock.sleeps == [10.0, 30.0, 90.0]
    snap = app[STATE].snapshot()
    assert snap.oom_errors == 4
    assert snap.failed_tasks == 1
    assert snap.success_rate == "0.0%"


async def test_plain_error_then_success_waits_the_error_delay(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """A non-OOM 500 is retried after d/2 and then succeeds."""
    clock = FakeClock()
    base, app = await start_gatekeeper(upstream.url, clock=clock, retry_jitter=0)
    status, _, _ = await _task(base, "500,502,ok", "t1")
    assert status == 200
    assert clock.sleeps == [5.0, 10.0]
    assert app[STATE].snapshot().retries[AttemptOutcome.ERROR] == 2


async def test_crash_then_restart_is_retried_like_oom(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """A reset connection counts as a crash and waits the OOM schedule before the retry."""
    clock = FakeClock()
    base, app = await start_gatekeeper(upstream.url, clock=clock, retry_jitter=0)
    status, headers, _ = await _task(base, "reset,ok", "t1")
    assert status == 200
    assert headers["X-Gatekeeper-Attempts"] == "2"
    assert clock.sleeps == [10.0]
    assert app[STATE].snapshot().attempts[AttemptOutcome.CRASH] == 1


async def test_client_error_is_passed_through_after_one_attempt(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """A 422 is the backend's own mistake: relayed untouched, never retried."""
    clock = FakeClock()
    base, app = await start_gatekeeper(upstream.url, clock=clock)
    status, headers, body = await _task(base, "422", "t1")
    assert (status, body) == (422, b"error 422")
    assert headers["X-Gatekeeper-Attempts"] == "1"
    assert clock.sleeps == []
    assert len(upstream.seen) == 1
    snap = app[STATE].snapshot()
    assert snap.tasks[TaskOutcome.CLIENT_ERROR] == 1
    assert snap.failed_tasks == 0


async def test_upstream_retry_after_is_honoured(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """A 503 with Retry-After: 40 waits 40 s instead of the 5 s error delay."""
    clock = FakeClock()
    base, _ = await start_gatekeeper(upstream.url, clock=clock, retry_jitter=0)
    status, _, _ = await _task(base, "503,ok", "t1", **{"X-Fake-Retry-After": "40"})
    assert status == 200
    assert clock.sleeps == [40.0]


async def test_jitter_comes_from_the_injected_random(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """With jitter 0.1 the delay lies within ±10 % and is the same for the same seed."""
    delays: list[float] = []
    for _ in range(2):
        clock = FakeClock()
        base, _ = await start_gatekeeper(upstream.url, clock=clock, seed=7)
        await _task(base, "oom,ok", f"t{len(delays)}")
        delays.append(clock.sleeps[0])
    assert 9.0 <= delays[0] <= 11.0
    assert delays[0] != 10.0
    assert delays[0] == delays[1]


async def test_cooldown_applies_within_the_window_only(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """The next task inside ASR_OOM_WINDOW waits ASR_OOM_COOLDOWN first; later ones do not."""
    clock = FakeClock()
    base, _ = await start_gatekeeper(upstream.url, clock=clock, retry_jitter=0)
    await _task(base, "oom,ok", "t1")  # OOM at t, retry after 10 s
    assert clock.sleeps == [10.0]
    await _task(base, "ok", "t2")  # 10 s after the OOM: inside the 30 s window
    assert clock.sleeps == [10.0, 15.0]
    clock.advance(31)
    await _task(base, "ok", "t3")
    assert clock.sleeps == [10.0, 15.0]


async def test_cooldown_log_line_names_the_real_delay(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The seed's cool-down line carries the configured delay, not a fixed 15."""
    clock = FakeClock()
    base, _ = await start_gatekeeper(upstream.url, clock=clock, retry_jitter=0, retry_delay=4)
    caplog.set_level("INFO", logger="gatekeeper")
    await _task(base, "oom,ok", "t1")
    await _task(base, "ok", "t2")
    lines = [r.getMessage() for r in caplog.records]
    assert "[ASR并发] 检测到最近OOM，延迟6秒后开始" in lines
    assert "[ASR并发] 显存不足" in lines


async def test_with_the_seeds_cool_down_the_retry_keeps_its_slot(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """With ASR_OOM_COOLDOWN > 0 (the default) a task waiting out a retry delay keeps its
    slot, as the seed describes: the next task stays queued (and would cool down anyway)."""
    clock = GatedClock()
    base, app = await start_gatekeeper(upstream.url, clock=clock, retry_jitter=0)
    first = asyncio.create_task(_task(base, "oom,ok", "first"))
    await until(lambda: clock.sleeping == 1)
    second = asyncio.create_task(_task(base, "ok", "second"))
    await until(lambda: app[STATE].snapshot().queued_tasks == 1)
    snap = app[STATE].snapshot()
    assert (snap.active_tasks, snap.gate.retrying) == (1, 0)
    assert upstream.active == 0
    assert len(upstream.seen) == 1
    clock.opened.set()
    results = await asyncio.gather(first, second)
    assert [r[0] for r in results] == [200, 200]
    assert upstream.max_active == 1
    assert [s.headers["X-Request-ID"] for s in upstream.seen] == ["first", "first", "second"]


async def test_retry_delay_gives_the_slot_away_and_the_retry_goes_first(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """During a retry delay the GPU does nothing for the task, so its slot serves the next one;
    when the delay is over the retry takes the next free slot, ahead of every queued task."""
    clock = GatedClock()
    base, app = await start_gatekeeper(
        upstream.url, clock=clock, retry_jitter=0, oom_cooldown=0, max_concurrent=1
    )
    first = asyncio.create_task(_task(base, "oom,ok", "first"))
    await until(lambda: clock.sleeping == 1)  # first is in its 10 s retry delay
    second = asyncio.create_task(_task(base, "ok", "second", **{"X-Fake-Hold": "h2"}))
    await upstream.wait_active(1)  # second got the slot at once
    snap = app[STATE].snapshot()
    assert (snap.active_tasks, snap.queued_tasks, snap.gate.retrying) == (1, 0, 1)
    third = asyncio.create_task(_task(base, "ok", "third"))
    await until(lambda: app[STATE].snapshot().queued_tasks == 1)
    clock.opened.set()  # first's delay ends while second still runs: first waits, ahead of third
    await until(lambda: app[STATE].snapshot().gate.retry_waiting == 1)  # waits for a slot
    assert [s.headers["X-Request-ID"] for s in upstream.seen] == ["first", "second"]
    upstream.release("h2")
    results = await asyncio.gather(first, second, third)
    assert [r[0] for r in results] == [200, 200, 200]
    assert results[0][1]["X-Gatekeeper-Attempts"] == "2"
    assert [s.headers["X-Request-ID"] for s in upstream.seen] == [
        "first",
        "second",
        "first",
        "third",
    ]
    assert upstream.max_active == 1
    snap = app[STATE].snapshot()
    assert (snap.active_tasks, snap.queued_tasks, snap.gate.retrying) == (0, 0, 0)


async def test_a_retry_that_cannot_get_a_slot_within_the_request_timeout_is_refused(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """Retries piled up behind a full limit: one still without a slot ASR_REQUEST_TIMEOUT after
    its delay is refused with 503 queue_timeout (so a task's worst case stays bounded), and it
    is never sent again."""
    clock = SteppedClock()
    base, app = await start_gatekeeper(
        upstream.url,
        clock=clock,
        retry_jitter=0,
        oom_cooldown=0,
        max_concurrent=1,
        request_timeout=0.5,  # on the fake clock: the slot wait follows it
    )
    a = asyncio.create_task(_task(base, "oom,hold=ha", "a"))
    await until(lambda: clock.started == 1)
    c = asyncio.create_task(_task(base, "oom,hold=hc", "c"))
    await until(lambda: clock.started == 2)
    e = asyncio.create_task(_task(base, "oom,ok", "e"))
    await until(lambda: clock.started == 3)
    assert app[STATE].snapshot().gate.retrying == 3
    clock.end(0)
    clock.end(1)
    await upstream.wait_active(1)  # a's retry holds the only slot; c waits ahead of e
    clock.end(2)
    # c and e wait for a slot (e behind c), each for ASR_REQUEST_TIMEOUT on the fake clock.
    await until(lambda: app[STATE].snapshot().gate.retry_waiting == 2)
    clock.advance(0.25)  # half of e's patience; c's attempt then holds past the rest
    upstream.release("ha")  # a answers; the slot goes to c, which holds it
    await until(lambda: [s.headers["X-Request-ID"] for s in upstream.seen][-1] == "c")
    clock.advance(0.24)
    await asyncio.sleep(0)
    assert not e.done()  # still within its patience
    clock.advance(0.02)  # past ASR_REQUEST_TIMEOUT after its delay: refused
    status, headers, body = await e
    assert status == 503
    assert headers["X-Gatekeeper-Reason"] == "queue_timeout"
    assert headers["X-Gatekeeper-Attempts"] == "1"  # it did reach the Whisper server once
    assert json.loads(body)["error"] == "服务繁忙"
    upstream.release("hc")
    assert [(await a)[0], (await c)[0]] == [200, 200]
    assert [s.headers["X-Request-ID"] for s in upstream.seen] == ["a", "c", "e", "a", "c"]
    assert upstream.max_active == 1
    snap = app[STATE].snapshot()
    assert snap.tasks[TaskOutcome.REJECTED] == 1
    assert snap.tasks[TaskOutcome.SUCCESS] == 2
    assert snap.rejected[RejectReason.QUEUE_TIMEOUT] == 1
    assert (snap.active_tasks, snap.queued_tasks, snap.gate.retrying) == (0, 0, 0)


@pytest.mark.parametrize("stage", ["delay", "waiting_for_a_slot"])
async def test_tasks_between_attempts_are_refused_at_the_end_of_a_shutdown(
    stage: str, upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """When the grace period ends, a task in its retry delay (or waiting for a slot to retry)
    holds no slot to finish in: it is answered 503 shutting_down with its attempt count."""
    clock = GatedClock()
    base, app = await start_gatekeeper(
        upstream.url, clock=clock, retry_jitter=0, oom_cooldown=0, max_concurrent=1
    )
    proxy = app[PROXY]
    retried = asyncio.create_task(_task(base, "oom,ok", "retried"))
    await until(lambda: clock.sleeping == 1)
    holder = asyncio.create_task(_task(base, "ok", "holder", **{"X-Fake-Hold": "h"}))
    await upstream.wait_active(1)
    if stage == "waiting_for_a_slot":
        clock.opened.set()
        await until(lambda: clock.sleeping == 0)
    proxy.gate.begin_shutdown()
    runners = proxy.stop_retries()
    assert len(runners) == 1
    status, headers, body = await retried
    assert status == 503
    assert headers["X-Gatekeeper-Reason"] == "shutting_down"
    assert headers["X-Gatekeeper-Attempts"] == "1"
    assert json.loads(body)["reason"] == "shutting_down"
    upstream.release("h")
    assert (await holder)[0] == 200  # the running one finishes in its slot
    assert [s.headers["X-Request-ID"] for s in upstream.seen] == ["retried", "holder"]
    snap = app[STATE].snapshot()
    assert snap.tasks[TaskOutcome.REJECTED] == 1
    assert snap.rejected[RejectReason.SHUTTING_DOWN] == 1
    assert (snap.active_tasks, snap.gate.retrying) == (0, 0)


async def test_at_the_end_of_a_shutdown_running_tasks_get_503_unless_their_answer_began(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """When the grace period ends (drain.end_grace cancels the runners), a task still waiting for
    the Whisper server is answered 503 shutting_down with its attempt count; one whose answer is
    already streaming to its client is cut, since a 503 cannot follow a 200. Books balance."""
    base, app = await start_gatekeeper(upstream.url, max_concurrent=2)
    proxy = app[PROXY]
    waiting = asyncio.create_task(_task(base, "ok", "waiting", **{"X-Fake-Hold": "h"}))
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{base}/asr", data=b"a", headers={"X-Fake-SSE": "3", "X-Request-ID": "streaming"}
        ) as streaming:
            assert streaming.status == 200
            assert (await streaming.content.readline()).startswith(b"data: ")
            await upstream.wait_active(2)
            report = await end_grace(proxy)  # what serve() does when the grace ends
            assert report == DrainReport(refused_waiting=0, stopped_running=2)
            with pytest.raises(aiohttp.ClientPayloadError):
                await streaming.read()
    status, headers, body = await waiting
    assert status == 503
    assert headers["X-Gatekeeper-Reason"] == "shutting_down"
    assert headers["X-Gatekeeper-Attempts"] == "1"
    assert json.loads(body)["reason"] == "shutting_down"
    snap = app[STATE].snapshot()
    assert (snap.tasks[TaskOutcome.REJECTED], snap.tasks[TaskOutcome.FAILED]) == (1, 1)
    assert snap.rejected[RejectReason.SHUTTING_DOWN] == 1
    assert (snap.active_tasks, snap.queued_tasks, snap.total_tasks) == (0, 0, 2)
    upstream.release("h")
    upstream.release("sse1")


async def test_client_leaving_while_its_retry_waits_for_a_slot_ends_the_task(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """A retry waiting for a slot whose client hangs up is never sent; the books balance."""
    clock = GatedClock()
    base, app = await start_gatekeeper(
        upstream.url, clock=clock, retry_jitter=0, oom_cooldown=0, max_concurrent=1
    )
    writer = await _quitter(base)
    await until(lambda: clock.sleeping == 1)
    second = asyncio.create_task(_task(base, "ok", "second", **{"X-Fake-Hold": "h2"}))
    await upstream.wait_active(1)
    clock.opened.set()
    await until(lambda: clock.sleeping == 0)  # the retry now waits for second's slot
    assert app[STATE].snapshot().gate.retrying == 1
    writer.close()
    await until(lambda: app[STATE].snapshot().gate.retrying == 0)
    upstream.release("h2")
    assert (await second)[0] == 200
    await until(lambda: not app[PROXY].runners)
    assert [s.headers["X-Request-ID"] for s in upstream.seen] == ["quitter", "second"]
    snap = app[STATE].snapshot()
    assert snap.tasks[TaskOutcome.CANCELLED] == 1
    assert (snap.active_tasks, snap.queued_tasks, snap.gate.retrying) == (0, 0, 0)


async def test_client_leaving_during_retry_delay_ends_the_task(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """A client that hangs up during a retry delay gets no further attempts; the slot frees."""
    clock = GatedClock()
    base, app = await start_gatekeeper(upstream.url, clock=clock, retry_jitter=0)
    writer = await _quitter(base)
    await until(lambda: clock.sleeping == 1)
    writer.close()
    await until(lambda: not (app[STATE].snapshot().active_tasks or app[PROXY].runners))
    assert len(upstream.seen) == 1
    assert app[STATE].snapshot().tasks[TaskOutcome.CANCELLED] == 1


@pytest.mark.parametrize(
    ("size", "outcome"),
    [(30_000, AttemptOutcome.OOM), (300_000, AttemptOutcome.ERROR)],
    ids=["oom-text-within-64k", "oom-text-beyond-64k"],
)
async def test_big_error_body_is_classified_on_its_head_and_relayed_whole(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory, size: int, outcome: AttemptOutcome
) -> None:
    """Only the first 64 KiB decide the outcome; the client still gets every byte unchanged."""
    clock = FakeClock()
    base, app = await start_gatekeeper(upstream.url, clock=clock, max_retries=1)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{base}/asr", data=b"x", headers={"X-Fake-Big-Error": str(size)}
        ) as response:
            assert response.status == 500
            body = await response.read()
    assert body == big_error_body(size)
    assert app[STATE].snapshot().attempts[outcome] == 2
