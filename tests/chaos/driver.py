"""The chaos driver: seeded clients, a fault monkey, continuous checks, and the final verdict.

One run pushes a stream of tasks through a gatekeeper in front of `ChaosUpstream`. Everything
random comes from the run's seed: task i's client behaviour, body, and the per-attempt plan of
upstream faults are drawn from `Random(f"{seed}:{i}")`, so a failing run is replayed with the
same seed (`CHAOS_SEED`). The interleaving still depends on timing, as in production; what the
seed fixes is which faults and which client behaviours meet.

Checks, continuously (`Monitor`, and the upstream itself at every arrival) and at the end
(`Verdict`):
- the upstream never has more than `limit` tasks in flight (counted by the upstream, which
  keeps computing after the gatekeeper hangs up, as a real Whisper server does: an attempt that
  timed out still counts until its work is over; the `overrun` fault makes sure some do);
- the gatekeeper's books: active ≤ limit, queued ≤ max_queue, and total = ended + active + queued;
- every client gets exactly one answer of the right kind (`judge`), deliberate leavers excepted;
- retries: never more than 1 + max_retries attempts, never after a 2xx, 4xx or timeout, never
  after the client left (beyond the attempt already running), never for a refused task;
- after traffic: active 0, queued 0, stats reconcile with the clients' view and with /metrics,
  bytes of successful answers equal what the upstream sent, request bodies arrive intact.
"""

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from gatekeeper.logs import Event
from gatekeeper.sim.errors import ErrorStyle
from gatekeeper.upstream import SMALL_ANSWER
from tests.chaos.chaos_upstream import CHAOS_BODY_SHA, CHAOS_PLAN, ChaosUpstream, Served

__all__ = [
    "CLIENT_KINDS",
    "ChaosConfig",
    "ClientResult",
    "EventLog",
    "Monitor",
    "Monkey",
    "Round",
    "TaskSpec",
    "Verdict",
    "fd_report",
    "make_spec",
    "run_clients",
]

# How each client behaves (weights out of 100).
CLIENT_KINDS: dict[str, int] = {
    "normal": 50,
    "chunked": 8,
    "slow_upload": 7,
    "leave_queued": 7,
    "leave_uploading": 5,
    "leave_running": 6,
    "leave_retry": 4,
    "stall_upload": 2,
    "too_large_cl": 1,
    "too_large_chunked": 1,
}
LEAVING = frozenset({"leave_queued", "leave_uploading", "leave_running", "leave_retry"})

# What the upstream does on one attempt (weights out of 100).
STEP_KINDS: dict[str, int] = {
    "ok": 57,
    "stream": 6,
    "trickle": 4,
    "oom": 9,
    "err": 5,
    "busy": 3,
    "client": 2,
    "reset_upload": 5,
    "reset_answer": 6,
    "hang": 1,
    # Computes past ASR_REQUEST_TIMEOUT and on after the gatekeeper hangs up (issue #13).
    "overrun": 2,
}
# How the gatekeeper must classify an attempt that suffered each step (unless a crash hit it).
_EXPECTED_OUTCOME = {
    "oom": "oom",
    "err": "error",
    "busy": "error",
    "client": "client_error",
    "hang": "timeout",
    "overrun": "timeout",
}
_NON_BARE = [s.value for s in ErrorStyle if s is not ErrorStyle.BARE]
_USAGE = re.compile(r"^\d+/\d+ \(\d+%\)$")
# Drawn once per process, so every chaos test of one session runs (and replays) with one seed.
_SESSION_SEED = random.SystemRandom().randrange(1 << 32)
_TASK_ID = re.compile(r"\btask_id=(\S+)")
_STAGE = re.compile(r"\bstage=(\S+)")


