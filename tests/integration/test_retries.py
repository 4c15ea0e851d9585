"""Retries, delays and the OOM cool-down, with an injected clock so nothing really waits."""

import asyncio
from dataclasses import dataclass, field

import aiohttp
import pytest

from gatekeeper.app import PROXY, STATE
from gatekeeper.clock import FakeClock
from gatekeeper.outcomes import AttemptOutcome, TaskOutcome
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
        self.now += seconds


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
    delays = []
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


async def test_retry_delay_keeps_the_slot(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """A task waiting out a retry delay still holds its slot: the next task stays queued."""
    clock = GatedClock()
    base, app = await start_gatekeeper(upstream.url, clock=clock, retry_jitter=0)
    first = asyncio.create_task(_task(base, "oom,ok", "first"))
    await until(lambda: clock.sleeping == 1)
    second = asyncio.create_task(_task(base, "ok", "second"))
    await until(lambda: app[STATE].snapshot().queued_tasks == 1)
    assert app[STATE].snapshot().active_tasks == 1
    assert upstream.active == 0
    assert len(upstream.seen) == 1
    clock.opened.set()
    results = await asyncio.gather(first, second)
    assert [r[0] for r in results] == [200, 200]
    assert upstream.max_active == 1
    assert [s.headers["X-Request-ID"] for s in upstream.seen] == ["first", "first", "second"]


async def test_client_leaving_during_retry_delay_ends_the_task(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """A client that hangs up during a retry delay gets no further attempts; the slot frees."""
    clock = GatedClock()
    base, app = await start_gatekeeper(upstream.url, clock=clock, retry_jitter=0)
    port = int(base.rsplit(":", 1)[1])
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /asr HTTP/1.1\r\nHost: x\r\nX-Fake-Script: oom,ok\r\nX-Request-ID: quitter\r\n"
        b"Content-Length: 5\r\n\r\naudio"
    )
    await writer.drain()
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
