"""`gatekeeper tune`: the seed guide's stress test (Q3 "如何判断最优并发数") as a command.

Against a Whisper server (or the simulator) it sends tasks straight to the server, never through
a gatekeeper, at concurrency 1, 2, 3, … — N tasks per level — and measures what each level
gives: success rate, OOMs, p50/p95 latency and goodput (minutes of successfully transcribed
audio per minute of wall time). It stops climbing at the first level with an OOM, a 5xx, a
timeout or less than 5 % more goodput than the level below, then recommends
`ASR_MAX_CONCURRENT` and says why. Results go to the terminal, JSON and Markdown.

Several servers (one per GPU, as in ASR_UPSTREAM_URL) are measured one after the other, each
alone: every card gets its own table and recommendation, then the pool's settings are printed
(`ASR_MAX_CONCURRENT=3,3,1`, one value per card in order). Every card is checked (reachable,
idle) before any is loaded.

Beside the count it recommends admission by memory (#16): ASR_GPU_MEMORY_GIB (the card's free
memory: --gpu-memory-gib, else the simulator's /sim/state, else the operator must give it),
ASR_TASK_MEMORY_GIB and ASR_TASK_MEMORY_PER_MINUTE_GIB. With one audio length they come from the
climb itself (per minute 0); with several (`--durations 60,300`) each length is then climbed
alone until it runs out of memory, and the figures are a line through what fitted (`memory`).

The parts: `args` (the flags and the `TuneConfig` built from them), `decide` (pure: when to
stop, what to recommend), `memory` (pure: the memory figures), `run` (the load, on one aiohttp
`ClientSession`), `report` (progress, table, JSON, Markdown). This module is the command:
`add_tune_arguments` and `run_tune` for the main CLI, and `tune` for one run.
"""

import argparse
import asyncio
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Final, TextIO

import aiohttp

from gatekeeper.commands.flags import print_error
from gatekeeper.commands.tune.args import (
    AudioItem,
    TuneConfig,
    add_tune_arguments,
    config_from_args,
)
from gatekeeper.commands.tune.decide import LevelResult, Recommendation, TaskSample, recommend
from gatekeeper.commands.tune.memory import (
    DurationBound,
    MemoryRecommendation,
    bound_from_levels,
    recommend_memory,
)
from gatekeeper.commands.tune.report import (
    PoolReport,
    Progress,
    TuneReport,
    format_table,
    memory_lines,
    pool_lines,
    recommendation_lines,
    write_results,
)
from gatekeeper.commands.tune.run import (
    Load,
    busy_reason,
    climb,
    memory_climb,
    send,
    sim_memory_gib,
)
from gatekeeper.policy.outcomes import AttemptOutcome
from gatekeeper.settings import server_name

__all__ = ["add_tune_arguments", "run_tune", "tune"]

_PROG: Final = "gatekeeper tune"


def run_tune(args: argparse.Namespace) -> int:
    """Run `gatekeeper tune`; the exit status is 0 with a recommendation, 1 when the server
    failed or could not be reached, 2 for bad flags or a refusal to load a busy server."""
    try:
        config = config_from_args(args)
    except ValueError as exc:
        return print_error(_PROG, exc)
    return asyncio.run(
        tune(config, stdout=sys.stdout, stderr=sys.stderr, interactive=sys.stdin.isatty())
    )


async def tune(
    config: TuneConfig,
    *,
    stdout: TextIO,
    stderr: TextIO,
    interactive: bool,
    ask: Callable[[str], bool] | None = None,
) -> int:
    """Check every server is idle, climb the levels on each in turn, print and write the results.

    `interactive` says whether a person can answer the question about a busy server (`ask`,
    by default `input()`); without one and without `--yes` a busy server is refused (exit 2).
    The exit status is 0 when every card got a recommendation, else 1.
    """
    started_at = _now()
    async with aiohttp.ClientSession() as session:
        refused = await _refusal(session, config, stderr, (ask or _ask) if interactive else None)
        if refused is not None:
            return refused
        if not config.pool:
            card = await _measure_card(Load(session, config, config.urls[0]), stderr)
            if card is None:
                return 1
            await _publish(card, stdout)
            return 0 if card.recommendation.max_concurrent is not None else 1
        cards = []
        for number, url in enumerate(config.urls, 1):
            Progress(stderr).line(f"card {number}/{len(config.urls)}: {server_name(url)} ({url})")
            card = await _measure_card(Load(session, config, url), stderr)
            cards.append(card or _failed_card(config, url))
            _print_card(cards[-1], stdout, heading=True)
    pool = PoolReport(config, started_at, tuple(cards))
    await _publish(pool, stdout)
    return 0 if pool.setting is not None else 1


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")


