"""A tiny fake upstream for tests that need exact control over timing and answers.

Like aiohttp's examples/fake_server.py: a class owning its app, started on a free port. It counts
requests in flight *at the upstream* (the only honest place to check the concurrency promise),
hashes every request body it receives (`active` counts POSTs: the tests' tasks), and answers
as each request's `X-Fake-*` headers say:

- `X-Fake-Hold: <name>`: wait until the test calls `release(name)` (or forever);
- `X-Fake-Status: <int>` / `X-Fake-Body: <text>` / `X-Fake-Content-Type`: the answer;
- `X-Fake-Retry-After: <s>`: add a Retry-After header to the answer;
- `X-Fake-SSE: <n>`: stream n server-sent events, each only after `release("sse")` for the
  ones after the first;
- `X-Fake-Big-Error: <n>`: a 500 whose n-byte body ends with a CUDA OOM line;
- `X-Fake-Gzip: 1`: answer a fixed gzip-encoded body with Content-Encoding: gzip;
- `X-Fake-Reset: 1`: abort the connection without answering.
- `X-Fake-Script: a,b,c`: per request id, answer the k-th attempt as the k-th item, where an item
  is a status (`500`), `oom` (500 with a CUDA OOM text), `reset`, or `ok`.
"""

import asyncio
import gzip
import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field

from aiohttp import web

from tests.waiting import until

__all__ = ["FakeUpstream", "Seen"]

OOM_TEXT = (
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
    "capacity of 23.69 GiB of which 1.02 GiB is free."
)


GZIP_BODY = gzip.compress(b"Simulated transcript, compressed by the upstream.", mtime=0)


def big_error_body(size: int) -> bytes:
    """`size` bytes of traceback-like text whose last line is a CUDA OOM message."""
    tail = ("\n" + OOM_TEXT).encode()
    line = b'  File "/app/whisper/model.py", line 42, in transcribe\n'
    return (line * (size // len(line) + 1))[: size - len(tail)] + tail


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    raw_path: str
    headers: dict[str, str]
    header_items: list[tuple[str, str]]
    sha256: str
    size: int
    chunked: bool


@dataclass
class FakeUpstream:
    seen: list[Seen] = field(default_factory=list)
    active: int = 0
    max_active: int = 0
    finished: int = 0
    _events: dict[str, asyncio.Event] = field(default_factory=lambda: defaultdict(asyncio.Event))
    _scripts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    _runner: web.AppRunner | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def release(self, name: str = "hold") -> None:
        self._events[name].set()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # auto_decompress off: `seen` records the body as it came over the wire.
        self._runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, auto_decompress=False
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        server = site._server
        assert server is not None
        assert server.sockets  # type: ignore[attr-defined]
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def stop(self) -> None:
        for event in self._events.values():
            event.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait_active(self, n: int) -> None:
        """Wait until exactly `n` tasks are in flight at the upstream."""
        await until(lambda: self.active == n)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.method != "POST":  # tests send tasks as POST; GETs are pass-through traffic
            return await self._answer(request)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            return await self._answer(request)
        finally:
            self.active -= 1
            self.finished += 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_chunked(1 << 16):
            digest.update(chunk)
            size += len(chunk)
        h = request.headers
        self.seen.append(
            Seen(
                request.method,
                request.raw_path,
                {k: v for k, v in h.items()},
                list(h.items()),
                digest.hexdigest(),
                size,
                "chunked" in h.get("Transfer-Encoding", "").lower(),
            )
        )
        if "X-Fake-Hold" in h:
            await self._events[h["X-Fake-Hold"]].wait()
        script = h.get("X-Fake-Script")
        if script:
            key = h.get("X-Request-ID", "")
            steps = script.split(",")
            step = steps[min(self._scripts[key], len(steps) - 1)]
            self._scripts[key] += 1
            if step.startswith("hold="):  # this attempt waits for release(name), then answers
                await self._events[step.removeprefix("hold=")].wait()
                step = "ok"
            if step == "reset":
                return self._reset(request)
            if step == "oom":
                return web.Response(status=500, text=OOM_TEXT)
            if step != "ok":
                extra = {}
                if "X-Fake-Retry-After" in h:
                    extra["Retry-After"] = h["X-Fake-Retry-After"]
                return web.Response(status=int(step), text=f"error {step}", headers=extra)
        if h.get("X-Fake-Reset"):
            return self._reset(request)
        if "X-Fake-Big-Error" in h:
            return web.Response(status=500, body=big_error_body(int(h["X-Fake-Big-Error"])))
        if h.get("X-Fake-Gzip"):
            return web.Response(
                body=GZIP_BODY, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"}
            )
        if "X-Fake-SSE" in h:
            return await self._sse(request, int(h["X-Fake-SSE"]))
        status = int(h.get("X-Fake-Status", "200"))
        body = h.get("X-Fake-Body")
        headers = {"X-Upstream": "fake", "Set-Cookie": "a=1"}
        if "X-Fake-Retry-After" in h:
            headers["Retry-After"] = h["X-Fake-Retry-After"]
        if body is None:
            payload = {
                "sha256": digest.hexdigest(),
                "size": size,
                "method": request.method,
                "path": request.raw_path,
            }
            return web.json_response(payload, status=status, headers=headers)
        return web.Response(
            status=status,
            text=body,
            headers=headers,
            content_type=h.get("X-Fake-Content-Type", "text/plain"),
        )

    def _reset(self, request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.abort()
        return web.Response()  # never sent: the connection is gone

    async def _sse(self, request: web.Request, count: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(count):
            if i > 0:
                await self._events[f"sse{i}"].wait()
            await response.write(f"data: {json.dumps({'segment': i})}\n\n".encode())
        await response.write_eof()
        return response
