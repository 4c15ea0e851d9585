"""Reading an nginx config: its times and sizes, and the locations that proxy with their limits.

Pure text parsing, no command: `nginx_proxied_locations` finds each location with a
`proxy_pass` and the `proxy_read_timeout`, `proxy_send_timeout` and `client_max_body_size` in
force there (its own, inherited from the blocks around it, or nginx's defaults).
"""

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "NGINX_DEFAULT_BODY_SIZE",
    "NGINX_DEFAULT_TIMEOUT",
    "ProxiedLocation",
    "format_nginx_size",
    "nginx_proxied_locations",
    "parse_nginx_size",
    "parse_nginx_time",
]

NGINX_DEFAULT_TIMEOUT: Final = 60.0
"""nginx's proxy_read_timeout and proxy_send_timeout when a config does not set them."""
NGINX_DEFAULT_BODY_SIZE: Final = 1024 * 1024
"""nginx's client_max_body_size when a config does not set it (1m)."""

_TIME_UNITS: Final = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 604800.0,
    "M": 2592000.0,
    "y": 31536000.0,
}
_TIME_PART: Final = re.compile(r"(\d+)(ms|s|m|h|d|w|M|y)?")
_SIZE_UNITS: Final = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_PUNCTUATION: Final = "{};"
_WORD_END: Final = "{};#\"'"  # besides whitespace


def parse_nginx_time(value: str) -> float:
    """Seconds from an nginx time such as `60`, `3000s`, `50m`, `1h 30m` or `500ms`."""
    text = value.strip()
    pos, total, parts = 0, 0.0, 0
    while pos < len(text):
        if text[pos].isspace():
            pos += 1
            continue
        match = _TIME_PART.match(text, pos)
        if match is None:
            raise ValueError(f"not an nginx time: {value!r}")
        total += int(match.group(1)) * _TIME_UNITS[match.group(2) or "s"]
        pos, parts = match.end(), parts + 1
    if parts == 0:
        raise ValueError(f"not an nginx time: {value!r}")
    return total


def parse_nginx_size(value: str) -> int:
    """Bytes from an nginx size such as `1g`, `512m`, `64k` or `1048576`."""
    match = re.fullmatch(r"(\d+)([kKmMgG]?)", value.strip())
    if match is None:
        raise ValueError(f"not an nginx size: {value!r}")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def format_nginx_size(size: int) -> str:
    """A byte count in the largest nginx unit that divides it: 1073741824 → `1g`."""
    for suffix, unit in (("g", 1024**3), ("m", 1024**2), ("k", 1024)):
        if size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


# -- tokens and blocks ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Directive:
    name: str
    args: list[str]
    line: int
    block: list["_Directive"] | None = field(default=None)


def _tokens(text: str) -> Iterator[tuple[str, int, bool]]:
    """(token, line, quoted) for words, quoted strings and the characters `{`, `}`, `;`."""
    pos, line, end = 0, 1, len(text)
    while pos < end:
        char = text[pos]
        if char == "\n":
            line += 1
            pos += 1
        elif char.isspace():
            pos += 1
        elif char == "#":
            pos = _line_end(text, pos)
        elif char in _PUNCTUATION:
            yield char, line, False
            pos += 1
        elif char in "\"'":
            token, after, newlines = _quoted(text, pos, line)
            yield token, line, True
            pos, line = after, line + newlines
        else:
            after = _word_end(text, pos)
            yield text[pos:after], line, False
            pos = after


def _line_end(text: str, pos: int) -> int:
    found = text.find("\n", pos)
    return len(text) if found < 0 else found


def _word_end(text: str, pos: int) -> int:
    while pos < len(text) and not text[pos].isspace() and text[pos] not in _WORD_END:
        pos += 1
    return pos


def _quoted(text: str, pos: int, line: int) -> tuple[str, int, int]:
    """The string quoted at `pos` (backslash escapes the next character), where it ends, and
    how many line breaks it holds."""
    quote, pos, end, chunk = text[pos], pos + 1, len(text), []
    while pos < end and text[pos] != quote:
        if text[pos] == "\\" and pos + 1 < end:
            pos += 1
        chunk.append(text[pos])
        pos += 1
    if pos >= end:
        raise ValueError(f"line {line}: unterminated quoted string")
    token = "".join(chunk)
    return token, pos + 1, token.count("\n")