@dataclass(frozen=True)
class ChaosConfig:
    """One chaos run: the gatekeeper's settings and the load, all small so runs are quick."""

    seed: int
    tasks: int
    seconds: float | None = None
    limit: int = 4
    max_queue: int = 16
    queue_timeout: float = 1.0
    request_timeout: float = 0.6
    # ASR_TIMEOUT_HOLD: how long a timed-out attempt may keep its slot while the Whisper server
    # still computes. None leaves the gatekeeper's default (= request_timeout) and sets nothing;
    # `overrun` steps end within request_timeout + hold / 2 either way.
    timeout_hold: float | None = None
    retry_delay: float = 0.02
    max_retries: int = 3
    client_body_timeout: float = 0.4
    max_body_size: int = 256 * 1024
    spool_memory_size: int = 32 * 1024
    clients: int = 22
    think_ms: float = 150.0
    work_ms: float = 15.0
    downtime_every: tuple[float, float] = (1.0, 3.0)
    downtime_length: tuple[float, float] = (0.05, 0.3)
    slow_every: tuple[float, float] = (1.0, 5.0)
    slow_length: tuple[float, float] = (0.8, 1.6)
    slow_ms: int = 400
    client_deadline: float = 60.0

    @classmethod
    def from_env(cls, default_tasks: int, **overrides: Any) -> "ChaosConfig":
        """CHAOS_TASKS, CHAOS_SECONDS and CHAOS_SEED (default: one fresh seed per test session)."""
        seed = int(os.environ.get("CHAOS_SEED") or _SESSION_SEED)
        tasks = int(os.environ.get("CHAOS_TASKS") or default_tasks)
        seconds = float(os.environ["CHAOS_SECONDS"]) if os.environ.get("CHAOS_SECONDS") else None
        if seconds is not None and not os.environ.get("CHAOS_TASKS"):
            tasks = 10**9  # run for the time given, whatever the count
        return cls(seed=seed, tasks=tasks, seconds=seconds, **overrides)

    def gatekeeper_settings(self, spool_dir: str) -> dict[str, Any]:
        """Settings for an in-process gatekeeper (load_settings overrides)."""
        settings: dict[str, Any] = {
            "max_concurrent": self.limit,
            "max_queue": self.max_queue,
            "queue_timeout": self.queue_timeout,
            "request_timeout": self.request_timeout,
            "retry_delay": self.retry_delay,
            "max_retries": self.max_retries,
            "client_body_timeout": self.client_body_timeout,
            "max_body_size": self.max_body_size,
            "spool_memory_size": self.spool_memory_size,
            "spool_dir": spool_dir,
            # whisper-asr-webservice hides OOM behind a bare 500; the README's advice.
            "oom_patterns": ("^Internal Server Error$",),
        }
        if self.timeout_hold is not None:
            settings["timeout_hold"] = self.timeout_hold
        return settings

    @property
    def hold(self) -> float:
        """Seconds a timed-out attempt keeps its slot at most (the gatekeeper's hold limit)."""
        return self.request_timeout if self.timeout_hold is None else self.timeout_hold

    def gatekeeper_flags(self, spool_dir: str) -> list[str]:
        """The same settings as `gatekeeper serve` flags."""
        flags: list[str] = []
        for name, value in self.gatekeeper_settings(spool_dir).items():
            text = ",".join(value) if isinstance(value, tuple) else str(value)
            flags += [f"--{name.replace('_', '-')}", text]
        return flags


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """Everything about task i that the seed decides."""

    index: int
    request_id: str
    kind: str
    body_size: int
    plan: tuple[str, ...]
    path: str
    pieces: int  # for slow uploads
    gap: float  # seconds between pieces / before leaving
    content_length: bool  # slow uploads: Content-Length or chunked

    def body(self) -> bytes:
        return random.Random(f"{self.request_id}:body").randbytes(self.body_size)


def _log_uniform(rng: random.Random, top: int) -> int:
    return 0 if rng.random() < 0.05 else int(2 ** rng.uniform(0, top.bit_length() - 1))


def _step(rng: random.Random, cfg: ChaosConfig) -> str:
    kind = rng.choices(list(STEP_KINDS), weights=list(STEP_KINDS.values()))[0]
    size = _log_uniform(rng, 128 * 1024)
    if kind in ("ok", "stream"):
        return f"{kind}:{min(200, int(rng.expovariate(1 / cfg.work_ms)))}:{size}"
    if kind == "overrun":
        # Past the attempt's deadline but well within the hold, so a gatekeeper that keeps the
        # slot until the upstream is done never has to give up on it.
        low = 1.15 * cfg.request_timeout
        ms = 1000 * rng.uniform(low, max(low, cfg.request_timeout + cfg.hold / 2))
        return f"overrun:{int(ms)}:{size}"
    if kind == "trickle":
        long = rng.random() < 0.25
        ms = cfg.request_timeout * 1000 * rng.uniform(1.3, 1.8) if long else rng.uniform(40, 150)
        return f"trickle:{int(ms)}:{max(size, 64)}"
    if kind == "oom":
        return f"oom:{rng.choice(list(ErrorStyle)).value}"
    if kind == "err":
        return f"err:{rng.choice((500, 500, 502))}:{rng.choice(_NON_BARE)}"
    if kind == "busy":
        return f"busy:{'1' if rng.random() < 0.2 else '0'}"
    if kind == "client":
        return f"client:{rng.choice((400, 404, 422))}"
    if kind == "reset_answer":
        # Both sides of the gatekeeper's 64 KiB "small answer" threshold.
        return f"reset_answer:{rng.choice((200, 500))}:{rng.randint(2048, 4 * SMALL_ANSWER)}"
    return kind  # reset_upload, hang


