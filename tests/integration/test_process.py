"""The real `gatekeeper serve` process: start-up, SIGTERM drain, and exit status."""

import asyncio
import gzip
import json
import signal

import aiohttp

from tests.fakes import FakeUpstream
from tests.processes import free_port, gatekeeper_process, sim_process
from tests.waiting import until


async def _post(
    session: aiohttp.ClientSession, url: str, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    async with session.post(url, data=b"audio", headers=headers) as response:
        return response.status, dict(response.headers), await response.read()


async def _shows(session: aiohttp.ClientSession, url: str, **expected: object) -> bool:
    """True when the JSON document at `url` (/health, /stats) has these values."""
    async with session.get(url) as response:
        doc = await response.json()
    return all(doc[name] == value for name, value in expected.items())


async def _answers(session: aiohttp.ClientSession, url: str, status: int) -> bool:
    async with session.get(url) as response:
        return response.status == status


async def test_sigterm_drains_running_and_queued_tasks(upstream: FakeUpstream) -> None:
    """On SIGTERM new tasks get 503 shutting_down, running and queued ones finish, exit 0."""
    async with gatekeeper_process(
        upstream.url, "--max-concurrent", "1", "--shutdown-grace", "20"
    ) as (proc, base):
        async with aiohttp.ClientSession() as session:
            running = asyncio.create_task(_post(session, f"{base}/asr", **{"X-Fake-Hold": "h"}))
            await upstream.wait_active(1)
            queued = asyncio.create_task(_post(session, f"{base}/asr", **{"X-Request-ID": "q"}))
            await until(lambda: _shows(session, f"{base}/health", queued_tasks=1), every=0.02)
            proc.send_signal(signal.SIGTERM)
            await until(lambda: _shows(session, f"{base}/health", shutting_down=True), every=0.02)
            status, headers, body = await _post(session, f"{base}/asr")
            assert status == 503
            assert headers["X-Gatekeeper-Reason"] == "shutting_down"
            assert json.loads(body)["error"] == "服务繁忙"
            async with session.get(f"{base}/docs") as response:
                assert response.status == 200  # other paths still pass while draining
            upstream.release("h")
            assert (await running)[0] == 200
            assert (await queued)[0] == 200
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        assert proc.stderr is not None
        log = (await proc.stderr.read()).decode()
    assert "[ASR并发] 收到停止信号，等待任务完成" in log
    assert "[ASR并发] 网关已停止" in log
    assert upstream.max_active == 1


async def test_grace_period_ends_with_503_for_the_queue(upstream: FakeUpstream) -> None:
    """When the grace period runs out, queued tasks get 503 shutting_down, and so does a task
    still upstream (with how many attempts it made); then the process exits."""
    async with gatekeeper_process(
        upstream.url, "--max-concurrent", "1", "--shutdown-grace", "0.5"
    ) as (proc, base):
        async with aiohttp.ClientSession() as session:
            running = asyncio.create_task(_post(session, f"{base}/asr", **{"X-Fake-Hold": "never"}))
            await upstream.wait_active(1)
            queued = asyncio.create_task(_post(session, f"{base}/asr"))
            await until(lambda: _shows(session, f"{base}/health", queued_tasks=1), every=0.02)
            proc.send_signal(signal.SIGTERM)
            status, headers, _ = await asyncio.wait_for(queued, 10)
            assert status == 503
            assert headers["X-Gatekeeper-Reason"] == "shutting_down"
            status, headers, body = await asyncio.wait_for(running, 10)
            assert status == 503
            assert headers["X-Gatekeeper-Reason"] == "shutting_down"
            assert headers["X-Gatekeeper-Attempts"] == "1"
            assert json.loads(body)["error"] == "服务繁忙"
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        assert proc.stderr is not None
        log = (await proc.stderr.read()).decode()
    assert "stopped_running=1" in log


async def test_second_signal_exits_at_once(upstream: FakeUpstream) -> None:
    """A second SIGTERM skips the grace period."""
    async with (
        gatekeeper_process(upstream.url, "--max-concurrent", "1", "--shutdown-grace", "60") as (
            proc,
            base,
        ),
        aiohttp.ClientSession() as session,
    ):
        running = asyncio.create_task(_post(session, f"{base}/asr", **{"X-Fake-Hold": "never"}))
        await upstream.wait_active(1)
        proc.send_signal(signal.SIGTERM)
        # It says so over HTTP, so it is alive and past the signal.
        await until(lambda: _shows(session, f"{base}/health", shutting_down=True), every=0.02)
        assert proc.returncode is None  # still draining
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        running.cancel()


async def test_upstream_down_at_start_then_recovers() -> None:
    """Started with the Whisper server down: degraded, 502 after retries, healthy once it is up."""
    port = free_port()
    upstream = f"http://127.0.0.1:{port}"
    async with gatekeeper_process(
        upstream, "--max-retries", "1", "--retry-delay", "0.05", "--health-interval", "0.1"
    ) as (_, base):
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/health") as response:
                assert response.status == 503
                assert (await response.json())["upstream"]["state"] in ("down", "unknown")
            status, headers, body = await _post(session, f"{base}/asr")
            assert status == 502
            assert headers["X-Gatekeeper-Attempts"] == "2"
            assert json.loads(body)["reason"] == "crash"
            async with sim_process(port=port):
                await until(lambda: _answers(session, f"{base}/health", 200), within=10, every=0.02)
                form = aiohttp.FormData()
                form.add_field("audio_file", b"RIFF", filename="a.wav")
                async with session.post(f"{base}/asr", data=form) as response:
                    assert response.status == 200


async def test_upload_still_running_when_grace_ends_gets_503(upstream: FakeUpstream) -> None:
    """A task still sending its body when the grace period ends is answered 503 shutting_down."""
    async with (
        gatekeeper_process(upstream.url, "--shutdown-grace", "0.5") as (proc, base),
        aiohttp.ClientSession() as session,
    ):
        port = int(base.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /asr HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nhalf")
        await writer.drain()
        await until(lambda: _shows(session, f"{base}/stats", uploading_tasks=1), every=0.02)
        proc.send_signal(signal.SIGTERM)
        answer = await asyncio.wait_for(reader.read(65536), 10)
        writer.close()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
    assert b"X-Gatekeeper-Reason: shutting_down" in answer
    assert upstream.seen == []


async def test_runs_on_uvloop_unless_told_otherwise(upstream: FakeUpstream) -> None:
    """uvloop (a dependency) by default, Python's own loop with ASR_EVENT_LOOP=asyncio; the
    serving line says which, and tasks pass on both."""
    packed = gzip.compress(b"RIFF" + bytes(100_000))
    for args, loop in (((), "uvloop"), (("--event-loop", "asyncio"), "asyncio")):
        async with gatekeeper_process(upstream.url, *args) as (proc, base):
            async with aiohttp.ClientSession() as session:
                status, headers, _ = await _post(session, f"{base}/asr")
                assert status == 200
                assert headers["X-Gatekeeper-Attempts"] == "1"
                # A compressed upload goes upstream as sent (the server never inflates it).
                async with session.post(
                    f"{base}/asr", data=packed, headers={"Content-Encoding": "gzip"}
                ) as response:
                    assert response.status == 200
                    assert (await response.json())["size"] == len(packed)
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 15) == 0
            assert proc.stderr is not None
            log = (await proc.stderr.read()).decode()
        serving = next(line for line in log.splitlines() if "网关已启动" in line)
        assert f"event_loop={loop}" in serving, serving
