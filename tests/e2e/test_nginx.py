"""Real nginx with the shipped config in front of the real gatekeeper in front of the simulator.

Every test starts Debian's nginx on free loopback ports with `nginx/gatekeeper.conf` (or its
internal-stats variant) as shipped, only ports, paths and, where said, timeouts replaced
(tests/e2e/nginx_harness.py).
"""

import argparse
import asyncio
import hashlib
import json
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from gatekeeper.commands.check_config import (
    add_check_config_arguments,
    run_check_config,
    suggested_timeout,
)
from gatekeeper.commands.nginx_conf import nginx_proxied_locations
from gatekeeper.policy.budget import from_settings, task_budget
from gatekeeper.settings import load_settings
from tests.e2e.nginx_harness import INTERNAL_STATS_CONF, STOCK_CONF, NginxStack, nginx_stack
from tests.waiting import until

pytestmark = pytest.mark.e2e

SHIPPED = [pytest.param(STOCK_CONF, id="stock"), pytest.param(INTERNAL_STATS_CONF, id="internal")]
OWN_ENDPOINTS = ("/stats", "/api/recordings/stats/asr-concurrency", "/metrics")


async def _stats(session: aiohttp.ClientSession, base: str) -> dict[str, object]:
    async with session.get(f"{base}/stats") as response:
        assert response.status == 200
        data: dict[str, object] = await response.json()
        return data


async def _sim_recent(session: aiohttp.ClientSession, sim_url: str) -> list[dict[str, object]]:
    async with session.get(f"{sim_url}/sim/state") as response:
        state = await response.json()
    recent: list[dict[str, object]] = state["recent"]
    return recent


# -- the shipped files, read --------------------------------------------------------------------


@pytest.mark.parametrize("conf", SHIPPED)
def test_shipped_timeouts_outlast_the_gatekeepers_worst_case(conf: Path) -> None:
    """nginx's read and send timeouts exceed the gatekeeper's worst case at default settings."""
    settings = load_settings({"upstream_url": "http://whisper:9000"}, env_file=None)
    budget = from_settings(settings)
    locations = nginx_proxied_locations(conf.read_text(encoding="utf-8"))
    assert locations, "no location proxies to the gatekeeper"
    for loc in locations:
        where = f"{conf.name}:{loc.line} location {loc.location}"
        assert loc.read_timeout > budget.worst_case_with_retry_after, where
        assert loc.send_timeout > budget.worst_case_with_retry_after, where
        assert loc.client_max_body_size == settings.max_body_size, where


def _directives(text: str) -> str:
    """The config without comments and layout, the restricted stats locations removed."""
    text = re.sub(r"#[^\n]*", "", text)
    own = "|".join(re.escape(path) for path in OWN_ENDPOINTS)
    text = re.sub(rf"location\s*=\s*({own})\s*\{{[^}}]*\}}", "", text)
    return " ".join(text.split())


def test_internal_variant_differs_only_in_the_restricted_locations() -> None:
    """The internal-stats variant is the stock config plus the three restricted locations."""
    stock = STOCK_CONF.read_text(encoding="utf-8")
    internal = INTERNAL_STATS_CONF.read_text(encoding="utf-8")
    assert _directives(internal) == _directives(stock)
    for path in OWN_ENDPOINTS:
        block = re.search(rf"location = {re.escape(path)} \{{([^}}]*)\}}", internal)
        assert block, path
        rules = [line.strip() for line in block.group(1).splitlines() if line.strip()]
        assert rules == [
            "allow 127.0.0.1;",
            "allow 10.0.0.0/8;",
            "allow 172.16.0.0/12;",
            "allow 192.168.0.0/16;",
            "deny all;",
            "proxy_pass http://gatekeeper_upstream;",
        ]


