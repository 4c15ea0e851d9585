"""The gatekeeper in front of the Whisper simulator: the promise and OOM recovery, end to end."""

import asyncio
import io
import json
import logging

import aiohttp
import pytest

from gatekeeper.app import STATE
from gatekeeper.policy.outcomes import AttemptOutcome, TaskOutcome
from gatekeeper.sim.audio import silent_wav
from tests.conftest import GatekeeperFactory, StartSim
from tests.waiting import until


def _form(seconds: float) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field(
        "audio_file", io.BytesIO(silent_wav(seconds)), filename="a.wav", content_type="audio/wav"
    )
    return form


async def _transcribe(
    session: aiohttp.ClientSession, base: str, seconds: float, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    async with session.post(
        f"{base}/asr?output=json", data=_form(seconds), headers=headers
    ) as response:
        return response.status, dict(response.headers), await response.read()


async def test_simulator_never_sees_more_than_the_limit(
    start_sim: StartSim, start_gatekeeper: GatekeeperFactory
) -> None:
    """200 simultaneous tasks at limit 2, queue 20: the simulator's own counter never passes 2."""
    sim = await start_sim(time_scale=8.0)
    base, app = await start_gatekeeper(sim.url, max_concurrent=2, max_queue=20)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        results = await asyncio.gather(
            *(_transcribe(session, base, 20, **{"X-Sim-Audio-Seconds": "60"}) for _ in range(200))
        )
    served = sum(1 for r in results if r[0] == 200)
    refused = [r for r in results if r[0] == 503]
    state = sim.state()
    snap = app[STATE].snapshot()
    assert state["max_active_seen"] == 2
    assert state["ooms"] == 0
    assert served + len(refused) == 200
    assert served >= 22  # exactly 22 when every request arrives before the first one finishes
    assert state["tasks_done"] == served == snap.total_tasks
    assert len(refused) == snap.rejected_tasks
    assert all(json.loads(r[2])["reason"] == "queue_full" for r in refused)
    print(
        f"200 tasks, limit 2, queue 20: simulator max active {state['max_active_seen']}, "
        f"{served} admitted, {len(refused)} refused"
    )


STYLES_WITH_MESSAGE = ["pytorch", "fastapi", "ctranslate2", "whispercpp", "openai"]


@pytest.mark.parametrize("style", STYLES_WITH_MESSAGE)
async def test_transient_oom_is_recognised_and_retried(
    start_sim: StartSim,
    start_gatekeeper: GatekeeperFactory,
    style: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """On a card that fits one task, a second one meets a real OOM, waits, and then succeeds."""
    # 10 GiB card, 6 reserved: one 60-s task (2.8 GiB) fits, two do not.
    sim = await start_sim(total_gib=10.0, error_style=style, time_scale=20.0)
    base, app = await start_gatekeeper(
        sim.url, max_concurrent=2, retry_delay=0.1, retry_jitter=0, oom_cooldown=0
    )
    caplog.set_level(logging.INFO, logger="gatekeeper")
    async with aiohttp.ClientSession() as session:
        first = asyncio.create_task(_transcribe(session, base, 60))
        await until(lambda: sim.state()["active_tasks"] == 1)
        second = await _transcribe(session, base, 60)
        assert (await first)[0] == 200
    status, headers, body = second
    assert status == 200, body
    assert int(headers["X-Gatekeeper-Attempts"]) >= 2
    assert b"Simulated transcript" in body or b"text" in body
    snap = app[STATE].snapshot()
    assert snap.oom_errors >= 1
    assert snap.attempts[AttemptOutcome.OOM] == sim.state()["ooms"]
    assert snap.tasks[TaskOutcome.SUCCESS] == 2
    delays = [r.gk_fields["delay"] for r in caplog.records if "重试转录" in r.getMessage()]  # type: ignore[attr-defined]
    assert delays == pytest.approx([0.1, 0.3, 0.9, 2.7][: len(delays)])
    print(f"{style}: attempts {headers['X-Gatekeeper-Attempts']}, retry delays {delays}")


async def test_bare_internal_server_error_needs_the_operator_pattern(
    start_sim: StartSim, start_gatekeeper: GatekeeperFactory
) -> None:
    """A bare 500 is a plain error by default, and an OOM with `^Internal Server Error$`."""
    results = {}
    for patterns in ((), ("^Internal Server Error$",)):
        sim = await start_sim(error_style="bare")
        base, app = await start_gatekeeper(
            sim.url, max_retries=1, retry_delay=0.01, oom_patterns=",".join(patterns)
        )
        async with aiohttp.ClientSession() as session:
            status, _, body = await _transcribe(session, base, 5, **{"X-Sim-Fail": "oom"})
        assert (status, body) == (500, b"Internal Server Error")  # relayed unchanged
        results[patterns] = app[STATE].snapshot().attempts
    assert results[()][AttemptOutcome.ERROR] == 2
    assert results[()][AttemptOutcome.OOM] == 0
    hidden = results[("^Internal Server Error$",)]
    assert hidden[AttemptOutcome.OOM] == 2
    assert hidden[AttemptOutcome.ERROR] == 0


async def test_crash_and_restart_is_survived(
    start_sim: StartSim, start_gatekeeper: GatekeeperFactory
) -> None:
    """Memory not yet freed makes the next task crash the server; it is retried after restart."""
    # Each task's memory is released 0.5 s after it ends (the seed's "cache not freed"), and an
    # OOM kills the server for 0.2 s (a ggml abort under a restarting container).
    sim = await start_sim(
        total_gib=10.0, crash_on_oom=True, restart_seconds=2, release_delay=5, time_scale=10.0
    )
    base, app = await start_gatekeeper(sim.url, max_concurrent=1, retry_delay=0.1, retry_jitter=0)
    async with aiohttp.ClientSession() as session:
        first = await _transcribe(session, base, 30)
        second = await _transcribe(session, base, 30)
    assert (first[0], second[0]) == (200, 200)
    assert int(second[1]["X-Gatekeeper-Attempts"]) >= 2
    assert app[STATE].snapshot().attempts[AttemptOutcome.CRASH] >= 1
    assert sim.state()["crashes"] == 1
    assert app[STATE].snapshot().tasks[TaskOutcome.SUCCESS] == 2


async def test_client_error_from_the_simulator_is_relayed_after_one_attempt(
    start_sim: StartSim, start_gatekeeper: GatekeeperFactory
) -> None:
    """A 422 from the Whisper server reaches the client untouched and is never retried."""
    sim = await start_sim()
    base, app = await start_gatekeeper(sim.url)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/asr", data=b"not a form") as response:
            assert response.status == 422
            assert response.headers["X-Gatekeeper-Attempts"] == "1"
            doc = await response.json()
    assert "detail" in doc
    assert app[STATE].snapshot().tasks[TaskOutcome.CLIENT_ERROR] == 1
