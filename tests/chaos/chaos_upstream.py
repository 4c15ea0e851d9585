"""A Whisper stand-in that misbehaves on purpose, and keeps the honest books.

The chaos upstream is the source of truth for the gatekeeper's central promise: it counts the
task requests in flight *at the upstream* itself, from the moment a request's headers arrive
until the upstream is done with it (see below), and it records what it did for every request:
which fault it injected, what it answered (status and the sha256 of the whole body it meant to
send), whether the answer was written completely, whether the gatekeeper cut the connection, and
the sha256 of the request body it received.

What each request suffers is not chosen here: the client writes a plan into the `X-Chaos-Plan`
header (the gatekeeper forwards headers unchanged), one step per attempt, and the k-th request
the upstream receives with a given `X-Request-ID` follows the k-th step (the last step repeats).
That keeps every fault reproducible from the driver's seed. Steps (`kind:arg:arg`):

- `ok:<ms>:<size>`        work ms, then 200 with `size` seeded random bytes (Content-Length);
- `overrun:<ms>:<size>`   as `ok`, but ms is longer than the gatekeeper's attempt timeout and
                          not stretched by `slow`: the upstream keeps computing after the
                          gatekeeper's deadline, and after its connection closes;
- `stream:<ms>:<size>`    work ms, then 200 chunked in a few pieces;
- `trickle:<ms>:<size>`   200 chunked, the body trickled in small pieces over ms (may outlast
                          the gatekeeper's attempt timeout, which then cuts it);
- `oom:<style>`           500 out-of-memory answer in a `gatekeeper.sim.errors.ErrorStyle`;
- `err:<status>:<style>`  a non-OOM 5xx in that style's container;
- `busy:<retry_after>`    503 with `Retry-After`;
- `client:<status>`       a 4xx (the backend's own mistake: relayed, never retried);
- `reset_upload`          read part of the request body, then abort the connection;
- `reset_answer:<status>:<size>`  headers and half of the body, then abort;
- `hang`                  never answer (until the gatekeeper gives up and disconnects).

"Done with it" is where a real Whisper server differs from a toy one. By default
(`on_disconnect=continue`) the upstream behaves like FastAPI/uvicorn running the model in a
threadpool: a request whose connection goes away mid-work keeps computing, and keeps counting
as in flight, until its service time is over (the `ms` of `ok`, `overrun`, `stream` or
`trickle`, plus `slow` where it applies). A gatekeeper that frees the slot when it closes the
connection lets the next task in beside it, and the count shows it. A `hang` is a request the
server never works on, so it ends with its connection (else any gatekeeper would break the
limit an hour later); the resets end the work themselves, and `go_down()` loses all of it, as a
crash does. `on_disconnect=stop` ends every request with its connection, like whisper.cpp's
server.

Besides per-request faults there are global ones the driver switches: `go_down()` (a crashed
container: the listener closes, every open connection is aborted, new connections are refused)
and `come_back()`, and `slow` (extra milliseconds added to the work of `ok`, `stream` and the
error answers: a busy GPU).

A pool (`ChaosPool`, issue #15) is several chaos upstreams behind one gatekeeper, one per GPU,
each with its own limit, its own in-flight count and its own books (`arrivals`: the requests it
received). They share one `Ledger`: a task's k-th request follows step k of its plan on
whichever server it lands, so a retry that moves to another server goes on with the plan.
"""

import asyncio
import hashlib
import random
import socket
import struct
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from gatekeeper.sim.errors import ErrorAnswer, ErrorStyle, gpu_error_answer, oom_answer
from gatekeeper.sim.server import OnDisconnect

__all__ = [
    "CHAOS_BODY_SHA",
    "CHAOS_PLAN",
    "ChaosPool",
    "ChaosUpstream",
    "Downtime",
    "Ledger",
    "Served",
    "Upstreams",
    "answer_bytes",
]

CHAOS_PLAN = "X-Chaos-Plan"
CHAOS_BODY_SHA = "X-Chaos-Body-Sha256"
_TASK_PREFIXES = ("/asr", "/detect-language", "/v1/audio/", "/inference")
_HANG_SECONDS = 3600.0


def answer_bytes(request_id: str, arrival: int, size: int) -> bytes:
    """The transcript bytes for one arrival of one task: seeded, so every run is identical."""
    return random.Random(f"{request_id}#{arrival}").randbytes(size)


