"""What the scenarios share: the run context, request bodies, closed-loop timing, wrk."""

import asyncio
import math
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.config import BenchConfig
from bench.httpclient import Connection, HttpError
from bench.procs import Procs, find_tool

__all__ = [
    "BOUNDARY",
    "CONTENT_TYPE",
    "SMALL_BODY",
    "ClosedLoop",
    "Ctx",
    "closed_loop",
    "gatekeeper_variants",
    "multipart_parts",
    "rotated",
    "run_wrk",
]

BOUNDARY = "benchboundaryQx7MA4YWxkTrZu0gW"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def multipart_parts(
    field_name: str = "audio_file", filename: str = "clip.wav"
) -> tuple[bytes, bytes]:
    """The bytes before and after the file's content in a one-file multipart body."""
    head = (
        f"--{BOUNDARY}\r\n"
        f'Content-Disposition: form-data; name="{field_name}"; filename="{filename}"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    return head, tail


def _small_body(size: int = 256) -> bytes:
    head, tail = multipart_parts()
    return head + b"x" * size + tail


SMALL_BODY = _small_body()
"""A small task: a 256-byte "file" in a multipart form, as a client would post it."""


JsonDict = dict[str, Any]


@dataclass
class Ctx:
    """Everything a scenario needs from the run."""

    cfg: BenchConfig
    procs: Procs
    workdir: Path
    out: Path
    seed: int
    asyncio_row: bool
    """Also run the gatekeeper on Python's own event loop (it runs on uvloop by default)."""
    profile: bool
    say: Callable[[str], None]
    notes: list[str] = field(default_factory=list)
    profiles: dict[str, JsonDict] = field(default_factory=dict)


def gatekeeper_variants(ctx: Ctx) -> list[tuple[str, dict[str, str]]]:
    """(reference name, extra settings) for the gatekeeper references of this run: as shipped
    (on uvloop), and on Python's own asyncio loop."""
    variants: list[tuple[str, dict[str, str]]] = [("gatekeeper", {})]
    if ctx.asyncio_row:
        variants.append(("gatekeeper_asyncio", {"event_loop": "asyncio"}))
    return variants


def rotated(names: list[str], round_index: int) -> list[str]:
    """The references in a different order every round, so no one always goes first."""
    k = round_index % len(names)
    return names[k:] + names[:k]


@dataclass
class ClosedLoop:
    latencies: list[float]
    statuses: Counter[int]
    errors: int


async def closed_loop(
    port: int,
    requests: int,
    concurrency: int,
    *,
    path: str = "/asr",
    body: bytes = SMALL_BODY,
    headers: tuple[tuple[str, str], ...] = (("Content-Type", CONTENT_TYPE),),
    within: float = 120.0,
) -> ClosedLoop:
    """`requests` requests over `concurrency` keep-alive connections, each one timed."""
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    errors = 0
    remaining = requests

    async def worker() -> None:
        nonlocal remaining, errors
        conn = Connection("127.0.0.1", port)
        try:
            while remaining > 0:
                remaining -= 1
                began = time.perf_counter()
                try:
                    response = await conn.request("POST", path, headers=headers, body=body)
                except HttpError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - began)
                statuses[response.status] += 1
        finally:
            await conn.close()

    async with asyncio.timeout(within):
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ClosedLoop(latencies, statuses, errors)


_WRK_LUA = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "{content_type}"
wrk.body = "{body}"
"""


def _lua_string(data: bytes) -> str:
    return "".join(f"\\{b:03d}" if b < 32 or b in (34, 92) or b > 126 else chr(b) for b in data)


def wrk_script(workdir: Path) -> Path:
    path = workdir / "post.lua"
    if not path.exists():
        path.write_text(
            _WRK_LUA.format(content_type=CONTENT_TYPE, body=_lua_string(SMALL_BODY)),
            encoding="ascii",
        )
    return path


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _duration(text: str) -> float | None:
    match = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text.strip())
    return None if match is None else float(match[1]) * _UNITS[match[2]]


async def run_wrk(
    ctx: Ctx, port: int, *, seconds: float, connections: int, path: str = "/asr"
) -> JsonDict:
    """Saturate `port` with wrk (one thread, `connections` keep-alive connections)."""
    argv = [
        find_tool("wrk"),
        "-t1",
        f"-c{connections}",
        f"-d{max(1, math.ceil(seconds))}s",
        "--latency",
        "-s",
        str(wrk_script(ctx.workdir)),
        f"http://127.0.0.1:{port}{path}",
    ]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(seconds + 60):
        out, err = await proc.communicate()
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err.decode(errors='replace')}")
    rps = re.search(r"Requests/sec:\s+([0-9.]+)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    total = re.search(r"(\d+) requests in", text)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    percentiles = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", text, flags=re.MULTILINE))
    return {
        "rps": float(rps[1]) if rps else 0.0,
        "requests": int(total[1]) if total else 0,
        "non_2xx": int(non2xx[1]) if non2xx else 0,
        "socket_errors": sum(int(x) for x in socket_errors.groups()) if socket_errors else 0,
        "latency_p50_ms": _ms(percentiles.get("50")),
        "latency_p99_ms": _ms(percentiles.get("99")),
    }


def _ms(text: str | None) -> float | None:
    seconds = None if text is None else _duration(text)
    return None if seconds is None else round(seconds * 1000, 3)
