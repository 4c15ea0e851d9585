"""The Whisper simulator over real sockets: API shapes, the memory model, faults and crashes."""

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, cast

import aiohttp
import pytest

from gatekeeper.sim import ErrorStyle, OnDisconnect, SimConfig, Simulator, silent_wav
from gatekeeper.sim.cli import add_sim_arguments, config_from_args, describe
from tests.conftest import StartSim
from tests.waiting import until

FIVE_MINUTES = {"X-Sim-Audio-Seconds": "300"}


@pytest.fixture
def sim_time_scale() -> float:
    """Simulators in this module run 1000.0× faster than real time."""
    return 1000.0


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """One client session per test, without keep-alive so each request sees the live server."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        yield s


def _form(
    field: str, audio: bytes, filename: str = "speech.wav", **fields: str
) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for name, value in fields.items():
        form.add_field(name, value)
    # Large bodies go as a file object, as aiohttp asks (raw bytes would block its loop).
    body = io.BytesIO(audio) if len(audio) > 1_000_000 else audio
    form.add_field(field, body, filename=filename, content_type="audio/wav")
    return form


async def _post(
    session: aiohttp.ClientSession,
    sim: Simulator,
    path: str,
    *,
    field: str = "audio_file",
    audio: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    **fields: str,
) -> tuple[int, Mapping[str, str], str]:
    data = _form(field, silent_wav(2.0) if audio is None else audio, **fields)
    async with session.post(sim.url + path, data=data, headers=headers) as response:
        return response.status, response.headers, await response.text()


def _state(sim: Simulator) -> dict[str, Any]:
    return cast(dict[str, Any], sim.state())


# -- API shapes ---------------------------------------------------------------------------


async def test_asr_answers_plain_text_with_its_headers(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    """POST /asr answers text/plain with Asr-Engine, Content-Disposition and upload checksums."""
    sim = await start_sim()
    audio = silent_wav(2.0)
    status, headers, body = await _post(
        session, sim, "/asr", audio=audio, headers={"X-Request-ID": "req-1"}
    )
    assert status == 200
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    assert headers["Asr-Engine"] == "sim"
    assert headers["Content-Disposition"] == 'attachment; filename="speech.wav.txt"'
    assert headers["X-Sim-Audio-Sha256"] == hashlib.sha256(audio).hexdigest()
    assert headers["X-Sim-Audio-Bytes"] == str(len(audio))
    assert headers["X-Request-ID"] == "req-1"
    assert headers["X-Sim-Task-Id"]
    assert body == "Simulated transcript of 2.0 seconds of audio.\n"


async def test_asr_json_output_is_still_text_plain(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    """Like whisper-asr-webservice, ?output=json sends JSON text labelled text/plain."""
    sim = await start_sim()
    status, headers, body = await _post(session, sim, "/asr?output=json&task=transcribe")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    assert headers["Content-Disposition"].endswith('.json"')
    result = json.loads(body)
    assert result["text"].startswith("Simulated transcript")
    assert result["segments"]


@pytest.mark.parametrize(
    ("output", "start"),
    [("vtt", "WEBVTT\n\n00:00:00.000 --> "), ("srt", "1\n00:00:00,000 --> "), ("tsv", "start\t")],
)
async def test_asr_subtitle_outputs(
    start_sim: StartSim, session: aiohttp.ClientSession, output: str, start: str
) -> None:
    """Subtitle outputs come in their usual text layouts."""
    sim = await start_sim()
    status, _, body = await _post(session, sim, f"/asr?output={output}")
    assert status == 200
    assert body.startswith(start)


async def test_asr_without_audio_is_a_fastapi_422(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    """A request without the audio_file field gets FastAPI's validation error."""
    sim = await start_sim()
    status, _, body = await _post(session, sim, "/asr", field="file")
    assert status == 422
    assert json.loads(body)["detail"][0]["loc"] == ["body", "audio_file"]
    assert _state(sim)["recent"][-1]["outcome"] == "bad_request"