def make_spec(cfg: ChaosConfig, index: int) -> TaskSpec:
    """Task `index` of the run with seed `cfg.seed`: the same on every replay."""
    rng = random.Random(f"{cfg.seed}:{index}")
    kind = rng.choices(list(CLIENT_KINDS), weights=list(CLIENT_KINDS.values()))[0]
    attempts = cfg.max_retries + 1
    if rng.random() < 0.03:  # doomed: every attempt fails the same way
        plan = [rng.choice(("oom:pytorch", "err:500:fastapi", "reset_upload", "busy:0"))] * attempts
    else:
        plan = [_step(rng, cfg) for _ in range(attempts)]
    if kind == "leave_running":
        plan[0] = f"ok:{rng.randint(150, 400)}:{rng.randint(0, 4096)}"
    elif kind == "leave_retry":
        plan[0] = "busy:1"
    body_size = _log_uniform(rng, 200 * 1024)
    if kind in ("leave_uploading", "stall_upload"):
        # Half the body goes before the stall: with none, the client library would hold the
        # request's headers back too, and the gatekeeper would never see a request at all.
        body_size = max(2, body_size)
    if kind.startswith("too_large"):
        body_size = cfg.max_body_size + rng.randint(1, 8192)
    path = rng.choice(
        ("/asr?output=json", "/v1/audio/transcriptions", "/inference", "/detect-language")
    )
    return TaskSpec(
        index=index,
        request_id=f"s{cfg.seed}-{index}",
        kind=kind,
        body_size=body_size,
        plan=tuple(plan),
        path=path,
        pieces=rng.randint(3, 8),
        gap=rng.uniform(0.005, 0.04) if kind == "slow_upload" else rng.uniform(0.0, 0.2),
        content_length=rng.random() < 0.5,
    )


@dataclass(slots=True)
class ClientResult:
    """What one client saw."""

    spec: TaskSpec
    started: float
    ended: float = 0.0
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body_sha: str | None = None
    body_size: int = 0
    document: dict[str, Any] | None = None  # the gatekeeper's own JSON answers
    error: str | None = None  # the connection broke (before or after the headers)
    left: bool = False  # the client hung up on purpose before any answer
    left_at: float | None = None


# -- clients --------------------------------------------------------------------------------


