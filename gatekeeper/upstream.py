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

from gatekeeper.classify import CLASSIFY_BODY_LIMIT
from gatekeeper.spool import SpooledBody

__all__ = ["AttemptResult", "create_session", "read_prefix", "send", "upstream_url"]

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
    """The upstream URL for a request path, query string byte-for-byte as the client sent it."""
    return URL(base + raw_path, encoded=True)


@dataclass
class AttemptResult:
    """One attempt: an open response (with an error body's first bytes), or what ended it."""

    response: aiohttp.ClientResponse | None
    prefix: bytes = b""
    error: BaseException | None = None
    timed_out: bool = False

    @property
    def status(self) -> int | None:
        return self.response.status if self.response is not None else None


async def read_prefix(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """Up to `limit` bytes of the body (the rest stays unread, to be relayed or discarded)."""
    parts: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await response.content.read(limit - size)
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


async def send(
    session: aiohttp.ClientSession,
    *,
    method: str,
    url: URL,
    headers: CIMultiDict[str],
    body: SpooledBody | None,
    deadline: float,
) -> AttemptResult:
    """One attempt, bounded by `deadline` (event-loop time) from connect to the error prefix."""
    response: aiohttp.ClientResponse | None = None
    headers = CIMultiDict(headers)
    data: bytes | AsyncIterator[bytes] | None = None
    if body is not None and body.size > 0:
        headers["Content-Length"] = str(body.size)
        data = body.in_memory()
        if data is None:
            data = body.replay()
    try:
        async with asyncio.timeout_at(deadline):
            response = await session.request(
                method, url, headers=headers, data=data, allow_redirects=False
            )
            if response.status >= 400:
                prefix = await read_prefix(response, CLASSIFY_BODY_LIMIT)
                return AttemptResult(response, prefix)
            return AttemptResult(response)
    except TimeoutError as exc:
        if response is not None:
            response.close()
        return AttemptResult(None, error=exc, timed_out=True)
    except (aiohttp.ClientError, OSError) as exc:
        if response is not None:
            response.close()
        return AttemptResult(None, error=exc)
