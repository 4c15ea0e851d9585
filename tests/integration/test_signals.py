"""Stopping `gatekeeper serve` with signals: what the log says, and in which order (issue #13)."""

import asyncio
import json
import signal

import aiohttp

from tests.fakes import FakeUpstream
from tests.processes import gatekeeper_process

DRAINING = "[ASR并发] 收到停止信号，等待任务完成"
HURRY = "[ASR并发] 再次收到停止信号，不再等待"
STOPPED = "[ASR并发] 网关已停止"


async def _post(session: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, str]:
    async with session.post(url, data=b"audio", headers=headers) as response:
        await response.read()
        return response.status, response.headers.get("X-Gatekeeper-Reason", "")


async def _stats(session: aiohttp.ClientSession, base: str) -> dict[str, int]:
    async with session.get(f"{base}/stats") as response:
        doc: dict[str, int] = json.loads(await response.read())
        return doc


async def _read_until(stream: asyncio.StreamReader, words: str, seen: list[str]) -> None:
    """Collect log lines into `seen` until one holds `words` (fail after 10 s)."""
    async with asyncio.timeout(10):
        while True:
            line = (await stream.readline()).decode()
            assert line, f"the log ended before {words!r}: {seen}"
            seen.append(line.rstrip("\n"))
            if words in line:
                return


async def test_second_signal_says_so_and_the_stop_line_comes_last(upstream: FakeUpstream) -> None:
    """A second SIGTERM logs its own line (the grace is skipped), not the first one's again;
    the stop line is the last one, after every refusal, and finds nothing active or queued."""
    async with gatekeeper_process(
        upstream.url, "--max-concurrent", "1", "--shutdown-grace", "60"
    ) as (proc, base):
        assert proc.stderr is not None
        lines: list[str] = []
        async with aiohttp.ClientSession() as session:
            running = asyncio.create_task(_post(session, f"{base}/asr", **{"X-Fake-Hold": "never"}))
            await upstream.wait_active(1)
            queued = asyncio.create_task(_post(session, f"{base}/asr"))
            reader, writer = await _upload_under_way(base)
            await _until_stats(session, base, queued_tasks=1, uploading_tasks=1)
            proc.send_signal(signal.SIGTERM)
            await _read_until(proc.stderr, DRAINING, lines)
            proc.send_signal(signal.SIGTERM)
            answers = await asyncio.wait_for(asyncio.gather(running, queued), 15)
            uploader = await asyncio.wait_for(reader.read(), 15)
            writer.close()
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        lines += (await proc.stderr.read()).decode().splitlines()
    assert answers == [(503, "shutting_down"), (503, "shutting_down")]
    assert uploader.startswith(b"HTTP/1.1 503"), uploader[:200]
    ours = [line for line in lines if "[ASR并发]" in line]
    assert sum(DRAINING in line for line in ours) == 1, ours
    assert sum(HURRY in line for line in ours) == 1, ours
    _stopped_last(ours)


async def test_stop_line_comes_last_when_the_grace_runs_out(upstream: FakeUpstream) -> None:
    """When the grace period ends with an upload still under way, its refusal is logged before
    the stop line, which is the last one."""
    async with gatekeeper_process(upstream.url, "--shutdown-grace", "0.3") as (proc, base):
        assert proc.stderr is not None
        async with aiohttp.ClientSession() as session:
            reader, writer = await _upload_under_way(base)
            await _until_stats(session, base, uploading_tasks=1)
        proc.send_signal(signal.SIGTERM)
        uploader = await asyncio.wait_for(reader.read(), 15)
        writer.close()
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        lines = (await proc.stderr.read()).decode().splitlines()
    assert uploader.startswith(b"HTTP/1.1 503"), uploader[:200]
    ours = [line for line in lines if "[ASR并发]" in line]
    assert any("服务正在关闭，拒绝任务" in line for line in ours), ours
    _stopped_last(ours)


async def _upload_under_way(base: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A task whose client has sent 4 of its 1000 bytes."""
    port = int(base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /asr HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nhalf")
    await writer.drain()
    return reader, writer


async def _until_stats(session: aiohttp.ClientSession, base: str, **expected: int) -> None:
    async with asyncio.timeout(10):
        while True:
            doc = await _stats(session, base)
            if all(doc[name] == value for name, value in expected.items()):
                return
            await asyncio.sleep(0.02)


def _stopped_last(ours: list[str]) -> None:
    assert STOPPED in ours[-1], ours
    assert " active=0 " in ours[-1] + " ", ours[-1]
    assert " queued=0" in ours[-1] + " ", ours[-1]
