"""Which headers cross the proxy: end-to-end ones unchanged, hop-by-hop and framing ones not."""

from multidict import CIMultiDict, CIMultiDictProxy

from gatekeeper.headers import forward_request_headers, forward_response_headers


def _incoming(*items: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(items))


def test_request_keeps_end_to_end_headers_in_order_and_drops_hop_and_framing_ones() -> None:
    out = forward_request_headers(
        _incoming(
            ("Host", "asr.example"),
            ("X-Custom", "one"),
            ("Connection", "keep-alive, X-Secret-Hop"),
            ("x-secret-hop", "drop me"),  # named by Connection, in another case
            ("Keep-Alive", "timeout=5"),
            ("Transfer-Encoding", "chunked"),
            ("Content-Length", "12"),
            ("TE", "trailers"),
            ("X-Custom", "two"),
            ("X-Forwarded-For", "10.0.0.1"),
        ),
        client_ip="10.0.0.2",
        scheme="http",
        host="asr.example",
        request_id="rid",
    )
    assert out.getall("X-Custom") == ["one", "two"]
    for gone in ("Connection", "X-Secret-Hop", "Keep-Alive", "Transfer-Encoding", "TE"):
        assert gone not in out
    assert "Content-Length" not in out  # set again from the spooled body
    assert out["X-Forwarded-For"] == "10.0.0.1, 10.0.0.2"
    assert (out["X-Forwarded-Proto"], out["X-Forwarded-Host"]) == ("http", "asr.example")
    assert out["X-Request-ID"] == "rid"
    assert out["Host"] == "asr.example"


def test_response_keeps_cookies_and_encoding_and_drops_framing() -> None:
    out = forward_response_headers(
        _incoming(
            ("Content-Type", "application/json"),
            ("Content-Encoding", "gzip"),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
            ("Content-Length", "99"),
            ("Connection", "close, X-Upstream-Only"),
            ("X-Upstream-Only", "1"),
            ("Upgrade", "h2c"),
        )
    )
    assert list(out.items()) == [
        ("Content-Type", "application/json"),
        ("Content-Encoding", "gzip"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
    ]
