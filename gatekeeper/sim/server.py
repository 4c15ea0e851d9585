"""A stand-in GPU Whisper server that runs out of memory the way a real one does.

`Simulator` owns an aiohttp application (like aiohttp's examples/fake_server.py) that speaks
the three APIs the gatekeeper fronts — whisper-asr-webservice, OpenAI-compatible servers and
whisper.cpp — and answers each in that server's shape. Behind the API sits a model of the
card (`memory.GpuMemory`, `memory.GpuCompute`): a task that does not fit answers OOM at once,
tasks that fit share the GPU and take time proportional to their audio, and with
`crash_on_oom` an OOM takes the whole process down and brings it back after a restart delay,
like a ggml abort under a restarting container.

A client that hangs up does not stop the GPU by default: like a FastAPI/uvicorn server whose
transcription runs in a threadpool worker, the task keeps its memory, its share of the GPU and
its place in `active_tasks` until it would have finished (`on_disconnect="continue"`). With
`on_disconnect="stop"` the work ends with the connection, as whisper.cpp's server aborts it.

Tests steer single requests with headers (`X-Sim-Fail`, `X-Sim-Status`, `X-Sim-Audio-Seconds`,
`X-Sim-Retry-After`) that travel through the gatekeeper unchanged, and read `GET /sim/state`
to see what actually reached the "GPU": how many tasks ran at once and the exact bytes sent.
"""

import asyncio
import json
import logging
import math
import random
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from typing import Final, Self, TypeAlias
from urllib.parse import quote

from aiohttp import BodyPartReader, web

from gatekeeper.spool import SpooledBody

from .audio import DEFAULT_BYTE_RATE, AudioProbe, estimate_seconds, spooled_seconds
from .errors import ErrorAnswer, ErrorStyle, gpu_error_answer, oom_answer, status_answer
from .memory import GpuCompute, GpuMemory

__all__ = ["TASK_PATHS", "JsonValue", "OnDisconnect", "SimConfig", "Simulator"]

JsonValue: TypeAlias = bool | int | float | str | list["JsonValue"] | dict[str, "JsonValue"] | None

TASK_PATHS: Final = (
    "/asr",
    "/detect-language",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
    "/inference",
)
"""Paths that run a task on the simulated GPU; everything else answers at once."""

_log = logging.getLogger(__name__)

_CHUNK = 64 * 1024  # upload read size: large enough to be fast, small enough to never matter
_SPOOL_MEMORY = 1024 * 1024  # an audio part larger than this waits in a temporary file
_SPOOL_IDLE = 600.0  # the simulator gives up on an upload that stalls this long
_FORM_FIELD_LIMIT = 64 * 1024  # non-file form fields are tiny; keep at most this much
_SHUTDOWN_TIMEOUT = 1.0  # handlers are cancelled on stop; do not wait aiohttp's default 60 s
_RESET_GRACE = 0.05  # real seconds the half-written answer gets to leave before the reset
_DETECT_SECONDS = 30.0  # language detection only looks at the first 30 s, like Whisper
_MAX_SEGMENTS = 50
_RECENT_LIMIT = 200


class OnDisconnect(StrEnum):
    """What the simulated server does with a task whose client hung up mid-work."""

    CONTINUE = "continue"
    """Work on until the task would have finished, holding its memory and its place (a sync
    handler in uvicorn's threadpool: whisper-asr-webservice, speaches)."""
    STOP = "stop"
    """Drop the task at once and free its memory (whisper.cpp's server aborts inference)."""


