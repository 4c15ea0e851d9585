"""Client connections: a deadline for each request head, which aiohttp's server lacks.

aiohttp reads a request's head (request line and headers) without a time limit: a client
sending one header line every few seconds keeps its connection for ever, and a few thousand of
them hold every socket the gatekeeper may open (slowloris). Like nginx's client_header_timeout
and Go's ReadHeaderTimeout, ASR_HEADER_TIMEOUT bounds the time a head may take: counted from
the moment the connection opens, or, on a kept-alive connection, from the first byte of the
next head. A connection that is idle between requests is left alone (aiohttp's keep-alive
timeout governs it): nginx keeps idle connections to the gatekeeper and would lose a POST
written onto one the gatekeeper had just closed. Once the head is in, the body has its own
limits (ASR_CLIENT_BODY_TIMEOUT, ASR_UPLOAD_TIMEOUT).

When the deadline passes and the head is still incomplete, the client gets 408 (if it sent
anything) and the connection is closed. The deadline only needs to know whether a head is under
way; aiohttp's handler knows that through `_waiter` (the same test its own keep-alive timer
uses) and `_messages` (requests parsed and not yet handled), which this module reads.
"""

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader

from gatekeeper.answers import header_timeout_bytes

__all__ = ["GatekeeperRunner"]

_END_OF_HEAD = b"\r\n\r\n"  # aiohttp parses requests strictly: CRLF only


class GatekeeperRunner(web.AppRunner):
    """aiohttp's AppRunner whose connections carry the request-head deadline."""

    __slots__ = ("_header_timeout",)

    def __init__(self, app: web.Application, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout = header_timeout

    async def _make_server(self) -> web.Server:
        # The extension point of aiohttp's runners; the server it builds makes plain handlers.
        server = await super()._make_server()
        return _Server(server, header_timeout=self._header_timeout)


class _Server(web.Server):
    """aiohttp's low-level server (the protocol factory), making deadline-keeping handlers."""

    def __init__(self, made: web.Server, *, header_timeout: float) -> None:
        super().__init__(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=made._loop,
            **made._kwargs,
        )
        self._header_timeout = header_timeout

    def __call__(self) -> web.RequestHandler:
        return _HeadDeadline(
            self, loop=self._loop, header_timeout=self._header_timeout, **self._kwargs
        )


class _HeadDeadline(web.RequestHandler):
    """aiohttp's connection handler with a deadline for each request head.

    A head is under way from the moment the connection opens, when a byte arrives while the
    handler waits for a request, or when bytes turn up after the body of the last request parsed
    (pipelining). It ends when aiohttp has parsed it. While the handler is busy with earlier
    requests, an overdue head waits; the deadline starts again and is enforced once the
    handler waits for it.
    """

    __slots__ = ("_head_fresh", "_head_timeout", "_head_timer", "_last", "_tail")

    def __init__(self, manager: web.Server, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout = header_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_fresh = False  # the head under way has not sent a byte yet
        self._last: tuple[RawRequestMessage, StreamReader] | None = None  # newest request parsed
        self._tail = b""  # the last bytes received, for a head end split across reads

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._head_begins(fresh=True)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._head_ends()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not data:  # aiohttp re-parsing what it buffered: nothing new arrived
            super().data_received(data)
            return
        idle = self._waiting_for_a_request()
        fresh = self._head_fresh or (idle and self._head_timer is None)  # a head starts at data[0]
        last = self._last
        body_bytes = 0 if last is None else last[1].total_bytes
        body_done = last is None or last[1].is_eof()
        parsed = len(self._messages)
        super().data_received(data)
        tail, self._tail = self._tail, data[-3:]
        if len(self._messages) > parsed:
            single = fresh and len(self._messages) == parsed + 1
            self._head_parsed(tail, data, data if single else None)
        elif self._head_timer is not None:
            self._head_fresh = False  # more of the head under way
        elif idle or body_done or _beyond_body(last, body_bytes, data):
            self._head_begins(fresh=False)  # the first bytes of a new head

    def _head_parsed(self, tail: bytes, data: bytes, whole_read: bytes | None) -> None:
        """aiohttp parsed one or more heads in `data`; another may have begun behind them."""
        message, payload = self._messages[-1]
        if isinstance(message, RawRequestMessage):  # not a parse error (answered 400, closed)
            self._last = (message, payload)
            if _more_follows(message, payload, tail, data, whole_read):
                self._head_begins(fresh=False)
                return
        self._head_ends()

    def _waiting_for_a_request(self) -> bool:
        """The handler is idle, waiting for aiohttp to parse the next request."""
        return self._waiter is not None and not self._waiter.done()

    def _head_begins(self, *, fresh: bool) -> None:
        self._head_ends()
        self._head_fresh = fresh
        self._head_timer = self._loop.call_later(self._head_timeout, self._head_overdue)

    def _head_ends(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._head_fresh = False

    def _head_overdue(self) -> None:
        self._head_timer = None
        if not self._waiting_for_a_request():
            # Busy with earlier requests: the head is not late yet; its time starts again.
            self._head_begins(fresh=self._head_fresh)
            return
        if self.transport is not None and not self._head_fresh:
            self.transport.write(header_timeout_bytes(self._head_timeout))
        self.force_close()


def _raw_length(message: RawRequestMessage) -> bool:
    """The body is framed by Content-Length and reaches the handler byte for byte."""
    return not message.chunked and message.compression is None


def _beyond_body(
    last: tuple[RawRequestMessage, StreamReader] | None, body_bytes: int, data: bytes
) -> bool:
    """The read `data` ended the last request's body with bytes to spare (the next head's).

    `body_bytes` is how much of that body had arrived before the read.
    """
    if last is None or not _raw_length(last[0]) or not last[1].is_eof():
        return False
    return len(data) > last[1].total_bytes - body_bytes


def _more_follows(
    message: RawRequestMessage,
    payload: StreamReader,
    tail: bytes,
    data: bytes,
    whole_read: bytes | None,
) -> bool:
    """Bytes of another head follow the complete request `message` in the read `data`.

    `tail` is what came just before `data`; `whole_read` is `data` when the request began with
    it (so its head ends at the read's first CRLFCRLF). A request still receiving its body is
    followed by nothing yet.
    """
    if not payload.is_eof():
        return False
    if message.chunked or payload.total_bytes == 0:
        # The head, or the last chunk of the body, ends with CRLFCRLF; anything after is more.
        end = data[-4:] if len(data) >= 4 else tail + data
        return not end.endswith(_END_OF_HEAD)
    if whole_read is None or not _raw_length(message):
        return False  # where the body ended in this read is unknown: assume nothing follows
    head_end = whole_read.find(_END_OF_HEAD) + len(_END_OF_HEAD)
    return len(whole_read) > head_end + payload.total_bytes