def _check_config(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_check_config_arguments(parser)
    args = parser.parse_args(["--env-file", os.devnull, "--upstream-url", "http://w:9000", *argv])
    return run_check_config(args)


@pytest.mark.parametrize("conf", SHIPPED)
def test_check_config_accepts_the_shipped_file_at_default_settings(
    conf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`check-config --nginx-conf` passes the shipped file and prints the 2715 s upper bound."""
    assert _check_config("--nginx-conf", str(conf)) == 0
    out = capsys.readouterr().out
    assert "1958 s" in out
    assert "2715 s" in out
    assert "OK: " in out


def test_check_config_warns_when_scheme_c_outgrows_the_shipped_file(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With scheme C (5 retries, 15 s) the shipped 4000 s timeouts are too short: exit 1."""
    monkeypatch.setenv("ASR_MAX_RETRIES", "5")
    monkeypatch.setenv("ASR_RETRY_DELAY", "15")
    assert _check_config("--nginx-conf", str(STOCK_CONF)) == 1
    captured = capsys.readouterr()
    assert "5104.5 s" in captured.out
    assert "TOO SHORT" in captured.out
    assert "WARNING" in captured.err
    assert "5700s" in captured.err


def test_check_config_refuses_bad_settings_like_serve(capsys: pytest.CaptureFixture[str]) -> None:
    """A bad setting stops check-config with status 2 and the same line `serve` prints."""
    assert _check_config("--max-retries", "-1", "--proxy-timeout", "1h") == 2
    assert "ASR_MAX_RETRIES (--max-retries)=-1 is invalid" in capsys.readouterr().err


# -- live: backend (this test) → nginx → gatekeeper → simulator ---------------------------------


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as client:
        yield client


async def until_active(session: aiohttp.ClientSession, stack: NginxStack, active: int) -> None:
    """Wait until the gatekeeper runs `active` tasks."""
    async with asyncio.timeout(10):
        # Polls /stats: the gatekeeper's state has no event a test process could wait on.
        while (await _stats(session, stack.gatekeeper_url))["active_tasks"] != active:  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def test_refusal_passes_through_unchanged(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A 503 queue_full reaches the backend through nginx with the gatekeeper's JSON and headers."""
    gk_args = ("--max-concurrent", "1", "--max-queue", "0")
    async with nginx_stack(tmp_path, gatekeeper_args=gk_args) as stack:
        busy = asyncio.create_task(
            session.post(f"{stack.nginx.url}/asr", data=b"x", headers={"X-Sim-Fail": "hang"})
        )
        try:
            await until_active(session, stack, 1)
            answers = []
            for base in (stack.nginx.url, stack.gatekeeper_url):
                async with session.post(f"{base}/asr", data=b"audio") as response:
                    answers.append(
                        (
                            response.status,
                            await response.json(),
                            {
                                name: response.headers.get(name)
                                for name in ("Retry-After", "X-Gatekeeper-Reason", "Content-Type")
                            },
                        )
                    )
        finally:
            busy.cancel()
    via_nginx, direct = answers
    assert via_nginx == direct
    status, body, headers = via_nginx
    assert status == 503
    assert body["error"] == "服务繁忙"
    assert body["reason"] == "queue_full"
    assert headers["X-Gatekeeper-Reason"] == "queue_full"
    assert headers["Retry-After"] == str(body["retry_after"])


_UPLOAD_SIZE = 100 * 1024 * 1024
_BOUNDARY = "nginx-e2e-boundary-7d1f0c"


async def _multipart(
    head: bytes, size: int, tail: bytes, digest: "hashlib._Hash"
) -> AsyncIterator[bytes]:
    """The body as it is generated: `size` audio bytes (1 MiB blocks, each numbered) hashed."""
    block = os.urandom(1024 * 1024)
    yield head
    sent = 0
    number = 0
    while sent < size:
        chunk = (number.to_bytes(8, "big") + block[8:])[: size - sent]
        digest.update(chunk)
        yield chunk
        sent += len(chunk)
        number += 1
    yield tail


async def test_large_upload_arrives_byte_exact(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A 100 MB upload goes backend → nginx → gatekeeper → Whisper with the same sha256."""
    head = (
        f"--{_BOUNDARY}\r\n"
        'Content-Disposition: form-data; name="audio_file"; filename="meeting.wav"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{_BOUNDARY}--\r\n".encode()
    digest = hashlib.sha256()
    async with nginx_stack(tmp_path, sim_args=("--time-scale", "100")) as stack:
        async with session.post(
            f"{stack.nginx.url}/asr?output=json",
            data=_multipart(head, _UPLOAD_SIZE, tail, digest),
            headers={
                "Content-Type": f"multipart/form-data; boundary={_BOUNDARY}",
                "Content-Length": str(len(head) + _UPLOAD_SIZE + len(tail)),
                "X-Sim-Audio-Seconds": "10",
            },
        ) as response:
            await response.read()
            assert response.status == 200
            assert response.headers["X-Sim-Audio-Bytes"] == str(_UPLOAD_SIZE)
            assert response.headers["X-Sim-Audio-Sha256"] == digest.hexdigest()


async def test_streamed_answer_passes_chunk_by_chunk(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Server-sent events reach the backend one by one as Whisper produces them, not at the end."""
    form = aiohttp.FormData()
    form.add_field("file", b"RIFF....", filename="a.wav", content_type="audio/wav")
    form.add_field("model", "whisper-1")
    form.add_field("stream", "true")
    loop = asyncio.get_running_loop()
    arrivals: list[float] = []
    # 60 s of audio: 12 segments over 1.5 s of simulated GPU work (time ×4).
    async with nginx_stack(tmp_path, sim_args=("--time-scale", "4")) as stack:
        async with session.post(
            f"{stack.nginx.url}/v1/audio/transcriptions",
            data=form,
            headers={"X-Sim-Audio-Seconds": "60"},
        ) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            assert "Content-Encoding" not in response.headers
            events = []
            async for line in response.content:
                if line.startswith(b"data: "):
                    arrivals.append(loop.time())
                    events.append(line[6:].strip())
    assert events[-1] == b"[DONE]"
    segments = [json.loads(event) for event in events[:-1]]
    assert [s["id"] for s in segments] == list(range(12))
    # Buffered, all 13 events would arrive within a few milliseconds of each other.
    assert arrivals[-1] - arrivals[0] > 0.8
    assert len({round(t, 2) for t in arrivals}) >= 8


async def test_request_id_is_the_same_at_backend_gatekeeper_and_whisper(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """One X-Request-ID (nginx's when the backend sends none) is in every answer and log."""
    async with nginx_stack(tmp_path, sim_args=("--time-scale", "100")) as stack:
        for answered, sent in enumerate((None, "backend-trace-42"), start=1):
            headers = {"X-Sim-Audio-Seconds": "1"}
            if sent is not None:
                headers["X-Request-ID"] = sent
            async with session.post(
                f"{stack.nginx.url}/asr", data=_audio_form(), headers=headers
            ) as response:
                assert response.status == 200
                request_id = response.headers["X-Request-ID"]
            if sent is None:
                assert re.fullmatch(r"[0-9a-f]{32}", request_id), request_id  # nginx $request_id
            else:
                assert request_id == sent
            recent = await _sim_recent(session, stack.sim_url)
            assert recent[-1]["request_id"] == request_id
            await stack.gatekeeper_log.wait_for("[ASR并发]", f"task_id={request_id}")

            def logged(lines: int = answered) -> bool:
                # nginx writes its access log line just after the answer has gone out.
                return len(stack.nginx.access_log.splitlines()) >= lines

            await until(logged)
            assert f"request_id={request_id}" in stack.nginx.access_log.splitlines()[-1]


def _audio_form() -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("audio_file", b"audio", filename="a.wav")
    return form


async def _queued_then_retried(directory: Path, proxy_timeout: float) -> tuple[int, str, float]:
    """Run one task behind another so it queues, hits an OOM and succeeds on its retry.

    Returns (status, X-Gatekeeper-Attempts or "", seconds) of the second task as nginx
    answered it.
    """
    # Simulator ×60: 600 s of audio is 1 s of GPU work and needs 10 of the 18 free GiB, so
    # two do not fit; a finished task keeps its memory for 0.5 s (release delay 30 story s).
    sim_args = ("--time-scale", "60", "--release-delay", "30")
    async with (
        nginx_stack(
            directory,
            sim_args=sim_args,
            gatekeeper_args=_SCALED_ARGS,
            proxy_timeout=f"{round(proxy_timeout * 1000)}ms",
        ) as stack,
        aiohttp.ClientSession() as session,
    ):
        headers = {"X-Sim-Audio-Seconds": "600"}
        first = asyncio.create_task(
            session.post(f"{stack.nginx.url}/asr", data=_audio_form(), headers=headers)
        )
        try:
            await until_active(session, stack, 1)
            loop = asyncio.get_running_loop()
            started = loop.time()
            async with session.post(
                f"{stack.nginx.url}/asr", data=_audio_form(), headers=headers
            ) as response:
                await response.read()
                elapsed = loop.time() - started
                return (
                    response.status,
                    response.headers.get("X-Gatekeeper-Attempts", ""),
                    elapsed,
                )
        finally:
            (await first).close()


# The gatekeeper scaled down: queue 2 s, attempts 1.5 s, 2 retries, delays 1 s and 3 s exactly.
_SCALED_BUDGET = task_budget(
    queue_timeout=2.0,
    request_timeout=1.5,
    max_retries=2,
    retry_delay=1.0,
    retry_jitter=0.0,
    oom_cooldown=1.5,
)
_SCALED_ARGS = (
    "--max-concurrent", "1",
    "--queue-timeout", "2", "--request-timeout", "1.5",
    "--max-retries", "2", "--retry-delay", "1", "--retry-jitter", "0",
)  # fmt: skip


async def test_nginx_waits_out_a_queued_then_retried_task(tmp_path: Path) -> None:
    """nginx timed from the budget delivers a queued-then-retried task that one timed like a
    single attempt cuts off with its own 504."""
    budget = _SCALED_BUDGET
    # The simulator sends no Retry-After, so the worst case without it is the bound here.
    from_budget = suggested_timeout(budget.worst_case)
    naive = budget.request_timeout
    (
        (ok_status, ok_attempts, ok_elapsed),
        (cut_status, cut_attempts, cut_elapsed),
    ) = await asyncio.gather(
        _queued_then_retried(tmp_path / "budget", from_budget),
        _queued_then_retried(tmp_path / "naive", naive),
    )
    assert (ok_status, ok_attempts) == (200, "2")
    assert naive < ok_elapsed < budget.worst_case
    assert (cut_status, cut_attempts) == (504, "")  # nginx's own 504, not the gatekeeper's
    assert cut_elapsed == pytest.approx(naive, abs=0.5)


async def test_internal_variant_restricts_stats_to_internal_networks(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """/stats, its alias and /metrics answer 127.0.0.1 but refuse 127.0.0.2; tasks pass both."""
    outside = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with (
        nginx_stack(
            tmp_path, sim_args=("--time-scale", "100"), source=INTERNAL_STATS_CONF
        ) as stack,
        aiohttp.ClientSession(connector=outside) as stranger,
    ):
        base = stack.nginx.url
        for path in OWN_ENDPOINTS:
            async with session.get(f"{base}{path}") as response:
                assert response.status == 200, path
            async with stranger.get(f"{base}{path}") as response:
                assert response.status == 403, path
        # nginx decodes and normalises before matching, as the gatekeeper's router decodes.
        for raw in ("/%73tats", "//stats"):
            async with stranger.get(URL(f"{base}{raw}", encoded=True)) as response:
                assert response.status == 403, raw
        for client in (session, stranger):
            async with client.post(
                f"{base}/asr", data=_audio_form(), headers={"X-Sim-Audio-Seconds": "1"}
            ) as response:
                assert response.status == 200