async def _pieces(body: bytes, pieces: int, gap: float) -> AsyncIterator[bytes]:
    step = max(1, -(-len(body) // pieces))
    for offset in range(0, len(body), step):
        yield body[offset : offset + step]
        await asyncio.sleep(gap)


async def _then_stall(body: bytes, stall: float | None) -> AsyncIterator[bytes]:
    """Half the body, then nothing for `stall` seconds (None: until cancelled), then the rest."""
    yield body[: len(body) // 2]
    if stall is None:
        await asyncio.Event().wait()
    else:
        await asyncio.sleep(stall)
    yield body[len(body) // 2 :]


async def _post(
    session: aiohttp.ClientSession, url: str, result: ClientResult, cfg: ChaosConfig
) -> None:
    spec = result.spec
    body = spec.body()
    headers = {
        "X-Request-ID": spec.request_id,
        CHAOS_PLAN: ",".join(spec.plan),
        CHAOS_BODY_SHA: hashlib.sha256(body).hexdigest(),
        "Content-Type": "application/octet-stream",
    }
    data: Any = body
    if spec.kind == "chunked" or spec.kind == "too_large_chunked":
        data = _pieces(body, spec.pieces, 0)
    elif spec.kind == "slow_upload":
        data = _pieces(body, spec.pieces, spec.gap)
        if spec.content_length:
            headers["Content-Length"] = str(len(body))
    elif spec.kind == "stall_upload":
        data = _then_stall(body, cfg.client_body_timeout * 3)
    elif spec.kind == "leave_uploading":
        data = _then_stall(body, None)
        headers["Content-Length"] = str(len(body))
    try:
        async with session.post(url + spec.path, data=data, headers=headers) as response:
            result.status = response.status
            result.headers = dict(response.headers)
            try:
                payload = await response.read()
            except (aiohttp.ClientError, OSError) as exc:
                result.error = f"{type(exc).__name__} after the headers: {exc}"
                return
    except (aiohttp.ClientError, OSError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return
    finally:
        result.ended = time.monotonic()
    result.body_sha = hashlib.sha256(payload).hexdigest()
    result.body_size = len(payload)
    if "X-Gatekeeper-Reason" in result.headers:
        with contextlib.suppress(ValueError):
            result.document = json.loads(payload)


async def run_client(
    session: aiohttp.ClientSession,
    url: str,
    spec: TaskSpec,
    cfg: ChaosConfig,
    upstream: ChaosUpstream,
) -> ClientResult:
    """One client, start to end: it sends, maybe leaves on purpose, and records what it saw."""
    result = ClientResult(spec, time.monotonic())
    call = asyncio.ensure_future(_post(session, url, result, cfg))
    trigger: asyncio.Future[Any] | None = None
    if spec.kind in ("leave_queued", "leave_uploading"):
        trigger = asyncio.ensure_future(
            asyncio.sleep(
                spec.gap
                if spec.kind != "leave_uploading"
                else min(spec.gap, cfg.client_body_timeout / 2)
            )
        )
    elif spec.kind == "leave_running":
        trigger = asyncio.ensure_future(_after(upstream, "arrived", spec.request_id, 0.02))
    elif spec.kind == "leave_retry":
        trigger = asyncio.ensure_future(_after(upstream, "answered", spec.request_id, 0.03))
    try:
        async with asyncio.timeout(cfg.client_deadline):
            if trigger is not None:
                await asyncio.wait({call, trigger}, return_when=asyncio.FIRST_COMPLETED)
                if not call.done():
                    result.left, result.left_at = True, time.monotonic()
                    call.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await call
                    return result
            await call
    except TimeoutError:
        result.error = f"no answer within {cfg.client_deadline} s"
    finally:
        for future in (call, trigger):
            if future is not None and not future.done():
                future.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await future
    return result


async def _after(upstream: ChaosUpstream, kind: str, request_id: str, delay: float) -> None:
    await upstream.event(kind, request_id, 1).wait()
    await asyncio.sleep(delay)


async def run_clients(
    url: str,
    cfg: ChaosConfig,
    upstream: ChaosUpstream,
    indices: range,
    *,
    deadline: float | None = None,
    connector: Callable[[], aiohttp.BaseConnector] | None = None,
    on_result: Callable[[ClientResult], None] | None = None,
) -> list[ClientResult]:
    """Run tasks `indices` with `cfg.clients` concurrent clients; stop starting at `deadline`."""
    results: list[ClientResult] = []
    pending = iter(indices)
    think = random.Random(f"{cfg.seed}:think:{indices.start}")

    async def worker(session: aiohttp.ClientSession) -> None:
        for index in pending:
            if deadline is not None and time.monotonic() >= deadline:
                return
            await asyncio.sleep(think.expovariate(1 / cfg.think_ms) / 1000)
            result = await run_client(session, url, make_spec(cfg, index), cfg, upstream)
            results.append(result)
            if on_result is not None:
                on_result(result)

    make = connector or (lambda: aiohttp.TCPConnector(limit=0))
    async with aiohttp.ClientSession(
        connector=make(), timeout=aiohttp.ClientTimeout(total=None)
    ) as session:
        await asyncio.gather(*(worker(session) for _ in range(cfg.clients)))
    return results


# -- faults on the upstream side that are not tied to one request ----------------------------


@dataclass
class Monkey:
    """Takes the upstream down and brings it back, and makes it slow for a while (seeded)."""

    upstream: ChaosUpstream
    cfg: ChaosConfig
    salt: str
    downs: int = 0
    slow_phases: int = 0
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        rng = random.Random(f"{self.cfg.seed}:monkey:{self.salt}")
        self._tasks = [
            asyncio.create_task(self._downtimes(random.Random(rng.random()))),
            asyncio.create_task(self._slowness(random.Random(rng.random()))),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.upstream.come_back()
        self.upstream.slow_ms = 0

    async def _downtimes(self, rng: random.Random) -> None:
        try:
            while True:
                await asyncio.sleep(rng.uniform(*self.cfg.downtime_every))
                self.upstream.go_down()
                self.downs += 1
                await asyncio.sleep(rng.uniform(*self.cfg.downtime_length))
                await self.upstream.come_back()
        finally:
            await self.upstream.come_back()

    async def _slowness(self, rng: random.Random) -> None:
        try:
            while True:
                await asyncio.sleep(rng.uniform(*self.cfg.slow_every))
                self.upstream.slow_ms = self.cfg.slow_ms
                self.slow_phases += 1
                await asyncio.sleep(rng.uniform(*self.cfg.slow_length))
                self.upstream.slow_ms = 0
        finally:
            self.upstream.slow_ms = 0


# -- continuous checks of the gatekeeper's own books -----------------------------------------

_ENDED = (
    "succeeded_tasks",
    "failed_tasks",
    "client_error_tasks",
    "cancelled_tasks",
    "rejected_after_queueing_tasks",
)


def books_problems(doc: dict[str, Any], cfg: ChaosConfig) -> list[str]:
    """What is wrong with one /stats reading, judged on its own."""
    problems = []
    ended = sum(doc[name] for name in _ENDED)
    # A held slot (a timed-out attempt the Whisper server may still compute) belongs to a task
    # that has ended already; an upload is a task without a slot or a queue place yet.
    in_progress = (
        doc["uploading_tasks"]
        + doc["active_tasks"]
        - doc["held_tasks"]
        + doc["queued_tasks"]
        + doc["retrying_tasks"]
    )
    if doc["total_tasks"] != ended + in_progress:
        parts = ", ".join(
            f"{name}={doc[name]}"
            for name in (
                *_ENDED,
                "uploading_tasks",
                "active_tasks",
                "held_tasks",
                "retrying_tasks",
            )
        )
        problems.append(
            f"/stats does not reconcile: total_tasks={doc['total_tasks']} != {parts}, "
            f"queued_tasks={doc['queued_tasks']}"
        )
    if doc["active_tasks"] > cfg.limit:
        problems.append(f"/stats active_tasks={doc['active_tasks']} > limit {cfg.limit}")
    if doc["queued_tasks"] > cfg.max_queue:
        problems.append(f"/stats queued_tasks={doc['queued_tasks']} > max_queue {cfg.max_queue}")
    return problems


@dataclass
class Monitor:
    """Polls /stats while traffic flows; every reading must make sense on its own."""

    base: str
    cfg: ChaosConfig
    upstream: ChaosUpstream
    readings: int = 0
    max_active: int = 0
    max_queued: int = 0
    problems: list[str] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    async with session.get(f"{self.base}/stats") as response:
                        doc = await response.json()
                except (aiohttp.ClientError, OSError):
                    await asyncio.sleep(0.05)  # a draining gatekeeper may be gone
                    continue
                self.readings += 1
                self.max_active = max(self.max_active, doc["active_tasks"])
                self.max_queued = max(self.max_queued, doc["queued_tasks"])
                if len(self.problems) < 1000:
                    self.problems.extend(books_problems(doc, self.cfg))
                    if self.upstream.in_flight > self.cfg.limit:
                        self.problems.append(
                            f"upstream in flight {self.upstream.in_flight} > limit "
                            f"{self.cfg.limit} ({self.upstream.orphans} of them computing "
                            "after the gatekeeper hung up)"
                        )
                await asyncio.sleep(0.025)


# -- the gatekeeper's own account of clients that left ---------------------------------------


class EventLog(logging.Handler):
    """Collects the gatekeeper's events (in process) so the driver knows where clients left."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.counts: Counter[str] = Counter()
        self.left: dict[str, str] = {}  # task_id -> stage
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "gk_event", None)
        fields: dict[str, Any] = getattr(record, "gk_fields", {}) or {}
        if event is not None:
            self.counts[event.name] += 1
            if event is Event.CLIENT_LEFT:
                self.left[str(fields.get("task_id"))] = str(fields.get("stage"))
            elif fields.get("outcome") == "cancelled":
                self.left.setdefault(str(fields.get("task_id")), "running")
        if record.levelno >= logging.ERROR:
            self.errors.append(self.format(record))

    def note_line(self, line: str) -> None:
        """The same from a text log line of a `gatekeeper serve` process."""
        for event in Event:
            words = event.value.split("{")[0]
            if words and f"] {words}" in line:
                self.counts[event.name] += 1
                break
        task = _TASK_ID.search(line)
        if task is not None:
            stage = _STAGE.search(line)
            if f"] {Event.CLIENT_LEFT.value}" in line and stage is not None:
                self.left[task.group(1)] = stage.group(1)
            elif "outcome=cancelled" in line:
                self.left.setdefault(task.group(1), "running")
        if " ERROR " in line or "Traceback" in line:
            self.errors.append(line)

    @contextlib.contextmanager
    def attached(self) -> Any:
        """Listen to the `gatekeeper` and `aiohttp` loggers without flooding pytest's capture."""
        gk = logging.getLogger("gatekeeper")
        aio = logging.getLogger("aiohttp")
        saved = (gk.level, gk.propagate, aio.level)
        gk.setLevel(logging.INFO)
        gk.propagate = False
        gk.addHandler(self)
        aio.addHandler(self)
        try:
            yield self
        finally:
            gk.removeHandler(self)
            aio.removeHandler(self)
            gk.setLevel(saved[0])
            gk.propagate = saved[1]


# -- leaks -----------------------------------------------------------------------------------


def fd_report(pid: int | str, spool_dir: str) -> tuple[int, int, list[str]]:
    """(open fds, of which sockets, fds that point into the spool directory) of a process."""
    total = sockets = 0
    spooled: list[str] = []
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue
        total += 1
        if target.startswith("socket:"):
            sockets += 1
        elif target.startswith(spool_dir):
            spooled.append(target)
    return total, sockets, spooled


# -- the verdict -----------------------------------------------------------------------------


@dataclass
class Round:
    """One batch of tasks and what was measured after it settled."""

    name: str
    tasks: int
    seconds: float
    fds: int
    sockets: int
    asyncio_tasks: int


@dataclass
class Verdict:
    """Judges every client's result against the upstream's books and the gatekeeper's stats."""

    cfg: ChaosConfig
    upstream: ChaosUpstream
    events: EventLog
    shutting_down_allowed: Callable[[ClientResult], bool] = lambda _r: False
    violations: list[str] = field(default_factory=list)
    tally: Counter[str] = field(default_factory=Counter)
    step_tally: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    ok_bytes_client: int = 0
    ok_bytes_upstream: int = 0
    results: int = 0
    arrivals: int = 0
    clean_outcomes: Counter[str] = field(default_factory=Counter)
    possible_outcomes: Counter[str] = field(default_factory=Counter)

    def fail(self, result: ClientResult | None, message: str) -> None:
        where = "" if result is None else f"{result.spec.request_id} ({result.spec.kind}, plan "
        if result is not None:
            where += f"{','.join(result.spec.plan)}): "
        self.violations.append(where + message)

    # -- per client --------------------------------------------------------------------------

    def judge(self, result: ClientResult) -> None:
        """Check one client's answer; tally it under the kind of answer it was."""
        self.results += 1
        spec = result.spec
        self.kinds[spec.kind] += 1
        arrivals = self.upstream.by_id.get(spec.request_id, [])
        self._check_attempt_sequence(result, arrivals)
        if result.left:
            self.tally["left"] += 1
            self.kinds[f"left_mid_{spec.kind.removeprefix('leave_')}"] += 1
            self._check_left(result, arrivals)
            return
        if result.status is None:
            self.tally["no_answer"] += 1
            if not self.shutting_down_allowed(result):
                self.fail(result, f"no answer at all: {result.error}")
            return
        if result.error is not None:
            self._judge_cut(result, arrivals)
            return
        if "X-Gatekeeper-Reason" in result.headers:
            self._judge_own(result, arrivals)
        else:
            self._judge_relayed(result, arrivals)

    def _attempts(self, result: ClientResult) -> int:
        try:
            return int(result.headers.get("X-Gatekeeper-Attempts", "-1"))
        except ValueError:
            return -1

    def _judge_cut(self, result: ClientResult, arrivals: list[Served]) -> None:
        last = arrivals[-1] if arrivals else None
        if (
            last is not None
            and result.status == last.status
            and (last.step.split(":")[0] in ("reset_answer", "trickle") or self._crashed(last))
        ):
            self.tally["cut_by_upstream"] += 1
            if result.status is not None and result.status >= 500:
                self.tally["cut_5xx_relayed"] += 1
            return
        self.fail(
            result,
            f"answer {result.status} broke off ({result.error}) but the upstream's last answer "
            f"was {last.step if last else 'none'}",
        )

    def _refused_retry(self, reason: object, arrivals: list[Served]) -> bool:
        """A retry that found no slot within ASR_REQUEST_TIMEOUT after its delay is refused with
        queue_timeout: allowed only after attempts that all failed in a retried way, with
        retries left (its next attempt was never sent)."""
        if reason != "queue_timeout" or len(arrivals) > self.cfg.max_retries:
            return False
        self.tally["503_queue_timeout_retry"] += 1
        return all(
            served.step.split(":")[0] in ("oom", "err", "busy", "reset_upload", "reset_answer")
            or self._crashed(served)
            for served in arrivals
        )

    def _crashed(self, served: Served) -> bool:
        return served.crashed or self.upstream.overlaps_downtime(served.started, served.ended)

    def _judge_own(self, result: ClientResult, arrivals: list[Served]) -> None:
        status, doc, spec = result.status, result.document, result.spec
        if doc is None or result.headers.get("Content-Type") != "application/json; charset=utf-8":
            self.fail(result, f"gatekeeper answer {status} without its JSON body")
            return
        reason = doc.get("reason")
        if result.headers.get("X-Gatekeeper-Reason") != reason:
            self.fail(result, f"X-Gatekeeper-Reason != body reason {reason!r}")
        if result.headers.get("X-Request-ID") != spec.request_id:
            self.fail(result, "X-Request-ID missing or changed")
        attempts = self._attempts(result)
        if status == 503:
            self.tally[f"503_{reason}"] += 1
            allowed = {"queue_full", "queue_timeout"}
            if self.shutting_down_allowed(result):
                allowed.add("shutting_down")
            if reason not in allowed:
                self.fail(result, f"503 with reason {reason!r}")
            retry_after = doc.get("retry_after")
            if not (
                doc.get("error") == "服务繁忙"
                and isinstance(retry_after, int)
                and 1 <= retry_after <= 120
                and result.headers.get("Retry-After") == str(retry_after)
                and _USAGE.match(str(doc.get("queue_usage")))
            ):
                self.fail(result, f"503 body or headers off the SPEC: {doc} {result.headers}")
            if arrivals and not self._refused_retry(reason, arrivals):
                self.fail(result, f"refused ({reason}) but reached the upstream {len(arrivals)}x")
            return
        if status == 502 and reason == "crash":
            self.tally["502_crash"] += 1
            last = arrivals[-1] if arrivals else None
            refused = len(arrivals) < attempts
            crashy = last is not None and (
                last.step.split(":")[0] in ("reset_upload", "reset_answer") or self._crashed(last)
            )
            if attempts != self.cfg.max_retries + 1 or doc.get("attempts") != attempts:
                self.fail(result, f"502 after {attempts} attempts (body {doc.get('attempts')})")
            if not (refused or crashy):
                self.fail(result, f"502 crash but the last attempt was {last}")
            return
        if status == 504 and reason == "timeout":
            self.tally["504_timeout"] += 1
            last = arrivals[-1] if arrivals else None
            slow = last is not None and (
                last.step.split(":")[0] in ("hang", "trickle", "overrun")
                or last.ended - last.started >= 0.5 * self.cfg.request_timeout
                or self._crashed(last)
            )
            if not slow:
                self.fail(result, f"504 but the upstream's last attempt was {last}")
            if doc.get("attempts") != attempts:
                self.fail(result, "504 attempts in body and header differ")
            return
        if status == 408 and reason == "client_body_timeout":
            self.tally["408_body_timeout"] += 1
            if spec.kind != "stall_upload":
                self.fail(result, "408 for a client that never stalled")
            if arrivals:
                self.fail(result, "408 but the task reached the upstream")
            return
        if status == 413 and reason == "body_too_large":
            self.tally[f"413_{spec.kind}"] += 1
            if not spec.kind.startswith("too_large"):
                self.fail(result, f"413 for a {spec.body_size}-byte body")
            if arrivals:
                self.fail(result, "413 but the task reached the upstream")
            return
        self.fail(result, f"unexpected gatekeeper answer {status} {doc}")

    def _judge_relayed(self, result: ClientResult, arrivals: list[Served]) -> None:
        status, spec = result.status, result.spec
        assert status is not None
        last = arrivals[-1] if arrivals else None
        if last is None:
            self.fail(result, f"answer {status} that the upstream never sent (no attempt)")
            return
        if last.status != status or last.answer_sha != result.body_sha:
            self.fail(
                result,
                f"answer {status} ({result.body_size} bytes) is not the upstream's last answer "
                f"({last.status}, {last.answer_size} bytes, step {last.step})",
            )
            return
        if result.headers.get("X-Request-ID") != spec.request_id:
            self.fail(result, "X-Request-ID missing or changed")
        attempts = self._attempts(result)
        if attempts < len(arrivals) or attempts > self.cfg.max_retries + 1:
            self.fail(result, f"X-Gatekeeper-Attempts={attempts}, upstream saw {len(arrivals)}")
        if status < 300:
            self.tally["200"] += 1
            self.ok_bytes_client += result.body_size
            self.ok_bytes_upstream += last.answer_size
        elif status < 500:
            self.tally["4xx_relayed"] += 1
        else:
            self.tally["5xx_relayed"] += 1
            if attempts != self.cfg.max_retries + 1:
                self.fail(result, f"upstream {status} relayed after only {attempts} attempts")

    # -- sequences of attempts ---------------------------------------------------------------

    def _check_attempt_sequence(self, result: ClientResult, arrivals: list[Served]) -> None:
        if len(arrivals) > self.cfg.max_retries + 1:
            self.fail(result, f"{len(arrivals)} attempts reached the upstream")
        for served in arrivals:
            self.arrivals += 1
            self.step_tally[served.step.split(":")[0]] += 1
            if served.step.startswith("oom:"):
                self.step_tally[served.step] += 1
            expected = _EXPECTED_OUTCOME.get(served.step.split(":")[0])
            if expected is not None:
                self.possible_outcomes[expected] += 1
                self.clean_outcomes[expected] += not self._crashed(served)
            elif served.step.startswith("reset_answer:5"):
                # Broken after the first 64 KiB the gatekeeper inspects: the status is known,
                # so it may count as `error` (else `crash`).
                self.possible_outcomes["error"] += 1
            if served.body_sha is not None and served.body_sha != served.body_expected:
                self.fail(result, f"attempt {served.arrival} received a different request body")
        for served in arrivals[:-1]:
            kind = served.step.split(":")[0]
            # A 2xx broken off mid-body may be retried as a crash if nothing reached the client
            # yet, so only complete answers, 4xx and time-outs must end a task.
            final = kind in ("ok", "overrun", "stream", "trickle", "client", "hang")
            if final and not self._crashed(served):
                self.fail(
                    result,
                    f"attempt {served.arrival} ({served.step}) ends a task, yet it was retried",
                )

    def _check_left(self, result: ClientResult, arrivals: list[Served]) -> None:
        assert result.left_at is not None
        stage = self.events.left.get(result.spec.request_id)
        if stage in ("queued", "uploading") and arrivals:
            self.fail(result, f"left while {stage}, yet reached the upstream")
        later = [s for s in arrivals if s.started > result.left_at]
        if len(later) > 1:
            self.fail(result, f"{len(later)} attempts started after the client left")

    # -- the books ---------------------------------------------------------------------------

    def reconcile(self, stats: dict[str, Any], metrics: str, *, admitted_refusals: bool) -> None:
        """At rest: the stats add up, agree with /metrics, and match what the clients saw."""
        for problem in books_problems(stats, self.cfg):
            self.fail(None, problem)
        busy = ("uploading_tasks", "active_tasks", "held_tasks", "queued_tasks", "retrying_tasks")
        if any(stats[name] for name in busy):
            self.fail(None, "not at rest: " + ", ".join(f"{n}={stats[n]}" for n in busy))
        t = self.tally
        leavers = t["left"] + t["no_answer"]
        expected = {
            "succeeded_tasks": t["200"],
            "client_error_tasks": t["4xx_relayed"]
            + t["408_body_timeout"]
            + t["413_too_large_chunked"],
            "rejected_after_queueing_tasks": t["503_queue_timeout"]
            + (t["503_shutting_down"] if admitted_refusals else 0),
        }
        for name, floor in expected.items():
            if not floor <= stats[name] <= floor + leavers:
                self.fail(None, f"{name}={stats[name]}, clients saw {floor} (+{leavers} unknown)")
        # An upstream that breaks off mid-answer leaves a cut connection, booked as failed
        # (test_chaos.py::test_answer_cut_by_the_upstream_counts_as_failed).
        failed = t["5xx_relayed"] + t["502_crash"] + t["504_timeout"] + t["cut_by_upstream"]
        if not failed <= stats["failed_tasks"] <= failed + leavers:
            self.fail(
                None,
                f"failed_tasks={stats['failed_tasks']}: clients saw {failed} failures (cut "
                f"answers included) (+{leavers} unknown)",
            )
        if stats["cancelled_tasks"] > leavers:
            self.fail(
                None, f"cancelled_tasks={stats['cancelled_tasks']} but only {leavers} clients left"
            )
        full = stats["rejected_by_reason"]["queue_full"]
        if not t["503_queue_full"] <= full <= t["503_queue_full"] + leavers:
            self.fail(None, f"queue_full refusals {full}, clients saw {t['503_queue_full']}")
        if not admitted_refusals and (
            stats["rejected_by_reason"]["queue_timeout"] != stats["rejected_after_queueing_tasks"]
        ):
            self.fail(None, "queue_timeout refusals != rejected_after_queueing_tasks")
        self._agree_with_metrics(stats, metrics)
        self._attempt_books(stats)
        if self.ok_bytes_client != self.ok_bytes_upstream:
            self.fail(
                None,
                f"successful answers: clients got {self.ok_bytes_client} bytes, upstream sent "
                f"{self.ok_bytes_upstream}",
            )

    def _agree_with_metrics(self, stats: dict[str, Any], metrics: str) -> None:
        samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(metrics):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

        def metric(name: str, **labels: str) -> float | None:
            return samples.get((f"asr_gatekeeper_{name}", tuple(sorted(labels.items()))))

        pairs = [
            (metric("tasks_total", outcome="success"), stats["succeeded_tasks"], "success"),
            (metric("tasks_total", outcome="failed"), stats["failed_tasks"], "failed"),
            (metric("tasks_total", outcome="client_error"), stats["client_error_tasks"], "4xx"),
            (metric("tasks_total", outcome="cancelled"), stats["cancelled_tasks"], "cancelled"),
            (
                metric("tasks_total", outcome="rejected"),
                stats["rejected_after_queueing_tasks"],
                "rejected",
            ),
            (metric("active_tasks"), stats["active_tasks"], "active"),
            (metric("queued_tasks"), stats["queued_tasks"], "queued"),
            (metric("retrying_tasks"), stats["retrying_tasks"], "retrying"),
            (metric("uploading_tasks"), stats["uploading_tasks"], "uploading"),
            (metric("held_tasks"), stats["held_tasks"], "held"),
            (metric("oom_errors_total"), stats["oom_errors"], "oom_errors"),
        ]
        for reason, count in stats["rejected_by_reason"].items():
            pairs.append((metric("rejected_total", reason=reason), count, f"rejected {reason}"))
        for outcome, count in stats["upstream_attempts"].items():
            pairs.append(
                (metric("upstream_attempts_total", outcome=outcome), count, f"attempts {outcome}")
            )
        for value, expected, what in pairs:
            if value != expected:
                self.fail(None, f"/metrics {what}={value} but /stats says {expected}")

    def _attempt_books(self, stats: dict[str, Any]) -> None:
        """The gatekeeper classified each attempt as what the upstream really did."""
        attempts = stats["upstream_attempts"]
        if sum(attempts.values()) < self.arrivals:
            self.fail(
                None,
                f"gatekeeper counted {sum(attempts.values())} attempts, upstream {self.arrivals}",
            )
        for outcome in ("oom", "error", "client_error"):
            clean, possible = self.clean_outcomes[outcome], self.possible_outcomes[outcome]
            if not clean <= attempts[outcome] <= possible:
                self.fail(
                    None,
                    f"{attempts[outcome]} attempts classified {outcome}, but the upstream sent "
                    f"{possible} such answers ({clean} of them not hit by a crash)",
                )
        if attempts["timeout"] < self.clean_outcomes["timeout"]:
            self.fail(
                None,
                f"{attempts['timeout']} timeouts for {self.clean_outcomes['timeout']} hangs and "
                "overruns",
            )

    def coverage_gaps(self, *, needed: tuple[str, ...]) -> list[str]:
        """Fault kinds and answer kinds a run of this size should have met but did not."""
        have = Counter(self.step_tally) + Counter(self.tally) + Counter(self.kinds)
        for stage in self.events.left.values():
            have[f"left_{stage}"] += 1
        have["downtime"] = len(self.upstream.downtimes)
        return [name for name in needed if have[name] == 0]

    def figures(self) -> dict[str, Any]:
        return {
            "results": dict(sorted(self.tally.items())),
            "attempt_faults": dict(sorted(self.step_tally.items())),
            "client_kinds": dict(sorted(self.kinds.items())),
            "left_stages": dict(Counter(self.events.left.values())),
        }


def summary(data: dict[str, Any]) -> str:
    """One line of figures, for the report."""
    return json.dumps(data, sort_keys=False, default=str)


def as_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)