def _error_answer(step: str, args: list[str]) -> ErrorAnswer:
    if step == "oom":
        return oom_answer(
            ErrorStyle(args[0]), tried_gib=2.0, total_gib=23.69, free_gib=1.02, used_gib=22.5
        )
    if step == "err":
        status = int(args[0])
        answer = gpu_error_answer(ErrorStyle(args[1]))
        return ErrorAnswer(status, answer.content_type, answer.body)
    if step == "busy":
        return ErrorAnswer(503, "text/plain", "Service Unavailable: model is loading")
    return ErrorAnswer(int(args[0]), "application/json", '{"detail": "Unprocessable audio"}')


@dataclass
class Served:
    """One request as the upstream lived it."""

    request_id: str
    arrival: int  # 1 for the first request with this id (on any server of a pool), 2 ...
    step: str
    started: float
    server: int = 0  # which server of the pool received it (its index)
    ended: float = 0.0  # the upstream was done: answered, broke off, or stopped computing
    busy_until: float | None = None  # when its computation ends (time.monotonic())
    status: int | None = None
    answer_sha: str | None = None  # of the whole body the step meant to send
    answer_size: int = 0
    complete: bool = False  # the whole answer was handed to the socket
    cut: bool = False  # the connection went away before the handler was done
    crashed: bool = False  # aborted by go_down()
    orphaned: bool = False  # kept computing after the connection went away
    body_sha: str | None = None  # of the request body, when it was read completely
    body_expected: str | None = None
    in_flight_at_start: int = 0


@dataclass(frozen=True)
class Downtime:
    """One period the upstream was down (connections refused), in time.monotonic() seconds."""

    began: float
    ended: float


@dataclass
class Ledger:
    """Every request of every task as the upstreams lived it, numbered per task across a pool,
    and events a client can wait on (`arrived`, `answered`)."""

    by_id: dict[str, list[Served]] = field(default_factory=lambda: defaultdict(list))
    _arrived: dict[tuple[str, int], asyncio.Event] = field(default_factory=dict)
    _answered: dict[tuple[str, int], asyncio.Event] = field(default_factory=dict)

    def event(self, kind: str, request_id: str, arrival: int) -> asyncio.Event:
        """An event set when `request_id`'s arrival number `arrival` came in / was answered."""
        table = self._arrived if kind == "arrived" else self._answered
        key = (request_id, arrival)
        if key not in table:
            table[key] = asyncio.Event()
        return table[key]

    def forget(self, request_id: str) -> None:
        """Drop what is kept about a task that has been judged (keeps a long soak's memory flat)."""
        for served in self.by_id.pop(request_id, []):
            self._arrived.pop((request_id, served.arrival), None)
            self._answered.pop((request_id, served.arrival), None)
        self._arrived.pop((request_id, 1), None)
        self._answered.pop((request_id, 1), None)

    def release(self) -> None:
        """Wake whoever waits on an event (the upstreams are stopping)."""
        for event in (*self._arrived.values(), *self._answered.values()):
            event.set()


