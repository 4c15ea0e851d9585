"""`gatekeeper tune`: the seed guide's stress test (Q3 "如何判断最优并发数") as a command.

Against a Whisper server (or the simulator) it sends tasks straight to the server, never through
a gatekeeper, at concurrency 1, 2, 3, … — N tasks per level — and measures what each level
gives: success rate, OOMs, p50/p95 latency and goodput (minutes of successfully transcribed
audio per minute of wall time). It stops climbing at the first level with an OOM, a 5xx, a
timeout or less than 5 % more goodput than the level below, then recommends
`ASR_MAX_CONCURRENT` and says why. Results go to the terminal, JSON and Markdown.

The decisions — when to stop, what to recommend — are pure functions over `LevelResult`s
(`stop_reason`, `recommend`), tested without sockets; the I/O around them is one aiohttp
`ClientSession`. The main CLI adds the flags with `add_tune_arguments` and calls `run_tune`.
"""

import argparse
import asyncio
import io
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Final, TextIO

import aiohttp

from gatekeeper import __version__
from gatekeeper.classify import CLASSIFY_BODY_LIMIT, OomMatcher, classify
from gatekeeper.outcomes import AttemptOutcome
from gatekeeper.sim.audio import HEAD_BYTES, audio_seconds, parse_wav, silent_wav
from gatekeeper.state import percentile

__all__ = [
    "API_ROUTES",
    "BUSY_PROBE_SECONDS",
    "MIN_GAIN",
    "ApiRoute",
    "AudioItem",
    "LevelResult",
    "Recommendation",
    "TaskSample",
    "TuneConfig",
    "TuneReport",
    "add_tune_arguments",
    "config_from_args",
    "format_table",
    "markdown_report",
    "recommend",
    "run_tune",
    "stop_reason",
    "summarize",
    "tune",
]

MIN_GAIN: Final = 0.05
"""A level must add at least this much goodput over the one below to be worth its memory."""

BUSY_PROBE_SECONDS: Final = 2.0
"""A server that takes longer than this to answer `GET /` is busy transcribing (whisper-asr-
webservice blocks its event loop while a job runs, so even `/` stalls)."""


@dataclass(frozen=True, slots=True)
class ApiRoute:
    """Where a task goes and how the audio is attached, per Whisper server family (SPEC)."""

    path: str
    field: str
    sends_model: bool = False


API_ROUTES: Final = {
    "asr": ApiRoute("/asr", "audio_file"),  # whisper-asr-webservice
    "openai": ApiRoute("/v1/audio/transcriptions", "file", sends_model=True),  # speaches, vLLM
    "whispercpp": ApiRoute("/inference", "file"),  # whisper.cpp server
}


@dataclass(frozen=True, slots=True)
class AudioItem:
    """One audio file the tasks send, with its duration (for goodput)."""

    name: str
    data: bytes = field(repr=False)
    seconds: float


@dataclass(frozen=True, slots=True)
class TaskSample:
    """What one task did: its outcome, how long it took and how much audio it carried."""

    outcome: AttemptOutcome
    seconds: float
    audio_seconds: float
    status: int | None = None


_FAILURES: Final = frozenset(
    {AttemptOutcome.OOM, AttemptOutcome.CRASH, AttemptOutcome.ERROR, AttemptOutcome.TIMEOUT}
)


