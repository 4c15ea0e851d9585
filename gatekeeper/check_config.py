"""`gatekeeper check-config`: the worst case of one task, and whether the proxy waits that long.

It loads the settings exactly as `gatekeeper serve` does (same flags, environment, env file),
prints the worst case of one task part by part (`budget.TaskBudget`), and compares it with a
proxy timeout given as `--proxy-timeout` or read from an nginx config (`--nginx-conf`: the
`proxy_read_timeout` and `proxy_send_timeout` in force in each location that proxies to the
gatekeeper, and its `client_max_body_size`, which must not be below ASR_MAX_BODY_SIZE).
Exit status: 0 fine, 1 the proxy would give up first (or refuse smaller uploads than the
gatekeeper), 2 bad settings or input.
"""

import argparse
import math
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gatekeeper.budget import RETRY_AFTER_CAP, TaskBudget, from_settings
from gatekeeper.settings import Settings, SettingsError, load_settings

__all__ = [
    "NGINX_DEFAULT_BODY_SIZE",
    "NGINX_DEFAULT_TIMEOUT",
    "ProxiedLocation",
    "add_check_config_arguments",
    "describe_budget",
    "main",
    "nginx_proxied_locations",
    "parse_nginx_size",
    "parse_nginx_time",
    "run_check_config",
    "suggested_timeout",
]

NGINX_DEFAULT_TIMEOUT = 60.0
"""nginx's proxy_read_timeout and proxy_send_timeout when a config does not set them."""
NGINX_DEFAULT_BODY_SIZE = 1024 * 1024
"""nginx's client_max_body_size when a config does not set it (1m)."""

_MARGIN = 1.1  # suggested proxy timeouts: the worst case plus 10 %

_PROG = "gatekeeper check-config"

# The gatekeeper answers these itself at once; locations for them alone carry no tasks.
_OWN_ENDPOINTS = ("/stats", "/api/recordings/stats/asr-concurrency", "/metrics", "/health")

# -- nginx config reading ----------------------------------------------------------------------

_TIME_UNITS = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 604800.0,
    "M": 2592000.0,
    "y": 31536000.0,
}
_TIME_PART = re.compile(r"(\d+)(ms|s|m|h|d|w|M|y)?")
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


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
            while pos < end and text[pos] != "\n":
                pos += 1
        elif char in "{};":
            yield char, line, False
            pos += 1
        elif char in "\"'":
            start_line, pos, chunk = line, pos + 1, []
            while pos < end and text[pos] != char:
                if text[pos] == "\\" and pos + 1 < end:
                    pos += 1
                if text[pos] == "\n":
                    line += 1
                chunk.append(text[pos])
                pos += 1
            if pos >= end:
                raise ValueError(f"line {start_line}: unterminated quoted string")
            pos += 1
            yield "".join(chunk), start_line, True
        else:
            start = pos
            while pos < end and not text[pos].isspace() and text[pos] not in "{};#\"'":
                pos += 1
            yield text[start:pos], line, False


def _parse(text: str) -> list[_Directive]:
    root: list[_Directive] = []
    stack = [root]
    words: list[str] = []
    first_line = 0
    for token, line, quoted in _tokens(text):
        if quoted or token not in "{};":
            if not words:
                first_line = line
            words.append(token)
        elif token == ";":
            if not words:
                raise ValueError(f"line {line}: unexpected ';'")
            stack[-1].append(_Directive(words[0], words[1:], first_line))
            words = []
        elif token == "{":
            if not words:
                raise ValueError(f"line {line}: '{{' without a directive name")
            block: list[_Directive] = []
            stack[-1].append(_Directive(words[0], words[1:], first_line, block))
            stack.append(block)
            words = []
        else:
            if words or len(stack) == 1:
                raise ValueError(f"line {line}: unexpected '}}'")
            stack.pop()
    if words or len(stack) != 1:
        raise ValueError("unexpected end of file: a directive or block is not closed")
    return root


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
_INHERITED: dict[str, tuple[Callable[[str], float], float]] = {
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
            proxy = [d for d in directive.block if d.name == "proxy_pass" and d.args]
            if proxy:
                inner = _own_values(directive.block, values)
                yield ProxiedLocation(
                    location=" ".join(directive.args),
                    proxy_pass=proxy[0].args[0],
                    line=directive.line,
                    read_timeout=inner["proxy_read_timeout"],
                    send_timeout=inner["proxy_send_timeout"],
                    client_max_body_size=int(inner["client_max_body_size"]),
                )
        yield from _walk(directive.block, values)


def nginx_proxied_locations(text: str) -> list[ProxiedLocation]:
    """The locations of an nginx config (whole file or an http-level snippet) that proxy.

    When some of them proxy to something named like the gatekeeper (`gatekeeper_upstream` in
    the shipped config), only those are returned. `include` directives are not followed.
    """
    defaults = {name: default for name, (_, default) in _INHERITED.items()}
    found = list(_walk(_parse(text), defaults))
    ours = [loc for loc in found if "gatekeeper" in loc.proxy_pass.lower()]
    return ours or found


# -- the command ---------------------------------------------------------------------------------


def _num(seconds: float) -> str:
    text = f"{seconds:.1f}"
    return text[:-2] if text.endswith(".0") else text


def _human(seconds: float) -> str:
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours} h"] if hours else []
    if minutes or hours:
        parts.append(f"{minutes} min")
    parts.append(f"{secs} s")
    return " ".join(parts)