@dataclass(frozen=True)
class SimConfig:
    """Every knob of the simulator, fixed at construction (config once, passed down).

    Defaults tell the README's story: a 24 GiB card with 6 GiB reserved, each task peaking at
    2 GiB + 0.8 GiB per audio minute — three 5-minute files fit, a fourth does not — and a GPU
    that works at 10× real time alone and up to 2× that in total when shared.
    """

    total_gib: float = 24.0
    reserved_gib: float = 6.0
    task_base_gib: float = 2.0
    task_gib_per_minute: float = 0.8
    rtf: float = 0.1
    """Exclusive-GPU seconds of work per second of audio (0.1 = 10× faster than real time)."""
    parallel_gain: float = 0.3
    """Extra total throughput each additional concurrent task brings."""
    max_speedup: float = 2.0
    """Cap on total throughput, relative to one task alone."""
    time_scale: float = 1.0
    """Run N× faster than the story: processing, restart period and release delay."""
    error_style: ErrorStyle = ErrorStyle.PYTORCH
    crash_on_oom: bool = False
    """Instead of answering OOM, reset every connection and restart (whisper.cpp / ggml)."""
    restart_seconds: float = 5.0
    """How long the port refuses connections after a crash."""
    release_delay: float = 0.0
    """Seconds a finished task keeps its memory (a cache that is not freed at once)."""
    byte_rate: float = DEFAULT_BYTE_RATE
    """Bytes per second used to estimate the duration of uploads whose headers cannot be read."""
    seed: int | None = None
    jitter: float = 0.0
    """Each task's work is multiplied by uniform(1 − jitter, 1 + jitter), drawn from `seed`."""
    stall_when_busy: bool = False
    """Non-task paths (/health, /docs, /) wait while the GPU is busy, as whisper-asr-webservice
    does because it transcribes on its event loop."""
    on_disconnect: OnDisconnect = OnDisconnect.CONTINUE
    """Whether a task whose client left keeps working (and counting) until its time is up."""

    def __post_init__(self) -> None:
        # Accept the enums' names so callers building a config from text need no enum import.
        object.__setattr__(self, "error_style", ErrorStyle(self.error_style))
        object.__setattr__(self, "on_disconnect", OnDisconnect(self.on_disconnect))
        positive = {
            "total_gib": self.total_gib,
            "rtf": self.rtf,
            "time_scale": self.time_scale,
            "byte_rate": self.byte_rate,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        non_negative = {
            "reserved_gib": self.reserved_gib,
            "task_base_gib": self.task_base_gib,
            "task_gib_per_minute": self.task_gib_per_minute,
            "parallel_gain": self.parallel_gain,
            "restart_seconds": self.restart_seconds,
            "release_delay": self.release_delay,
        }
        for name, value in non_negative.items():
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.reserved_gib > self.total_gib:
            raise ValueError("reserved_gib must not exceed total_gib")
        if self.max_speedup < 1:
            raise ValueError(f"max_speedup must be >= 1, got {self.max_speedup}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")

    def scaled(self, story_seconds: float) -> float:
        """Real seconds for a duration in the story's time."""
        return story_seconds / self.time_scale


class _Family(StrEnum):
    """Which real server's API a path belongs to; decides field names and answer shapes."""

    ASR_WEBSERVICE = "asr-webservice"
    OPENAI = "openai"
    WHISPERCPP = "whispercpp"


@dataclass(frozen=True)
class _Route:
    family: _Family
    field: str
    task: str  # transcribe | translate | detect


_ROUTES: Final = {
    "/asr": _Route(_Family.ASR_WEBSERVICE, "audio_file", "transcribe"),
    "/detect-language": _Route(_Family.ASR_WEBSERVICE, "audio_file", "detect"),
    "/v1/audio/transcriptions": _Route(_Family.OPENAI, "file", "transcribe"),
    "/v1/audio/translations": _Route(_Family.OPENAI, "file", "translate"),
    "/inference": _Route(_Family.WHISPERCPP, "file", "transcribe"),
}

_ASR_OUTPUTS: Final = ("txt", "vtt", "srt", "tsv", "json")
_OPENAI_FORMATS: Final = ("json", "text", "verbose_json", "srt", "vtt")
_FAILS: Final = ("oom", "error", "crash", "hang", "reset-mid-answer")


@dataclass
class _TaskRecord:
    """What one task request looked like on arrival, and how it ended."""

    task_id: str
    path: str
    query_string: str
    method: str
    request_id: str | None
    headers: dict[str, str]
    audio_bytes: int = 0
    audio_sha256: str | None = None
    audio_seconds: float = 0.0
    outcome: str = "running"

    def to_json(self) -> dict[str, JsonValue]:
        headers: dict[str, JsonValue] = dict(self.headers)
        return {
            "task_id": self.task_id,
            "path": self.path,
            "query_string": self.query_string,
            "method": self.method,
            "request_id": self.request_id,
            "headers": headers,
            "audio_bytes": self.audio_bytes,
            "audio_sha256": self.audio_sha256,
            "audio_seconds": round(self.audio_seconds, 6),
            "outcome": self.outcome,
        }


@dataclass
class _Counters:
    """Everything `POST /sim/reset` zeroes."""

    tasks_started: int = 0
    tasks_done: int = 0
    ooms: int = 0
    errors: int = 0
    resets: int = 0
    crashes: int = 0
    max_active_seen: int = 0


@dataclass
class _Upload:
    """The parsed multipart body: the audio part (hashed, and spooled until its length is
    read) and small form fields."""

    probe: AudioProbe = field(default_factory=AudioProbe)
    found: bool = False
    filename: str = "audio"
    form: dict[str, str] = field(default_factory=dict)
    audio: SpooledBody | None = None

    async def seconds(self, byte_rate: float) -> float:
        """How long the audio is: read in a thread, since it is file I/O."""
        if self.audio is None:
            return estimate_seconds(0, byte_rate)
        return await asyncio.to_thread(spooled_seconds, self.audio, byte_rate)

    def close(self) -> None:
        """Free the spooled audio (idempotent)."""
        if self.audio is not None:
            self.audio.close()
            self.audio = None


class _BadSteering(ValueError):
    """A steering header the simulator cannot act on (a test bug, reported as 400)."""


class _Job:
    """One task on the GPU: a future for its end and progress marks for streaming answers."""

    __slots__ = ("_changed", "finished", "marks", "reached")

    def __init__(self, loop: asyncio.AbstractEventLoop, marks: tuple[float, ...]) -> None:
        self.finished: asyncio.Future[None] = loop.create_future()
        self.marks = marks
        self.reached = 0
        self._changed = asyncio.Event()

    def notify(self) -> None:
        self._changed.set()

    async def changed(self) -> None:
        """Wait until a mark is passed or the job ends."""
        await self._changed.wait()
        self._changed.clear()


class _GpuProcessor:
    """Drives `GpuCompute` with real time: one timer for the next completion or mark.

    Event-driven rather than polling, so a 1000× time-scaled test still sees segments and
    completions in the right order and at the right moments.
    """

    def __init__(self, compute: GpuCompute, on_finished: Callable[[str], None]) -> None:
        self._compute = compute
        self._on_finished = on_finished
        self._jobs: dict[str, _Job] = {}
        self._timer: asyncio.TimerHandle | None = None
        self.idle = asyncio.Event()
        self.idle.set()

    @property
    def running(self) -> int:
        return len(self._jobs)

    def __contains__(self, task_id: object) -> bool:
        """Whether `task_id` is still on the GPU."""
        return task_id in self._jobs

    def submit(self, task_id: str, work: float, marks: tuple[float, ...] = ()) -> _Job:
        loop = asyncio.get_running_loop()
        job = _Job(loop, marks)
        self._jobs[task_id] = job
        self._compute.add(task_id, work, loop.time())
        self.idle.clear()
        self._tick()
        return job

    def abandon(self, task_id: str) -> None:
        """Take one unfinished job off the GPU (its client left and the server gives up on it)."""
        job = self._jobs.pop(task_id, None)
        if job is None:
            return
        self._compute.remove(task_id, asyncio.get_running_loop().time())
        job.finished.cancel()
        job.notify()
        self._tick()  # the others speed up; the GPU may be idle now

    def clear(self) -> None:
        """Drop every job (the process died): waiters see their job cancelled."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._compute.clear()
        jobs, self._jobs = self._jobs, {}
        for job in jobs.values():
            job.finished.cancel()
            job.notify()
        self.idle.set()

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = loop.time()
        for task_id in self._compute.advance(now):
            job = self._jobs.pop(task_id, None)
            if job is None:
                continue
            job.reached = len(job.marks)
            if not job.finished.done():
                job.finished.set_result(None)
            job.notify()
            self._on_finished(task_id)
        wake = math.inf
        for task_id, job in self._jobs.items():
            progress = self._compute.progress(task_id)
            while job.reached < len(job.marks) and progress >= job.marks[job.reached] - 1e-9:
                job.reached += 1
                job.notify()
            wake = min(wake, self._compute.seconds_until(task_id))
            if job.reached < len(job.marks):
                wake = min(wake, self._compute.seconds_until(task_id, job.marks[job.reached]))
        if not self._jobs:
            self.idle.set()
        elif math.isfinite(wake):
            self._timer = loop.call_at(now + wake, self._tick)


_Handler: TypeAlias = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Simulator:
    """A simulated GPU Whisper server on a real socket.

    ``async with Simulator(SimConfig(time_scale=100)) as sim:`` starts it on a free port of
    127.0.0.1; `sim.url` is where to send requests and `sim.state()` what it has seen.

    Request headers that steer one task (they pass through the gatekeeper untouched):

    - ``X-Sim-Audio-Seconds: 300`` — use this duration instead of the one from the upload.
    - ``X-Sim-Fail: oom`` — behave as if the task did not fit (OOM answer, or a crash with
      `crash_on_oom`); ``error`` — a non-OOM 500 in the configured style; ``crash`` — reset
      every connection and restart; ``hang`` — never answer until the client leaves (no GPU
      work, so nothing runs on after it);
      ``reset-mid-answer`` — do the work, send the status, headers and half the body, reset.
    - ``X-Sim-Status: 429`` — answer that status with a small body in the configured style.
    - ``X-Sim-Retry-After: 7`` — add ``Retry-After: 7`` to an error answer.

    Task answers carry ``X-Sim-Task-Id``, ``X-Sim-Audio-Bytes`` and ``X-Sim-Audio-Sha256`` so
    a test can prove the upload arrived byte for byte.

    ``active_tasks`` and ``max_active_seen`` in `state()` count what is on the simulated
    server: with the default ``on_disconnect="continue"`` a task whose client left stays
    counted (and listed in ``orphaned_tasks``) until its work is done.
    """

    def __init__(
        self, config: SimConfig | None = None, *, access_log: logging.Logger | None = None
    ) -> None:
        self._config = config or SimConfig()
        self._access_log = access_log
        self._memory = GpuMemory(
            total_gib=self._config.total_gib,
            reserved_gib=self._config.reserved_gib,
            base_gib=self._config.task_base_gib,
            per_minute_gib=self._config.task_gib_per_minute,
        )
        self._compute = GpuCompute(
            parallel_gain=self._config.parallel_gain, max_speedup=self._config.max_speedup
        )
        self._processor = _GpuProcessor(self._compute, self._task_finished)
        self._rng = random.Random(self._config.seed)
        self._counters = _Counters()
        self._recent: deque[_TaskRecord] = deque(maxlen=_RECENT_LIMIT)
        self._inflight: dict[str, _TaskRecord] = {}
        # Tasks whose client left while their job runs on (on_disconnect=continue): still
        # counted in `_active` until the GPU is done with them.
        self._orphans: set[str] = set()
        self._releases: dict[str, asyncio.TimerHandle] = {}
        self._active = 0
        self._next_id = 0
        self._host = "127.0.0.1"
        self._port = 0
        self._runner: web.AppRunner | None = None
        self._app: web.Application | None = None
        self._crash_task: asyncio.Task[None] | None = None
        self._restarting = False

    # -- lifetime -------------------------------------------------------------------------

    @property
    def config(self) -> SimConfig:
        return self._config

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The listening port (the real one when started with port 0); kept across restarts."""
        return self._port

    @property
    def url(self) -> str:
        """Base URL to reach the simulator, e.g. ``http://127.0.0.1:9000``."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self._host, self._host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self._port}"

    @property
    def app(self) -> web.Application | None:
        """The application currently serving (a fresh one after each restart)."""
        return self._app

    @property
    def restarting(self) -> bool:
        return self._restarting

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on `host`:`port`; port 0 picks a free one, remembered for restarts."""
        if self._runner is not None:
            raise RuntimeError("simulator already started")
        self._host, self._port = host, port
        await self._listen()

    async def stop(self) -> None:
        """Stop listening, reset open connections and cancel all background work."""
        crash_task, self._crash_task = self._crash_task, None
        if crash_task is not None and not crash_task.done():
            crash_task.cancel()
        if crash_task is not None:
            await asyncio.gather(crash_task, return_exceptions=True)
        runner, self._runner = self._runner, None
        self._app = None
        if runner is not None:
            await self._close_runner(runner)
        self._kill_gpu()
        self._restarting = False

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- state ----------------------------------------------------------------------------

    def state(self) -> dict[str, JsonValue]:
        """The live picture `GET /sim/state` serves: memory, counters and recent tasks."""
        c = self._counters
        recent: list[JsonValue] = [record.to_json() for record in self._recent]
        return {
            "memory_total_gib": round(self._memory.total_gib, 6),
            "memory_reserved_gib": round(self._memory.reserved_gib, 6),
            "memory_used_gib": round(self._memory.used_gib, 6),
            "memory_free_gib": round(self._memory.free_gib, 6),
            "active_tasks": self._active,
            "orphaned_tasks": len(self._orphans),
            "gpu_jobs": self._processor.running,
            "pending_releases": len(self._releases),
            "max_active_seen": c.max_active_seen,
            "tasks_started": c.tasks_started,
            "tasks_done": c.tasks_done,
            "ooms": c.ooms,
            "errors": c.errors,
            "resets": c.resets,
            "crashes": c.crashes,
            "restarting": self._restarting,
            "on_disconnect": self._config.on_disconnect.value,
            "recent": recent,
        }

    def reset(self) -> None:
        """Zero the counters and forget recent tasks; memory in use and running tasks stay."""
        self._counters = _Counters(max_active_seen=self._active)
        self._recent.clear()

    # -- serving --------------------------------------------------------------------------

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[_echo_request_id])
        for path, route in _ROUTES.items():
            app.router.add_post(path, self._task_handler(route))
        app.router.add_get("/health", self._health)
        app.router.add_get("/docs", self._docs)
        app.router.add_get("/", self._root)
        app.router.add_get("/sim/state", self._sim_state)
        app.router.add_post("/sim/reset", self._sim_reset)
        return app

    async def _listen(self) -> None:
        app = self._make_app()
        runner = web.AppRunner(
            app,
            handler_cancellation=True,  # a client that leaves ends its handler; see on_disconnect
            shutdown_timeout=_SHUTDOWN_TIMEOUT,
            access_log=self._access_log,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner, self._app = runner, app
        if self._port == 0:
            self._port = int(runner.addresses[0][1])

    @staticmethod
    async def _close_runner(runner: web.AppRunner) -> None:
        """Refuse new connections, reset the open ones, then let aiohttp tidy up."""
        for site in list(runner.sites):
            await site.stop()
        _abort_connections(runner)
        await runner.cleanup()

    async def _stall_if_busy(self) -> None:
        if self._config.stall_when_busy:
            await self._processor.idle.wait()

    async def _health(self, request: web.Request) -> web.StreamResponse:
        await self._stall_if_busy()
        return web.json_response({"status": "ok"})

    async def _docs(self, request: web.Request) -> web.StreamResponse:
        await self._stall_if_busy()
        return web.Response(text=_DOCS_HTML, content_type="text/html")

    async def _root(self, request: web.Request) -> web.StreamResponse:
        await self._stall_if_busy()
        raise web.HTTPTemporaryRedirect("/docs")

    async def _sim_state(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.state())

    async def _sim_reset(self, request: web.Request) -> web.StreamResponse:
        self.reset()
        return web.json_response(self.state())

    def _task_handler(self, route: _Route) -> _Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._task(request, route)

        return handle

    async def _task(self, request: web.Request, route: _Route) -> web.StreamResponse:
        self._next_id += 1
        record = _TaskRecord(
            task_id=f"sim-{self._next_id}",
            path=request.path,
            query_string=request.query_string,
            method=request.method,
            request_id=request.headers.get("X-Request-ID"),
            headers=dict(request.headers.items()),
        )
        self._recent.append(record)
        self._inflight[record.task_id] = record
        self._counters.tasks_started += 1
        self._active += 1
        self._counters.max_active_seen = max(self._counters.max_active_seen, self._active)
        try:
            return await self._serve_task(request, route, record)
        except BaseException as exc:
            if record.outcome == "running":
                left = isinstance(exc, asyncio.CancelledError | ConnectionError)
                record.outcome = "client_left" if left else "internal_error"
            raise
        finally:
            self._inflight.pop(record.task_id, None)
            self._end_request(record.task_id)

    def _end_request(self, task_id: str) -> None:
        """The handler is done; a GPU job it leaves behind (its client left) runs on or stops."""
        if task_id not in self._processor:
            self._active -= 1
        elif self._config.on_disconnect is OnDisconnect.STOP:
            self._processor.abandon(task_id)
            self._active -= 1
            self._task_finished(task_id)
        else:
            # The transcription goes on without anyone to answer, as in a threadpool worker:
            # it stays active, on the GPU and in memory until `_task_finished`.
            self._orphans.add(task_id)

    async def _serve_task(
        self, request: web.Request, route: _Route, record: _TaskRecord
    ) -> web.StreamResponse:
        upload = await _read_upload(request, route.field)
        record.audio_bytes = upload.probe.total_bytes
        record.audio_sha256 = upload.probe.sha256 if upload.found else None
        headers = _task_headers(request, record)
        steered = "X-Sim-Audio-Seconds" in request.headers  # overrides what the file says
        try:
            measured = 0.0 if steered else await upload.seconds(self._config.byte_rate)
        finally:
            upload.close()
        try:
            seconds = _steered_seconds(request) if steered else measured
            status = _steered_status(request)
            fail = request.headers.get("X-Sim-Fail", "").strip().lower()
            if fail and fail not in _FAILS:
                raise _BadSteering(f"X-Sim-Fail must be one of {', '.join(_FAILS)}, got {fail!r}")
        except _BadSteering as exc:
            record.outcome = "bad_request"
            body = json.dumps({"detail": str(exc)})
            return _respond(ErrorAnswer(400, "application/json", body), headers)
        record.audio_seconds = seconds
        gpu_seconds = min(seconds, _DETECT_SECONDS) if route.task == "detect" else seconds
        need = self._memory.need_gib(gpu_seconds)

        if status is not None:
            record.outcome = "status"
            if status >= 500:
                self._counters.errors += 1
            return self._error(request, status_answer(self._config.error_style, status), headers)
        if fail == "oom":
            return await self._out_of_memory(request, record, need, headers)
        if fail == "error":
            record.outcome = "error"
            self._counters.errors += 1
            return self._error(request, gpu_error_answer(self._config.error_style), headers)
        if fail == "crash":
            return await self._crash(record)
        if fail == "hang":
            record.outcome = "hang"
            await asyncio.get_running_loop().create_future()  # ends when the client leaves

        if not upload.found:
            record.outcome = "bad_request"
            return _respond(_missing_field(route), headers)
        answer_format = _answer_format(route, request, upload)
        if isinstance(answer_format, ErrorAnswer):
            record.outcome = "bad_request"
            return _respond(answer_format, headers)

        if not self._memory.try_allocate(record.task_id, need):
            return await self._out_of_memory(request, record, need, headers)
        work = self._config.scaled(gpu_seconds * self._config.rtf) * self._jitter()
        streaming = route.family is _Family.OPENAI and _truthy(upload.form.get("stream", ""))
        segments = _segments(seconds)
        if streaming and fail != "reset-mid-answer":
            marks = tuple(k / len(segments) for k in range(1, len(segments)))
            job = self._processor.submit(record.task_id, work, marks)
            return await self._stream(request, record, job, segments, headers)
        job = self._processor.submit(record.task_id, work)
        await asyncio.shield(job.finished)
        answer = _render(route, answer_format, seconds, segments)
        if fail == "reset-mid-answer":
            return await self._reset_mid_answer(request, record, answer, headers)
        record.outcome = "ok"
        self._counters.tasks_done += 1
        if route.family is _Family.ASR_WEBSERVICE and route.task != "detect":
            headers["Asr-Engine"] = "sim"
            name = quote(upload.filename)
            headers["Content-Disposition"] = f'attachment; filename="{name}.{answer_format}"'
        return _respond(answer, headers)

    def _jitter(self) -> float:
        j = self._config.jitter
        return 1.0 + self._rng.uniform(-j, j) if j > 0 else 1.0

    def _error(
        self, request: web.Request, answer: ErrorAnswer, headers: dict[str, str]
    ) -> web.Response:
        retry_after = request.headers.get("X-Sim-Retry-After")
        if retry_after is not None and answer.status >= 400:
            headers["Retry-After"] = retry_after.strip()
        return _respond(answer, headers)

    async def _out_of_memory(
        self, request: web.Request, record: _TaskRecord, need: float, headers: dict[str, str]
    ) -> web.StreamResponse:
        self._counters.ooms += 1
        if self._config.crash_on_oom:
            return await self._crash(record)
        record.outcome = "oom"
        memory = self._memory
        answer = oom_answer(
            self._config.error_style,
            tried_gib=need,
            total_gib=memory.total_gib,
            free_gib=memory.free_gib,
            used_gib=memory.used_gib,
        )
        return self._error(request, answer, headers)

    async def _stream(
        self,
        request: web.Request,
        record: _TaskRecord,
        job: _Job,
        segments: list["_Segment"],
        headers: dict[str, str],
    ) -> web.StreamResponse:
        """SSE: one event per segment as the GPU gets there, flushed at once, then [DONE]."""
        response = web.StreamResponse(headers=headers)
        response.content_type = "text/event-stream"
        response.charset = "utf-8"
        response.headers["Cache-Control"] = "no-cache"
        await response.prepare(request)
        await response.write(b"")  # headers leave now, as Starlette's StreamingResponse does
        sent = 0
        while True:
            if job.finished.cancelled():
                raise asyncio.CancelledError  # the GPU died; our connection is already gone
            ready = len(segments) if job.finished.done() else job.reached
            while sent < ready:
                event = json.dumps(segments[sent].to_json(), ensure_ascii=False)
                await response.write(f"data: {event}\n\n".encode())
                sent += 1
            if job.finished.done():
                break
            await job.changed()
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        record.outcome = "ok"
        self._counters.tasks_done += 1
        return response

    async def _reset_mid_answer(
        self,
        request: web.Request,
        record: _TaskRecord,
        answer: "_Answer",
        headers: dict[str, str],
    ) -> web.StreamResponse:
        """Send the status line, headers and half the body, then reset the connection."""
        record.outcome = "reset"
        self._counters.resets += 1
        body = answer.body.encode()
        response = web.StreamResponse(status=answer.status, headers=headers)
        response.content_type = answer.content_type
        response.charset = "utf-8"
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[: max(1, len(body) // 2)])
        # Give the bytes a moment to reach the client: a reset discards unsent data.
        await asyncio.sleep(_RESET_GRACE)
        if request.transport is not None:
            request.transport.abort()
        await asyncio.get_running_loop().create_future()  # cancelled by the connection loss
        return response  # pragma: no cover - unreachable

    async def _crash(self, record: _TaskRecord) -> web.StreamResponse:
        """Die like a ggml abort: every connection resets, the port refuses, then restart."""
        record.outcome = "crash"
        if not self._restarting:
            self._restarting = True
            self._counters.crashes += 1
            for other in self._inflight.values():
                if other.outcome in ("running", "hang"):
                    other.outcome = "crash"
            runner, self._runner = self._runner, None
            self._app = None
            if runner is not None:
                _abort_connections(runner)  # before the GPU dies, so handlers end as resets
            self._kill_gpu()
            self._crash_task = asyncio.create_task(self._restart_after_crash(runner))
        # Our own connection is reset with the others; this handler ends by cancellation.
        await asyncio.get_running_loop().create_future()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _restart_after_crash(self, runner: web.AppRunner | None) -> None:
        _log.warning("simulated crash: connections reset, restarting")
        if runner is not None:
            closing = asyncio.ensure_future(self._close_runner(runner))
            try:
                await asyncio.shield(closing)
            except asyncio.CancelledError:
                await closing  # stop() must not return with the old socket half closed
                raise
        await asyncio.sleep(self._config.scaled(self._config.restart_seconds))
        for attempt in range(50):
            try:
                await self._listen()
                break
            except OSError:
                if attempt == 49:
                    raise
                await asyncio.sleep(0.1)
        self._restarting = False
        _log.warning("simulated restart complete, listening on %s", self.url)

    def _kill_gpu(self) -> None:
        """Lose every job and all task memory, as a dead process does."""
        self._active -= len(self._orphans)
        self._orphans.clear()
        self._processor.clear()
        self._memory.clear()
        for handle in self._releases.values():
            handle.cancel()
        self._releases.clear()

    def _task_finished(self, task_id: str) -> None:
        if task_id in self._orphans:
            self._orphans.discard(task_id)
            self._active -= 1
        delay = self._config.scaled(self._config.release_delay)
        if delay <= 0:
            self._memory.release(task_id)
            return
        loop = asyncio.get_running_loop()
        self._releases[task_id] = loop.call_later(delay, self._release_late, task_id)

    def _release_late(self, task_id: str) -> None:
        self._releases.pop(task_id, None)
        self._memory.release(task_id)


@web.middleware
async def _echo_request_id(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Every answer carries the caller's X-Request-ID back, as tracing proxies expect."""
    response = await handler(request)
    request_id = request.headers.get("X-Request-ID")
    if request_id is not None and not response.prepared:
        response.headers.setdefault("X-Request-ID", request_id)
    return response


def _abort_connections(runner: web.AppRunner) -> None:
    """Reset every open connection (RST, not FIN), idle keep-alive ones included."""
    server = runner.server
    if server is not None:
        for conn in server.connections:
            if conn.transport is not None:
                conn.transport.abort()


# -- request parsing ----------------------------------------------------------------------


async def _read_upload(request: web.Request, field_name: str) -> _Upload:
    """Stream the multipart body: hash the audio part chunk by chunk, keep small fields."""
    upload = _Upload()
    if not request.content_type.startswith("multipart/"):
        return upload
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                await part.release()
            elif part.name == field_name and not upload.found:
                upload.found = True
                upload.filename = part.filename or "audio"
                await _spool_audio(part, upload)
            elif part.filename is None and part.name:
                upload.form[part.name] = await _read_small(part)
            else:
                await part.release()
    except ValueError:
        _log.debug("malformed multipart body", exc_info=True)
    except BaseException:  # the client left mid-upload: nothing will read the spool
        upload.close()
        raise
    return upload


async def _spool_audio(part: BodyPartReader, upload: _Upload) -> None:
    """Keep the audio part (in memory, or a temporary file when large), hashing it as it comes."""
    audio = upload.audio = SpooledBody(memory_limit=_SPOOL_MEMORY)

    async def read() -> bytes:
        chunk = await part.read_chunk(_CHUNK)
        upload.probe.feed(chunk)
        return chunk

    await audio.fill(read, max_size=sys.maxsize, idle_timeout=_SPOOL_IDLE)


async def _read_small(part: BodyPartReader) -> str:
    kept = bytearray()
    while chunk := await part.read_chunk(_CHUNK):
        if len(kept) < _FORM_FIELD_LIMIT:
            kept += chunk[: _FORM_FIELD_LIMIT - len(kept)]
    return kept.decode("utf-8", errors="replace")


def _steered_seconds(request: web.Request) -> float:
    raw = request.headers["X-Sim-Audio-Seconds"]
    try:
        seconds = float(raw)
    except ValueError:
        raise _BadSteering(f"X-Sim-Audio-Seconds must be a number, got {raw!r}") from None
    if not (math.isfinite(seconds) and seconds >= 0):
        raise _BadSteering(f"X-Sim-Audio-Seconds must be >= 0, got {raw!r}")
    return seconds


def _steered_status(request: web.Request) -> int | None:
    raw = request.headers.get("X-Sim-Status")
    if raw is None:
        return None
    try:
        status = int(raw)
    except ValueError:
        raise _BadSteering(f"X-Sim-Status must be an integer, got {raw!r}") from None
    if not 100 <= status <= 599:
        raise _BadSteering(f"X-Sim-Status must be 100..599, got {status}")
    return status


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def _task_headers(request: web.Request, record: _TaskRecord) -> dict[str, str]:
    headers = {"X-Sim-Task-Id": record.task_id, "X-Sim-Audio-Bytes": str(record.audio_bytes)}
    if record.audio_sha256 is not None:
        headers["X-Sim-Audio-Sha256"] = record.audio_sha256
    if record.request_id is not None:
        headers["X-Request-ID"] = record.request_id
    return headers


def _missing_field(route: _Route) -> ErrorAnswer:
    """Each server's own complaint about a request without audio."""
    if route.family is _Family.WHISPERCPP:
        body = json.dumps({"error": f"no '{route.field}' field in the request"})
        return ErrorAnswer(400, "application/json", body)
    detail = [{"type": "missing", "loc": ["body", route.field], "msg": "Field required"}]
    return ErrorAnswer(422, "application/json", json.dumps({"detail": detail}))


def _answer_format(route: _Route, request: web.Request, upload: _Upload) -> str | ErrorAnswer:
    """The output format the client asked for, or FastAPI's 422 for one it does not know."""
    if route.task == "detect":
        return "json"
    asked = upload.form.get("response_format") or request.query.get("response_format")
    if route.family is _Family.WHISPERCPP:
        # whisper.cpp falls back to JSON for anything it does not recognise.
        return asked if asked in _OPENAI_FORMATS else "json"
    if route.family is _Family.ASR_WEBSERVICE:
        value, allowed, loc = request.query.get("output", "txt"), _ASR_OUTPUTS, "query"
        name = "output"
    else:
        value, allowed, loc = asked or "json", _OPENAI_FORMATS, "body"
        name = "response_format"
    if value in allowed:
        return value
    choices = ", ".join(f"'{a}'" for a in allowed)
    detail = [
        {"type": "enum", "loc": [loc, name], "msg": f"Input should be {choices}", "input": value}
    ]
    return ErrorAnswer(422, "application/json", json.dumps({"detail": detail}))


@dataclass(frozen=True)
class _Answer:
    """A successful answer before it becomes a response."""

    status: int
    content_type: str
    body: str


def _respond(answer: "ErrorAnswer | _Answer", headers: dict[str, str]) -> web.Response:
    return web.Response(
        status=answer.status,
        text=answer.body,
        content_type=answer.content_type,
        charset="utf-8",
        headers=headers,
    )


# -- transcripts --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Segment:
    index: int
    start: float
    end: float
    text: str

    def to_json(self) -> dict[str, JsonValue]:
        return {
            "id": self.index,
            "seek": 0,
            "start": round(self.start, 3),
            "end": round(self.end, 3),
            "text": self.text,
            "tokens": [],
            "temperature": 0.0,
            "avg_logprob": -0.25,
            "compression_ratio": 1.2,
            "no_speech_prob": 0.01,
        }


def _segments(seconds: float) -> list[_Segment]:
    """Deterministic segments of about 5 s (longer for long files, at most 50 of them)."""
    length = max(5.0, seconds / _MAX_SEGMENTS)
    count = max(1, math.ceil(seconds / length - 1e-9))
    return [
        _Segment(i, i * length, min(seconds, (i + 1) * length), f"Segment {i + 1} of {count}.")
        for i in range(count)
    ]


def _summary(seconds: float, task: str) -> str:
    kind = "translation" if task == "translate" else "transcript"
    return f"Simulated {kind} of {seconds:.1f} seconds of audio."


def _timestamp(seconds: float, separator: str) -> str:
    millis = round(seconds * 1000)
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _render(route: _Route, fmt: str, seconds: float, segments: list[_Segment]) -> _Answer:
    """The success answer in the family's shape."""
    text = _summary(seconds, route.task)
    if route.task == "detect":
        body = {"detected_language": "english", "language_code": "en", "confidence": 0.98}
        return _Answer(200, "application/json", json.dumps(body))
    # whisper-asr-webservice sends text/plain whatever the output format, JSON included.
    plain = route.family is _Family.ASR_WEBSERVICE
    if fmt in ("txt", "text"):
        return _Answer(200, "text/plain", text + ("\n" if plain else ""))
    if fmt == "srt":
        blocks = [
            f"{s.index + 1}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{s.text}\n"
            for s in segments
        ]
        return _Answer(200, "text/plain", "\n".join(blocks))
    if fmt == "vtt":
        cues = [
            f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{s.text}\n" for s in segments
        ]
        return _Answer(200, "text/plain", "WEBVTT\n\n" + "\n".join(cues))
    if fmt == "tsv":
        rows = [f"{round(s.start * 1000)}\t{round(s.end * 1000)}\t{s.text}" for s in segments]
        return _Answer(200, "text/plain", "start\tend\ttext\n" + "\n".join(rows) + "\n")
    seg_json: list[JsonValue] = [s.to_json() for s in segments]
    if plain:  # /asr?output=json: openai-whisper's result dict, as text/plain
        result: dict[str, JsonValue] = {"text": text, "segments": seg_json, "language": "en"}
        return _Answer(200, "text/plain", json.dumps(result))
    if fmt == "verbose_json":
        task = "translate" if route.task == "translate" else "transcribe"
        verbose: dict[str, JsonValue] = {
            "task": task,
            "language": "english",
            "duration": round(seconds, 3),
            "text": text,
            "segments": seg_json,
        }
        return _Answer(200, "application/json", json.dumps(verbose))
    return _Answer(200, "application/json", json.dumps({"text": text}))


_DOCS_HTML: Final = """<!DOCTYPE html>
<html><head><title>Whisper simulator</title></head>
<body><h1>Whisper simulator</h1>
<p>A stand-in GPU Whisper server with a memory model. Endpoints:</p>
<ul>
<li>POST /asr, POST /detect-language (whisper-asr-webservice, field audio_file)</li>
<li>POST /v1/audio/transcriptions, POST /v1/audio/translations (OpenAI, field file)</li>
<li>POST /inference (whisper.cpp, field file)</li>
<li>GET /health, GET /sim/state, POST /sim/reset</li>
</ul></body></html>
"""
