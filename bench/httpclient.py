"""A minimal keep-alive HTTP/1.1 client over asyncio streams.

The benchmark's client must cost as little as possible and cost the same through every proxy:
on a 2-core machine the client, the proxy and the upstream share the CPU, so a heavy client
would blur the differences the benchmark exists to show. This client writes a prepared request
and parses the answer's framing (Content-Length, chunked, or read to close) and nothing else.
"""

import asyncio
import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Connection", "HttpError", "Response", "fetch"]

_STREAM_LIMIT = 1 << 20


class HttpError(Exception):
    """The connection failed or the answer was not HTTP."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: dict[str, str]
    """Lower-case names; the last value wins (enough for the headers the benchmark reads)."""
    body: bytes


Body = bytes | tuple[Iterable[bytes | memoryview], int]
"""Either the whole body, or chunks to write one after the other and their total length."""


class Connection:
    """One TCP connection, reopened when the server closes it between requests."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._used = False

    async def _open(self) -> None:
        try:
            self._reader, self._writer = await asyncio.open_connection(
                self.host, self.port, limit=_STREAM_LIMIT
            )
        except OSError as exc:
            raise HttpError(f"connect: {exc}") from exc
        self._used = False

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def request(
        self,
        method: str,
        target: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        body: Body = b"",
    ) -> Response:
        """Send one request and read its whole answer.

        A reused keep-alive connection that turns out to be closed before any byte of the answer
        arrived is reopened and the request sent once more (what browsers do); a replay of a
        chunk iterator is impossible, so only `bytes` bodies get that second chance.
        """
        if self._writer is None:
            await self._open()
        reused = self._used
        try:
            return await self._exchange(method, target, headers, body)
        except _Stale:
            await self.close()
            if not reused or not isinstance(body, bytes):
                raise HttpError("connection closed before the answer") from None
            await self._open()
            try:
                return await self._exchange(method, target, headers, body)
            except _Stale:
                await self.close()
                raise HttpError("connection closed before the answer") from None
        except BaseException:
            await self.close()
            raise

    async def _exchange(
        self, method: str, target: str, headers: Sequence[tuple[str, str]], body: Body
    ) -> Response:
        reader, writer = self._reader, self._writer
        assert reader is not None
        assert writer is not None
        self._used = True
        length = len(body) if isinstance(body, bytes) else body[1]
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        if length or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {length}")
        lines.extend(f"{name}: {value}" for name, value in headers)
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        got_head = False
        try:
            if isinstance(body, bytes):
                writer.write(head + body)
            else:
                writer.write(head)
                for chunk in body[0]:
                    writer.write(chunk)
                    await writer.drain()
            await writer.drain()
            status_and_headers = await reader.readuntil(b"\r\n\r\n")
            got_head = True
            status, response_headers, http10 = _parse_head(status_and_headers)
            payload = await _read_body(reader, method, status, response_headers)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            if got_head:
                raise HttpError(f"answer cut short: {exc!r}") from exc
            raise _Stale from exc
        connection = response_headers.get("connection", "").lower()
        if "close" in connection or (http10 and "keep-alive" not in connection):
            await self.close()
        elif "content-length" not in response_headers and (
            "chunked" not in response_headers.get("transfer-encoding", "")
        ):
            await self.close()  # the body was delimited by the close
        return Response(status, response_headers, payload)


class _Stale(Exception):
    """The connection was closed before the answer began."""


def _parse_head(head: bytes) -> tuple[int, dict[str, str], bool]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise HttpError(f"not an HTTP answer: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers, parts[0] == "HTTP/1.0"


async def _read_body(
    reader: asyncio.StreamReader, method: str, status: int, headers: dict[str, str]
) -> bytes:
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return b""
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts: list[bytes] = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers
                return b"".join(parts)
            chunk = await reader.readexactly(size + 2)
            parts.append(chunk[:-2])
    return await reader.read()


async def fetch(
    host: str,
    port: int,
    method: str,
    target: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    body: Body = b"",
    within: float = 30.0,
) -> Response:
    """One request on a fresh connection, closed afterwards."""
    conn = Connection(host, port)
    try:
        async with asyncio.timeout(within):
            return await conn.request(method, target, headers=headers, body=body)
    finally:
        await conn.close()