def suggested_timeout(worst_case: float) -> int:
    """A proxy timeout with room to spare: the worst case + 10 %, rounded up (to 100 s)."""
    wanted = worst_case * _MARGIN
    step = 100 if wanted >= 1000 else 1
    return int(math.ceil(wanted / step) * step)


def _delays(delays: tuple[float, ...]) -> str:
    return " + ".join(_num(d) for d in delays) + " s" if delays else "none"


def describe_budget(budget: TaskBudget, settings: Settings) -> list[str]:
    """The worst case in operator words, one line per part."""
    rows = [
        ("waiting for a slot after the upload (ASR_QUEUE_TIMEOUT)", budget.queue_timeout),
        ("OOM cool-down before the first attempt (ASR_OOM_COOLDOWN)", budget.oom_cooldown),
        (
            f"{budget.attempts} attempt(s) × {_num(budget.request_timeout)} s "
            f"(1 + ASR_MAX_RETRIES={settings.max_retries}, ASR_REQUEST_TIMEOUT)",
            budget.attempts_seconds,
        ),
        (
            f"{len(budget.retry_delays)} retry delay(s) at their longest "
            f"({_delays(budget.retry_delays)})",
            budget.retry_delay_seconds,
        ),
    ]
    if budget.retry_slot_wait_seconds:
        rows.append(
            (
                f"{len(budget.retry_delays)} wait(s) for a slot to retry in (no cool-down: "
                "the slot is given away during a delay; at most ASR_REQUEST_TIMEOUT each)",
                budget.retry_slot_wait_seconds,
            )
        )
    if budget.retry_hold_seconds:
        rows.append(
            (
                f"{len(budget.retry_delays)} wait(s) for the Whisper server to finish a timed-out "
                f"attempt before its retry (ASR_RETRY_ON_TIMEOUT, ASR_TIMEOUT_HOLD)",
                budget.retry_hold_seconds,
            )
        )
    width = max(len(label) for label, _ in rows)
    lines = [
        "Worst case for one task with these settings, from its arrival at the gatekeeper to "
        "the first byte of its answer:"
    ]
    lines += [f"  {label:<{width}}  {_num(value):>7} s" for label, value in rows]
    lines.append(
        f"  {'= without Retry-After from the Whisper server':<{width}}  "
        f"{_num(budget.worst_case):>7} s  ({_human(budget.worst_case)})"
    )
    lines.append(
        f"  {'= with Retry-After (each delay up to ' + _num(RETRY_AFTER_CAP) + ' s)':<{width}}  "
        f"{_num(budget.worst_case_with_retry_after):>7} s  "
        f"({_human(budget.worst_case_with_retry_after)}; delays "
        f"{_delays(budget.retry_delays_with_retry_after)})"
    )
    lines.append(
        "Retry delays follow the OOM/crash schedule ASR_RETRY_DELAY × 3^(k−1) with jitter at its "
        f"top (×{1 + settings.retry_jitter:g}), the longest of all schedules."
    )
    return lines


