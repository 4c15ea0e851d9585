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
    pool_setting,
    stop_reason,
)
from gatekeeper.commands.tune.memory import MemoryRecommendation, pool_memory_settings
from gatekeeper.policy.outcomes import AttemptOutcome
from gatekeeper.settings import server_name

__all__ = [
    "PoolReport",
    "Progress",
    "TuneReport",
    "format_table",
    "markdown_report",
    "memory_lines",
    "pool_lines",
    "recommendation_lines",
    "write_results",
]


@dataclass(frozen=True, slots=True)
class TuneReport:
    """One card's run: the levels measured, why climbing stopped, and the recommendation.

    `levels` is empty when the card's warm-up task failed (the recommendation says so)."""

    config: TuneConfig
    url: str
    started_at: str
    levels: tuple[LevelResult, ...]
    stopped: str | None
    recommendation: Recommendation
    memory: MemoryRecommendation | None = None
    """Admission by memory: the figures for this card (None when nothing was measured)."""

    @property
    def name(self) -> str:
        """The card's name, as the gatekeeper shows it: host:port."""
        return server_name(self.url)

    def to_json(self) -> dict[str, object]:
        return {**_run_json(self.config, self.started_at), **_card_json(self)}


@dataclass(frozen=True, slots=True)
class PoolReport:
    """Several cards measured one after the other, in ASR_UPSTREAM_URL's order."""

    config: TuneConfig
    started_at: str
    cards: tuple[TuneReport, ...]

    @property
    def setting(self) -> str | None:
        """ASR_MAX_CONCURRENT's value for the pool (`3,3,1`); None when a card has none."""
        return pool_setting([card.recommendation for card in self.cards])

    @property
    def memory_setting(self) -> str | None:
        """The memory settings' line for the pool; None when a card has no figures."""
        return pool_memory_settings([card.memory for card in self.cards])

    def to_json(self) -> dict[str, object]:
        return {
            **_run_json(self.config, self.started_at),
            "urls": [card.url for card in self.cards],
            "cards": [{"name": card.name, **_card_json(card)} for card in self.cards],
            "recommendation": {
                "max_concurrent": [card.recommendation.max_concurrent for card in self.cards],
                "asr_upstream_url": ",".join(card.url for card in self.cards),
                "asr_max_concurrent": self.setting,
                "memory": _pool_memory_json(self),
            },
        }


def _pool_memory_json(report: PoolReport) -> dict[str, object]:
    """Each card's memory figures in order, and the pool's line (None when a card has none)."""
    memories = [card.memory for card in report.cards]
    return {
        "gpu_memory_gib": [m.budget_gib if m else None for m in memories],
        "task_memory_gib": [m.figures.base_gib if m and m.figures else None for m in memories],
        "task_memory_per_minute_gib": [
            m.figures.per_minute_gib if m and m.figures else None for m in memories
        ],
        "max_concurrent": [m.max_concurrent if m else None for m in memories],
        "settings": report.memory_setting,
    }


def _run_json(c: TuneConfig, started_at: str) -> dict[str, object]:
    """What every card of a run shares."""
    return {
        "tool": "gatekeeper tune",
        "version": __version__,
        "started_at": started_at,
        "api": c.api,
        "path": API_ROUTES[c.api].path,
        "audio": [{"name": a.name, "seconds": round(a.seconds, 3)} for a in c.audio],
        "tasks_per_level": c.tasks_per_level,
        "max_level": c.max_level,
        "timeout_seconds": c.timeout,
    }


def _card_json(card: TuneReport) -> dict[str, object]:
    return {
        "url": card.url,
        "started_at": card.started_at,
        "levels": [_level_json(r) for r in card.levels],
        "stopped_because": card.stopped,
        "recommendation": {
            "max_concurrent": card.recommendation.max_concurrent,
            "reason": card.recommendation.reason,
            "memory": _memory_json(card.memory),
        },
    }


def _memory_json(memory: MemoryRecommendation | None) -> dict[str, object] | None:
    """The memory figures; with several lengths each length's own climb, level by level."""
    if memory is None:
        return None
    return memory.to_json(_level_json if len(memory.bounds) > 1 else None)


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
    "warm_up_failed": "the warm-up task failed",
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


