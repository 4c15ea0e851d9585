"""Turn what one upstream attempt produced into an `AttemptOutcome` (SPEC "Outcomes, retries,
delays").

Pure policy: no I/O, no asyncio, no aiohttp. The proxy reads at most `CLASSIFY_BODY_LIMIT` bytes
of an error body and hands them here; the retry schedule then depends only on the outcome. The
hard part is telling a CUDA out-of-memory failure (worth retrying after a long pause) from any
other 5xx, because every Whisper server wraps the same exception text differently: plain text,
a Python traceback, `{"detail": …}`, `{"error": {"message": …}}`, `{"error": …}` or an HTML page.
"""

import codecs
import html
import json
import re
from collections.abc import Iterable
from typing import Any

from gatekeeper.policy.outcomes import AttemptOutcome

__all__ = [
    "BUILTIN_OOM_PATTERNS",
    "CLASSIFY_BODY_LIMIT",
    "OomMatcher",
    "body_text",
    "classify",
]

CLASSIFY_BODY_LIMIT = 65536
"""How many bytes of an error body are inspected: enough for a long traceback or an HTML debug
page, small enough that a huge body cannot make classification slow or memory-hungry."""

# One expression per failure family. `\s+` rather than a space because HTML pages and JSON
# re-encoders re-wrap text; `\b` so that e.g. `NoMemoryErrorHandler` is not `MemoryError`.
# They are compiled with IGNORECASE | ASCII: ASCII so that a CJK letter glued to "CUDA" (a
# Chinese wrapper message without a space) still counts as a word boundary.
BUILTIN_OOM_PATTERNS: tuple[str, ...] = (
    # PyTorch >= 2.1 and < 2.1 ("CUDA out of memory. Tried to allocate …") and the raw CUDA
    # runtime text PyTorch and ggml both print ("CUDA error: out of memory").
    r"\bCUDA\s+(?:error:\s*)?out\s+of\s+memory\b",
    # The exception class names, for messages that carry nothing else ("Allocation on device").
    r"\b(?:torch\.(?:cuda\.)?)?OutOfMemoryError\b",
    # cuBLAS handle/workspace allocation (PyTorch "CUDA error: …", CTranslate2 "cuBLAS failed
    # with status …").
    r"\bCUBLAS_STATUS_ALLOC_FAILED\b",
    # cuDNN 8 and cuDNN 9 (device and host variants).
    r"\bCUDNN_STATUS_(?:ALLOC_FAILED|INTERNAL_ERROR_(?:DEVICE|HOST)_ALLOCATION_FAILED)\b",
    # CUDA driver / runtime enum names, as some wrappers print them instead of the text.
    r"\bCUDA_ERROR_OUT_OF_MEMORY\b",
    r"\bcudaErrorMemoryAllocation\b",
    # CTranslate2 / faster-whisper.
    r"\bCUDA\s+failed\s+with\s+error\s+out\s+of\s+memory\b",
    # ggml / whisper.cpp.
    r"\bcudaMalloc\s+failed:\s*out\s+of\s+memory\b",
    r"\bfailed\s+to\s+allocate\s+the\s+compute\s+buffer\b",
    # ONNX Runtime (CUDA provider and its BFC arena).
    r"\bCUDA\s+failure\s+2\s*:\s*out\s+of\s+memory\b",
    r"\bFailed\s+to\s+allocate\s+memory\s+for\s+requested\s+buffer\s+of\s+size\b",
    # Host memory: Python and C++.
    r"\bMemoryError\b",
    r"\bstd::bad_alloc\b",
)

_BUILTIN_FLAGS = re.IGNORECASE | re.ASCII
_EXTRA_FLAGS = re.MULTILINE


