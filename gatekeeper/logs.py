"""Log lines operators grep: the seed's `[ASR并发]` wording, then `key=value` facts.

`ASR_LOG_FORMAT=json` writes the same facts as one JSON object a line.
"""

import json
import logging
import sys
import time
import traceback
from datetime import datetime
from enum import StrEnum
from typing import Any

from aiohttp.http_exceptions import BadHttpMessage

__all__ = ["LOG_PREFIX", "Event", "configure_logging", "log_event", "logger"]

LOG_PREFIX = "[ASR并发]"
logger = logging.getLogger("gatekeeper")

_FIELDS_ATTR = "gk_fields"
_EVENT_ATTR = "gk_event"


class Event(StrEnum):
    """Every event the gatekeeper logs; the value is the seed's (Chinese) wording."""

    START = "开始转录"
    FINISH = "转录完成"
    FAILED = "转录失败"
    OOM = "显存不足"
    COOLDOWN = "检测到最近OOM，延迟{delay}秒后开始"
    QUEUE_FULL = "队列已满，拒绝任务"
    QUEUE_TIMEOUT = "排队超时，拒绝任务"
    SHUTDOWN_REFUSED = "服务正在关闭，拒绝任务"
    RETRY = "重试转录"
    RETRY_REFUSED = "重试无法进行，拒绝任务"
    TIMEOUT = "转录超时"
    HOLD = "超时任务仍在GPU上，保留槽位"
    HOLD_ENDED = "超时任务已结束，释放槽位"
    CRASH = "Whisper服务连接中断"
    UPSTREAM_ERROR = "Whisper服务返回错误"
    UPSTREAM_DOWN = "Whisper服务不可用，暂停分配任务"
    UPSTREAM_UP = "Whisper服务已恢复"
    COORDINATION_REFUSED = "Redis不可用，无法确认空闲槽位，拒绝任务"
    REDIS_DOWN = "Redis不可用，暂停分配新任务"
    REDIS_UP = "Redis已恢复，继续分配任务"
    CLIENT_LEFT = "客户端已断开"
    BODY_TOO_LARGE = "请求体过大，拒绝任务"
    BODY_TIMEOUT = "上传超时，释放排队位置"
    UPLOAD_TIMEOUT = "上传总时间超时，拒绝任务"
    CONFIG_CHANGED = "配置已更改"
    CONFIG_NEEDS_RESTART = "配置更改需要重启才能生效"
    LIMIT_CHANGED = "调整并发"
    MEMORY_LEARNED = "调整显存估计"
    SERVING = "网关已启动"
    DRAINING = "收到停止信号，等待任务完成"
    DRAINING_CUT = "再次收到停止信号，不再等待"
    STOPPED = "网关已停止"


def _escape(text: str, keep: str = "") -> str:
    """`text` with every non-printable character (but those in `keep`) as a backslash escape.

    Paths, request ids and header values come from clients: written raw, a NUL, an escape
    sequence or a line separator (U+2028, U+0085) would garble a terminal or forge a line.
    """
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() or c in keep else c.encode("unicode_escape").decode("ascii")
        for c in text
    )


def _json_escape(text: str) -> str:
    """JSON text with the non-printable characters json.dumps leaves raw (DEL, C1 controls,
    line separators, lone surrogates) as \\u escapes; outside strings JSON text is printable."""
    if text.isprintable():
        return text
    out = []
    for c in text:
        code = ord(c)
        if c.isprintable():
            out.append(c)
        elif code > 0xFFFF:
            code -= 0x10000
            out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
        else:
            out.append(f"\\u{code:04x}")
    return "".join(out)


# The pieces of a traceback that Python writes itself; the rest (exception messages) may hold
# client text, so their line breaks are escaped too: a message cannot forge a log line.
_TRACEBACK_FRAMES = ("Traceback (most recent call last):\n", '  File "')
_TRACEBACK_LINKS = frozenset(
    {
        "\nThe above exception was the direct cause of the following exception:\n\n",
        "\nDuring handling of the above exception, another exception occurred:\n\n",
    }
)