class _Tree:
    """Directives built from tokens: the blocks still open, and the words of the one being read."""

    def __init__(self) -> None:
        self.root: list[_Directive] = []
        self._open = [self.root]
        self._words: list[str] = []
        self._first_line = 0

    def word(self, word: str, line: int) -> None:
        if not self._words:
            self._first_line = line
        self._words.append(word)

    def semicolon(self, line: int) -> None:
        if not self._words:
            raise ValueError(f"line {line}: unexpected ';'")
        self._open[-1].append(self._directive())

    def open_brace(self, line: int) -> None:
        if not self._words:
            raise ValueError(f"line {line}: '{{' without a directive name")
        block: list[_Directive] = []
        self._open[-1].append(self._directive(block))
        self._open.append(block)

    def close_brace(self, line: int) -> None:
        if self._words or len(self._open) == 1:
            raise ValueError(f"line {line}: unexpected '}}'")
        self._open.pop()

    def finish(self) -> list[_Directive]:
        if self._words or len(self._open) != 1:
            raise ValueError("unexpected end of file: a directive or block is not closed")
        return self.root

    def _directive(self, block: list[_Directive] | None = None) -> _Directive:
        words, self._words = self._words, []
        return _Directive(words[0], words[1:], self._first_line, block)


def _parse(text: str) -> list[_Directive]:
    tree = _Tree()
    for token, line, quoted in _tokens(text):
        if quoted or token not in _PUNCTUATION:
            tree.word(token, line)
        elif token == ";":
            tree.semicolon(line)
        elif token == "{":
            tree.open_brace(line)
        else:
            tree.close_brace(line)
    return tree.finish()


# -- locations -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProxiedLocation:
    """A location that proxies requests, with the timeouts in force there (inherited or own)."""

    location: str
    proxy_pass: str
    line: int
    read_timeout: float
    send_timeout: float
    client_max_body_size: int
    """Bytes; 0 means no limit (nginx's meaning)."""


# Settings a location inherits from the blocks around it, with nginx's defaults.
_INHERITED: Final[dict[str, tuple[Callable[[str], float], float]]] = {
    "proxy_read_timeout": (parse_nginx_time, NGINX_DEFAULT_TIMEOUT),
    "proxy_send_timeout": (parse_nginx_time, NGINX_DEFAULT_TIMEOUT),
    "client_max_body_size": (parse_nginx_size, NGINX_DEFAULT_BODY_SIZE),
}


def _own_values(block: list[_Directive], inherited: dict[str, float]) -> dict[str, float]:
    values = dict(inherited)
    for directive in block:
        if directive.name in _INHERITED and directive.args:
            parse, _ = _INHERITED[directive.name]
            values[directive.name] = parse(" ".join(directive.args))
    return values


def _walk(block: list[_Directive], inherited: dict[str, float]) -> Iterator[ProxiedLocation]:
    values = _own_values(block, inherited)
    for directive in block:
        if directive.block is None:
            continue
        if directive.name == "location":
            yield from _proxied(directive, directive.block, values)
        yield from _walk(directive.block, values)


def _proxied(
    location: _Directive, block: list[_Directive], values: dict[str, float]
) -> Iterator[ProxiedLocation]:
    """The location, when it proxies, with the limits in force inside it."""
    proxy = [d for d in block if d.name == "proxy_pass" and d.args]
    if not proxy:
        return
    inner = _own_values(block, values)
    yield ProxiedLocation(
        location=" ".join(location.args),
        proxy_pass=proxy[0].args[0],
        line=location.line,
        read_timeout=inner["proxy_read_timeout"],
        send_timeout=inner["proxy_send_timeout"],
        client_max_body_size=int(inner["client_max_body_size"]),
    )


def nginx_proxied_locations(text: str) -> list[ProxiedLocation]:
    """The locations of an nginx config (whole file or an http-level snippet) that proxy.

    When some of them proxy to something named like the gatekeeper (`gatekeeper_upstream` in
    the shipped config), only those are returned. `include` directives are not followed.
    """
    defaults = {name: default for name, (_, default) in _INHERITED.items()}
    found = list(_walk(_parse(text), defaults))
    ours = [loc for loc in found if "gatekeeper" in loc.proxy_pass.lower()]
    return ours or found
