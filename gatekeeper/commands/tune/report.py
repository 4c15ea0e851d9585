"""How `gatekeeper tune` shows its results: progress while it runs, then a table, JSON, Markdown."""

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TextIO

from gatekeeper import __version__
from gatekeeper.commands.tune.args import API_ROUTES, TuneConfig
from gatekeeper.commands.tune.decide import (
    MIN_GAIN,
    LevelResult,
    Recommendation,
    TaskSample,
    gain_words,
    stop_reason,
)
from gatekeeper.policy.outcomes import AttemptOutcome

__all__ = [
    "Progress",
    "TuneReport",
    "format_table",
    "markdown_report",
    "recommendation_lines",
    "write_results",
]


@dataclass(frozen=True, slots=True)
class TuneReport:
    """A finished run: the levels measured, why climbing stopped, and the recommendation."""

    config: TuneConfig
    started_at: str
    levels: tuple[LevelResult, ...]
    stopped: str | None
    recommendation: Recommendation

    def to_json(self) -> dict[str, object]:
        c = self.config
        return {
            "tool": "gatekeeper tune",
            "version": __version__,
            "started_at": self.started_at,
            "url": c.url,
            "api": c.api,
            "path": API_ROUTES[c.api].path,
            "audio": [{"name": a.name, "seconds": round(a.seconds, 3)} for a in c.audio],
            "tasks_per_level": c.tasks_per_level,
            "max_level": c.max_level,
            "timeout_seconds": c.timeout,
            "levels": [_level_json(r) for r in self.levels],
            "stopped_because": self.stopped,
            "recommendation": {
                "max_concurrent": self.recommendation.max_concurrent,
                "reason": self.recommendation.reason,
            },
        }


def _level_json(r: LevelResult) -> dict[str, object]:
    return {
        "level": r.level,
        "planned": r.planned,
        "sent": r.sent,
        "ok": r.ok,
        "oom": r.oom,
        "crash": r.crash,
        "error": r.error,
        "timeout": r.timeout,
        "client_error": r.client_error,
        "success_rate": round(r.success_rate, 4),
        "p50_seconds": _round(r.p50),
        "p95_seconds": _round(r.p95),
        "wall_seconds": round(r.wall_seconds, 3),
        "audio_seconds_ok": round(r.audio_seconds_ok, 3),
        "goodput_audio_min_per_min": round(r.goodput, 4),
    }


_STOP_WORDS: Final = {
    "oom": "out of GPU memory",
    "server_error": "server errors",
    "timeout": "timeouts",
    "client_error": "the server rejected the requests",
    "no_gain": f"less than {MIN_GAIN:.0%} more goodput",
    "max_level": "--max-level reached",
}

_COLUMNS: Final = (
    "level",
    "tasks",
    "ok",
    "oom",
    "5xx",
    "timeout",
    "success",
    "p50 s",
    "p95 s",
    "audio-min/min",
    "note",
)


# -- the table -----------------------------------------------------------------------------------


def _rows(report: TuneReport) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    previous: LevelResult | None = None
    for r in report.levels:
        note = _note(previous, r, recommended=r.level == report.recommendation.max_concurrent)
        rows.append(_row(r, note))
        previous = r
    return rows


def _note(previous: LevelResult | None, r: LevelResult, *, recommended: bool) -> str:
    """The last column: recommended or not, the gain over the level below, why it stopped."""
    stopped = stop_reason(previous, r)
    words = [_STOP_WORDS[stopped]] if stopped else []
    if previous is not None and previous.goodput > 0 and r.clean:
        words.insert(0, gain_words(previous, r))
    if recommended:
        words.insert(0, "◀ recommended")
    return ", ".join(words)


def _row(r: LevelResult, note: str) -> tuple[str, ...]:
    return (
        str(r.level),
        f"{r.sent}/{r.planned}" if r.sent != r.planned else str(r.sent),
        str(r.ok),
        str(r.oom),
        str(r.server_errors),
        str(r.timeout),
        f"{100 * r.success_rate:.1f}%",
        _fmt(r.p50),
        _fmt(r.p95),
        f"{r.goodput:.2f}",
        note,
    )