async def test_asr_unknown_output_is_a_422(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    """An output format the server does not know is rejected before any GPU work."""
    sim = await start_sim()
    status, _, body = await _post(session, sim, "/asr?output=docx")
    assert status == 422
    assert json.loads(body)["detail"][0]["loc"] == ["query", "output"]


async def test_detect_language_answers_json(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    """POST /detect-language answers the language, its code and a confidence."""
    sim = await start_sim()
    status, headers, body = await _post(session, sim, "/detect-language")
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(body) == {
        "detected_language": "english",
        "language_code": "en",
        "confidence": 0.98,
    }


@pytest.mark.parametrize(
    ("path", "response_format", "content_type", "check"),
    [
        ("/v1/audio/transcriptions", "json", "application/json", "text"),
        ("/v1/audio/transcriptions", "verbose_json", "application/json", "segments"),
        ("/v1/audio/transcriptions", "text", "text/plain", None),
        ("/v1/audio/translations", "json", "application/json", "text"),
        ("/inference", "json", "application/json", "text"),
        ("/inference", "verbose_json", "application/json", "segments"),
        ("/inference", "text", "text/plain", None),
    ],
)
async def test_openai_and_whispercpp_answer_shapes(
    start_sim: StartSim,
    session: aiohttp.ClientSession,
    path: str,
    response_format: str,
    content_type: str,
    check: str | None,
) -> None:
    """OpenAI-style and whisper.cpp paths answer in the requested response_format."""
    sim = await start_sim()
    status, headers, body = await _post(
        session, sim, path, field="file", model="whisper-1", response_format=response_format
    )
    assert status == 200
    assert headers["Content-Type"].startswith(content_type)
    if check is None:
        assert body.startswith("Simulated")
    else:
        assert check in json.loads(body)
    if path.endswith("translations"):
        assert json.loads(body)["text"].startswith("Simulated translation")


@pytest.mark.parametrize(
    ("path", "status", "shape"),
    [("/v1/audio/transcriptions", 422, "detail"), ("/inference", 400, "error")],
)
async def test_missing_file_field_in_each_family(
    start_sim: StartSim, session: aiohttp.ClientSession, path: str, status: int, shape: str
) -> None:
    """Without the `file` field OpenAI-style servers say {detail}, whisper.cpp says {error}."""
    sim = await start_sim()
    got, _, body = await _post(session, sim, path, field="audio_file")
    assert got == status
    assert shape in json.loads(body)


async def test_non_task_paths(start_sim: StartSim, session: aiohttp.ClientSession) -> None:
    """/health says ok (echoing X-Request-ID), /docs is a small HTML page, / redirects there."""
    sim = await start_sim()
    async with session.get(sim.url + "/health", headers={"X-Request-ID": "probe"}) as response:
        assert response.status == 200
        assert response.headers["X-Request-ID"] == "probe"
        assert await response.json() == {"status": "ok"}
    async with session.get(sim.url + "/docs") as response:
        assert response.status == 200
        assert response.content_type == "text/html"
    async with session.get(sim.url + "/", allow_redirects=False) as response:
        assert response.status == 307
        assert response.headers["Location"] == "/docs"


async def test_state_records_what_each_task_request_looked_like(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    """/sim/state lists each task's path, query, headers and the exact audio received."""
    sim = await start_sim()
    audio = silent_wav(3.0)
    headers = {"X-Request-ID": "abc", "X-Custom": "kept"}
    await _post(session, sim, "/asr?output=json&language=en", audio=audio, headers=headers)
    async with session.get(sim.url + "/sim/state") as response:
        state = await response.json()
    [task] = state["recent"]
    assert task["path"] == "/asr"
    assert task["query_string"] == "output=json&language=en"
    assert task["method"] == "POST"
    assert task["request_id"] == "abc"
    assert task["headers"]["X-Custom"] == "kept"
    assert task["audio_bytes"] == len(audio)
    assert task["audio_sha256"] == hashlib.sha256(audio).hexdigest()
    assert task["audio_seconds"] == pytest.approx(3.0)
    assert task["outcome"] == "ok"
    assert (state["tasks_started"], state["tasks_done"], state["active_tasks"]) == (1, 1, 0)


async def test_reset_zeroes_counters_and_recent(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    """POST /sim/reset forgets counters and recent tasks."""
    sim = await start_sim()
    await _post(session, sim, "/asr", headers={"X-Sim-Fail": "oom"})
    async with session.post(sim.url + "/sim/reset") as response:
        state = await response.json()
    assert (state["ooms"], state["tasks_started"], state["max_active_seen"]) == (0, 0, 0)
    assert state["recent"] == []


async def test_large_upload_is_streamed_and_counted_exactly(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    """A 10 MB non-WAV upload is hashed byte-exactly and its duration estimated from size."""
    sim = await start_sim()
    audio = bytes(range(256)) * (10 * 1024 * 1024 // 256)
    status, headers, _ = await _post(session, sim, "/inference", field="file", audio=audio)
    assert status == 200
    assert headers["X-Sim-Audio-Sha256"] == hashlib.sha256(audio).hexdigest()
    task = _state(sim)["recent"][-1]
    assert task["audio_seconds"] == pytest.approx(len(audio) / 16_000)


# -- the memory model ---------------------------------------------------------------------


async def test_three_concurrent_five_minute_tasks_fit_and_a_fourth_gets_oom(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    """Three 5-minute tasks run together; a fourth arriving meanwhile gets PyTorch's OOM."""
    sim = await start_sim(time_scale=200.0)
    three = [
        asyncio.create_task(_post(session, sim, "/asr", headers=FIVE_MINUTES)) for _ in range(3)
    ]
    await until(lambda: _state(sim)["memory_used_gib"] == pytest.approx(24.0))
    status, headers, body = await _post(session, sim, "/asr", headers=FIVE_MINUTES)
    assert status == 500
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    assert (
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 6.00 GiB. GPU 0 has a "
        "total capacity of 24.00 GiB of which 0 bytes is free." in body
    )
    assert [status for status, _, _ in await asyncio.gather(*three)] == [200, 200, 200]
    state = _state(sim)
    assert (state["ooms"], state["tasks_done"], state["max_active_seen"]) == (1, 3, 4)
    assert state["memory_used_gib"] == pytest.approx(6.0)


async def test_four_five_minute_tasks_in_turn_all_succeed(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    """One after another, four 5-minute tasks never run out of memory."""
    sim = await start_sim()
    statuses = [(await _post(session, sim, "/asr", headers=FIVE_MINUTES))[0] for _ in range(4)]
    assert statuses == [200, 200, 200, 200]
    state = _state(sim)
    assert (state["ooms"], state["max_active_seen"]) == (0, 1)


async def test_max_active_seen_counts_concurrent_requests(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    """max_active_seen is the most task requests the simulator ever held at once."""
    sim = await start_sim(time_scale=100.0)
    await asyncio.gather(_post(session, sim, "/asr"), _post(session, sim, "/asr"))
    await _post(session, sim, "/inference", field="file")
    assert _state(sim)["max_active_seen"] == 2
    assert _state(sim)["active_tasks"] == 0


async def test_delayed_release_causes_an_oom_that_would_not_happen_otherwise(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    """When finished tasks keep their memory, a fourth task in turn runs out of it."""
    sim = await start_sim(release_delay=3600.0)
    statuses = [(await _post(session, sim, "/asr", headers=FIVE_MINUTES))[0] for _ in range(4)]
    assert statuses == [200, 200, 200, 500]
    assert _state(sim)["pending_releases"] == 3


async def test_delayed_release_frees_memory_after_the_delay(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    """Held memory comes back once the release delay has passed."""
    sim = await start_sim(time_scale=100.0, release_delay=10.0)
    await _post(session, sim, "/asr", headers={"X-Sim-Audio-Seconds": "60"})
    assert _state(sim)["memory_used_gib"] == pytest.approx(8.8)
    await until(lambda: _state(sim)["memory_used_gib"] == pytest.approx(6.0))


# -- processing time ----------------------------------------------------------------------


async def test_processing_time_follows_audio_length_and_sharing(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    """One 60 s file takes 6 GPU-seconds; two at once each take longer, together less."""
    sim = await start_sim(time_scale=20.0)  # alone: 60 × 0.1 / 20 = 0.3 s
    minute = {"X-Sim-Audio-Seconds": "60"}
    began = time.monotonic()
    await _post(session, sim, "/asr", headers=minute)
    alone = time.monotonic() - began
    began = time.monotonic()
    await asyncio.gather(*(_post(session, sim, "/asr", headers=minute) for _ in range(2)))
    pair = time.monotonic() - began  # 2 × 6 / 1.3 / 20 ≈ 0.46 s
    assert alone >= 0.3
    assert alone < pair < 2 * alone


async def test_sse_stream_arrives_in_several_chunks_over_time(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    """With stream=true each segment is sent as an SSE event when ready, then [DONE]."""
    sim = await start_sim(time_scale=20.0)  # 60 s audio → 0.3 s of processing
    data = _form("file", silent_wav(1.0), model="whisper-1", stream="true")
    headers = {"X-Sim-Audio-Seconds": "60"}
    arrivals: list[tuple[float, bytes]] = []
    async with session.post(sim.url + "/v1/audio/transcriptions", data=data, headers=headers) as r:
        assert r.status == 200
        assert r.content_type == "text/event-stream"
        opened = time.monotonic()
        async for line in r.content:
            if line.startswith(b"data: "):
                arrivals.append((time.monotonic() - opened, line[6:].strip()))
    events = [payload for _, payload in arrivals]
    assert events[-1] == b"[DONE]"
    assert len(events) == 13  # 12 segments of 5 s, then [DONE]
    assert json.loads(events[0])["text"] == "Segment 1 of 12."
    assert arrivals[-2][0] - arrivals[0][0] > 0.15  # spread over the processing time


# -- steering and error styles ------------------------------------------------------------

_OOM_STYLES = [
    (ErrorStyle.PYTORCH, "text/plain", "torch.OutOfMemoryError: CUDA out of memory. Tried to"),
    (ErrorStyle.FASTAPI, "application/json", '{"detail": "CUDA out of memory. Tried to'),
    (ErrorStyle.BARE, "text/plain", "Internal Server Error"),
    (ErrorStyle.CTRANSLATE2, "text/plain", "RuntimeError: CUDA failed with error out of memory"),
    (
        ErrorStyle.WHISPERCPP,
        "application/json",
        '{"error": "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 2048.00 MiB on '
        'device 0: cudaMalloc failed: out of memory"}',
    ),
    (ErrorStyle.OPENAI, "application/json", '{"error": {"message": "CUDA out of memory.'),
]


@pytest.mark.parametrize(("style", "content_type", "expected"), _OOM_STYLES)
async def test_forced_oom_in_each_error_style(
    start_sim: StartSim,
    session: aiohttp.ClientSession,
    style: ErrorStyle,
    content_type: str,
    expected: str,
) -> None:
    """X-Sim-Fail: oom answers 500 with that style's exact out-of-memory text."""
    sim = await start_sim(error_style=style)
    headers = {"X-Sim-Fail": "oom", "X-Sim-Audio-Seconds": "0"}
    status, got_headers, body = await _post(session, sim, "/asr", headers=headers)
    assert status == 500
    assert got_headers["Content-Type"] == f"{content_type}; charset=utf-8"
    if style in (ErrorStyle.BARE, ErrorStyle.CTRANSLATE2, ErrorStyle.WHISPERCPP):
        assert body == expected
    else:
        assert expected in body
    assert _state(sim)["ooms"] == 1


@pytest.mark.parametrize("style", list(ErrorStyle))
async def test_forced_error_is_not_out_of_memory(
    start_sim: StartSim, session: aiohttp.ClientSession, style: ErrorStyle
) -> None:
    """X-Sim-Fail: error answers a 500 whose text never says out of memory."""
    sim = await start_sim(error_style=style)
    status, _, body = await _post(session, sim, "/asr", headers={"X-Sim-Fail": "error"})
    assert status == 500
    assert "out of memory" not in body.lower()
    assert _state(sim)["errors"] == 1


async def test_forced_status_with_retry_after(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    """X-Sim-Status answers that status, and X-Sim-Retry-After adds Retry-After."""
    sim = await start_sim(error_style="openai")
    headers = {"X-Sim-Status": "429", "X-Sim-Retry-After": "7"}
    status, got, body = await _post(
        session, sim, "/v1/audio/transcriptions", field="file", headers=headers
    )
    assert status == 429
    assert got["Retry-After"] == "7"
    assert json.loads(body)["error"]["code"] == 429


async def test_bad_steering_header_is_a_400(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    """A misspelt X-Sim-Fail is refused loudly instead of being ignored."""
    sim = await start_sim()
    status, _, body = await _post(session, sim, "/asr", headers={"X-Sim-Fail": "explode"})
    assert status == 400
    assert "X-Sim-Fail" in body


async def test_hang_never_answers_until_the_client_leaves(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    """X-Sim-Fail: hang keeps the request open; when the client gives up the task ends."""
    sim = await start_sim()
    with pytest.raises(TimeoutError):
        await _post_with_deadline(session, sim, {"X-Sim-Fail": "hang"}, seconds=0.2)
    await until(lambda: _state(sim)["active_tasks"] == 0)
    assert _state(sim)["recent"][-1]["outcome"] == "hang"


async def _post_with_deadline(
    session: aiohttp.ClientSession, sim: Simulator, headers: Mapping[str, str], seconds: float
) -> None:
    data = _form("audio_file", silent_wav(1.0))
    timeouts = aiohttp.ClientTimeout(total=seconds)
    async with session.post(sim.url + "/asr", data=data, headers=headers, timeout=timeouts) as r:
        await r.read()


async def test_reset_mid_answer_cuts_the_body(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    """X-Sim-Fail: reset-mid-answer sends a 200 and part of the body, then resets."""
    sim = await start_sim()
    data = _form("audio_file", silent_wav(1.0))
    headers = {"X-Sim-Fail": "reset-mid-answer"}
    async with session.post(sim.url + "/asr", data=data, headers=headers) as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    assert _state(sim)["resets"] == 1


async def test_stall_when_busy_makes_health_wait_for_the_gpu(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    """With stall_when_busy, /health answers only once the running task is done."""
    sim = await start_sim(time_scale=20.0, stall_when_busy=True)
    task = asyncio.create_task(_post(session, sim, "/asr", headers={"X-Sim-Audio-Seconds": "60"}))
    await until(lambda: _state(sim)["gpu_jobs"] == 1)
    health = asyncio.create_task(session.get(sim.url + "/health"))
    await asyncio.sleep(0.05)
    assert not health.done()
    await task
    async with await health as response:
        assert response.status == 200
    assert task.done()


# -- a client that hangs up mid-task ------------------------------------------------------

ONE_MINUTE = {"X-Sim-Audio-Seconds": "60"}  # 6 GPU-seconds of work at the default rtf


async def _leave_mid_task(session: aiohttp.ClientSession, sim: Simulator) -> None:
    """Send a one-minute task, hang up once it is on the GPU, return when the sim noticed."""
    request = asyncio.create_task(_post(session, sim, "/asr", headers=ONE_MINUTE))
    await until(lambda: _state(sim)["gpu_jobs"] == 1)
    request.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await request
    await until(lambda: _state(sim)["recent"][0]["outcome"] == "client_left")


async def test_a_task_whose_client_left_keeps_working_and_counting_until_its_time_is_up(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    """By default a task whose client hung up stays active, on the GPU and in memory until done."""
    sim = await start_sim(time_scale=12.0)  # one minute of audio: 6 GPU-seconds, 0.5 s here
    loop = asyncio.get_running_loop()
    began = loop.time()
    await _leave_mid_task(session, sim)
    state = _state(sim)
    assert (state["active_tasks"], state["orphaned_tasks"], state["gpu_jobs"]) == (1, 1, 1)
    assert state["memory_used_gib"] == pytest.approx(8.8)
    # A task sent now shares the GPU with the abandoned one: two at once, as the server sees it.
    status, _, _ = await _post(session, sim, "/asr", headers={"X-Sim-Audio-Seconds": "1"})
    assert status == 200
    assert _state(sim)["max_active_seen"] == 2
    await until(lambda: _state(sim)["active_tasks"] == 0)
    assert loop.time() - began >= 0.5  # not before its work was done
    state = _state(sim)
    assert (state["orphaned_tasks"], state["gpu_jobs"], state["tasks_done"]) == (0, 0, 1)
    assert state["memory_used_gib"] == pytest.approx(6.0)


async def test_on_disconnect_stop_ends_the_task_with_its_connection(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    """With on_disconnect=stop a client that hangs up frees its place, GPU share and memory."""
    sim = await start_sim(time_scale=1.0, on_disconnect="stop")  # 6 s of work, never waited
    await _leave_mid_task(session, sim)
    state = _state(sim)
    assert (state["active_tasks"], state["orphaned_tasks"], state["gpu_jobs"]) == (0, 0, 0)
    assert state["memory_used_gib"] == pytest.approx(6.0)
    assert (await _post(session, sim, "/asr"))[0] == 200
    state = _state(sim)
    assert (state["max_active_seen"], state["tasks_done"]) == (1, 1)


async def test_stop_ends_the_work_of_clients_that_left(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    """Stopping the simulator ends work that outlived its client, leaving nothing behind."""
    sim = await start_sim(time_scale=1.0)  # 6 s of work, cut short by the stop
    await _leave_mid_task(session, sim)
    assert _state(sim)["orphaned_tasks"] == 1
    await sim.stop()
    state = _state(sim)
    assert (state["active_tasks"], state["orphaned_tasks"], state["gpu_jobs"]) == (0, 0, 0)
    assert state["memory_used_gib"] == pytest.approx(6.0)
    assert asyncio.all_tasks() == {asyncio.current_task()}


# -- crashes ------------------------------------------------------------------------------


async def _health_status(session: aiohttp.ClientSession, sim: Simulator) -> int | None:
    try:
        async with session.get(sim.url + "/health") as response:
            return response.status
    except aiohttp.ClientConnectorError:
        return None


async def test_crash_resets_connections_refuses_then_comes_back(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    """X-Sim-Fail: crash resets in-flight tasks, refuses connections, then listens again."""
    sim = await start_sim(time_scale=100.0, restart_seconds=40.0)  # down for 0.4 s
    port = sim.port
    running = asyncio.create_task(_post(session, sim, "/asr", headers=FIVE_MINUTES))
    await until(lambda: _state(sim)["gpu_jobs"] == 1)
    with pytest.raises(aiohttp.ClientConnectionError):
        await _post(session, sim, "/asr", headers={"X-Sim-Fail": "crash"})
    with pytest.raises(aiohttp.ClientConnectionError):
        await running
    assert _state(sim)["restarting"] is True
    assert await _health_status(session, sim) is None  # connection refused

    async def healthy() -> bool:
        return await _health_status(session, sim) == 200

    await until(healthy, every=0.02)
    state = _state(sim)
    assert sim.port == port
    assert (state["crashes"], state["restarting"], state["memory_used_gib"]) == (1, False, 6.0)
    assert [task["outcome"] for task in state["recent"]] == ["crash", "crash"]
    assert (await _post(session, sim, "/asr"))[0] == 200


async def test_crash_on_oom_takes_every_task_down(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    """With crash_on_oom, the task that does not fit resets all four connections."""
    sim = await start_sim(time_scale=100.0, crash_on_oom=True, restart_seconds=20.0)
    three = [
        asyncio.create_task(_post(session, sim, "/asr", headers=FIVE_MINUTES)) for _ in range(3)
    ]
    await until(lambda: _state(sim)["memory_used_gib"] == pytest.approx(24.0))
    with pytest.raises(aiohttp.ClientConnectionError):
        await _post(session, sim, "/asr", headers=FIVE_MINUTES)
    results = await asyncio.gather(*three, return_exceptions=True)
    assert all(isinstance(r, aiohttp.ClientConnectionError) for r in results)
    await until(lambda: not _state(sim)["restarting"])
    state = _state(sim)
    assert (state["ooms"], state["crashes"], state["memory_used_gib"]) == (1, 1, 6.0)
    assert await _health_status(session, sim) == 200


async def test_stop_during_work_leaves_no_tasks_behind(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    """Stopping with a hanging and a running request ends all of the simulator's work."""
    sim = await start_sim(time_scale=1.0, release_delay=100.0)
    requests = [
        asyncio.create_task(_post(session, sim, "/asr", headers={"X-Sim-Fail": "hang"})),
        asyncio.create_task(_post(session, sim, "/asr", headers=FIVE_MINUTES)),
    ]
    await until(lambda: _state(sim)["active_tasks"] == 2)
    began = time.monotonic()
    await sim.stop()
    assert time.monotonic() - began < 1.0
    results = await asyncio.gather(*requests, return_exceptions=True)
    assert all(isinstance(r, aiohttp.ClientConnectionError) for r in results)
    assert asyncio.all_tasks() == {asyncio.current_task()}


# -- command line -------------------------------------------------------------------------


def test_cli_flags_build_the_config_and_describe_the_card() -> None:
    """`gatekeeper sim` flags map onto SimConfig, and the banner tells the memory story."""
    parser = argparse.ArgumentParser()
    add_sim_arguments(parser)
    defaults = parser.parse_args([])
    assert (defaults.host, defaults.port) == ("127.0.0.1", 9000)
    assert config_from_args(defaults) == SimConfig()
    assert SimConfig().on_disconnect is OnDisconnect.CONTINUE
    assert describe(SimConfig()).startswith(
        "24 GiB card, 6 GiB reserved, a task needs 2.0 GiB + 0.8 GiB per audio minute"
    )
    args = parser.parse_args(
        ["--total-gib", "16", "--error-style", "bare", "--crash-on-oom", "--seed", "7"]
    )
    config = config_from_args(args)
    assert (config.total_gib, config.error_style, config.crash_on_oom, config.seed) == (
        16.0,
        ErrorStyle.BARE,
        True,
        7,
    )
    stopping = config_from_args(parser.parse_args(["--on-disconnect", "stop"]))
    assert stopping.on_disconnect is OnDisconnect.STOP
    assert describe(stopping).endswith(", stops a task whose client left")


def test_on_disconnect_accepts_only_continue_or_stop() -> None:
    """SimConfig takes on_disconnect by name and refuses anything else."""
    assert SimConfig(on_disconnect="stop").on_disconnect is OnDisconnect.STOP  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pause"):
        SimConfig(on_disconnect="pause")  # type: ignore[arg-type]
