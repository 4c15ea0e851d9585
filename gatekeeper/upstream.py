"""Talking to the Whisper server: the one client session, and one attempt at a time.

An attempt ends in one of two ways: with the upstream's answer open and its headers read (plus,
for an error status, the first bytes of its body for classification), or with the exception
that ended it. Classification and retries live elsewhere; this module only does the I/O.
"""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from gatekeeper.clock import Clock
from gatekeeper.policy.classify import CLASSIFY_BODY_LIMIT
from gatekeeper.spool import SpooledBody

__all__ = [
    "SMALL_ANSWER",
    "AttemptResult",
    "create_session",
    "read_prefix",
    "send",
    "upstream_url",
]

# Successful answers up to this size (Whisper's transcripts, mostly) are read whole.
SMALL_ANSWER = 64 * 1024

# Never let the client library add or change anything the backend did not send.
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def create_session(*, pool_size: int) -> aiohttp.ClientSession:
    """The app's single client session: raw bytes both ways, no cookies kept, no proxies."""
    connector = aiohttp.TCPConnector(limit=pool_size, keepalive_timeout=30)
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,  # bytes in = bytes out, compressed answers stay compressed
        cookie_jar=aiohttp.DummyCookieJar(),  # one backend's cookies must not reach another
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        skip_auto_headers=_SKIP_AUTO_HEADERS,
        trust_env=False,
    )


def upstream_url(base: str, raw_path: str) -> URL:
    """The upstream URL for a request target, query string byte-for-byte as the client sent it.

    An absolute-form target (`POST http://host/asr?x`, which RFC 9112 §3.2.2 says a server must
    accept) goes upstream in origin-form: its path and query only, never its scheme and host.
    """
    if not raw_path.startswith("/"):
        raw_path = _origin_form(raw_path)
    return URL(base + raw_path, encoded=True)


def _origin_form(target: str) -> str:
    """`http://host:1/a?b` → `/a?b`, `http://host?b` → `/?b` (sliced: no byte re-encoded)."""
    _, scheme_sep, rest = target.partition("://")
    if scheme_sep:
        ends = [i for i in (rest.find("/"), rest.find("?")) if i >= 0]
        target = rest[min(ends) :] if ends else ""
    return target if target.startswith("/") else "/" + target


@dataclass
class AttemptResult:
    """One attempt: an open response with the body read so far, or what ended it.

    `prefix` is the first bytes of an error body (for classification) or the whole of a small
    answer; `complete` says the body is all in `prefix`.
    """

    response: aiohttp.ClientResponse | None
    prefix: bytes = b""
    complete: bool = False
    error: BaseException | None = None
    timed_out: bool = False
    still_upstream: "asyncio.Task[AttemptResult] | None" = None
    """After a timeout: the attempt itself, still running. The Whisper server keeps computing
    a task whose client gave up, so the caller keeps its slot until this ends (or cancels it)."""

    @property
    def status(self) -> int | None:
        return self.response.status if self.response is not None else None


async def read_prefix(response: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """Up to `limit` bytes of the body, and whether that was all of it (the rest stays unread)."""
    parts: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await response.content.read(limit - size)
        if not chunk:
            return b"".join(parts), True
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts), response.content.at_eof()


def _small_answer(method: str, response: aiohttp.ClientResponse) -> bool:
    """A short successful answer of known length, read whole as part of the attempt.

    Reading it before answering means an upstream that breaks off mid-answer is a crash the
    attempt loop can still retry (nothing reached the client yet), and the answer then goes out
    in one write.
    """
    length = response.content_length
    return (
        length is not None
        and length <= SMALL_ANSWER
        and method != "HEAD"  # its Content-Length describes a body that is never sent
        and response.status not in (204, 304)
    )


async def send(
    session: aiohttp.ClientSession,
    *,
    method: str,
    url: URL,
    headers: CIMultiDict[str],
    body: SpooledBody | None,
    deadline: float,
    clock: Clock,
) -> AttemptResult:
    """One attempt, waited for until `deadline` (`clock` time), connect to the error prefix.

    `headers` go as they are: the caller sets Content-Length for the body, once per task.
    At the deadline the attempt is not cut: the result says `timed_out` and carries the attempt,
    still running, as `still_upstream` (the body may still be streaming from the spool, so the
    caller keeps the body open until it ends). Cancelling `send` cancels the attempt.
    """
    data: bytes | AsyncIterator[bytes] | None = None
    if body is not None and body.size > 0:
        data = body.in_memory()
        if data is None:
            data = body.replay()
    attempt = asyncio.ensure_future(_exchange(session, method, url, headers, data))
    try:
        async with clock.timeout_at(deadline):
            return await asyncio.shield(attempt)
    except TimeoutError as exc:
        if attempt.done():  # it ended just as the deadline came
            return attempt.result()
        return AttemptResult(None, error=exc, timed_out=True, still_upstream=attempt)
    except asyncio.CancelledError:
        attempt.cancel()
        raise


async def _exchange(
    session: aiohttp.ClientSession,
    method: str,
    url: URL,
    headers: CIMultiDict[str],
    data: bytes | AsyncIterator[bytes] | None,
) -> AttemptResult:
    """The attempt's I/O without a deadline: `send` decides how long to wait for it."""
    response: aiohttp.ClientResponse | None = None
    try:
        response = await session.request(
            method, url, headers=headers, data=data, allow_redirects=False
        )
        if response.status >= 400:
            prefix, complete = await read_prefix(response, CLASSIFY_BODY_LIMIT)
            return AttemptResult(response, prefix, complete)
        if _small_answer(method, response):
            return AttemptResult(response, await response.content.read(), complete=True)
        return AttemptResult(response)
    except TimeoutError as exc:  # the session's connect timeout: nothing reached the server
        if response is not None:
            response.close()
        return AttemptResult(None, error=exc, timed_out=True)
    except (aiohttp.ClientError, OSError) as exc:
        if response is not None:
            response.close()
        return AttemptResult(None, error=exc)
    except BaseException:  # cancelled: the connection goes with it
        if response is not None:
            response.close()
        raise
