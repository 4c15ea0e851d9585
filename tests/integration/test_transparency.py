"""Bytes in = bytes out: bodies, paths, query strings and headers cross the proxy unchanged."""

import asyncio
import gzip
import hashlib
import io
import json
import os

import aiohttp

from gatekeeper.app import STATE
from gatekeeper.policy.outcomes import HoldEnd
from tests.conftest import GatekeeperFactory
from tests.fakes import GZIP_BODY, FakeUpstream
from tests.waiting import until


async def test_50mb_multipart_upload_arrives_byte_exact(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """A 50 MB multipart upload reaches the upstream with the same sha256 (spooled to disk)."""
    base, _ = await start_gatekeeper(upstream.url)
    audio = os.urandom(50 * 1024 * 1024)
    boundary = "gatekeeper-test-boundary"
    raw = (
        (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="audio_file"; filename="meeting.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n"
        ).encode()
        + audio
        + f"\r\n--{boundary}--\r\n".encode()
    )
    content_type = f"multipart/form-data; boundary={boundary}"
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{base}/asr?output=json",
            data=io.BytesIO(raw),
            headers={"Content-Type": content_type},
        ) as response,
    ):
        assert response.status == 200
        answer = await response.json()
    assert answer["sha256"] == hashlib.sha256(raw).hexdigest()
    assert answer["size"] == len(raw)
    assert upstream.seen[0].headers["Content-Length"] == str(len(raw))