class _Connection(RequestHandler):
    """aiohttp's handler of one connection, cut at once when the upstream crashed (or stopped)
    between the kernel accepting the connection and this handler taking it up: a dead process
    serves nothing, not even what reached its socket just before it died."""

    __slots__ = ("_life", "_upstream")

    def __init__(self, upstream: "ChaosUpstream", manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._upstream = upstream
        self._life = upstream.lives

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._upstream.down or self._life != self._upstream.lives:
            self._upstream.cut_without_request += 1
            cast(asyncio.Transport, transport).abort()


@dataclass
class ChaosUpstream:
    """The misbehaving Whisper server, on a fixed loopback port for its whole life."""

    limit: int
    on_disconnect: OnDisconnect = OnDisconnect.CONTINUE
    slow_ms: int = 0
    in_flight: int = 0  # computations included whose connection is gone
    max_in_flight: int = 0
    orphans_total: int = 0  # requests that kept computing after their connection went away
    violations: list[str] = field(default_factory=list)
    arrivals: int = 0  # requests this server received (their headers reached the handler)
    # Connections a crash cut with no request being handled on them (idle keep-alive ones, and
    # those whose request had not reached the handler yet, accepted or still in the backlog):
    # an attempt the gatekeeper sent on one never arrived here, so it bounds the attempts the
    # gatekeeper may count beyond `arrivals` and the connections it saw refused.
    cut_without_request: int = 0
    lives: int = 0  # how often it crashed (or stopped): a connection belongs to one life
    downtimes: list[Downtime] = field(default_factory=list)
    port: int = 0
    index: int = 0  # its place in a pool
    ledger: Ledger = field(default_factory=Ledger)
    _current: dict[str, Served] = field(default_factory=dict)
    _orphans: dict[str, asyncio.TimerHandle] = field(default_factory=dict)
    _handling: set[RequestHandler] = field(default_factory=set)
    _runner: web.AppRunner | None = None
    _server: asyncio.AbstractServer | None = None
    _socket: socket.socket | None = None
    _down_since: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def name(self) -> str:
        """The gatekeeper's name for this server (host:port)."""
        return f"127.0.0.1:{self.port}"

    @property
    def by_id(self) -> dict[str, list[Served]]:
        return self.ledger.by_id

    @property
    def members(self) -> tuple["ChaosUpstream", ...]:
        """The servers behind the gatekeeper: this one (a pool has several)."""
        return (self,)

    @property
    def down(self) -> bool:
        return self._server is None

    @property
    def orphans(self) -> int:
        """Requests in flight now whose connection is gone (they are still computing)."""
        return len(self._orphans)

    async def start(self) -> None:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        await self._listen()

    async def stop(self) -> None:
        self.ledger.release()
        self.lives += 1
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._runner is not None:
            await self._runner.cleanup()
        # Computations that outlived their connection end with the server, not after it.
        for key in list(self._orphans):
            self._finish(key)

    async def _listen(self) -> None:
        assert self._runner is not None
        assert self._runner.server is not None
        # Our own listening socket, so that a crash can see what waits in its backlog.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(128)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        manager = self._runner.server
        self._server = await loop.create_server(
            lambda: _Connection(self, manager, loop=loop, **manager._kwargs), sock=sock
        )
        self._socket = sock

    def go_down(self) -> None:
        """Crash: stop listening and abort every open connection (idle or busy)."""
        if self._server is None:
            return
        self._down_since = time.monotonic()
        self.lives += 1
        self.cut_without_request += self._reset_backlog()
        self._server.close()
        self._server = None
        for served in self._current.values():
            served.crashed = True
        for key in list(self._orphans):
            self._finish(key)  # a dead process computes nothing
        assert self._runner is not None
        assert self._runner.server is not None
        for handler in self._runner.server.connections:
            if handler not in self._handling:
                self.cut_without_request += 1
            if handler.transport is not None:
                handler.transport.abort()

    def _reset_backlog(self) -> int:
        """Connections the kernel accepted that the server had not taken yet: reset them, as
        the kernel does when a crashed process's listener goes; how many there were."""
        cut = 0
        while self._socket is not None:
            try:
                conn, _ = self._socket.accept()
            except OSError:  # BlockingIOError: the backlog is empty
                break
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
            cut += 1
        self._socket = None
        return cut

    async def come_back(self) -> None:
        """Restart: listen on the same port again."""
        if self._server is not None:
            return
        await self._listen()
        assert self._down_since is not None
        self.downtimes.append(Downtime(self._down_since, time.monotonic()))
        self._down_since = None

    def forget(self, request_id: str) -> None:
        """Drop what is kept about a task that has been judged (keeps a long soak's memory flat)."""
        self.ledger.forget(request_id)

    def overlaps_downtime(self, began: float, ended: float, margin: float = 0.05) -> bool:
        """True when the upstream crashed between `began` and `ended` (plus a margin)."""
        periods = [*self.downtimes]
        if self._down_since is not None:
            periods.append(Downtime(self._down_since, time.monotonic()))
        return any(d.began <= ended + margin and d.ended >= began - margin for d in periods)

    def working(self) -> list[Served]:
        """The requests being handled now on a live connection (orphans not included)."""
        return [served for served in self._current.values() if not served.orphaned]

    def hit_by_crash(self, served: Served) -> bool:
        """The request was cut by a crash, or lived through one (its server's)."""
        return served.crashed or self.overlaps_downtime(served.started, served.ended)

    def event(self, kind: str, request_id: str, arrival: int) -> asyncio.Event:
        """An event set when `request_id`'s arrival number `arrival` came in / was answered."""
        return self.ledger.event(kind, request_id, arrival)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.method != "POST" or not request.path.startswith(_TASK_PREFIXES):
            return web.json_response({"upstream": "chaos", "path": request.raw_path})
        request_id = request.headers.get("X-Request-ID", "")
        steps = request.headers.get(CHAOS_PLAN, "ok:0:16").split(",")
        arrival = len(self.by_id[request_id]) + 1
        step = steps[min(arrival, len(steps)) - 1]
        served = Served(request_id, arrival, step, time.monotonic(), server=self.index)
        served.body_expected = request.headers.get(CHAOS_BODY_SHA)
        self.in_flight += 1
        served.in_flight_at_start = self.in_flight
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if self.in_flight > self.limit:
            current = sorted(
                key + (f" ({other.step}, computing after the hang-up)" if other.orphaned else "")
                for key, other in self._current.items()
            )
            self.violations.append(
                f"{self.in_flight} tasks in flight at the upstream (limit {self.limit}) when "
                f"{request_id} arrived; in flight: {current}"
            )
        self.arrivals += 1
        self.by_id[request_id].append(served)
        key = f"{request_id}#{arrival}"
        self._current[key] = served
        self._handling.add(request.protocol)
        self.event("arrived", request_id, arrival).set()
        try:
            return await self._perform(request, served)
        except asyncio.CancelledError:
            served.cut = True
            raise
        finally:
            self._handling.discard(request.protocol)
            self.event("answered", request_id, arrival).set()
            self._end(key, served)

    def _end(self, key: str, served: Served) -> None:
        """The handler is over; a request cut mid-work stays in flight while it computes on."""
        left = 0.0 if served.busy_until is None else served.busy_until - time.monotonic()
        carry_on = served.cut and not served.crashed and left > 0
        if carry_on and self.on_disconnect is OnDisconnect.CONTINUE:
            served.orphaned = True
            self.orphans_total += 1
            self._orphans[key] = asyncio.get_running_loop().call_later(left, self._finish, key)
            return
        self._finish(key)

    def _finish(self, key: str) -> None:
        handle = self._orphans.pop(key, None)
        if handle is not None:
            handle.cancel()
        served = self._current.pop(key)
        served.ended = time.monotonic()
        self.in_flight -= 1

    async def _read_body(self, request: web.Request, served: Served) -> None:
        digest = hashlib.sha256()
        async for chunk in request.content.iter_chunked(1 << 16):
            digest.update(chunk)
        served.body_sha = digest.hexdigest()

    def _compute(self, served: Served, ms: float, *, slow: bool = True) -> float:
        """Start `ms` of computing (plus `slow_ms` when `slow`); return its length in seconds."""
        seconds = max(0.0, ms + (self.slow_ms if slow else 0)) / 1000
        served.busy_until = time.monotonic() + seconds
        return seconds

    async def _work(self, served: Served, ms: float, *, slow: bool = True) -> None:
        seconds = self._compute(served, ms, slow=slow)
        if seconds > 0:
            await asyncio.sleep(seconds)

    async def _perform(self, request: web.Request, served: Served) -> web.StreamResponse:
        try:
            return await self._act(request, served)
        except ConnectionResetError:
            # The gatekeeper hung up while we wrote (it gave up on a slow answer): the lost
            # connection cancels this handler in a moment.
            served.cut = True
            await asyncio.sleep(_HANG_SECONDS)
            raise AssertionError("a lost connection did not cancel its handler") from None

    async def _act(self, request: web.Request, served: Served) -> web.StreamResponse:
        kind, *args = served.step.split(":")
        if kind == "reset_upload":
            await request.content.readany()
            return await self._abort(request)
        await self._read_body(request, served)
        if kind in ("ok", "overrun", "stream", "trickle"):
            ms, size = int(args[0]), int(args[1])
            body = answer_bytes(served.request_id, served.arrival, size)
            self._note_answer(served, 200, body)
            if kind in ("ok", "overrun"):
                await self._work(served, ms, slow=kind == "ok")
                response = web.Response(body=body, content_type="application/octet-stream")
                served.complete = True
                return response
            pieces = 4 if kind == "stream" else 12
            if kind == "stream":
                await self._work(served, ms)
            else:
                self._compute(served, ms, slow=False)  # the trickle below is the computing
            stream = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            await stream.prepare(request)
            step = max(1, -(-size // pieces))
            for offset in range(0, max(size, 1), step):
                if kind == "trickle":
                    await asyncio.sleep(ms / pieces / 1000)
                await stream.write(body[offset : offset + step])
            await stream.write_eof()
            served.complete = True
            return stream
        if kind == "reset_answer":
            status, size = int(args[0]), int(args[1])
            body = answer_bytes(served.request_id, served.arrival, size)
            self._note_answer(served, status, body)
            stream = web.StreamResponse(status=status)
            stream.content_length = size
            await stream.prepare(request)
            await stream.write(body[: size // 2])
            return await self._abort(request)
        if kind == "hang":
            await asyncio.sleep(_HANG_SECONDS)
            raise AssertionError("the gatekeeper never gave up on a hung attempt")
        answer = _error_answer(kind, args)
        await self._work(served, 0)
        headers = {"Retry-After": args[0]} if kind == "busy" else {}
        body = answer.body.encode()
        self._note_answer(served, answer.status, body)
        response = web.Response(
            status=answer.status, body=body, headers=headers, content_type=answer.content_type
        )
        served.complete = True
        return response

    @staticmethod
    def _note_answer(served: Served, status: int, body: bytes) -> None:
        served.status = status
        served.answer_sha = hashlib.sha256(body).hexdigest()
        served.answer_size = len(body)

    @staticmethod
    async def _abort(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.abort()
        # The lost connection cancels this handler (handler_cancellation); wait for that.
        await asyncio.sleep(_HANG_SECONDS)
        raise AssertionError("an aborted connection did not cancel its handler")


@dataclass
class ChaosPool:
    """Several chaos upstreams behind one gatekeeper (ASR_UPSTREAM_URL=u0,u1,...), one limit
    each, sharing one ledger. Offers what the driver uses of a `ChaosUpstream`; the promises
    are checked at each member (its own limit, in-flight count and books)."""

    members: tuple[ChaosUpstream, ...]
    ledger: Ledger

    @classmethod
    def of(
        cls, limits: Iterable[int], on_disconnect: OnDisconnect = OnDisconnect.CONTINUE
    ) -> "ChaosPool":
        ledger = Ledger()
        members = tuple(
            ChaosUpstream(limit=limit, on_disconnect=on_disconnect, index=index, ledger=ledger)
            for index, limit in enumerate(limits)
        )
        return cls(members, ledger)

    @property
    def url(self) -> str:
        """ASR_UPSTREAM_URL for the gatekeeper: every member, in order."""
        return ",".join(member.url for member in self.members)

    @property
    def by_id(self) -> dict[str, list[Served]]:
        return self.ledger.by_id

    @property
    def limit(self) -> int:
        return sum(member.limit for member in self.members)

    @property
    def in_flight(self) -> int:
        return sum(member.in_flight for member in self.members)

    @property
    def orphans(self) -> int:
        return sum(member.orphans for member in self.members)

    @property
    def orphans_total(self) -> int:
        return sum(member.orphans_total for member in self.members)

    @property
    def arrivals(self) -> int:
        return sum(member.arrivals for member in self.members)

    @property
    def violations(self) -> list[str]:
        return [
            f"{member.name} (server {member.index}): {violation}"
            for member in self.members
            for violation in member.violations
        ]

    @property
    def downtimes(self) -> list[Downtime]:
        return sorted(
            (d for member in self.members for d in member.downtimes), key=lambda d: d.began
        )

    async def start(self) -> None:
        for member in self.members:
            await member.start()

    async def stop(self) -> None:
        for member in self.members:
            await member.stop()

    def event(self, kind: str, request_id: str, arrival: int) -> asyncio.Event:
        return self.ledger.event(kind, request_id, arrival)

    def forget(self, request_id: str) -> None:
        self.ledger.forget(request_id)

    def hit_by_crash(self, served: Served) -> bool:
        """A crash of the server that received the request hit it (the others' do not)."""
        return self.members[served.server].hit_by_crash(served)


Upstreams = ChaosUpstream | ChaosPool
"""What the driver runs against: one chaos upstream, or a pool of them."""
