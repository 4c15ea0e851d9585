"""A real Whisper (faster-whisper-server, Whisper base, CPU int8) behind the gatekeeper.

Speech is made by espeak-ng at test time; nothing is fetched from a model hub. Run alone with
`pytest -m whisper -s` (-s shows the transcripts and timings). Needs `./scripts/setup
--test-tools`, which installs the server into .venv-whisper; without it these tests fail.

The gatekeeper (and nginx) must hand back the Whisper server's answer unchanged, so each answer
through them is compared with the server's own answer to the same bytes, asked directly. What
Whisper base hears in espeak-ng's voice depends on the builds of both, so the spoken words are
only a loose sanity check: at least half of them must be in the text.
"""

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from tests.e2e.nginx_harness import Nginx, nginx_process
from tests.e2e.whisper_server import (
    SETUP_HINT,
    WhisperServer,
    missing_tools,
    speak,
    transcribe,
    whisper_server,
)
from tests.processes import free_port, gatekeeper_process
from tests.waiting import until

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.whisper,
    pytest.mark.asyncio(loop_scope="module"),
]

# Each sentence, with words the sanity check looks for in the transcript.
WEATHER = (
    "Please transcribe this sentence about the weather in Paris tomorrow.",
    {"transcribe", "sentence", "weather", "paris", "tomorrow"},
)
LIGHTHOUSE = (
    "The lighthouse keeper climbed the narrow stairs and lit the great lamp above the harbour"
    " every evening.",
    {"lighthouse", "keeper", "stairs", "lamp", "evening"},
)
BUSES = (
    "Seven green buses drove slowly across the old stone bridge into the quiet village"
    " before sunrise.",
    {"seven", "green", "buses", "bridge", "village", "sunrise"},
)


@dataclass
class Whisper:
    server: WhisperServer
    clips: dict[str, Path]
    direct: dict[str, Any]  # the server's own answer to each clip, asked without the gatekeeper


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def whisper(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Whisper]:
    """One faster-whisper-server for the module, warmed up, and the spoken clips."""
    if missing := missing_tools():
        pytest.fail(f"the real-Whisper tests need {', '.join(missing)}: {SETUP_HINT}")
    work = tmp_path_factory.mktemp("whisper")
    started = time.perf_counter()
    clips = {
        name: speak(text, work / f"{name}.wav")
        for name, (text, _) in {
            "weather": WEATHER,
            "lighthouse": LIGHTHOUSE,
            "buses": BUSES,
        }.items()
    }
    async with whisper_server(work) as server:
        print(
            f"\n[whisper] up and warm in {time.perf_counter() - started:.2f}s"
            f" (first request, model load included: {server.warm_up_seconds:.2f}s,"
            f" heard {server.warm_up_text!r})"
        )
        # The reference answers, each asked twice: comparing with them needs a server that
        # answers the same bytes the same way, and this says so if it does not.
        direct: dict[str, Any] = {}
        async with aiohttp.ClientSession() as session:
            for name, clip in clips.items():
                first, again = [await transcribe(session, server.url, clip) for _ in range(2)]
                assert first[0] == 200, f"the server itself answered {first} to {name}.wav"
                assert first == again, (
                    f"the server answered {name}.wav twice differently: {first} {again}"
                )
                direct[name] = first[1]
        yield Whisper(server, clips, direct)


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", text.lower()))


def assert_passed_through(body: Any, direct: Any, expected: set[str]) -> str:
    """`body`, the answer through the gatekeeper (and nginx), is the server's direct answer to
    the same bytes, and has at least half of the `expected` words; its text."""
    assert body == direct, f"through the front: {body!r}\nfrom the server itself: {direct!r}"
    assert isinstance(body, dict), body
    text: str = body["text"]
    heard = expected & words(text)
    assert 2 * len(heard) >= len(expected), (
        f"heard only {sorted(heard)} of {sorted(expected)} in {text!r}"
    )
    return text


@dataclass
class Window:
    request_id: str
    start: float
    end: float = 0.0


@dataclass
class UpstreamTap:
    """A pass-through in front of the Whisper server that records, at the upstream's door, the
    time window of every request and the most requests it ever had in flight at once."""

    upstream: str
    windows: list[Window] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        window = Window(request.headers.get("X-Request-ID", "?"), time.perf_counter())
        self.windows.append(window)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in {"host", "content-length", "transfer-encoding", "connection"}
        }
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.request(
                    request.method, self.upstream + request.path_qs, data=body, headers=headers
                ) as resp,
            ):
                payload = await resp.read()
                content_type = resp.headers.get("Content-Type", "application/octet-stream")
                return web.Response(
                    status=resp.status, body=payload, headers={"Content-Type": content_type}
                )
        finally:
            self.in_flight -= 1
            window.end = time.perf_counter()


@pytest_asyncio.fixture(loop_scope="module")
async def tap(whisper: Whisper) -> AsyncIterator[tuple[UpstreamTap, str]]:
    """An UpstreamTap in front of the module's Whisper server, on a free port."""
    recorder = UpstreamTap(whisper.server.url)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recorder.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield recorder, f"http://127.0.0.1:{port}"
    await runner.cleanup()