def recommendation_lines(recommendation: Recommendation, *, card: str | None = None) -> list[str]:
    """The setting to use (or that there is none), then why. For one `card` of a pool, its
    value in the pool's ASR_MAX_CONCURRENT list (a line to copy would set it for every card)."""
    limit = recommendation.max_concurrent
    if limit is None:
        setting = "no recommendation" + (f" for {card}" if card else "")
    elif card is None:
        setting = f"ASR_MAX_CONCURRENT={limit}"
    else:
        setting = f"{card}: {limit} at a time (its value in the pool's ASR_MAX_CONCURRENT below)"
    return [setting, f"  why: {recommendation.reason}"]


def memory_lines(memory: MemoryRecommendation | None, *, card: str | None = None) -> list[str]:
    """Admission by memory, beside the count: the settings' line to copy (or, for one `card` of
    a pool, its values in the pool's line), then why. Nothing when nothing was measured."""
    if memory is None:
        return []
    figures, per_budget = memory.figures, memory.per_budget
    why = f"  why: {memory.reason}"
    if per_budget is None:
        return [f"No memory figures{f' for {card}' if card else ''}.", why]
    if figures is None or memory.budget_gib is None:
        return [
            f"Admission by memory{f' on {card}' if card else ''}: the card's free memory is "
            "unknown; give --gpu-memory-gib (its total minus what the idle server holds, "
            "nvidia-smi's total − used). Per GiB of it a task costs "
            f"{per_budget.base_gib:.4g} GiB + {per_budget.per_minute_gib:.4g} GiB per audio "
            f"minute (ASR_TASK_MEMORY_GIB = {per_budget.base_gib:.4g} × it, "
            f"ASR_TASK_MEMORY_PER_MINUTE_GIB = {per_budget.per_minute_gib:.4g} × it), "
            f"at most {memory.max_concurrent} at once.",
            why,
        ]
    source = f" (from {memory.budget_from})" if memory.budget_from else ""
    if card is not None:
        return [
            f"{card} by memory: {memory.budget_gib:g} GiB free{source}; a task "
            f"{figures.base_gib:g} GiB + {figures.per_minute_gib:g} GiB per audio minute, at "
            f"most {memory.max_concurrent} at once (its values in the pool's memory line below)",
            why,
        ]
    return [
        f"Or admit by GPU memory instead of a count ({memory.budget_gib:g} GiB free"
        f"{f', from {memory.budget_from}' if memory.budget_from else ''}; "
        "ASR_MAX_CONCURRENT then only caps):",
        str(memory.settings),
        why,
    ]


def pool_lines(report: PoolReport) -> list[str]:
    """The pool's settings, one value per card in order (or why there are none)."""
    urls = ",".join(card.url for card in report.cards)
    each = ", ".join(
        f"{card.name} {card.recommendation.max_concurrent or '-'}" for card in report.cards
    )
    lines = [f"Pool of {len(report.cards)} cards ({each}):"]
    if report.setting is None:
        failed = [card.name for card in report.cards if card.recommendation.max_concurrent is None]
        return [
            *lines,
            f"  no recommendation for the pool: no limit for {', '.join(failed)} (see above); "
            "fix that card or leave it out of ASR_UPSTREAM_URL",
        ]
    return [
        *lines,
        f"ASR_UPSTREAM_URL={urls}",
        f"ASR_MAX_CONCURRENT={report.setting}",
        "  each card was measured alone, the others idle: two servers sharing one GPU must "
        "share its limit",
        *_pool_memory_lines(report),
    ]


def _pool_memory_lines(report: PoolReport) -> list[str]:
    if report.memory_setting is not None:
        return [
            "Or admit by GPU memory instead of a count (ASR_MAX_CONCURRENT then only caps):",
            report.memory_setting,
        ]
    missing = [card.name for card in report.cards if card.memory is None or not card.memory.figures]
    return [
        f"  no memory settings for the pool: no figures for {', '.join(missing)} (give "
        "--gpu-memory-gib, one value per card, when a card's free memory is unknown)"
    ]


# -- the files -----------------------------------------------------------------------------------


