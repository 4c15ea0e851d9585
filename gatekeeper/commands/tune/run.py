"""How `gatekeeper tune` loads the server: the idle check, tasks sent straight to it, the levels.

One aiohttp `ClientSession` for the run; each answer is classified as the gatekeeper would
classify it, and each level's samples are folded by `decide.summarize`.
"""

import asyncio
import dataclasses
import io
import math
import time
from dataclasses import dataclass, field
from typing import Any, Final, TextIO, TypeGuard

import aiohttp

from gatekeeper.commands.tune.args import API_ROUTES, ApiRoute, AudioItem, TuneConfig
from gatekeeper.commands.tune.decide import LevelResult, TaskSample, stop_reason, summarize
from gatekeeper.commands.tune.report import Progress
from gatekeeper.policy.classify import CLASSIFY_BODY_LIMIT, OomMatcher, classify
from gatekeeper.policy.outcomes import AttemptOutcome

__all__ = [
    "BUSY_PROBE_SECONDS",
    "Load",
    "busy_reason",
    "climb",
    "memory_climb",
    "run_level",
    "send",
    "sim_memory_gib",
]

BUSY_PROBE_SECONDS: Final = 2.0
"""A server that takes longer than this to answer `GET /` is busy transcribing (whisper-asr-
webservice blocks its event loop while a job runs, so even `/` stalls)."""


@dataclass(frozen=True, slots=True)
class Load:
    """What sends the tasks: the run's one client session, its config, the card being measured
    (one of `config.urls`), and the OOM matcher."""

    session: aiohttp.ClientSession
    config: TuneConfig
    url: str
    matcher: OomMatcher = field(default_factory=lambda: OomMatcher.from_patterns(()))


# -- is the server idle? -------------------------------------------------------------------------


async def busy_reason(session: aiohttp.ClientSession, url: str, stderr: TextIO) -> str | None:
    """Why the server looks busy, or None when it looks idle.

    Asks the simulator's `/sim/state` and a gatekeeper's `/stats` (either may be absent), then
    times `GET /`. Raises aiohttp.ClientError when nothing answers at all.
    """
    for path in ("/sim/state", "/stats"):
        document = await _json_document(session, url + path)
        if document is None:
            continue
        if path == "/stats" and "queue_usage" in document:
            print(
                f"gatekeeper tune: warning: {url} answers /stats like a gatekeeper; tune "
                "measures the Whisper server best when pointed at it directly.",
                file=stderr,
            )
        reason = _reported_work(document, url + path)
        if reason is not None:
            return reason
    return await _slow_root(session, url)


def _quick() -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=BUSY_PROBE_SECONDS)


