"""The fast upstream for the overhead, upload and overload scenarios.

``python -m bench.upstream --port N`` serves HTTP/1.1 on 127.0.0.1 from a raw asyncio protocol
(uvloop when it is installed): far cheaper per request than any proxy in front of it, so the
proxies are what the benchmark measures. Every request body is drained and checksummed (CRC-32,
chunked bodies too), and each answer, a small JSON, carries ``X-Bench-Bytes`` and
``X-Bench-Crc32`` so the client can prove an upload arrived byte for byte.

Steering, per request:
- default: answer after ``--delay`` seconds (1 ms: the "fast handler");
- ``X-Bench-Delay: s``: answer after s seconds instead;
- ``X-Bench-Hold: 1``: while holding is on (``POST /bench/hold``), wait until
  ``POST /bench/release`` (or ``--max-hold`` seconds), so tasks stay in flight during a flood.
``GET /health`` answers at once; ``GET /bench/state`` tells how many requests and bytes arrived.
"""

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import zlib
from collections.abc import Callable

__all__ = ["main"]

_MAX_HEAD = 64 * 1024


class _Upstream:
    """State shared by all connections."""

    def __init__(self, delay: float, max_hold: float) -> None:
        self.delay = delay
        self.max_hold = max_hold
        self.holding = False
        self.held: list[Callable[[], None]] = []
        self.requests = 0
        self.bytes = 0

    def release(self) -> None:
        self.holding = False
        held, self.held = self.held, []
        for answer in held:
            answer()

    def state(self) -> bytes:
        return json.dumps(
            {
                "requests": self.requests,
                "bytes": self.bytes,
                "held": len(self.held),
                "holding": self.holding,
            }
        ).encode()


class _Connection(asyncio.Protocol):
    """One client connection: parse a request head, drain its body, answer, repeat."""

    def __init__(self, upstream: _Upstream) -> None:
        self.up = upstream
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.state = "head"  # head | body | chunk-size | chunk-data | chunk-end | trailer | busy
        self.remaining = 0
        self.method = ""
        self.path = ""
        self.headers: dict[str, str] = {}
        self.crc = 0
        self.size = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self.state == "body" and not self.buf:
            # Fast path for big uploads: checksum straight from the received block.
            take = min(self.remaining, len(data))
            self._feed(memoryview(data)[:take])
            self.remaining -= take
            if take < len(data):
                self.buf += memoryview(data)[take:]
            if self.remaining == 0:
                self._dispatch()
            self._process()
            return
        self.buf += data
        self._process()

    def _feed(self, chunk: memoryview | bytes) -> None:
        self.crc = zlib.crc32(chunk, self.crc)
        self.size += len(chunk)

    def _process(self) -> None:
        buf = self.buf
        while buf and self.state != "busy":
            if self.state == "head":
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > _MAX_HEAD:
                        self._close()
                    return
                self._parse_head(bytes(buf[:end]))
                del buf[: end + 4]
            elif self.state == "body":
                take = min(self.remaining, len(buf))
                self._feed(memoryview(buf)[:take])
                del buf[:take]
                self.remaining -= take
                if self.remaining == 0:
                    self._dispatch()
            elif self.state in ("chunk-size", "chunk-end", "trailer"):
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                line = bytes(buf[:end])
                del buf[: end + 2]
                if self.state == "chunk-size":
                    self.remaining = int(line.split(b";", 1)[0].strip() or b"0", 16)
                    self.state = "chunk-data" if self.remaining else "trailer"
                elif self.state == "chunk-end":
                    self.state = "chunk-size"
                elif not line:  # the empty line after the trailers ends the body
                    self._dispatch()
            elif self.state == "chunk-data":
                take = min(self.remaining, len(buf))
                self._feed(memoryview(buf)[:take])
                del buf[:take]
                self.remaining -= take
                if self.remaining == 0:
                    self.state = "chunk-end"

    def _parse_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        self.method, self.path = parts[0], parts[1] if len(parts) > 1 else "/"
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self.headers = headers
        self.crc = 0
        self.size = 0
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self.state = "chunk-size"
        else:
            self.remaining = int(headers.get("content-length", "0") or 0)
            self.state = "body"
            if self.remaining == 0:
                self._dispatch()

    def _dispatch(self) -> None:
        """The whole request is in: answer now, later, or when released."""
        self.state = "busy"
        up = self.up
        up.requests += 1
        up.bytes += self.size
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._answer(200, b'{"status": "ok"}')
            return
        if path == "/bench/state":
            self._answer(200, up.state())
            return
        if path == "/bench/hold":
            up.holding = True
            self._answer(200, up.state())
            return
        if path == "/bench/release":
            up.release()
            self._answer(200, up.state())
            return
        body = json.dumps({"text": "ok", "bytes": self.size, "crc32": self.crc}).encode()
        extra = (("X-Bench-Bytes", str(self.size)), ("X-Bench-Crc32", str(self.crc)))
        loop = asyncio.get_running_loop()
        if up.holding and self.headers.get("x-bench-hold"):
            done = False

            def answer() -> None:
                nonlocal done
                if not done:
                    done = True
                    self._answer(200, body, extra)

            up.held.append(answer)
            loop.call_later(up.max_hold, answer)
            return
        delay = float(self.headers.get("x-bench-delay", up.delay))
        if delay <= 0:
            self._answer(200, body, extra)
        else:
            loop.call_later(delay, self._answer, 200, body, extra)

    def _answer(self, status: int, body: bytes, extra: tuple[tuple[str, str], ...] = ()) -> None:
        transport = self.transport
        if transport is None:
            return
        close = self.headers.get("connection", "").lower() == "close"
        head = [
            f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            *(f"{name}: {value}" for name, value in extra),
        ]
        if close:
            head.append("Connection: close")
        transport.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        if close:
            self._close()
            return
        self.state = "head"
        self._process()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None


async def _serve(port: int, delay: float, max_hold: float) -> None:
    loop = asyncio.get_running_loop()
    upstream = _Upstream(delay, max_hold)
    server = await loop.create_server(
        lambda: _Connection(upstream), "127.0.0.1", port, backlog=4096, reuse_address=True
    )
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print(f"bench upstream listening on 127.0.0.1:{port}", flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.001, help="seconds per answer")
    parser.add_argument("--max-hold", type=float, default=120.0, help="longest hold, seconds")
    parser.add_argument("--uvloop", action="store_true", help="use uvloop if installed")
    args = parser.parse_args(argv)
    if args.uvloop:
        with contextlib.suppress(ImportError):
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(_serve(args.port, args.delay, args.max_hold))
    return 0


if __name__ == "__main__":
    sys.exit(main())