async def test_compressed_upload_is_forwarded_as_sent(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """A gzip-encoded upload reaches the upstream still compressed, byte for byte, with its
    Content-Encoding: the gatekeeper never inflates a body (nor the pass-through path)."""
    base, _ = await start_gatekeeper(upstream.url)
    plain = b"RIFF" + os.urandom(200_000) + b"\x00" * 300_000
    packed = gzip.compress(plain)
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/octet-stream"}
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        for path in ("/asr", "/docs"):  # a task, then a pass-through request
            async with session.post(f"{base}{path}", data=packed, headers=headers) as response:
                assert response.status == 200
                answer = await response.json()
            assert (answer["sha256"], answer["size"]) == (
                hashlib.sha256(packed).hexdigest(),
                len(packed),
            )
            assert upstream.seen[-1].headers["Content-Encoding"] == "gzip"
    assert [seen.size for seen in upstream.seen] == [len(packed), len(packed)]


async def test_chunked_request_body_is_forwarded_whole(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """A chunked upload (no Content-Length) arrives complete, with its real length."""
    base, _ = await start_gatekeeper(upstream.url)
    parts = [os.urandom(70_000) for _ in range(20)]

    async def body():  # type: ignore[no-untyped-def]
        for part in parts:
            yield part

    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/audio/transcriptions", data=body()) as response:
            answer = await response.json()
    whole = b"".join(parts)
    assert answer["sha256"] == hashlib.sha256(whole).hexdigest()
    assert upstream.seen[0].headers["Content-Length"] == str(len(whole))


async def test_path_query_and_headers_pass_unchanged(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """Method, raw path, query string and end-to-end headers pass; hop-by-hop ones do not."""
    base, _ = await start_gatekeeper(upstream.url)
    port = int(base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /asr?output=json&language=zh&initial_prompt=%E4%BD%A0%20a+b HTTP/1.1\r\n"
        b"Host: asr.example\r\n"
        b"Authorization: Bearer backend\r\n"
        b"X-Custom: one\r\n"
        b"X-Custom: two\r\n"
        b"Connection: keep-alive, X-Secret-Hop\r\n"
        b"X-Secret-Hop: drop me\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"TE: trailers\r\n"
        b"X-Forwarded-For: 10.0.0.7\r\n"
        b"X-Request-ID: backend-42\r\n"
        b"Content-Type: text/plain\r\n"
        b"Content-Length: 5\r\n\r\naudio"
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    seen = upstream.seen[0]
    assert seen.method == "POST"
    assert seen.raw_path == "/asr?output=json&language=zh&initial_prompt=%E4%BD%A0%20a+b"
    assert seen.headers["Authorization"] == "Bearer backend"
    assert [v for k, v in seen.header_items if k == "X-Custom"] == ["one", "two"]
    assert seen.headers["Host"] == "asr.example"
    assert seen.headers["Content-Type"] == "text/plain"
    for hop in ("X-Secret-Hop", "Keep-Alive", "TE"):
        assert hop not in seen.headers
    assert seen.headers["X-Forwarded-For"] == "10.0.0.7, 127.0.0.1"
    assert seen.headers["X-Forwarded-Proto"] == "http"
    assert seen.headers["X-Forwarded-Host"] == "asr.example"
    assert seen.headers["X-Request-ID"] == "backend-42"
    assert "User-Agent" not in seen.headers
    assert "Accept-Encoding" not in seen.headers
    text = head.decode()
    assert text.startswith("HTTP/1.1 200")
    assert "X-Request-ID: backend-42" in text
    assert "X-Upstream: fake" in text
    assert "X-Gatekeeper-Attempts: 1" in text


async def test_request_id_is_created_when_missing(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """A task without X-Request-ID gets a new one, the same upstream and in the answer."""
    base, _ = await start_gatekeeper(upstream.url)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/inference", data=b"x") as response:
            rid = response.headers["X-Request-ID"]
    assert len(rid) >= 16
    assert upstream.seen[0].headers["X-Request-ID"] == rid


async def test_compressed_answer_stays_compressed(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """An upstream answer with Content-Encoding is relayed as the same bytes, not decoded."""
    base, _ = await start_gatekeeper(upstream.url)
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.post(f"{base}/asr", data=b"x", headers={"X-Fake-Gzip": "1"}) as r:
            assert r.headers["Content-Encoding"] == "gzip"
            assert r.headers["Content-Length"] == str(len(GZIP_BODY))
            assert await r.read() == GZIP_BODY


async def test_sse_answer_streams_chunk_by_chunk(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """A streamed answer reaches the client event by event, before the upstream has finished."""
    base, _ = await start_gatekeeper(upstream.url)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{base}/v1/audio/transcriptions", data=b"x", headers={"X-Fake-SSE": "3"}
        ) as response,
    ):
        assert response.headers["Content-Type"] == "text/event-stream"
        first = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 5)
        assert json.loads(first.removeprefix(b"data: "))["segment"] == 0
        upstream.release("sse1")
        second = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 5)
        assert json.loads(second.removeprefix(b"data: "))["segment"] == 1
        upstream.release("sse2")
        rest = await response.read()
    assert b'"segment": 2' in rest


async def test_attempt_timeout_gives_504_json(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """An attempt that exceeds ASR_REQUEST_TIMEOUT answers 504 with the SPEC's JSON body; the
    slot stays held (the server may still compute it) until ASR_TIMEOUT_HOLD runs out."""
    base, app = await start_gatekeeper(upstream.url, request_timeout=0.3, timeout_hold=0.3)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/asr", data=b"x", headers={"X-Fake-Hold": "never"}) as r:
            assert r.status == 504
            assert r.headers["X-Gatekeeper-Attempts"] == "1"
            doc = await r.json()
    assert doc["reason"] == "timeout"
    assert doc["attempts"] == 1
    assert doc["error"]
    snap = app[STATE].snapshot()
    assert snap.failed_tasks == 1
    assert (snap.active_tasks, snap.held_tasks) == (1, 1)
    await until(lambda: app[STATE].snapshot().active_tasks == 0)
    snap = app[STATE].snapshot()
    assert snap.held_tasks == 0
    assert snap.holds[HoldEnd.EXPIRED] == 1
    assert snap.upstream_in_flight == 0


async def test_refused_connection_gives_502_json(start_gatekeeper: GatekeeperFactory) -> None:
    """With the Whisper server down and no retries left, a task answers 502 reason crash."""
    base, app = await start_gatekeeper("http://127.0.0.1:9", max_retries=0)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/asr", data=b"x") as response:
            assert response.status == 502
            doc = await response.json()
        async with session.get(f"{base}/docs") as response:
            assert response.status == 502
            assert (await response.json())["reason"] == "upstream_unreachable"
    assert doc == {
        "error": doc["error"],
        "reason": "crash",
        "attempts": 1,
        "detail": doc["detail"],
    }
    assert app[STATE].snapshot().failed_tasks == 1


async def test_head_keeps_the_upstream_content_length(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """A HEAD request passes the upstream's Content-Length through, with no body."""
    base, _ = await start_gatekeeper(upstream.url)
    async with aiohttp.ClientSession() as session:
        async with session.head(f"{upstream.url}/docs") as response:
            length = response.headers["Content-Length"]  # what the upstream itself says
        assert int(length) > 0
        async with session.head(f"{base}/docs") as response:
            assert response.status == 200
            assert response.headers["Content-Length"] == length
            assert await response.read() == b""