def _format_exception(exc: BaseException) -> str:
    """The standard traceback, with every non-printable character of the messages escaped."""
    pieces = []
    for piece in traceback.format_exception(exc):
        if piece.startswith(_TRACEBACK_FRAMES) or piece in _TRACEBACK_LINKS:
            pieces.append(_escape(piece, keep="\n"))
        else:
            pieces.append(_escape(piece.removesuffix("\n")) + "\n")
    return "".join(pieces).removesuffix("\n")


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.3f}".rstrip("0").rstrip(".")
        return text or "0"
    kind = type(value)
    if kind is int:
        return str(value)
    text = value if kind is str else str(value)
    bare = text.isprintable() and " " not in text and "=" not in text and '"' not in text
    # Quoted values are JSON strings: every control and non-ASCII character escaped.
    return text if text and bare else json.dumps(text)


def _number(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".") if value != int(value) else str(int(value))


def log_event(event: Event, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event with its facts (`fields` become `key=value` pairs or JSON keys)."""
    if not logger.isEnabledFor(level):
        return
    words = event.value
    if "{delay}" in words:
        words = words.format(delay=_number(float(fields.get("delay", 0.0))))
    logger.log(level, "%s %s", LOG_PREFIX, words, extra={_FIELDS_ATTR: fields, _EVENT_ATTR: event})


class _TextFormatter(logging.Formatter):
    """`time level message key=value …`, built directly: every task writes two of these lines.

    The output is what `Formatter("%(asctime)s %(levelname)s %(message)s")` writes, with the
    facts appended; only the date-and-time part is cached, once per second.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s")
        self._second = -1
        self._second_text = ""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _escape(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return _format_exception(ei[1]) if ei[1] is not None else super().formatException(ei)

    def formatStack(self, stack_info: str) -> str:
        return _escape(super().formatStack(stack_info), keep="\n")

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            line = super().format(record)  # tracebacks: the standard layout
        else:
            record.message = _escape(record.getMessage())
            second = int(record.created)
            if second != self._second:
                self._second_text = time.strftime(self.default_time_format, self.converter(second))
                self._second = second
            record.asctime = f"{self._second_text},{int(record.msecs):03d}"
            line = f"{record.asctime} {record.levelname} {record.message}"
        fields: dict[str, Any] | None = getattr(record, _FIELDS_ATTR, None)
        if fields:
            line += " " + " ".join([f"{k}={_format_value(v)}" for k, v in fields.items()])
        return line


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event: Event | None = getattr(record, _EVENT_ATTR, None)
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if event is not None:
            data["event"] = event.name.lower()
        fields: dict[str, Any] | None = getattr(record, _FIELDS_ATTR, None)
        if fields:
            data.update(fields)
        if record.exc_info:
            data["exc_info"] = self.formatException(record.exc_info)
        return _json_escape(json.dumps(data, ensure_ascii=False, default=str))


class _MalformedRequestFilter(logging.Filter):
    """Turn aiohttp's traceback for a malformed request into one warning line.

    A client sending garbage (bad framing, a header flood) is refused with 400 by the HTTP
    parser; that is the client's problem, not an error in the gatekeeper, and a full traceback
    at ERROR level would page someone for nothing.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, BadHttpMessage):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args, record.exc_info, record.exc_text = (
                "%s 拒绝格式错误的请求 error=%s",
                (LOG_PREFIX, json.dumps(exc.message, ensure_ascii=False)),
                None,
                None,
            )
        return True


def configure_logging(*, fmt: str, level: str) -> None:
    """Send every log line to stderr in the chosen format (called once, by the CLI)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter())
    handler.addFilter(_MalformedRequestFilter())
    # The logging HOWTO's "Optimization": skip facts no line shows (caller's source file and
    # line, thread, process) — every task logs at least two lines.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # One access-log line per request would drown the task lines (and every scrape of /metrics
    # would add one); the task lines already say what happened. DEBUG brings them back.
    logging.getLogger("aiohttp.access").setLevel(logging.DEBUG if level == "DEBUG" else "WARNING")
