"""Protocol edges (issue #13), over real sockets: absolute-form targets, transfer codings, slow
request heads, the Bearer scheme's case, and the gatekeeper's own paths never reaching upstream.

Raw bytes go over a plain socket wherever an HTTP client would tidy the request up first.
"""

import asyncio
import json
import logging
import time

import aiohttp
import pytest

from gatekeeper.app import STATE
from gatekeeper.logs import configure_logging
from gatekeeper.policy.outcomes import TaskOutcome
from tests.conftest import GatekeeperFactory
from tests.fakes import FakeUpstream
from tests.waiting import until


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.") else 0


def _header(answer: bytes, name: bytes) -> bytes | None:
    head = answer.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None


def _json(answer: bytes) -> dict[str, object]:
    doc: dict[str, object] = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    return doc


async def _raw(port: int, data: bytes, *, within: float = 5.0) -> bytes:
    """Send raw bytes (ending in a `Connection: close` request); return the whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(within):
            return await reader.read()  # until the server closes
    finally:
        writer.close()


async def _read_answer(reader: asyncio.StreamReader) -> bytes:
    """One answer with a Content-Length body from a kept-alive connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(_header(head, b"Content-Length") or b"0")
    return head + await reader.readexactly(length)


async def _closed_after(reader: asyncio.StreamReader, *, within: float) -> tuple[bytes, float]:
    """Everything the server still sends until it closes, and when it closed (monotonic)."""
    async with asyncio.timeout(within):
        rest = await reader.read()
    return rest, time.monotonic()


# 1. Absolute-form request targets (RFC 9112 §3.2.2)


