"""Every answer the gatekeeper makes up itself (refusals and failures), in one place.

Answers that come from the Whisper server are relayed unchanged elsewhere; these are the ones a
backend sees when the gatekeeper speaks for itself. `error` is user-facing (Chinese, as the seed
shows it to users); `detail` tells an operator what happened and what to do.
"""

import functools
import json
from typing import Any

from aiohttp import web

from gatekeeper.headers import REQUEST_ID
from gatekeeper.policy.outcomes import AttemptOutcome, RejectReason

__all__ = [
    "ATTEMPTS_HEADER",
    "REASON_HEADER",
    "body_broken",
    "body_timeout",
    "body_too_large",
    "header_timeout_bytes",
    "json_answer",
    "own_path_elsewhere",
    "refusal",
    "transfer_coding_refused",
    "upload_timeout",
    "upstream_failure",
    "upstream_unreachable",
]

AUDIO_HEADER = "X-Gatekeeper-Audio-Seconds"
"""Seconds of audio in a task's upload (two decimals), or `unknown`, on every answer to it."""
ATTEMPTS_HEADER = "X-Gatekeeper-Attempts"
REASON_HEADER = "X-Gatekeeper-Reason"
_JSON = "application/json; charset=utf-8"


def json_answer(
    status: int, payload: dict[str, Any], *, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON answer with UTF-8 text left readable (no \\u escapes for Chinese)."""
    body = json.dumps(payload, ensure_ascii=False).encode()
    response = web.Response(status=status, body=body, headers=headers)
    response.headers["Content-Type"] = _JSON
    return response


@functools.lru_cache(maxsize=1024)
def _refusal_body(reason: RejectReason, retry_after: int, queue_usage: str) -> bytes:
    """The refusal's JSON, encoded once per distinct content (a flood repeats the same few)."""
    payload = {
        "error": "服务繁忙",
        "reason": reason.value,
        "retry_after": retry_after,
        "queue_usage": queue_usage,
    }
    return json.dumps(payload, ensure_ascii=False).encode()


def refusal(
    reason: RejectReason, *, retry_after: int, queue_usage: str, request_id: str, attempts: int = 0
) -> web.Response:
    """503 服务繁忙 with an honest Retry-After (SPEC "Tasks: admit, queue, refuse").

    While shutting down the connection is closed after the answer: keeping it would make the
    server wait for the rest of an unread upload before it can exit.
    """
    response = web.Response(
        status=503,
        body=_refusal_body(reason, retry_after, queue_usage),
        headers={
            "Content-Type": _JSON,
            "Retry-After": str(retry_after),
            REASON_HEADER: reason.value,
            REQUEST_ID: request_id,
            ATTEMPTS_HEADER: str(attempts),
        },
    )
    if reason is RejectReason.SHUTTING_DOWN:
        response.force_close()
    return response


_FAILURES: dict[AttemptOutcome, tuple[int, str, str]] = {
    AttemptOutcome.CRASH: (
        502,
        "语音识别服务暂时不可用",
        "the Whisper server closed or refused the connection before answering; it may be "
        "restarting - check its container and logs",
    ),
    AttemptOutcome.TIMEOUT: (
        504,
        "语音识别超时",
        "the Whisper server did not finish within ASR_REQUEST_TIMEOUT; raise it for long audio "
        "or lower ASR_MAX_CONCURRENT",
    ),
}


def upstream_failure(outcome: AttemptOutcome, *, attempts: int, request_id: str) -> web.Response:
    """502 after a crash, 504 after a timeout: the task's last attempt left no answer to relay."""
    status, error, detail = _FAILURES[outcome]
    return json_answer(
        status,
        {"error": error, "reason": outcome.value, "attempts": attempts, "detail": detail},
        headers={
            REQUEST_ID: request_id,
            ATTEMPTS_HEADER: str(attempts),
            REASON_HEADER: outcome.value,
        },
    )


def body_too_large(limit: int, *, request_id: str) -> web.Response:
    """413 for a body over ASR_MAX_BODY_SIZE (decided from Content-Length or while reading)."""
    return json_answer(
        413,
        {
            "error": "音频文件过大",
            "reason": "body_too_large",
            "max_body_size": limit,
            "detail": f"the request body exceeds ASR_MAX_BODY_SIZE={limit} bytes",
        },
        headers={REQUEST_ID: request_id, REASON_HEADER: "body_too_large", "Connection": "close"},
    )


def body_broken(*, request_id: str) -> web.Response:
    """400 for a body that ended early or was garbled (usually nobody is left to read it)."""
    return json_answer(
        400,
        {
            "error": "上传中断",
            "reason": "body_incomplete",
            "detail": "the request body ended before it was complete, or its chunking was invalid",
        },
        headers={REQUEST_ID: request_id, REASON_HEADER: "body_incomplete", "Connection": "close"},
    )


def body_timeout(seconds: float, *, request_id: str) -> web.Response:
    """408 for a client that stopped sending its body (its queue place or slot is freed)."""
    return json_answer(
        408,
        {
            "error": "上传超时",
            "reason": "client_body_timeout",
            "detail": f"no request body data for {seconds:g} s (ASR_CLIENT_BODY_TIMEOUT)",
        },
        headers={
            REQUEST_ID: request_id,
            REASON_HEADER: "client_body_timeout",
            "Connection": "close",
        },
    )


def upload_timeout(seconds: float, *, request_id: str) -> web.Response:
    """408 for an upload that took longer than ASR_UPLOAD_TIMEOUT in all (a steady trickle)."""
    return json_answer(
        408,
        {
            "error": "上传超时",
            "reason": "upload_timeout",
            "detail": f"the upload took longer than {seconds:g} s in all (ASR_UPLOAD_TIMEOUT); "
            "send it faster, or let nginx buffer it first",
        },
        headers={REQUEST_ID: request_id, REASON_HEADER: "upload_timeout", "Connection": "close"},
    )


def upstream_unreachable(reason: str) -> web.Response:
    """502 for a pass-through request the Whisper server did not answer."""
    return json_answer(
        502,
        {
            "error": "语音识别服务暂时不可用",
            "reason": "upstream_unreachable",
            "detail": f"could not reach the Whisper server: {reason}",
        },
    )


def own_path_elsewhere(own: str, *, allowed: tuple[str, ...], exact: bool) -> web.Response:
    """404 (405 for another method) for one of the gatekeeper's own paths spelled loosely.

    `/STATS`, `/stats/` or `POST /stats` are answered here, never passed on: the token sent with
    them is meant for the gatekeeper, not for the Whisper server.
    """
    if exact:
        return json_answer(
            405,
            {
                "error": "method not allowed",
                "path": own,
                "detail": f"{own} is the gatekeeper's own endpoint: use {' or '.join(allowed)}",
            },
            headers={"Allow": ",".join(allowed)},
        )
    return json_answer(
        404,
        {
            "error": "not found",
            "path": own,
            "detail": f"the gatekeeper's own endpoint is {own}, spelled exactly so; this request "
            "was not passed to the Whisper server",
        },
    )


def transfer_coding_refused(transfer_encoding: str, *, invalid: str | None = None) -> web.Response:
    """501 for a body in a transfer coding other than chunked alone; 400 (saying why, in
    `invalid`) for a Transfer-Encoding that makes no sense at all.

    The body is never read: its framing cannot be trusted, so the connection closes after the
    answer (RFC 9112 §6.1).
    """
    if invalid is not None:
        status, reason, error, detail = 400, "transfer_encoding_invalid", "bad request", invalid
    else:
        status, reason, error = 501, "transfer_coding_not_implemented", "not implemented"
        detail = (
            "only 'Transfer-Encoding: chunked' is accepted; send the body as it is, with "
            "Content-Length or chunked (a compressed upload says so in Content-Encoding)"
        )
    response = json_answer(
        status,
        {
            "error": error,
            "reason": reason,
            "transfer_encoding": transfer_encoding,
            "detail": detail,
        },
        headers={REASON_HEADER: reason, "Connection": "close"},
    )
    response.force_close()
    return response


@functools.lru_cache(maxsize=8)
def header_timeout_bytes(seconds: float) -> bytes:
    """408 for a request head that did not arrive within ASR_HEADER_TIMEOUT, as raw bytes.

    Written straight onto the connection (no request was parsed to answer), which then closes.
    """
    body = json.dumps(
        {
            "error": "请求超时",
            "reason": "client_header_timeout",
            "detail": f"the request line and headers did not arrive within {seconds:g} s "
            "(ASR_HEADER_TIMEOUT)",
        },
        ensure_ascii=False,
    ).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\n"
        f"Content-Type: {_JSON}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{REASON_HEADER}: client_header_timeout\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body