@dataclass(frozen=True, slots=True)
class LevelResult:
    """The measurements of one concurrency level."""

    level: int
    planned: int
    sent: int
    ok: int
    oom: int
    crash: int
    error: int
    timeout: int
    client_error: int
    p50: float | None
    p95: float | None
    wall_seconds: float
    audio_seconds_ok: float

    @property
    def server_errors(self) -> int:
        """Non-OOM server failures: 5xx answers and dropped connections."""
        return self.error + self.crash

    @property
    def clean(self) -> bool:
        """Every task sent succeeded: no OOM, no 5xx, no crash, no timeout, no 4xx."""
        return self.sent > 0 and self.ok == self.sent

    @property
    def success_rate(self) -> float:
        return self.ok / self.sent if self.sent else 0.0

    @property
    def goodput(self) -> float:
        """Audio-minutes transcribed successfully per minute of wall time."""
        return self.audio_seconds_ok / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "level": self.level,
            "planned": self.planned,
            "sent": self.sent,
            "ok": self.ok,
            "oom": self.oom,
            "crash": self.crash,
            "error": self.error,
            "timeout": self.timeout,
            "client_error": self.client_error,
            "success_rate": round(self.success_rate, 4),
            "p50_seconds": _round(self.p50),
            "p95_seconds": _round(self.p95),
            "wall_seconds": round(self.wall_seconds, 3),
            "audio_seconds_ok": round(self.audio_seconds_ok, 3),
            "goodput_audio_min_per_min": round(self.goodput, 4),
        }


def summarize(
    level: int, samples: Sequence[TaskSample], *, planned: int, wall_seconds: float
) -> LevelResult:
    """Fold the samples of one level into its result; latency percentiles over successes only
    (an OOM answers in milliseconds and would flatter the level)."""
    count = {o: sum(1 for s in samples if s.outcome is o) for o in AttemptOutcome}
    ok = tuple(s.seconds for s in samples if s.outcome is AttemptOutcome.OK)
    return LevelResult(
        level=level,
        planned=planned,
        sent=len(samples),
        ok=count[AttemptOutcome.OK],
        oom=count[AttemptOutcome.OOM],
        crash=count[AttemptOutcome.CRASH],
        error=count[AttemptOutcome.ERROR],
        timeout=count[AttemptOutcome.TIMEOUT],
        client_error=count[AttemptOutcome.CLIENT_ERROR],
        p50=percentile(ok, 0.5),
        p95=percentile(ok, 0.95),
        wall_seconds=wall_seconds,
        audio_seconds_ok=math.fsum(
            s.audio_seconds for s in samples if s.outcome is AttemptOutcome.OK
        ),
    )


def stop_reason(
    previous: LevelResult | None, current: LevelResult, *, min_gain: float = MIN_GAIN
) -> str | None:
    """Why not to climb above `current`, or None to go on.

    Any OOM, 5xx/crash or timeout means the server is past what it sustains; a 4xx means the
    requests themselves are wrong and nothing can be measured; goodput that did not grow by
    `min_gain` over the level below means more concurrency only adds memory risk.
    """
    if current.oom:
        return "oom"
    if current.server_errors:
        return "server_error"
    if current.timeout:
        return "timeout"
    if current.client_error or current.sent == 0:
        return "client_error"
    if previous is not None and current.goodput < previous.goodput * (1 + min_gain):
        return "no_gain"
    return None


@dataclass(frozen=True, slots=True)
class Recommendation:
    """The `ASR_MAX_CONCURRENT` to use (None when even one task at a time failed) and why."""

    max_concurrent: int | None
    reason: str


def recommend(
    levels: Sequence[LevelResult], *, tolerance: float = MIN_GAIN, max_level: int | None = None
) -> Recommendation:
    """The lowest clean level whose goodput is within `tolerance` of the best clean level.

    Only levels where every task succeeded count. Preferring the lowest of the near-best leaves
    memory headroom for files longer than the test's (the seed: "实际建议：2（留有余地）"):
    a level that adds less than `tolerance` is not worth its risk.
    """
    clean = [r for r in levels if r.clean]
    if not clean:
        first = levels[0] if levels else None
        what = _failure_words(first) if first is not None else "nothing was measured"
        return Recommendation(
            None,
            f"even one task at a time failed ({what}): fix the server, or test with shorter "
            "files, before choosing a concurrency",
        )
    best = max(clean, key=lambda r: r.goodput)
    choice = min(
        (r for r in clean if r.goodput >= best.goodput * (1 - tolerance)), key=lambda r: r.level
    )
    by_level = {r.level: r for r in levels}
    parts = [f"{choice.level} at a time moved {choice.goodput:.2f} audio-min/min with no failure"]
    below = by_level.get(choice.level - 1)
    if below is not None and below.goodput > 0:
        parts[0] += f" ({_gain(below, choice)} over {below.level})"
    if best is not choice:
        parts.append(
            f"{best.level} at a time was only {_gain(choice, best)} faster: the lower level "
            "leaves memory headroom for longer files"
        )
    above = by_level.get(choice.level + 1)
    if above is not None and best is choice:
        if above.clean:
            parts.append(
                f"{above.level} at a time added less than {tolerance:.0%} ({_gain(choice, above)})"
            )
        else:
            parts.append(f"{above.level} at a time failed ({_failure_words(above)})")
    elif above is None and max_level is not None and choice.level >= max_level:
        parts.append(f"--max-level {max_level} reached: the server may sustain more")
    return Recommendation(choice.level, "; ".join(parts))


