"""Relaying the Whisper server's answers: streaming to the client, reading unwanted answers to
their end, and pass-through requests.

Nothing here decides anything about a task: the runner says what to relay and learns how the
relay ended (`RelayEnd`); an answer the upstream breaks off, or that outlives the deadline, is
cut at the client, never made to look complete.
"""

import asyncio
from collections.abc import Callable
from enum import Enum

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gatekeeper.answers import upstream_unreachable
from gatekeeper.clock import Clock
from gatekeeper.headers import REQUEST_ID, forward_request_headers, forward_response_headers
from gatekeeper.policy.outcomes import HoldEnd
from gatekeeper.upstream import AttemptResult, upstream_url

__all__ = [
    "RelayEnd",
    "client_write",
    "cut",
    "discard",
    "finish_answer",
    "finish_attempt",
    "pass_through",
    "relay",
    "upstream_headers",
]

_CLIENT_CHUNK = 64 * 1024


class RelayEnd(Enum):
    """How relaying an answer ended."""

    DELIVERED = "delivered"
    CLIENT_GONE = "client_gone"
    UPSTREAM_BROKE = "upstream_broke"
    TIMED_OUT = "timed_out"


def upstream_headers(request: web.Request, request_id: str) -> CIMultiDict[str]:
    """The client's headers as the Whisper server should see them (this hop recorded)."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    client_ip = peer[0] if isinstance(peer, tuple) and peer else request.remote
    return forward_request_headers(
        request.headers,
        client_ip=client_ip,
        scheme=request.scheme,
        host=request.host,
        request_id=request_id,
    )


async def pass_through(
    request: web.Request,
    session: aiohttp.ClientSession,
    *,
    upstream: str,
    within: float,
    new_id: Callable[[], str],
    clock: Clock,
) -> web.StreamResponse:
    """Non-task requests go straight upstream: never queued, never retried."""
    deadline = clock.monotonic() + within
    request_id = request.headers.get(REQUEST_ID) or new_id()
    headers = upstream_headers(request, request_id)
    data = request.content if request.body_exists else None
    try:
        async with clock.timeout_at(deadline):
            response = await session.request(
                request.method,
                upstream_url(upstream, request.raw_path),
                headers=headers,
                data=data,
                allow_redirects=False,
            )
    except TimeoutError:
        return upstream_unreachable("no answer within ASR_REQUEST_TIMEOUT")
    except (aiohttp.ClientError, OSError) as exc:
        return upstream_unreachable(str(exc) or type(exc).__name__)
    try:
        answer, _ = await relay(request, response, {}, deadline, clock)
        return answer
    finally:
        response.close()


async def relay(
    request: web.Request,
    upstream: AttemptResult | aiohttp.ClientResponse,
    extra_headers: dict[str, str],
    deadline: float,
    clock: Clock,
    gone: asyncio.Event | None = None,
) -> tuple[web.StreamResponse, "RelayEnd"]:
    """Send the upstream answer to the client, streaming what is not read yet.

    If the client is gone the rest is still read (and dropped) so the attempt really ends
    before the slot is given back. If the upstream breaks off or the deadline passes
    mid-answer, the client connection is cut, so the client sees a broken answer rather
    than a silently short one.
    """
    result = upstream if isinstance(upstream, AttemptResult) else AttemptResult(upstream)
    response_in = result.response
    assert response_in is not None
    headers = forward_response_headers(response_in.headers)
    headers.update(extra_headers)
    if result.complete and "Content-Type" in headers:
        # Already read whole (a transcript, an error page): one write, status to last byte.
        small = web.Response(status=response_in.status, reason=response_in.reason, headers=headers)
        small.body = result.prefix
        if gone is not None and gone.is_set():
            return small, RelayEnd.CLIENT_GONE
        ok = await client_write(small.prepare(request))
        if ok:
            ok = await client_write(small.write_eof())
        return small, RelayEnd.DELIVERED if ok else RelayEnd.CLIENT_GONE
    response = web.StreamResponse(
        status=response_in.status, reason=response_in.reason, headers=headers
    )
    if response_in.content_length is not None:
        response.content_length = response_in.content_length
    client_ok = gone is None or not gone.is_set()
    try:
        async with clock.timeout_at(deadline):
            if client_ok:
                client_ok = await client_write(response.prepare(request))
            if result.prefix and client_ok:
                client_ok = await client_write(response.write(result.prefix))
            if not result.complete:
                async for chunk in response_in.content.iter_any():
                    if client_ok:
                        client_ok = await client_write(response.write(chunk))
            if client_ok:
                client_ok = await client_write(response.write_eof())
    except TimeoutError:
        cut(request)
        return response, RelayEnd.TIMED_OUT
    except (aiohttp.ClientError, OSError):
        cut(request)
        return response, RelayEnd.UPSTREAM_BROKE
    return response, RelayEnd.DELIVERED if client_ok else RelayEnd.CLIENT_GONE


async def client_write(write: "asyncio.Future[object] | object") -> bool:
    """Await one write to the client; False (not an exception) when the client has gone."""
    try:
        await write  # type: ignore[misc]
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        return False
    return True


async def finish_attempt(attempt: "asyncio.Task[AttemptResult]") -> HoldEnd:
    """Wait for a timed-out attempt to end upstream; read and drop any answer it gets.

    Cancelling this (the hold ran out, or the shutdown) cancels the attempt: its connection
    is closed, which is all a proxy can do to stop the work.
    """
    result = await attempt
    if result.response is None:
        return HoldEnd.CLOSED
    if result.complete:
        result.response.close()
        return HoldEnd.ANSWERED
    return await finish_answer(result.response)


async def finish_answer(response: aiohttp.ClientResponse) -> HoldEnd:
    """Read an answer nobody wants to its end: ANSWERED, or CLOSED if the server broke off."""
    try:
        while await response.content.read(_CLIENT_CHUNK):
            pass
    except (aiohttp.ClientError, OSError):
        return HoldEnd.CLOSED
    finally:
        response.close()
    return HoldEnd.ANSWERED


async def discard(response: aiohttp.ClientResponse, deadline: float, clock: Clock) -> None:
    """Read an unwanted answer to its end (keeps the connection reusable), then close it."""
    try:
        async with clock.timeout_at(deadline):
            while await response.content.read(_CLIENT_CHUNK):
                pass
    except (TimeoutError, aiohttp.ClientError, OSError):
        pass
    finally:
        response.close()


def cut(request: web.Request) -> None:
    """Abort the client's connection: a broken answer must look broken, never complete."""
    transport = request.transport
    if transport is not None:
        transport.abort()
