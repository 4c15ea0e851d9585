"""Admission by GPU memory (#16) end to end, over real sockets: the gatekeeper reads each
upload's audio, costs it, starts it only where it fits, says so on the answer, in /stats,
/metrics and the log; learns its figures in adaptive mode; scales timeouts by the audio."""

import asyncio
import io
import logging
from typing import Any

import aiohttp
import pytest

from gatekeeper.app import PROXY, REGISTRY, STATE
from gatekeeper.clock import FakeClock
from gatekeeper.logs import _EVENT_ATTR, _FIELDS_ATTR, Event
from gatekeeper.settings import server_name
from gatekeeper.sim.audio import silent_wav
from tests.conftest import GatekeeperFactory, StartSim
from tests.fakes import FakeUpstream
from tests.waiting import until

# The simulator's default card: 24 GiB, 6 reserved, a task needs 2 + 0.8 GiB per audio minute.
TRUE = {"gpu_memory_gib": 18, "task_memory_gib": 2, "task_memory_per_minute_gib": 0.8}
RATE = 2000  # samples a second: real WAV files, small enough to send many of them


def _form(seconds: float) -> aiohttp.FormData:
    form = aiohttp.FormData()
    wav = silent_wav(seconds, sample_rate=RATE)
    form.add_field("audio_file", io.BytesIO(wav), filename="a.wav", content_type="audio/wav")
    return form


async def _task(
    session: aiohttp.ClientSession, base: str, seconds: float
) -> tuple[int, dict[str, str]]:
    async with session.post(f"{base}/asr", data=_form(seconds)) as response:
        await response.read()
        return response.status, dict(response.headers)


def _events(caplog: pytest.LogCaptureFixture, event: Event) -> list[dict[str, Any]]:
    return [
        dict(vars(r)[_FIELDS_ATTR])
        for r in caplog.records
        if getattr(r, _EVENT_ATTR, None) is event
    ]