async def test_absolute_form_task_goes_upstream_in_origin_form(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """`POST http://host/asr?…` is a task like `POST /asr?…`; upstream sees the origin-form path
    with the query byte for byte, and the task ends with an outcome."""
    base, app = await start_gatekeeper(upstream.url)
    answer = await _raw(
        _port(base),
        b"POST http://127.0.0.1:8600/asr?a=%41&b=c%20d&e HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: 5\r\nConnection: close\r\n\r\naudio",
    )
    assert _status(answer) == 200, answer[:300]
    assert _header(answer, b"X-Gatekeeper-Attempts") == b"1"  # handled as a task
    assert [seen.raw_path for seen in upstream.seen] == ["/asr?a=%41&b=c%20d&e"]
    assert _json(answer)["size"] == 5
    await until(lambda: app[STATE].snapshot().tasks[TaskOutcome.SUCCESS] == 1)
    snap = app[STATE].snapshot()
    assert (snap.total_tasks, snap.active_tasks, snap.queued_tasks) == (1, 0, 0)


async def test_absolute_form_pass_through_and_own_paths(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """Absolute-form targets pass through in origin-form, and reach the gatekeeper's own
    endpoints exactly as origin-form ones do."""
    base, _ = await start_gatekeeper(upstream.url)
    port = _port(base)
    answer = await _raw(
        port, b"GET http://x/docs?q=%7e&r HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert _status(answer) == 200, answer[:300]
    answer = await _raw(
        port, b"GET https://x:1/health HTTP/1.1\r\nHost: y\r\nConnection: close\r\n\r\n"
    )
    assert _status(answer) in (200, 503), answer[:300]
    assert "upstream" in _json(answer)  # the gatekeeper's own /health answered it
    assert [seen.raw_path for seen in upstream.seen] == ["/docs?q=%7e&r"]


# 3. Transfer codings other than chunked alone (RFC 9112 §6.1)


@pytest.mark.parametrize(
    "coding",
    [b"gzip, chunked", b"deflate, chunked", b"br, chunked", b"compress, chunked",
     b"x-unknown, chunked", b"GZIP ,chunked"],
)  # fmt: skip
async def test_transfer_coding_other_than_chunked_is_refused_with_501(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory, coding: bytes
) -> None:
    """A body framed with any transfer coding besides `chunked` gets 501 and is never
    forwarded (its bytes are still compressed; upstream would take them for the audio)."""
    base, app = await start_gatekeeper(upstream.url)
    answer = await _raw(
        _port(base),
        b"POST /asr HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + coding + b"\r\n"
        b"Connection: close\r\n\r\n5\r\n\x1f\x8b\x08\x00\x00\r\n0\r\n\r\n",
    )
    assert _status(answer) == 501, answer[:300]
    doc = _json(answer)
    assert doc["reason"] == "transfer_coding_not_implemented"
    assert _header(answer, b"Content-Type") == b"application/json; charset=utf-8"
    assert upstream.seen == []
    assert app[STATE].snapshot().total_tasks == 0


@pytest.mark.parametrize(
    "head",
    [b"POST /asr HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\naudio\r\n0\r\n\r\n",
     b"POST /asr HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \r\nContent-Length: 5\r\n"
     b"Connection: close\r\n\r\naudio"],
    ids=["http-1.0", "empty"],
)  # fmt: skip
async def test_meaningless_transfer_encoding_is_refused_with_400(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory, head: bytes
) -> None:
    """Transfer-Encoding in HTTP/1.0 (which has none: the framing is faulty, RFC 9112 §6.1) or
    naming no coding at all is refused with 400 and never forwarded."""
    base, _ = await start_gatekeeper(upstream.url)
    answer = await _raw(_port(base), head)
    assert _status(answer) == 400, answer[:300]
    assert _json(answer)["reason"] == "transfer_encoding_invalid"
    assert upstream.seen == []


async def test_chunked_alone_in_any_case_is_accepted(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """`Transfer-Encoding: chunked` (any letter case) still carries a task's body upstream."""
    base, _ = await start_gatekeeper(upstream.url)
    answer = await _raw(
        _port(base),
        b"POST /asr HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: CHUNKED\r\nConnection: close\r\n"
        b"\r\n5\r\naudio\r\n0\r\n\r\n",
    )
    assert _status(answer) == 200, answer[:300]
    assert [seen.size for seen in upstream.seen] == [5]


# 4. The request head must arrive within ASR_HEADER_TIMEOUT


async def test_slow_request_head_is_cut_at_the_header_timeout(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """A client sending one header line every 0.1 s is cut off once its head has taken the
    header timeout (0.3 s), although it never paused that long; nothing goes upstream."""
    base, _ = await start_gatekeeper(upstream.url, header_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(base))
    opened = time.monotonic()
    writer.write(b"POST /asr HTTP/1.1\r\nHost: x\r\n")

    async def trickle() -> int:
        sent = 0
        try:
            while True:  # a slow client: one more header line every 0.1 s, for ever
                await asyncio.sleep(0.1)
                writer.write(b"X-Slow-%d: v\r\n" % sent)
                await writer.drain()
                sent += 1
        except (ConnectionError, asyncio.CancelledError):
            return sent

    lines = asyncio.create_task(trickle())
    try:
        rest, closed = await _closed_after(reader, within=5)
    finally:
        lines.cancel()
        writer.close()
    assert closed - opened < 1.0
    assert await lines >= 2  # it was still sending when it was cut
    assert rest == b"" or _status(rest) == 408, rest[:200]
    assert upstream.seen == []


async def test_silent_connection_is_closed_at_the_header_timeout(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """A connection that never sends a byte is closed once the header timeout has passed."""
    base, _ = await start_gatekeeper(upstream.url, header_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(base))
    opened = time.monotonic()
    try:
        rest, closed = await _closed_after(reader, within=5)
    finally:
        writer.close()
    assert rest == b""
    assert 0.25 < closed - opened < 1.0


@pytest.mark.parametrize(
    "pieces",
    [
        [b"GET /docs HTTP/1.1\r\nHost: x\r\n\r\nGET /docs HTTP/1.1\r\nX-A: "],
        [b"POST /docs HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\naudioGET /docs HTTP/1.1"],
        [b"POST /docs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\naudio\r\n"
         b"0\r\n\r\nGET /"],
        [b"POST /docs HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nau", b"dioGET /docs HTTP"],
    ],
    ids=["bodyless", "length", "chunked", "body-end-then-head"],
)  # fmt: skip
async def test_partial_head_behind_a_complete_request_is_cut(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory, pieces: list[bytes]
) -> None:
    """A complete request followed, in the same read, by the start of another head gets its
    answer, then the connection is closed once the second head is overdue."""
    base, _ = await start_gatekeeper(upstream.url, header_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(base))
    try:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
        sent = time.monotonic()
        first = await asyncio.wait_for(_read_answer(reader), 5)
        rest, closed = await _closed_after(reader, within=5)
    finally:
        writer.close()
    assert _status(first) == 200
    assert rest == b"" or _status(rest) == 408, rest[:200]
    assert closed - sent < 1.0
    assert len(upstream.seen) == 1


async def test_partial_head_sent_while_busy_is_cut_once_the_answer_is_out(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """A head begun while the gatekeeper is still busy with the request before it is not late
    while it waits; once the answer is out, the connection closes when it is overdue."""
    base, _ = await start_gatekeeper(upstream.url, header_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(base))
    try:
        writer.write(b"GET /docs HTTP/1.1\r\nHost: x\r\nX-Fake-Hold: h\r\n\r\n")
        await until(lambda: len(upstream.seen) == 1)
        writer.write(b"GET /docs HTTP/1.1\r\nX-A: ")
        await writer.drain()
        await asyncio.sleep(0.6)  # busy for two header timeouts: the behaviour under test
        upstream.release("h")
        answered = time.monotonic()
        first = await asyncio.wait_for(_read_answer(reader), 5)
        rest, closed = await _closed_after(reader, within=5)
    finally:
        writer.close()
    assert _status(first) == 200
    assert rest == b"" or _status(rest) == 408, rest[:200]
    assert closed - answered < 1.0


@pytest.mark.parametrize(
    "pieces",
    [
        [b"POST /asr HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\naudio"],
        [b"GET /docs HTTP/1.1\r\nHost: x\r\n\r\n"],
        [b"GET /docs HTTP/1.1\r\nHost: x\r\n\r", b"\n"],
        [b"POST /asr HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\naudio\r\n",
         b"0\r\n\r\n"],
        [b"POST /asr HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nau", b"dio"],
    ],
    ids=["length", "bodyless", "head-end-split", "chunked", "body-split"],
)  # fmt: skip
async def test_idle_keep_alive_connection_outlives_the_header_timeout(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory, pieces: list[bytes]
) -> None:
    """A kept-alive connection that sends nothing between requests is not cut by the header
    timeout (nginx reuses idle connections; cutting them would lose its next POST)."""
    base, _ = await start_gatekeeper(upstream.url, header_timeout=0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(base))
    try:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.01)  # separate reads where the test splits the request
        assert _status(await asyncio.wait_for(_read_answer(reader), 5)) == 200
        await asyncio.sleep(0.8)  # idle for four header timeouts: the behaviour under test
        writer.write(b"".join(pieces))
        assert _status(await asyncio.wait_for(_read_answer(reader), 5)) == 200
    finally:
        writer.close()
    assert len(upstream.seen) == 2


async def test_slow_body_is_not_governed_by_the_header_timeout(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """Once the head is in, a body trickling in for longer than the header timeout is fine
    (ASR_CLIENT_BODY_TIMEOUT covers the body)."""
    base, _ = await start_gatekeeper(upstream.url, header_timeout=0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(base))
    try:
        writer.write(b"POST /asr HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\n")
        for _ in range(6):  # one byte every 0.1 s: 0.6 s for the body, three header timeouts
            await asyncio.sleep(0.1)
            writer.write(b"a")
        answer = await asyncio.wait_for(_read_answer(reader), 5)
    finally:
        writer.close()
    assert _status(answer) == 200, answer[:300]
    assert [seen.size for seen in upstream.seen] == [6]


# 5. The Bearer scheme is case-insensitive (RFC 9110 §11.1)


async def test_bearer_scheme_in_any_case_is_accepted(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """`bearer`, `BEARER` and `Bearer` all work with the right token; a wrong token, another
    scheme or undecodable bytes get 401."""
    base, _ = await start_gatekeeper(upstream.url, stats_token="s3cret")
    async with aiohttp.ClientSession() as session:
        for value, status in [
            ("Bearer s3cret", 200),
            ("bearer s3cret", 200),
            ("BEARER s3cret", 200),
            ("bEaReR   s3cret", 200),
            ("bearer s3cre", 401),
            ("Basic s3cret", 401),
            ("s3cret", 401),
            ("bearers3cret", 401),
        ]:
            async with session.get(f"{base}/stats", headers={"Authorization": value}) as response:
                assert response.status == status, value
    answer = await _raw(
        _port(base),
        b"GET /stats HTTP/1.1\r\nHost: x\r\nAuthorization: bearer \xff\xfe\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert _status(answer) == 401, answer[:300]


# 7. The gatekeeper's own paths, loosely spelled, never reach the Whisper server


@pytest.mark.parametrize(
    ("path", "own"),
    [
        ("/stats/", "/stats"),
        ("/STATS", "/stats"),
        ("/Stats//", "/stats"),
        ("//stats", "/stats"),
        ("/%53TATS%2f", "/stats"),
        ("/docs/../stats", "/stats"),
        ("/API/Recordings/Stats/ASR-Concurrency/", "/api/recordings/stats/asr-concurrency"),
        ("/metrics/", "/metrics"),
        ("/Health", "/health"),
        ("/admin/config/", "/admin/config"),
        ("/ADMIN/CONFIG", "/admin/config"),
    ],
)
async def test_own_paths_in_other_spellings_are_answered_here(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory, path: str, own: str
) -> None:
    """Any spelling of the gatekeeper's own paths (letter case, trailing or doubled slashes)
    gets a 404 naming the right path, and the token sent with it never goes upstream."""
    base, _ = await start_gatekeeper(upstream.url, stats_token="s3cret", admin_token="adm1n")
    answer = await _raw(
        _port(base),
        f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    assert _status(answer) == 404, answer[:300]
    assert _json(answer)["path"] == own
    assert upstream.seen == []


async def test_own_paths_with_other_methods_are_answered_here(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """`POST /stats`, `DELETE /metrics`, `PUT http://x/STATS/` are answered 405 or 404 by the
    gatekeeper; none reaches the Whisper server (admin API off: /admin/config is 404 here)."""
    base, _ = await start_gatekeeper(upstream.url, stats_token="s3cret")

    async def ask(request_line: bytes) -> bytes:
        return await _raw(
            _port(base),
            request_line + b"\r\nHost: x\r\nContent-Length: 0\r\n"
            b"Authorization: Bearer s3cret\r\nConnection: close\r\n\r\n",
        )

    answer = await ask(b"POST /stats HTTP/1.1")
    assert _status(answer) == 405, answer[:300]
    assert _header(answer, b"Allow") == b"GET,HEAD"
    answer = await ask(b"DELETE /metrics HTTP/1.1")
    assert _status(answer) == 405, answer[:300]
    for request_line in (b"PUT http://x/STATS/ HTTP/1.1", b"POST /Admin/Config HTTP/1.1"):
        answer = await ask(request_line)
        assert _status(answer) == 404, answer[:300]
    assert upstream.seen == []


async def test_paths_below_own_paths_still_pass_through(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """Only the own paths themselves are kept back: `/stats/daily` or `/healthz` belong to the
    Whisper server and go there."""
    base, _ = await start_gatekeeper(upstream.url)
    async with aiohttp.ClientSession() as session:
        for path in ("/stats/daily", "/healthz", "/v1/metrics"):
            async with session.get(f"{base}{path}") as response:
                assert response.status == 200, path
    assert [seen.raw_path for seen in upstream.seen] == ["/stats/daily", "/healthz", "/v1/metrics"]


# 2. Live configuration refuses non-finite numbers and true/false for numbers


@pytest.mark.parametrize(
    "patch",
    [b'{"retry_delay": Infinity}', b'{"request_timeout": NaN}', b'{"queue_timeout": 1e999}',
     b'{"retry_delay": -Infinity}', b'{"max_concurrent": true}', b'{"retry_jitter": false}',
     b'{"max_queue": Infinity}'],
)  # fmt: skip
async def test_live_config_refuses_non_finite_and_boolean_numbers(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory, patch: bytes
) -> None:
    """PATCH /admin/config with Infinity, NaN, 1e999 or true/false for a number is a 400 that
    names the setting; nothing changes and /stats stays valid JSON."""
    base, _ = await start_gatekeeper(upstream.url, admin_token="adm1n")
    auth = {"Authorization": "Bearer adm1n", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        async with session.patch(f"{base}/admin/config", data=patch, headers=auth) as response:
            assert response.status == 400, await response.text()
            problems = (await response.json())["problems"]
        name = json.loads(patch.replace(b"Infinity", b"0").replace(b"NaN", b"0")).popitem()[0]
        assert len(problems) == 1
        assert f"ASR_{name.upper()}=" in problems[0]
        async with session.get(f"{base}/stats") as response:
            text = await response.text()

    def no_constants(word: str) -> None:
        raise AssertionError(f"/stats holds {word}, which is not JSON")

    settings = json.loads(text, parse_constant=no_constants)["settings"]
    assert (settings["max_concurrent"], settings["retry_delay"]) == (1, 10.0)


async def test_live_config_null_returns_a_setting_to_its_default(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """`null` in a PATCH puts a setting back to its default, a derived one following its base."""
    base, _ = await start_gatekeeper(upstream.url, admin_token="adm1n", max_queue=3)
    auth = {"Authorization": "Bearer adm1n"}
    async with aiohttp.ClientSession() as session:
        patch = {"max_concurrent": 2, "max_queue": None, "retry_delay": 4}
        async with session.patch(f"{base}/admin/config", json=patch, headers=auth) as response:
            assert response.status == 200, await response.text()
            settings = (await response.json())["settings"]
    assert (settings["max_queue"], settings["oom_window"]) == (20, 12.0)


# 6. Client text in log lines is escaped


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_control_characters_from_the_wire_are_escaped_in_the_log(
    upstream: FakeUpstream,
    start_gatekeeper: GatekeeperFactory,
    capsys: pytest.CaptureFixture[str],
    fmt: str,
) -> None:
    """A task whose path holds NUL and ESC and whose request id holds a line separator is
    logged on single printable lines."""
    base, app = await start_gatekeeper(upstream.url)
    configure_logging(fmt=fmt, level="INFO")
    try:
        answer = await _raw(
            _port(base),
            b"POST /asr%00%1b[2J HTTP/1.1\r\nHost: x\r\nX-Request-ID: t-1\xe2\x80\xa8forged\r\n"
            b"Content-Length: 5\r\nConnection: close\r\n\r\naudio",
        )
        await until(lambda: app[STATE].snapshot().tasks[TaskOutcome.SUCCESS] == 1)
    finally:
        logging.getLogger().handlers.clear()
    assert _status(answer) == 200, answer[:300]
    lines = capsys.readouterr().err.splitlines()  # splits on U+2028 too, as log viewers do
    started = [line for line in lines if "开始转录" in line]
    assert len(started) == 1, lines
    assert all(line.isprintable() for line in lines), lines
    if fmt == "json":
        doc = json.loads(started[0])
        assert (doc["path"], doc["task_id"]) == ("/asr\x00\x1b[2J", "t-1\u2028forged")
    else:
        assert 'path="/asr\\u0000\\u001b[2J"' in started[0]