def _gain(base: LevelResult, other: LevelResult) -> str:
    if base.goodput <= 0:
        return "n/a"
    return f"{other.goodput / base.goodput - 1:+.0%}"


def _failure_words(result: LevelResult) -> str:
    kinds = [
        (result.oom, "OOM"),
        (result.error, "5xx"),
        (result.crash, "dropped connection"),
        (result.timeout, "timeout"),
        (result.client_error, "4xx"),
    ]
    said = [f"{n} {word}" for n, word in kinds if n]
    return ", ".join(said) + f" in {result.sent} tasks" if said else "no task succeeded"


@dataclass(frozen=True, slots=True)
class TuneConfig:
    """Everything one run needs, built once from the flags."""

    url: str
    api: str
    audio: tuple[AudioItem, ...]
    tasks_per_level: int = 8
    max_level: int = 8
    timeout: float = 600.0
    pause: float = 5.0
    model: str = "whisper-1"
    out_dir: Path | None = None
    yes: bool = False


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
            "levels": [r.to_json() for r in self.levels],
            "stopped_because": self.stopped,
            "recommendation": {
                "max_concurrent": self.recommendation.max_concurrent,
                "reason": self.recommendation.reason,
            },
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


def _rows(report: TuneReport) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    previous: LevelResult | None = None
    for r in report.levels:
        note = stop_reason(previous, r)
        words = _STOP_WORDS.get(note, "") if note else ""
        if previous is not None and previous.goodput > 0 and r.clean:
            words = f"{_gain(previous, r)}" + (f", {words}" if words else "")
        if r.level == report.recommendation.max_concurrent:
            words = "◀ recommended" + (f", {words}" if words else "")
        rows.append(
            (
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
                words,
            )
        )
        previous = r
    return rows


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


def markdown_report(report: TuneReport) -> str:
    """The results as a Markdown page: parameters, the table, the recommendation."""
    c = report.config
    audio = ", ".join(f"{a.name} ({a.seconds:g} s)" for a in c.audio)
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
        "|"
        + "|".join("---:" if i < len(_COLUMNS) - 1 else "---" for i in range(len(_COLUMNS)))
        + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(report)]
    rec = report.recommendation
    lines += ["", "## Recommendation", ""]
    if rec.max_concurrent is not None:
        lines += ["```sh", f"ASR_MAX_CONCURRENT={rec.max_concurrent}", "```", ""]
    lines += [rec.reason[:1].upper() + rec.reason[1:] + ".", ""]
    return "\n".join(lines)