@dataclass
class Front:
    url: str  # where the backend sends its uploads
    gatekeeper: str
    nginx: Nginx | None

    async def check_passed_nginx(self, uploads: int) -> None:
        if self.nginx is not None:
            nginx, line = self.nginx, '"POST /v1/audio/transcriptions HTTP/1.1" 200'
            # nginx writes its access-log line after the answer has gone: poll for it.
            with contextlib.suppress(TimeoutError):
                await until(lambda: nginx.access_log.count(line) >= uploads)
            assert nginx.access_log.count(line) == uploads, nginx.access_log


@asynccontextmanager
async def front(via: str, upstream: str, directory: Path) -> AsyncIterator[Front]:
    """`gatekeeper serve --max-concurrent 1` in front of `upstream`, and the shipped nginx config
    in front of the gatekeeper when `via` is "nginx"."""
    async with gatekeeper_process(upstream, "--max-concurrent", "1") as (_, gatekeeper):
        if via == "nginx":
            async with nginx_process(gatekeeper, directory / "nginx") as nginx:
                yield Front(nginx.url, gatekeeper, nginx)
        else:
            yield Front(gatekeeper, gatekeeper, None)


VIA = pytest.mark.parametrize("via", ["gatekeeper", "nginx"])


@VIA
async def test_transcription_comes_back_with_the_spoken_words(
    whisper: Whisper, via: str, tmp_path: Path
) -> None:
    """An OpenAI-style upload through the gatekeeper (and nginx) gets the server's own answer."""
    async with (
        front(via, whisper.server.url, tmp_path) as entry,
        aiohttp.ClientSession() as session,
    ):
        started = time.perf_counter()
        status, body = await transcribe(session, entry.url, whisper.clips["weather"])
        took = time.perf_counter() - started
        await entry.check_passed_nginx(1)
    assert status == 200, body
    text = assert_passed_through(body, whisper.direct["weather"], WEATHER[1])
    print(f"\n[whisper via {via}] said:  {WEATHER[0]!r}")
    print(f"[whisper via {via}] heard: {text!r} in {took:.2f}s")


@VIA
async def test_two_uploads_are_served_one_after_the_other(
    whisper: Whisper, tap: tuple[UpstreamTap, str], via: str, tmp_path: Path
) -> None:
    """With ASR_MAX_CONCURRENT=1, two concurrent uploads reach the Whisper server one at a time."""
    recorder, upstream = tap
    samples: list[dict[str, Any]] = []
    done: dict[str, float] = {}

    async with front(via, upstream, tmp_path) as entry, aiohttp.ClientSession() as session:

        async def upload(name: str) -> tuple[int, Any]:
            clip = whisper.clips[name]
            answer = await transcribe(session, entry.url, clip, {"X-Request-ID": name})
            done[name] = time.perf_counter() - started
            return answer

        async def watch_stats() -> None:
            while True:
                async with session.get(f"{entry.gatekeeper}/stats") as resp:
                    samples.append(await resp.json())
                await asyncio.sleep(0.02)

        watcher = asyncio.create_task(watch_stats())
        try:
            started = time.perf_counter()
            first = asyncio.create_task(upload("lighthouse"))
            await asyncio.sleep(0.05)  # both are in flight together; the order is fixed
            second = asyncio.create_task(upload("buses"))
            (status1, body1), (status2, body2) = await asyncio.gather(first, second)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        async with session.get(f"{entry.gatekeeper}/stats") as resp:
            final = await resp.json()
        await entry.check_passed_nginx(2)

    assert (status1, status2) == (200, 200), (body1, body2)
    text1 = assert_passed_through(body1, whisper.direct["lighthouse"], LIGHTHOUSE[1])
    text2 = assert_passed_through(body2, whisper.direct["buses"], BUSES[1])

    # At the Whisper server's door: one request at a time, the second after the first ended.
    windows = [(w.request_id, w.start - started, w.end - started) for w in recorder.windows]
    assert [w[0] for w in windows] == ["lighthouse", "buses"], windows
    assert recorder.max_in_flight == 1, windows
    (_, start1, end1), (_, start2, end2) = windows
    assert start2 >= end1, windows
    # The gatekeeper held the second in its queue while the first ran, and never ran two.
    assert any(s["active_tasks"] == 1 and s["queued_tasks"] == 1 for s in samples), samples
    assert max(s["active_tasks"] for s in samples) == 1
    assert final["total_tasks"] == 2
    assert final["succeeded_tasks"] == 2
    assert final["upstream_attempts"]["ok"] == 2, final
    # The second answer came about one whole transcription after the first.
    one_transcription = min(end1 - start1, end2 - start2)
    assert done["buses"] - done["lighthouse"] >= 0.8 * one_transcription, (done, windows)

    print(
        f"\n[whisper via {via}] heard 1: {text1!r}\n[whisper via {via}] heard 2: {text2!r}"
        f"\n[whisper via {via}] upstream windows (s from the start): 1 {start1:.2f}-{end1:.2f},"
        f" 2 {start2:.2f}-{end2:.2f}; answers at {done['lighthouse']:.2f} and"
        f" {done['buses']:.2f}; /stats showed active 1 + queued 1 in"
        f" {sum(s['active_tasks'] == 1 and s['queued_tasks'] == 1 for s in samples)}"
        f"/{len(samples)} samples"
    )