def format_table(report: TuneReport) -> str:
    """The results as an aligned plain-text table."""
    rows = [_COLUMNS, *_rows(report)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = []
    for row in rows:
        cells = [
            cell.ljust(w) if i == len(row) - 1 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def recommendation_lines(recommendation: Recommendation) -> list[str]:
    """The setting to use (or that there is none), then why."""
    if recommendation.max_concurrent is None:
        setting = "no recommendation"
    else:
        setting = f"ASR_MAX_CONCURRENT={recommendation.max_concurrent}"
    return [setting, f"  why: {recommendation.reason}"]


# -- the files -----------------------------------------------------------------------------------


def markdown_report(report: TuneReport) -> str:
    """The results as a Markdown page: parameters, the table, the recommendation."""
    c = report.config
    audio = ", ".join(f"{a.name} ({a.seconds:g} s)" for a in c.audio)
    alignments = ["---:"] * (len(_COLUMNS) - 1) + ["---"]
    lines = [
        "# gatekeeper tune",
        "",
        f"- server: `{c.url}{API_ROUTES[c.api].path}` ({c.api} API)",
        f"- started: {report.started_at}",
        f"- audio: {audio}",
        f"- tasks per level: {c.tasks_per_level} (rounded up to a multiple of the level)",
        "- goodput: minutes of successfully transcribed audio per minute of wall time",
        "",
        "| " + " | ".join(_COLUMNS) + " |",
        "|" + "|".join(alignments) + "|",
        *("| " + " | ".join(row) + " |" for row in _rows(report)),
    ]
    return "\n".join(lines + _markdown_recommendation(report.recommendation))


def _markdown_recommendation(rec: Recommendation) -> list[str]:
    lines = ["", "## Recommendation", ""]
    if rec.max_concurrent is not None:
        lines += ["```sh", f"ASR_MAX_CONCURRENT={rec.max_concurrent}", "```", ""]
    return [*lines, rec.reason[:1].upper() + rec.reason[1:] + ".", ""]


def write_results(report: TuneReport, out_dir: Path) -> list[Path]:
    """Write the report as JSON and Markdown into `out_dir`; the paths written, JSON first."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "tune-" + report.started_at.replace(":", "").replace("-", "").replace("T", "-")
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(
        json.dumps(report.to_json(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    md_path.write_text(markdown_report(report), encoding="utf-8")
    return [json_path, md_path]


# -- progress while it runs ----------------------------------------------------------------------


class Progress:
    """A bar redrawn in place on a terminal; one plain line per task and level otherwise."""

    _WIDTH = 24

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._began = time.monotonic()

    def line(self, text: str) -> None:
        self._stream.write(text + "\n")
        self._stream.flush()

    def level_started(self, level: int, planned: int) -> None:
        self._began = time.monotonic()
        if not self._tty:
            self.line(f"level {level}: sending {planned} tasks, {level} at a time")

    def task_done(self, level: int, planned: int, samples: Sequence[TaskSample]) -> None:
        done = len(samples)
        ok = sum(1 for s in samples if s.outcome is AttemptOutcome.OK)
        oom = sum(1 for s in samples if s.outcome is AttemptOutcome.OOM)
        if self._tty:
            filled = round(self._WIDTH * done / planned)
            bar = "#" * filled + "·" * (self._WIDTH - filled)
            elapsed = time.monotonic() - self._began
            text = f"level {level} [{bar}] {done}/{planned}  ok {ok}  oom {oom}  {elapsed:.1f} s"
            self._stream.write("\r" + text.ljust(78))
            self._stream.flush()
            return
        last = samples[-1]
        self.line(
            f"level {level}: task {done}/{planned} {last.outcome.value} in "
            f"{last.seconds:.2f} s (ok {ok}, oom {oom})"
        )

    def level_done(self, result: LevelResult, stopped: str | None) -> None:
        if self._tty:
            self._stream.write("\n")
        verdict = f"stop: {_STOP_WORDS[stopped]}" if stopped else "climbing"
        self.line(
            f"level {result.level}: {result.ok}/{result.sent} ok, "
            f"{result.goodput:.2f} audio-min/min, p50 {_fmt(result.p50)} s — {verdict}"
        )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
