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
from gatekeeper.outcomes import AttemptOutcome, RejectReason

__all__ = [
    "ATTEMPTS_HEADER",
    "REASON_HEADER",
    "body_broken",
    "body_timeout",
    "body_too_large",
    "json_answer",
    "refusal",
    "upstream_failure",
    "upstream_unreachable",
]

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