def markdown_report(report: TuneReport | PoolReport) -> str:
    """The results as a Markdown page: parameters, the table, the recommendation (for a pool:
    one section per card, then the pool's settings)."""
    c = report.config
    audio = ", ".join(f"{a.name} ({a.seconds:g} s)" for a in c.audio)
    path = API_ROUTES[c.api].path
    if isinstance(report, TuneReport):
        servers = f"- server: `{report.url}{path}` ({c.api} API)"
    else:
        servers = f"- servers: {', '.join(f'`{card.url}{path}`' for card in report.cards)} "
        servers += f"({c.api} API), measured one at a time"
    lines = [
        "# gatekeeper tune",
        "",
        servers,
        f"- started: {report.started_at}",
        f"- audio: {audio}",
        f"- tasks per level: {c.tasks_per_level} (rounded up to a multiple of the level)",
        "- goodput: minutes of successfully transcribed audio per minute of wall time",
    ]
    if isinstance(report, TuneReport):
        return "\n".join([*lines, "", *_markdown_table(report), *_markdown_recommendation(report)])
    lines.append("")
    for card in report.cards:
        lines += [f"## {card.name} (`{card.url}`)", ""]
        lines += _markdown_table(card) + _markdown_recommendation(card, pool=True)
    return "\n".join(lines + _markdown_pool(report))


def _markdown_table(report: TuneReport) -> list[str]:
    if not report.levels:
        return ["No level measured."]
    alignments = ["---:"] * (len(_COLUMNS) - 1) + ["---"]
    return [
        "| " + " | ".join(_COLUMNS) + " |",
        "|" + "|".join(alignments) + "|",
        *("| " + " | ".join(row) + " |" for row in _rows(report)),
    ]


def _markdown_recommendation(report: TuneReport, *, pool: bool = False) -> list[str]:
    rec = report.recommendation
    lines = ["", "### Recommendation" if pool else "## Recommendation", ""]
    if rec.max_concurrent is not None and pool:
        lines += [f"{rec.max_concurrent} at a time on this card.", ""]
    elif rec.max_concurrent is not None:
        lines += ["```sh", f"ASR_MAX_CONCURRENT={rec.max_concurrent}", "```", ""]
    lines += [rec.reason[:1].upper() + rec.reason[1:] + ".", ""]
    return lines + _markdown_memory(report.memory, pool=pool)


def _markdown_memory(memory: MemoryRecommendation | None, *, pool: bool) -> list[str]:
    """Admission by memory: the settings (or this card's values), why, each length's bounds."""
    if memory is None:
        return []
    lines = ["#### By GPU memory" if pool else "### By GPU memory", ""]
    figures = memory.figures
    if memory.settings is not None and figures is not None and not pool:
        lines += ["```sh", memory.settings, "```", ""]
    elif figures is not None and memory.budget_gib is not None:
        lines += [
            f"{memory.budget_gib:g} GiB free, a task {figures.base_gib:g} GiB + "
            f"{figures.per_minute_gib:g} GiB per audio minute, at most "
            f"{memory.max_concurrent} at once.",
            "",
        ]
    else:
        lines += [line.strip() for line in memory_lines(memory)[:1]] + [""]
    lines += [memory.reason[:1].upper() + memory.reason[1:] + ".", ""]
    if memory.bounds:
        lines += [
            "| audio | fitted at once | first OOM | climb stopped |",
            "|---:|---:|---:|---|",
            *(
                f"| {b.audio_seconds:g} s | {b.fitted} | {b.oom_at or '-'} | "
                f"{_STOP_WORDS.get(b.stopped or '', b.stopped or '-')} |"
                for b in memory.bounds
            ),
            "",
        ]
    return lines


def _markdown_pool(report: PoolReport) -> list[str]:
    lines = ["## The pool", ""]
    if report.setting is None:
        return [*lines, *(line.strip() for line in pool_lines(report)[1:]), ""]
    urls = ",".join(card.url for card in report.cards)
    setting = report.memory_setting
    memory = (
        ["By GPU memory instead (ASR_MAX_CONCURRENT then only caps):", "", "```sh", setting]
        if setting is not None
        else [line.strip() for line in _pool_memory_lines(report)]
    )
    return [
        *lines,
        "```sh",
        f"ASR_UPSTREAM_URL={urls}",
        f"ASR_MAX_CONCURRENT={report.setting}",
        "```",
        "",
        "Each card was measured alone, the others idle: two servers sharing one GPU must share "
        "its limit.",
        "",
        *memory,
        *(["```"] if setting is not None else []),
        "",
    ]


def write_results(report: TuneReport | PoolReport, out_dir: Path) -> list[Path]:
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