def add_check_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of `gatekeeper serve` (same settings) plus the proxy to check against."""
    # Imported here: cli.py imports this module to wire the sub-command.
    from gatekeeper.cli import _add_serve_arguments

    _add_serve_arguments(parser)
    proxy = parser.add_argument_group("the proxy in front")
    proxy.add_argument(
        "--proxy-timeout",
        metavar="TIME",
        help="how long the proxy waits for an answer, in seconds or nginx units (3000s, 50m); "
        "exit 1 if that is shorter than the worst case",
    )
    proxy.add_argument(
        "--nginx-conf",
        metavar="PATH",
        type=Path,
        help="read proxy_read_timeout and proxy_send_timeout from this nginx config (each "
        "location proxying to the gatekeeper); exit 1 if one is shorter than the worst case",
    )
    proxy.add_argument(
        "--without-retry-after",
        action="store_true",
        help="the Whisper server never sends Retry-After: compare with the worst case without "
        f"it (by default each retry delay counts up to the {_num(RETRY_AFTER_CAP)} s cap)",
    )


def _load(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {name: getattr(args, name, None) for name in Settings.model_fields}
    flags = {name: name.replace("_", "-") for name, v in overrides.items() if v is not None}
    return load_settings(overrides, env_file=args.env_file, flags=flags)


@dataclass(frozen=True, slots=True)
class _Check:
    where: str
    timeouts: dict[str, float]
    body_size: int | None = None  # nginx's client_max_body_size there, when from a config


def _checks(args: argparse.Namespace) -> list[_Check]:
    """What to compare with the worst case; raises ValueError or OSError on bad input."""
    checks: list[_Check] = []
    if args.proxy_timeout is not None:
        checks.append(_Check("--proxy-timeout", {"": parse_nginx_time(args.proxy_timeout)}))
    if args.nginx_conf is not None:
        path: Path = args.nginx_conf
        locations = nginx_proxied_locations(path.read_text(encoding="utf-8"))
        tasks = [loc for loc in locations if not _own_endpoint(loc)]
        if not tasks:
            raise ValueError(f"{path}: no location that proxies to the gatekeeper")
        checks += [
            _Check(
                f"{path}:{loc.line} location {loc.location}",
                {"proxy_read_timeout": loc.read_timeout, "proxy_send_timeout": loc.send_timeout},
                loc.client_max_body_size,
            )
            for loc in tasks
        ]
    return checks


def _own_endpoint(location: ProxiedLocation) -> bool:
    """An exact-match location for an endpoint the gatekeeper answers at once (never a task)."""
    words = location.location.split()
    return len(words) == 2 and words[0] == "=" and words[1] in _OWN_ENDPOINTS


def run_check_config(args: argparse.Namespace) -> int:
    """Print the worst case; 1 if a given proxy timeout is shorter, 2 on bad settings or input."""
    try:
        settings = _load(args)
    except SettingsError as exc:
        for line in exc.lines:
            print(f"gatekeeper: {line}", file=sys.stderr)
        return 2
    try:
        checks = _checks(args)
    except (OSError, ValueError) as exc:
        print(f"{_PROG}: {exc}", file=sys.stderr)
        return 2
    budget = from_settings(settings)
    with_retry_after = not args.without_retry_after
    limit = budget.limit(upstream_retry_after=with_retry_after)
    suggestion = suggested_timeout(limit)
    for line in describe_budget(budget, settings):
        print(line)
    which = "with" if with_retry_after else "without"
    print(
        f"nginx's proxy_read_timeout and proxy_send_timeout (and the backend's HTTP client "
        f"timeout) must exceed {_num(limit)} s (the worst case {which} Retry-After); "
        f"suggested: {suggestion}s."
    )
    short = small = False
    for check in checks:
        shown = ", ".join(f"{name} {_num(sec)} s".strip() for name, sec in check.timeouts.items())
        if all(
            budget.covered_by(sec, upstream_retry_after=with_retry_after)
            for sec in check.timeouts.values()
        ):
            print(f"OK: {check.where}: {shown}")
        else:
            short = True
            print(f"TOO SHORT: {check.where}: {shown}")
        size = check.body_size
        if size is not None and 0 < size < settings.max_body_size:
            small = True
            print(
                f"TOO SMALL: {check.where}: client_max_body_size {size} bytes is below "
                f"ASR_MAX_BODY_SIZE {settings.max_body_size}: nginx refuses those uploads with "
                f"its own 413 (its default is 1m); set client_max_body_size "
                f"{_nginx_size(settings.max_body_size)}.",
                file=sys.stderr,
            )
    if short:
        print(
            f"WARNING: the proxy gives up before the gatekeeper's worst case of {_num(limit)} s: "
            "a task that queues, retries or runs long gets the proxy's 504 while the gatekeeper "
            f"is still working on it. Raise the timeouts marked TOO SHORT to {suggestion}s.",
            file=sys.stderr,
        )
        return 1
    return 1 if small else 0


def _nginx_size(size: int) -> str:
    for suffix, unit in (("g", 1024**3), ("m", 1024**2), ("k", 1024)):
        if size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gatekeeper.check_config``: the check without the main CLI."""
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Print the longest one task can take with the current settings, and check "
        "that the proxy in front (nginx) waits longer.",
    )
    add_check_config_arguments(parser)
    return run_check_config(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
