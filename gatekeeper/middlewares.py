"""aiohttp middlewares: checks every request passes before any handler (own or proxy) sees it."""

from aiohttp import web
from aiohttp.http import HttpVersion11
from aiohttp.typedefs import Handler

from gatekeeper.answers import transfer_coding_refused

__all__ = ["refuse_transfer_codings"]


@web.middleware
async def refuse_transfer_codings(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse a body framed in any transfer coding but `chunked` alone, unread and unforwarded.

    aiohttp's parser undoes `chunked` and hands over what is left as the body: for
    `gzip, chunked` that is still gzip, which the Whisper server would take for the audio
    itself. A server that does not implement a coding answers 501 (RFC 9112 §6.1); HTTP/1.0 has
    no transfer codings, so such a message's framing is faulty (400). aiohttp already refuses a
    list that does not end in `chunked` and a second Transfer-Encoding field.
    """
    if "Transfer-Encoding" not in request.headers:
        return await handler(request)
    value = ", ".join(request.headers.getall("Transfer-Encoding"))
    codings = [coding.strip().lower() for coding in value.split(",") if coding.strip()]
    if request.version < HttpVersion11:
        return transfer_coding_refused(
            value, invalid="HTTP/1.0 has no Transfer-Encoding (RFC 9112 §6.1); send Content-Length"
        )
    if not codings:
        return transfer_coding_refused(value, invalid="Transfer-Encoding names no coding")
    if codings != ["chunked"]:
        return transfer_coding_refused(value)
    return await handler(request)
