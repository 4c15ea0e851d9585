"""Sampling profiles of the gatekeeper under load, with py-spy, summarised for the report.

py-spy reads the process's memory from outside (``--nonblocking``: it never pauses it), so the
profiled run is a separate run after the measured ones: profiling never touches a figure.
Idle samples (the event loop waiting in epoll) are left out by py-spy, so the shares below are
shares of the CPU time the gatekeeper actually spent.
"""

import asyncio
import re
from collections import Counter
from pathlib import Path
from typing import Any

from bench.procs import find_tool, log_file

__all__ = ["ProfileRecorder", "summarize_raw"]

# Frames every sample passes through (interpreter start, the event loop): no information.
_FRAME_NOISE = frozenset(
    {
        "_run_module_as_main",
        "_run_code",
        "<module>",
        "main",
        "_serve",
        "run",
        "Runner.run",
        "BaseEventLoop.run_until_complete",
        "BaseEventLoop.run_forever",
        "BaseEventLoop._run_once",
        "Handle._run",
    }
)
_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^()]*?)(?::\d+)?\)$")


class ProfileRecorder:
    """``py-spy record --pid`` for the duration of an ``async with`` block."""

    def __init__(self, pid: int, raw_path: Path, *, rate: int = 250) -> None:
        self.pid = pid
        self.raw_path = raw_path
        self.rate = rate
        self._proc: asyncio.subprocess.Process | None = None
        self._log = raw_path.with_suffix(".log")

    async def __aenter__(self) -> "ProfileRecorder":
        with log_file(self._log) as sink:
            self._proc = await asyncio.create_subprocess_exec(
                find_tool("py-spy"),
                "record",
                "--pid",
                str(self.pid),
                "--rate",
                str(self.rate),
                "--nonblocking",
                "--format",
                "raw",
                "--output",
                str(self.raw_path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=sink,
                stderr=sink,
            )
        await asyncio.sleep(0.5)  # attach before the load starts
        return self

    async def __aexit__(self, *exc: object) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(2)  # SIGINT: py-spy writes its output and exits
        try:
            async with asyncio.timeout(20):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
        if proc.returncode == 0:
            self._log.unlink(missing_ok=True)  # py-spy's own chatter; kept only on failure


_REPO = str(Path(__file__).resolve().parents[1]) + "/"  # this checkout, wherever it lives


def _short(frame: str) -> tuple[str, str]:
    """(function label, package) of one py-spy frame, e.g. ``handle (gatekeeper/proxy.py:140)``."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip(), "other"
    func, path = match["func"], match["file"]
    for marker in ("site-packages/", "lib/python3.", _REPO):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "lib/python3.":
                path = "stdlib/" + path.split("/", 1)[1] if "/" in path else path
            break
    area = path.split("/", 1)[0] if "/" in path else path
    if area.endswith(".py"):
        area = area[:-3]
    return f"{func} ({path})", area


def summarize_raw(raw_path: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive shares per function, and shares per package, from collapsed stacks."""
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    try:
        lines = raw_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return {"samples": 0, "error": f"no profile at {raw_path}"}
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";")[1:] or stack.split(";")]
        if not frames:
            continue
        total += count
        leaf_label, leaf_area = frames[-1]
        self_counts[leaf_label] += count
        areas[leaf_area] += count
        for label in {label for label, _ in frames}:
            inclusive[label] += count

    def shares(counter: Counter[str]) -> list[list[Any]]:
        ranked = [
            (name, n)
            for name, n in counter.most_common()
            if name.split(" (")[0] not in _FRAME_NOISE
        ]
        return [[name, round(100.0 * n / total, 1)] for name, n in ranked[:top]]

    if total == 0:
        return {"samples": 0}
    return {
        "samples": total,
        "self_pct": shares(self_counts),
        "inclusive_pct": shares(inclusive),
        "by_area_pct": shares(areas),
    }
