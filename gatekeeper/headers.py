"""Which headers cross the proxy (pure): everything except the hop-by-hop ones.

RFC 9110 §7.6.1: Connection, and every header it names, plus the classic hop-by-hop set, apply
to one connection only and must not be forwarded.
"""

from multidict import CIMultiDict, CIMultiDictProxy

__all__ = [
    "HOP_BY_HOP",
    "REQUEST_ID",
    "forward_request_headers",
    "forward_response_headers",
]

REQUEST_ID = "X-Request-ID"

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

Headers = CIMultiDict[str] | CIMultiDictProxy[str]


def _connection_named(headers: Headers) -> set[str]:
    named: set[str] = set()
    for value in headers.getall("Connection", []):
        named.update(token.strip().lower() for token in value.split(",") if token.strip())
    return named


# Framing is redone on each side of the proxy: Content-Length is recomputed for the body sent.
# Expect: 100-continue is answered here (the body is spooled before it goes on), never upstream.
_DROP = HOP_BY_HOP | {"content-length", "expect"}


def _end_to_end(headers: Headers, drop: frozenset[str]) -> CIMultiDict[str]:
    if "Connection" in headers:  # rare on keep-alive HTTP/1.1: the headers it names go too
        drop = drop | _connection_named(headers)
    return CIMultiDict([(k, v) for k, v in headers.items() if k.lower() not in drop])


def forward_request_headers(
    headers: Headers,
    *,
    client_ip: str | None,
    scheme: str,
    host: str | None,
    request_id: str,
) -> CIMultiDict[str]:
    """The client's headers as the upstream should see them.

    Content-Length is dropped here and set again from the spooled body (the same value for an
    intact upload), the X-Forwarded-* family records this hop, and X-Request-ID is the task's
    id.
    """
    out = _end_to_end(headers, _DROP)
    if client_ip:
        prior = ", ".join(out.getall("X-Forwarded-For", []))
        out.popall("X-Forwarded-For", None)
        out["X-Forwarded-For"] = f"{prior}, {client_ip}" if prior else client_ip
    if "X-Forwarded-Proto" not in out:
        out["X-Forwarded-Proto"] = scheme
    if host and "X-Forwarded-Host" not in out:
        out["X-Forwarded-Host"] = host
    out[REQUEST_ID] = request_id
    return out


def forward_response_headers(headers: Headers) -> CIMultiDict[str]:
    """The upstream's answer headers as the client should see them (framing is redone)."""
    return _end_to_end(headers, _DROP)