async def test_the_answer_says_how_long_the_audio_was(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Every answer to a task carries X-Gatekeeper-Audio-Seconds (two decimals, or unknown);
    the log lines say `audio=`; the histogram counts the lengths read."""
    caplog.set_level(logging.INFO, logger="gatekeeper")
    base, app = await start_gatekeeper(upstream.url)
    async with aiohttp.ClientSession() as session:
        status, headers = await _task(session, base, 12.345)
        assert status == 200
        assert headers["X-Gatekeeper-Audio-Seconds"] == "12.35"
        async with session.post(f"{base}/asr", data=b"not audio") as response:
            assert response.status == 200
            assert response.headers["X-Gatekeeper-Audio-Seconds"] == "unknown"
    assert [s["audio"] for s in _events(caplog, Event.START)] == ["12.35", "unknown"]
    assert [s["audio"] for s in _events(caplog, Event.FINISH)] == ["12.35", "unknown"]
    registry = app[REGISTRY]
    assert registry.get_sample_value("asr_gatekeeper_audio_seconds_count") == 1
    assert registry.get_sample_value("asr_gatekeeper_audio_seconds_sum") == pytest.approx(
        12.345, abs=0.01
    )
    assert registry.get_sample_value("asr_gatekeeper_audio_unreadable_total") == 1


async def test_short_files_share_the_card_long_ones_are_spaced_and_nothing_runs_out(
    start_sim: StartSim, start_gatekeeper: GatekeeperFactory
) -> None:
    """With the card's true figures, 24 voice notes and 4 meetings at once: the count cap (8)
    lets eight short files run together (a count of 3 would be the seed's), yet no mix ever
    runs out of memory at the simulator; every task is answered 200."""
    sim = await start_sim(time_scale=100.0)
    base, app = await start_gatekeeper(sim.url, max_concurrent=8, max_queue=40, **TRUE)
    lengths = [20.0] * 24 + [600.0] * 4
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        results = await asyncio.gather(*(_task(session, base, s) for s in lengths))
        async with session.get(f"{base}/stats") as response:
            doc = await response.json()
    assert [status for status, _ in results] == [200] * len(lengths)
    state = sim.state()
    assert state["ooms"] == 0
    assert state["max_active_seen"] > 3  # short files packed beyond the seed's count
    memory = doc["upstreams"][0]["memory_gib"]
    assert memory["budget"] == 18
    assert memory["used"] == 0  # every estimate given back
    assert (memory["task_memory_gib"], memory["task_memory_per_minute_gib"]) == (2, 0.8)
    assert memory["learning"] is None
    assert doc["audio_seconds"]["count"] == len(lengths)
    assert app[STATE].snapshot().gate.servers[0].memory_used == 0


async def test_learning_from_the_seeds_defaults_loses_no_task(
    start_sim: StartSim, start_gatekeeper: GatekeeperFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Adaptive mode starting from the seed's 6 GiB a task: a stream of short files, with
    memory the limit, brings the figures down (more run at once than 3), an OOM brings them
    up again; every task still ends 200 and /stats shows what was learned."""
    caplog.set_level(logging.INFO, logger="gatekeeper")
    sim = await start_sim(time_scale=60.0)
    base, _ = await start_gatekeeper(
        sim.url,
        adaptive=True,
        max_concurrent=12,
        max_queue=200,
        gpu_memory_gib=18,
        retry_delay=0.01,
        retry_jitter=0,
        max_retries=6,
    )
    lengths = [30.0] * 60 + [300.0] * 6
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        results = await asyncio.gather(*(_task(session, base, s) for s in lengths))
        async with session.get(f"{base}/stats") as response:
            doc = await response.json()
    assert [status for status, _ in results] == [200] * len(lengths)
    learned = doc["upstreams"][0]["memory_gib"]
    assert learned["learning"]["started_from"] == {
        "task_memory_gib": 6.0,
        "task_memory_per_minute_gib": 0.0,
    }
    assert learned["task_memory_gib"] < 6.0  # came down from the seed's guess
    assert sim.state()["max_active_seen"] > 3
    changes = _events(caplog, Event.MEMORY_LEARNED)
    assert changes
    assert all(c["upstream"] == server_name(sim.url) for c in changes)


async def test_an_attempts_timeout_scales_with_its_audio(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """With ASR_TIMEOUT_PER_AUDIO_MINUTE=30 a one-minute file's attempt times out after 60 s
    (not ASR_REQUEST_TIMEOUT's 240), five minutes after 150 s, a file of unknown length after
    240 s: the client gets its 504 at the scaled deadline (time moved on a fake clock)."""
    clock = FakeClock()
    base, app = await start_gatekeeper(
        upstream.url,
        clock=clock,
        timeout_per_audio_minute=30,
        request_timeout=240,
        max_concurrent=3,
        timeout_hold=1,
    )
    hold = {"X-Fake-Hold": "never"}
    async with aiohttp.ClientSession() as session:

        async def post(data: Any) -> int:
            async with session.post(f"{base}/asr", data=data, headers=hold) as response:
                await response.read()
                return response.status

        start = clock.monotonic()
        calls = {
            60.0: asyncio.create_task(post(_form(60))),
            150.0: asyncio.create_task(post(_form(300))),
            240.0: asyncio.create_task(post(b"not audio")),
        }
        await upstream.wait_active(3)
        for deadline, call in calls.items():
            clock.advance(start + deadline - clock.monotonic() - 1)
            await asyncio.sleep(0.05)
            assert not call.done(), deadline
            clock.advance(2)
            assert await asyncio.wait_for(call, 5) == 504, deadline
    assert app[PROXY].config.attempt_timeout(3600) == 240  # never above the worst case
    upstream.release("never")


async def test_retry_after_comes_from_the_audio_queued_ahead(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """Once a slot-second per second of audio is measured (a 60-s file held its slot 30 s:
    0.5), a refusal's Retry-After is the audio queued ahead at that rate: 100 s queued →
    50 s, where the mean service time alone (30 s) would have said 30."""
    clock = FakeClock()
    base, app = await start_gatekeeper(upstream.url, clock=clock, max_concurrent=1, max_queue=1)
    async with aiohttp.ClientSession() as session:

        async def post(seconds: float, hold: str) -> tuple[int, dict[str, str]]:
            headers = {"X-Fake-Hold": hold}
            async with session.post(
                f"{base}/asr", data=_form(seconds), headers=headers
            ) as response:
                await response.read()
                return response.status, dict(response.headers)

        first = asyncio.create_task(post(60, "first"))
        await upstream.wait_active(1)
        clock.advance(30)
        upstream.release("first")
        assert (await first)[0] == 200
        running = asyncio.create_task(post(600, "second"))
        await upstream.wait_active(1)
        queued = asyncio.create_task(post(100, "second"))
        await until(lambda: app[STATE].snapshot().gate.queued == 1)
        status, headers = await post(10, "second")
        assert status == 503
        assert headers["Retry-After"] == "50"
        upstream.release("second")
        assert [(await running)[0], (await queued)[0]] == [200, 200]