# -- the command ------------------------------------------------------------------------------


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of `gatekeeper tune`."""
    parser.add_argument(
        "url",
        nargs="?",
        help="base URL of the Whisper server (or the simulator), e.g. http://whisper:9000; "
        "not the gatekeeper: tune loads the server directly",
    )
    parser.add_argument("--upstream-url", dest="upstream_url", help="the same as URL")
    parser.add_argument(
        "--api",
        choices=sorted(API_ROUTES),
        default="asr",
        help="asr: POST /asr, field audio_file (whisper-asr-webservice); openai: POST "
        "/v1/audio/transcriptions, field file (speaches, vLLM); whispercpp: POST /inference, "
        "field file (default: %(default)s)",
    )
    parser.add_argument(
        "--model",
        default="whisper-1",
        help="model form field sent with --api openai (default: %(default)s)",
    )
    audio = parser.add_mutually_exclusive_group()
    audio.add_argument(
        "--audio", type=Path, metavar="FILE", help="an audio file to send with every task"
    )
    audio.add_argument(
        "--durations",
        default=None,
        metavar="SECONDS,…",
        help="send generated silent 16 kHz WAVs of these durations in turn (default: 300). "
        "Servers with voice-activity filtering skip silence: use --audio with real speech there",
    )
    parser.add_argument(
        "--audio-seconds",
        type=float,
        default=None,
        help="duration of --audio when it is not a WAV (otherwise estimated from its size)",
    )
    parser.add_argument(
        "--tasks-per-level",
        type=int,
        default=8,
        metavar="N",
        help="tasks sent at each level, rounded up to a multiple of the level so every slot "
        "stays busy to the end (default: %(default)s)",
    )
    parser.add_argument(
        "--max-level", type=int, default=8, help="highest concurrency to try (default: %(default)s)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds one task may take before it counts as a timeout (default: %(default)s)",
    )
    parser.add_argument(
        "--pause",
        type=float,
        default=5.0,
        help="seconds to wait between levels so the server can free memory (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("tune-results"),
        metavar="DIR",
        help="directory for the JSON and Markdown results (default: %(default)s)",
    )
    parser.add_argument(
        "--yes",
        "-y",
        action="store_true",
        help="do not ask before loading a server that already has traffic",
    )


def run_tune(args: argparse.Namespace) -> int:
    """Run `gatekeeper tune`; the exit status is 0 with a recommendation, 1 when the server
    failed or could not be reached, 2 for bad flags or a refusal to load a busy server."""
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"gatekeeper tune: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(
        tune(config, stdout=sys.stdout, stderr=sys.stderr, interactive=sys.stdin.isatty())
    )


def config_from_args(args: argparse.Namespace) -> TuneConfig:
    """Check the flags and load or generate the audio; ValueError names what is wrong."""
    url = args.url or args.upstream_url
    if url is None:
        raise ValueError("give the Whisper server's URL (URL or --upstream-url)")
    if args.url and args.upstream_url and args.url != args.upstream_url:
        raise ValueError("URL and --upstream-url differ; give one")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"URL must start with http:// or https://, got {url!r}")
    for name in ("tasks_per_level", "max_level"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if not args.timeout > 0:
        raise ValueError("--timeout must be > 0")
    if not args.pause >= 0:
        raise ValueError("--pause must be >= 0")
    audio: tuple[AudioItem, ...]
    if args.audio is not None:
        audio = (_load_audio(args.audio, args.audio_seconds),)
    else:
        if args.audio_seconds is not None:
            raise ValueError("--audio-seconds goes with --audio")
        audio = tuple(_generated(d) for d in _parse_durations(args.durations or "300"))
    return TuneConfig(
        url=url.rstrip("/"),
        api=args.api,
        audio=audio,
        tasks_per_level=args.tasks_per_level,
        max_level=args.max_level,
        timeout=args.timeout,
        pause=args.pause,
        model=args.model,
        out_dir=args.out,
        yes=args.yes,
    )


def _parse_durations(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--durations must be seconds separated by commas, got {text!r}") from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"--durations must be positive seconds, got {text!r}")
    return values


def _generated(seconds: float) -> AudioItem:
    return AudioItem(f"silence-{seconds:g}s.wav", silent_wav(seconds), seconds)


def _load_audio(path: Path, seconds: float | None) -> AudioItem:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read --audio {path}: {exc.strerror or exc}") from None
    if seconds is None:
        if parse_wav(data[:HEAD_BYTES], len(data)) is None:
            raise ValueError(
                f"{path.name} is not a WAV file: give its duration with --audio-seconds"
            )
        seconds = audio_seconds(data[:HEAD_BYTES], len(data))
    if not seconds > 0:
        raise ValueError(f"{path.name} has no audio (duration {seconds:g} s)")
    return AudioItem(path.name, data, seconds)


async def tune(
    config: TuneConfig,
    *,
    stdout: TextIO,
    stderr: TextIO,
    interactive: bool,
    ask: Callable[[str], bool] | None = None,
) -> int:
    """Check the server is idle, climb the levels, print and write the results.

    `interactive` says whether a person can answer the question about a busy server (`ask`,
    by default `input()`); without one and without `--yes` a busy server is refused (exit 2).
    """
    started_at = datetime.now().isoformat(timespec="seconds")
    matcher = OomMatcher.from_patterns(())
    async with aiohttp.ClientSession() as session:
        try:
            busy = await _busy_reason(session, config.url, stderr)
        except aiohttp.ClientError as exc:
            print(f"gatekeeper tune: cannot reach {config.url}: {exc}", file=stderr)
            return 1
        if busy is not None and not config.yes:
            print(f"gatekeeper tune: warning: {busy}.", file=stderr)
            print(
                "gatekeeper tune: a stress test would compete with that traffic and may make "
                "its tasks run out of memory.",
                file=stderr,
            )
            if not interactive:
                print(
                    "gatekeeper tune: refusing to load a busy server without a terminal to ask; "
                    "run it when the server is idle, or pass --yes to load it anyway.",
                    file=stderr,
                )
                return 2
            if not await asyncio.to_thread(ask or _ask, "Load it anyway? [y/N] "):
                print("gatekeeper tune: not started.", file=stderr)
                return 2
        progress = _Progress(stderr)
        warm = await _send(session, config, 0, matcher)
        progress.line(
            f"warm-up: one task, {warm.outcome.value} in {warm.seconds:.2f} s (not counted)"
        )
        if warm.outcome is not AttemptOutcome.OK:
            print(
                f"gatekeeper tune: the warm-up task failed ({_warm_words(warm)}); "
                "check the URL, --api and the server before tuning.",
                file=stderr,
            )
            return 1
        levels: list[LevelResult] = []
        stopped: str | None = None
        for level in range(1, config.max_level + 1):
            if levels and config.pause > 0:
                await asyncio.sleep(config.pause)
            result = await _run_level(session, config, level, matcher, progress)
            levels.append(result)
            stopped = stop_reason(levels[-2] if len(levels) > 1 else None, result)
            progress.level_done(result, stopped)
            if stopped is not None:
                break
        else:
            stopped = "max_level"
    recommendation = recommend(levels, max_level=config.max_level)
    report = TuneReport(config, started_at, tuple(levels), stopped, recommendation)
    print(format_table(report), file=stdout)
    print("", file=stdout)
    if recommendation.max_concurrent is not None:
        print(f"ASR_MAX_CONCURRENT={recommendation.max_concurrent}", file=stdout)
    else:
        print("no recommendation", file=stdout)
    print(f"  why: {recommendation.reason}", file=stdout)
    if config.out_dir is not None:
        written = await asyncio.to_thread(_write, report, config.out_dir)
        print(f"  results: {', '.join(str(p) for p in written)}", file=stdout)
    stdout.flush()
    return 0 if recommendation.max_concurrent is not None else 1


def _ask(prompt: str) -> bool:
    try:
        return input(prompt).strip().lower() in ("y", "yes")
    except EOFError:
        return False


def _warm_words(sample: TaskSample) -> str:
    status = f"HTTP {sample.status}, " if sample.status is not None else ""
    return f"{status}{sample.outcome.value}"


async def _busy_reason(session: aiohttp.ClientSession, url: str, stderr: TextIO) -> str | None:
    """Why the server looks busy, or None when it looks idle.

    Asks the simulator's `/sim/state` and a gatekeeper's `/stats` (either may be absent), then
    times `GET /`. Raises aiohttp.ClientError when nothing answers at all.
    """
    quick = aiohttp.ClientTimeout(total=BUSY_PROBE_SECONDS)
    for path in ("/sim/state", "/stats"):
        try:
            async with session.get(url + path, timeout=quick, allow_redirects=False) as resp:
                document = await resp.json(content_type=None) if resp.status == 200 else None
        except (TimeoutError, aiohttp.ClientError, ValueError):
            continue
        if not isinstance(document, dict):
            continue
        if path == "/stats" and "queue_usage" in document:
            print(
                f"gatekeeper tune: warning: {url} answers /stats like a gatekeeper; tune "
                "measures the Whisper server best when pointed at it directly.",
                file=stderr,
            )
        active, queued = document.get("active_tasks"), document.get("queued_tasks")
        if isinstance(active, int) and active > 0:
            return f"{url}{path} reports {active} task(s) running"
        if isinstance(queued, int) and queued > 0:
            return f"{url}{path} reports {queued} task(s) queued"
    began = time.monotonic()
    try:
        async with session.get(url + "/", timeout=quick, allow_redirects=False) as resp:
            await resp.read()
    except TimeoutError:
        return f"GET {url}/ did not answer within {BUSY_PROBE_SECONDS:g} s (busy transcribing?)"
    took = time.monotonic() - began
    if took > BUSY_PROBE_SECONDS:  # pragma: no cover - the timeout above usually fires first
        return f"GET {url}/ took {took:.1f} s (busy transcribing?)"
    return None


async def _run_level(
    session: aiohttp.ClientSession,
    config: TuneConfig,
    level: int,
    matcher: OomMatcher,
    progress: "_Progress",
) -> LevelResult:
    """`level` workers share the level's tasks; the first failure stops new sends (the ones
    already upstream finish), so a level past the memory line costs one OOM, not a dozen."""
    planned = level * math.ceil(config.tasks_per_level / level)
    samples: list[TaskSample] = []
    next_index = iter(range(planned))
    failed = False
    progress.level_started(level, planned)

    async def worker() -> None:
        nonlocal failed
        for index in next_index:
            if failed:
                return
            sample = await _send(session, config, index, matcher)
            samples.append(sample)
            if sample.outcome is not AttemptOutcome.OK:
                failed = True
            progress.task_done(level, planned, samples)

    began = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(level)))
    return summarize(level, samples, planned=planned, wall_seconds=time.monotonic() - began)


async def _send(
    session: aiohttp.ClientSession, config: TuneConfig, index: int, matcher: OomMatcher
) -> TaskSample:
    """One task straight to the server, classified as the gatekeeper would classify it."""
    route = API_ROUTES[config.api]
    audio = config.audio[index % len(config.audio)]
    form = aiohttp.FormData()
    if route.sends_model:
        form.add_field("model", config.model)
    # A file object rather than bytes: aiohttp streams it instead of copying it on the loop.
    form.add_field(route.field, io.BytesIO(audio.data), filename=audio.name)
    began = time.monotonic()
    status: int | None = None
    try:
        async with session.post(
            config.url + route.path,
            data=form,
            timeout=aiohttp.ClientTimeout(total=config.timeout),
        ) as resp:
            status = resp.status
            if status < 400:
                await resp.read()
                body = b""
            else:
                body = await resp.content.read(CLASSIFY_BODY_LIMIT)
            outcome = classify(
                status=status,
                body=body,
                content_type=resp.headers.get("Content-Type"),
                matcher=matcher,
            )
    except TimeoutError:
        outcome = classify(status=status, timed_out=True, matcher=matcher)
    except aiohttp.ClientError as exc:
        outcome = classify(status=status, error=exc, matcher=matcher)
    return TaskSample(outcome, time.monotonic() - began, audio.seconds, status)


def _write(report: TuneReport, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "tune-" + report.started_at.replace(":", "").replace("-", "").replace("T", "-")
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(
        json.dumps(report.to_json(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    md_path.write_text(markdown_report(report), encoding="utf-8")
    return [json_path, md_path]


class _Progress:
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
        elapsed = time.monotonic() - self._began
        if self._tty:
            filled = round(self._WIDTH * done / planned)
            bar = "#" * filled + "·" * (self._WIDTH - filled)
            text = f"level {level} [{bar}] {done}/{planned}  ok {ok}  oom {oom}  {elapsed:.1f} s"
            self._stream.write("\r" + text.ljust(78))
            self._stream.flush()
        else:
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
