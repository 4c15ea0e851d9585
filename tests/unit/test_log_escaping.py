"""Client-controlled text never reaches the log raw (issue #13, item 6).

A path, a request id or a header value may hold NUL, terminal escape sequences or line
separators; both log formats write them as escapes, one record a line.
"""

import json
import logging
from collections.abc import Callable

import pytest

from gatekeeper.logs import Event, configure_logging, log_event

HOSTILE = "/asr\x00\x1b[2J\x7f\x85\u2028\u202e\udcff\U000e0001end"


def _emit(fmt: str, capsys: pytest.CaptureFixture[str], emit: Callable[[], None]) -> list[str]:
    """The lines `emit` writes in format `fmt`, split the way log tools split lines."""
    configure_logging(fmt=fmt, level="INFO")
    try:
        emit()
    finally:
        logging.getLogger().handlers.clear()
    text = capsys.readouterr().err
    return text.rstrip("\n").splitlines()  # splits on U+2028, U+0085 … as log viewers do


def _event() -> None:
    log_event(Event.START, task_id=f"t-1{HOSTILE}", path=HOSTILE, active="1/1", queued=0)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_control_characters_in_fields_are_escaped(
    capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    """A path or id with NUL, ESC, DEL, C1 controls, line separators, a lone surrogate or a bidi
    override stays one printable line."""
    lines = _emit(fmt, capsys, _event)
    assert len(lines) == 1, lines
    assert lines[0].isprintable()
    if fmt == "json":
        doc = json.loads(lines[0])
        assert (doc["path"], doc["task_id"]) == (HOSTILE, f"t-1{HOSTILE}")  # nothing lost
    else:
        assert ' path="/asr\\u0000\\u001b[2J\\u007f\\u0085\\u2028' in lines[0]


def test_readable_text_stays_as_it_is(capsys: pytest.CaptureFixture[str]) -> None:
    """Chinese text and ordinary values are written as before, unquoted."""
    lines = _emit(
        "text", capsys, lambda: log_event(Event.OOM, task_id="abc-1", error="显存不足", n=2)
    )
    assert lines[0].endswith("[ASR并发] 显存不足 task_id=abc-1 error=显存不足 n=2")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_other_loggers_messages_are_escaped(capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    """A library's message carrying client text (aiohttp's, say) is escaped too."""
    lines = _emit(
        fmt,
        capsys,
        lambda: logging.getLogger("aiohttp.server").warning("bad target %s", HOSTILE),
    )
    assert len(lines) == 1, lines
    assert lines[0].isprintable()
    if fmt == "text":
        assert "bad target /asr\\x00\\x1b[2J" in lines[0]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_tracebacks_keep_their_lines_but_escape_the_rest(
    capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    """An exception whose message holds client text keeps the traceback's own line breaks and
    escapes everything else, the message's line breaks included."""

    def fail() -> None:
        try:
            raise ValueError(f"invalid URL {HOSTILE}\nsecond line")
        except ValueError:
            logging.getLogger("aiohttp.server").exception("Error handling %s", HOSTILE)

    lines = _emit(fmt, capsys, fail)
    assert all(line.isprintable() for line in lines), lines
    if fmt == "json":
        assert len(lines) == 1
        assert "invalid URL /asr\x00" in json.loads(lines[0])["exc_info"]
    else:
        escaped = "/asr\\x00\\x1b[2J\\x7f\\x85\\u2028\\u202e\\udcff\\U000e0001end"
        assert lines[0].endswith(f"Error handling {escaped}")
        assert lines[1] == "Traceback (most recent call last):"
        assert lines[2].startswith('  File "')
        assert lines[-1].startswith("ValueError: invalid URL /asr\\x00")
        assert lines[-1].endswith("\\U000e0001end\\nsecond line")  # no forged line