async def _json_document(session: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    """The JSON object at `url`, or None when there is none (any error, status or shape)."""
    try:
        async with session.get(url, timeout=_quick(), allow_redirects=False) as resp:
            document = await resp.json(content_type=None) if resp.status == 200 else None
    except (TimeoutError, aiohttp.ClientError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def _reported_work(document: dict[str, Any], where: str) -> str | None:
    active, queued = document.get("active_tasks"), document.get("queued_tasks")
    if isinstance(active, int) and active > 0:
        return f"{where} reports {active} task(s) running"
    if isinstance(queued, int) and queued > 0:
        return f"{where} reports {queued} task(s) queued"
    return None


async def _slow_root(session: aiohttp.ClientSession, url: str) -> str | None:
    began = time.monotonic()
    try:
        async with session.get(url + "/", timeout=_quick(), allow_redirects=False) as resp:
            await resp.read()
    except TimeoutError:
        return f"GET {url}/ did not answer within {BUSY_PROBE_SECONDS:g} s (busy transcribing?)"
    took = time.monotonic() - began
    if took > BUSY_PROBE_SECONDS:  # pragma: no cover - the timeout above usually fires first
        return f"GET {url}/ took {took:.1f} s (busy transcribing?)"
    return None


async def sim_memory_gib(session: aiohttp.ClientSession, url: str) -> float | None:
    """The memory a simulated card leaves to tasks (`/sim/state`: total − reserved), or None
    when the server is not the simulator (a real one cannot tell)."""
    document = await _json_document(session, url + "/sim/state")
    if document is None:
        return None
    total, reserved = document.get("memory_total_gib"), document.get("memory_reserved_gib")
    if not (_number(total) and _number(reserved)):
        return None
    free = float(total) - float(reserved)
    return free if math.isfinite(free) and free > 0 else None


def _number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


# -- the levels ----------------------------------------------------------------------------------


async def climb(
    load: Load, progress: Progress, *, past_no_gain: bool = False
) -> tuple[list[LevelResult], str]:
    """Levels 1, 2, 3, … until `stop_reason` says stop or --max-level is done; the results
    and why climbing stopped. `past_no_gain`: only a failure stops it (the memory line is
    what is sought, not the best goodput)."""
    levels: list[LevelResult] = []
    for level in range(1, load.config.max_level + 1):
        if levels and load.config.pause > 0:
            await asyncio.sleep(load.config.pause)
        levels.append(await run_level(load, level, progress))
        previous = levels[-2] if len(levels) > 1 and not past_no_gain else None
        stopped = stop_reason(previous, levels[-1])
        progress.level_done(levels[-1], stopped)
        if stopped is not None:
            return levels, stopped
    return levels, "max_level"


async def memory_climb(
    load: Load, audio: AudioItem, progress: Progress
) -> tuple[list[LevelResult], str]:
    """Tasks of one length only, climbing until one runs out of memory (or another failure, or
    --max-level): "c of these fitted at once, c + 1 did not"."""
    config = dataclasses.replace(load.config, audio=(audio,))
    return await climb(dataclasses.replace(load, config=config), progress, past_no_gain=True)


async def run_level(load: Load, level: int, progress: Progress) -> LevelResult:
    """`level` workers share the level's tasks; the first failure stops new sends (the ones
    already upstream finish), so a level past the memory line costs one OOM, not a dozen."""
    planned = level * math.ceil(load.config.tasks_per_level / level)
    samples: list[TaskSample] = []
    next_index = iter(range(planned))
    progress.level_started(level, planned)

    async def worker() -> None:
        for index in next_index:
            if any(s.outcome is not AttemptOutcome.OK for s in samples):
                return
            samples.append(await send(load, index))
            progress.task_done(level, planned, samples)

    began = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(level)))
    return summarize(level, samples, planned=planned, wall_seconds=time.monotonic() - began)


# -- one task ------------------------------------------------------------------------------------


async def send(load: Load, index: int) -> TaskSample:
    """One task straight to the server, classified as the gatekeeper would classify it."""
    route = API_ROUTES[load.config.api]
    audio = load.config.audio[index % len(load.config.audio)]
    form = _form(route, audio, load.config.model)
    began = time.monotonic()
    status, outcome = await _post(load, load.url + route.path, form)
    return TaskSample(outcome, time.monotonic() - began, audio.seconds, status)


def _form(route: ApiRoute, audio: AudioItem, model: str) -> aiohttp.FormData:
    form = aiohttp.FormData()
    if route.sends_model:
        form.add_field("model", model)
    # A file object rather than bytes: aiohttp streams it instead of copying it on the loop.
    form.add_field(route.field, io.BytesIO(audio.data), filename=audio.name)
    return form


async def _post(load: Load, url: str, form: aiohttp.FormData) -> tuple[int | None, AttemptOutcome]:
    """The status (None without one) and the outcome of one POST, failures included."""
    status: int | None = None
    timeout = aiohttp.ClientTimeout(total=load.config.timeout)
    try:
        async with load.session.post(url, data=form, timeout=timeout) as resp:
            status = resp.status
            return status, await _answer_outcome(resp, load.matcher)
    except TimeoutError:
        return status, classify(status=status, timed_out=True, matcher=load.matcher)
    except aiohttp.ClientError as exc:
        return status, classify(status=status, error=exc, matcher=load.matcher)


async def _answer_outcome(resp: aiohttp.ClientResponse, matcher: OomMatcher) -> AttemptOutcome:
    """Read the answer (all of a success, the head of a failure) and classify it."""
    if resp.status < 400:
        await resp.read()
        body = b""
    else:
        body = await resp.content.read(CLASSIFY_BODY_LIMIT)
    content_type = resp.headers.get("Content-Type")
    return classify(status=resp.status, body=body, content_type=content_type, matcher=matcher)