class OomMatcher:
    """Decides whether an error text reports an out-of-memory failure.

    Built-in patterns are fixed and case-insensitive; operator extras (ASR_OOM_PATTERNS) are
    compiled as written plus MULTILINE, so `^Internal Server Error$` can mean "the body is only
    that line" — the shape whisper-asr-webservice and speaches give an unhandled OOM. Everything
    is compiled once at start-up; `matches` is called per failed attempt.
    """

    __slots__ = ("_builtin", "_extra")

    def __init__(self, extra: Iterable[re.Pattern[str]] = ()) -> None:
        """Use the built-in patterns plus already-compiled extras (see `from_patterns`)."""
        # One alternation scans the text once instead of once per pattern.
        self._builtin = re.compile(
            "|".join(f"(?:{p})" for p in BUILTIN_OOM_PATTERNS), _BUILTIN_FLAGS
        )
        # Extras stay separate: an operator's inline global flag such as `(?i)` is only legal
        # at the start of its own expression.
        self._extra = tuple(extra)

    @classmethod
    def from_patterns(cls, extra: Iterable[str]) -> "OomMatcher":
        """Compile operator patterns; a bad one is a start-up error that names it.

        Raises `ValueError` for a pattern that does not compile or is blank (a blank pattern
        would match every 5xx body and silently turn all errors into OOM retries).
        """
        if isinstance(extra, str):
            raise TypeError("OomMatcher.from_patterns() takes a collection of patterns, not a str")
        compiled: list[re.Pattern[str]] = []
        for pattern in extra:
            if not pattern.strip():
                raise ValueError(
                    f"invalid OOM pattern {pattern!r}: a blank pattern would match every error body"
                )
            try:
                compiled.append(re.compile(pattern, _EXTRA_FLAGS))
            except (re.error, OverflowError, RecursionError) as exc:
                raise ValueError(
                    f"invalid OOM pattern {pattern!r}: {exc} (patterns are Python regular "
                    "expressions, e.g. 'CUDA out of memory' or '^Internal Server Error$')"
                ) from exc
        return cls(compiled)

    @property
    def extra_patterns(self) -> tuple[str, ...]:
        """The operator patterns as given, for the start-up log."""
        return tuple(p.pattern for p in self._extra)

    def matches(self, text: str) -> bool:
        """True when any built-in or operator pattern occurs anywhere in `text`."""
        if self._builtin.search(text) is not None:
            return True
        return any(p.search(text) is not None for p in self._extra)

    def __repr__(self) -> str:
        return f"OomMatcher(extra_patterns={self.extra_patterns!r})"


_CHARSET = re.compile(r"""charset\s*=\s*["']?([^"';\s]+)""", re.IGNORECASE)
_JSON_START = ("{", "[", '"')


def body_text(body: bytes, content_type: str | None) -> str:
    """The text OOM patterns are searched in, built from an (already truncated) error body.

    The raw decoded text always comes first. When the whole text is JSON, its string values
    follow, one per line, so escapes (`\\n`, `\\uXXXX`, `\\"`) no longer hide a message. When it
    contains HTML entities, the unescaped text follows too (`&nbsp;` as a plain space), so an
    HTML error page still matches. Never raises: this runs on whatever an upstream sent.
    """
    text = _decode(body, content_type)
    parts = [text]
    stripped = text.lstrip("\ufeff \t\r\n")
    if stripped.startswith(_JSON_START):
        parts.extend(_json_strings(stripped))
    if "&" in text:
        unescaped = html.unescape(text).replace("\xa0", " ")
        if unescaped != text:
            parts.append(unescaped)
    return "\n".join(parts)


def _decode(body: bytes, content_type: str | None) -> str:
    """Decode leniently with the declared charset when it names a real text encoding."""
    if content_type:
        found = _CHARSET.search(content_type)
        if found is not None:
            try:
                codecs.lookup(found.group(1))
                return body.decode(found.group(1), errors="replace")
            except (LookupError, ValueError, TypeError):
                # Unknown or non-text codec (e.g. "hex", "rot13"): fall back to UTF-8.
                pass
    return body.decode("utf-8", errors="replace")


def _json_strings(text: str) -> list[str]:
    """All string values anywhere in `text` if it parses as JSON, else nothing."""
    try:
        document: Any = json.loads(text)
    except (ValueError, RecursionError):
        return []
    found: list[str] = []
    # Iterative walk: a hostile body can nest deeper than the recursion limit allows.
    stack: list[Any] = [document]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            found.append(node)
        elif isinstance(node, dict):
            stack.extend(reversed(list(node.values())))
        elif isinstance(node, list):
            stack.extend(reversed(node))
    return found


def classify(
    *,
    status: int | None,
    body: bytes = b"",
    content_type: str | None = None,
    error: BaseException | None = None,
    timed_out: bool = False,
    matcher: OomMatcher,
) -> AttemptOutcome:
    """Name what one upstream attempt ended with; the retry schedule is keyed on the answer.

    In order:

    - `timed_out` → TIMEOUT, whatever else is known: the GPU may still be working on it, so it
      is never retried.
    - `error` given (connection refused, reset, closed, incomplete response — any exception,
      even after a status line arrived) → CRASH: no full response, the server is probably
      restarting.
    - `status` None → CRASH as well (nothing complete came back).
    - status < 400 → OK; 400–499 → CLIENT_ERROR (the request itself is wrong, never retried).
    - status ≥ 500 whose first `CLASSIFY_BODY_LIMIT` bytes match `matcher` → OOM; any other
      status ≥ 500 → ERROR. The body is only looked at for 5xx: an OOM text inside a 200
      transcript or a 4xx is the client's business, not a GPU failure.
    """
    if timed_out:
        return AttemptOutcome.TIMEOUT
    if error is not None or status is None:
        return AttemptOutcome.CRASH
    if status < 400:
        return AttemptOutcome.OK
    if status < 500:
        return AttemptOutcome.CLIENT_ERROR
    if matcher.matches(body_text(body[:CLASSIFY_BODY_LIMIT], content_type)):
        return AttemptOutcome.OOM
    return AttemptOutcome.ERROR
