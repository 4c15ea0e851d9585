"""The real `gatekeeper serve` process: start-up, SIGTERM drain, and exit status."""

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp

from tests.fakes import FakeUpstream


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def gatekeeper_process(
    upstream_url: str, *args: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """Run `python -m gatekeeper serve` on a free port until it listens."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASR_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gatekeeper",
        "serve",
        "--upstream-url",
        upstream_url,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--env-file",
        os.devnull,
        *args,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with asyncio.timeout(20):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.close()
                    break
                except OSError:
                    assert proc.returncode is None, "gatekeeper exited during start-up"
                    await asyncio.sleep(0.05)
        yield proc, base
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _post(
    session: aiohttp.ClientSession, url: str, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    async with session.post(url, data=b"audio", headers=headers) as response:
        return response.status, dict(response.headers), await response.read()


async def test_sigterm_drains_running_and_queued_tasks(upstream: FakeUpstream) -> None:
    """On SIGTERM new tasks get 503 shutting_down, running and queued ones finish, exit 0."""
    async with gatekeeper_process(
        upstream.url, "--max-concurrent", "1", "--shutdown-grace", "20"
    ) as (proc, base):
        async with aiohttp.ClientSession() as session:
            running = asyncio.create_task(_post(session, f"{base}/asr", **{"X-Fake-Hold": "h"}))
            await upstream.wait_active(1)
            queued = asyncio.create_task(_post(session, f"{base}/asr", **{"X-Request-ID": "q"}))
            await asyncio.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
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
    """When the grace period runs out, queued tasks get 503 shutting_down and the process exits."""
    async with gatekeeper_process(
        upstream.url, "--max-concurrent", "1", "--shutdown-grace", "0.5"
    ) as (proc, base):
        async with aiohttp.ClientSession() as session:
            running = asyncio.create_task(_post(session, f"{base}/asr", **{"X-Fake-Hold": "never"}))
            await upstream.wait_active(1)
            queued = asyncio.create_task(_post(session, f"{base}/asr"))
            await asyncio.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            status, headers, _ = await asyncio.wait_for(queued, 10)
            assert status == 503
            assert headers["X-Gatekeeper-Reason"] == "shutting_down"
            with contextlib.suppress(aiohttp.ClientError):
                await asyncio.wait_for(running, 10)  # cut when the grace period is over
        assert await asyncio.wait_for(proc.wait(), 15) == 0


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
        await asyncio.sleep(0.3)
        assert proc.returncode is None  # still draining
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        running.cancel()