async def _refusal(
    session: aiohttp.ClientSession,
    config: TuneConfig,
    stderr: TextIO,
    ask: Callable[[str], bool] | None,
) -> int | None:
    """The exit status when the run must not start: a server cannot be reached (1), or one is
    busy and nobody said yes (2); None to go ahead. `ask` is None without a person to ask.
    Every server is asked before any is loaded: a pool's run stops before it starts rather than
    at its third card."""
    busy: list[str] = []
    for url in config.urls:
        try:
            reason = await busy_reason(session, url, stderr)
        except aiohttp.ClientError as exc:
            print(f"{_PROG}: cannot reach {url}: {exc}", file=stderr)
            return 1
        if reason is not None:
            busy.append(reason)
    if not busy or config.yes:
        return None
    for reason in busy:
        print(f"{_PROG}: warning: {reason}.", file=stderr)
    print(
        f"{_PROG}: a stress test would compete with that traffic and may make its tasks run "
        "out of memory.",
        file=stderr,
    )
    return await _confirm(stderr, ask)


async def _confirm(stderr: TextIO, ask: Callable[[str], bool] | None) -> int | None:
    if ask is None:
        print(
            f"{_PROG}: refusing to load a busy server without a terminal to ask; run it when "
            "the server is idle, or pass --yes to load it anyway.",
            file=stderr,
        )
        return 2
    if await asyncio.to_thread(ask, "Load it anyway? [y/N] "):
        return None
    print(f"{_PROG}: not started.", file=stderr)
    return 2


async def _measure_card(load: Load, stderr: TextIO) -> TuneReport | None:
    """One card: a warm-up task (not counted), then the levels; None when the warm-up failed."""
    started_at = _now()
    progress = Progress(stderr)
    warm = await send(load, 0)
    progress.line(f"warm-up: one task, {warm.outcome.value} in {warm.seconds:.2f} s (not counted)")
    if warm.outcome is not AttemptOutcome.OK:
        print(
            f"{_PROG}: the warm-up task on {load.url} failed ({_warm_words(warm)}); "
            "check the URL, --api and the server before tuning.",
            file=stderr,
        )
        return None
    levels, stopped = await climb(load, progress)
    recommendation = recommend(levels, max_level=load.config.max_level)
    memory = await _memory(load, levels, stopped, progress)
    return TuneReport(
        load.config, load.url, started_at, tuple(levels), stopped, recommendation, memory
    )


async def _memory(
    load: Load, levels: list[LevelResult], stopped: str, progress: Progress
) -> MemoryRecommendation:
    """The memory figures for the card: from the climb itself with one audio length; with
    several, from each length climbed alone until it runs out of memory. The card's free memory
    comes from --gpu-memory-gib, else the simulator's /sim/state, else it is unknown."""
    config = load.config
    budget, source = config.gpu_memory_for(load.url), "--gpu-memory-gib"
    if budget is None:
        budget, source = await sim_memory_gib(load.session, load.url), "/sim/state"
    lengths = list({item.seconds: item for item in config.audio}.values())
    if len(lengths) == 1:
        bounds = [bound_from_levels(lengths[0].seconds, levels, stopped)]
    else:
        bounds = [await _climb_alone(load, item, progress) for item in lengths]
    return recommend_memory(
        bounds, budget, source if budget is not None else None, max_level=config.max_level
    )


async def _climb_alone(load: Load, item: AudioItem, progress: Progress) -> DurationBound:
    """One length alone, after the pause between levels: how many fitted, when it ran out."""
    if load.config.pause > 0:
        await asyncio.sleep(load.config.pause)
    progress.line(f"memory: {item.seconds:g} s files alone, climbing until they run out of memory")
    levels, stopped = await memory_climb(load, item, progress)
    return bound_from_levels(item.seconds, levels, stopped)


def _failed_card(config: TuneConfig, url: str) -> TuneReport:
    """A pool's card whose warm-up failed: no levels, no recommendation."""
    why = "the warm-up task failed: check the URL, --api and the server, then tune it again"
    return TuneReport(config, url, _now(), (), "warm_up_failed", Recommendation(None, why))


def _print_card(card: TuneReport, stdout: TextIO, *, heading: bool) -> None:
    """A card's table and recommendation (with a heading naming the card, in a pool)."""
    if heading:
        print(f"== {card.name} ({card.url})", file=stdout)
    if card.levels:
        print(format_table(card), file=stdout)
        print("", file=stdout)
    name = card.name if heading else None
    for line in recommendation_lines(card.recommendation, card=name):
        print(line, file=stdout)
    for line in memory_lines(card.memory, card=name):
        print(line, file=stdout)
    if heading:
        print("", file=stdout)
    stdout.flush()


async def _publish(report: TuneReport | PoolReport, stdout: TextIO) -> None:
    """The last lines on stdout (a card's table and recommendation, or the pool's settings);
    the JSON and Markdown files when asked."""
    if isinstance(report, TuneReport):
        _print_card(report, stdout, heading=False)
    else:
        for line in pool_lines(report):
            print(line, file=stdout)
    if report.config.out_dir is not None:
        written = await asyncio.to_thread(write_results, report, report.config.out_dir)
        print(f"  results: {', '.join(str(p) for p in written)}", file=stdout)
    stdout.flush()


def _ask(prompt: str) -> bool:
    try:
        return input(prompt).strip().lower() in ("y", "yes")
    except EOFError:
        return False


def _warm_words(sample: TaskSample) -> str:
    status = f"HTTP {sample.status}, " if sample.status is not None else ""
    return f"{status}{sample.outcome.value}"
