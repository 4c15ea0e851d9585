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
  bytes of successful answers equal what the upstream sent, request bodies arrive intact;
- per server (`_server_books`): the attempts the gatekeeper booked to a server are the requests
  that server received, plus the connections it refused while down (from the log), plus at
  most the connections a crash cut before their request reached it; each attempt is classified
  as what that server did; nothing is left active, in flight or held on any server.

Pool mode (issue #15, `ChaosConfig.pool`): several chaos upstreams behind one gatekeeper, each
with its own limit (`ChaosPool`), the same clients and faults, and `Kill`: one server crashes
mid-run (listener closed, every connection cut) and restarts later on its port. Every check
above holds at each server, against that server's own limit.

Replicas mode (issue #17, tests/chaos/test_chaos_replicas.py): several gatekeeper processes
behind nginx share the upstream's limit through Redis. The checks above are the same, with three
hooks of `Verdict` for what replicas add: `extra_refusals` (coordination_unavailable), a
client's answer from nginx itself when its replica was killed (`gateway_error_allowed`), and a
replica frozen with SIGSTOP whose timers all fire when it wakes (`frozen`). `Monitor` can leave
the upstream to a check after the run (`check_upstream`), and `Verdict.agree_with_metrics`
checks one replica's pages.
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
from tests.chaos.chaos_upstream import (
    CHAOS_BODY_SHA,
    CHAOS_PLAN,
    ChaosPool,
    ChaosUpstream,
    Served,
    Upstreams,
)

__all__ = [
    "CLIENT_KINDS",
    "ChaosConfig",
    "ClientResult",
    "EventLog",
    "Kill",
    "Monitor",
    "Monkey",
    "Round",
    "TaskSpec",
    "Verdict",
    "books",
    "books_problems",
    "fd_report",
    "get_json",
    "make_spec",
    "run_clients",
    "server_books_problems",
    "settle",
    "verdict_text",
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
_UPSTREAM = re.compile(r"\bupstream=(\S+)")
# The gatekeeper's name for a connection the Whisper server refused (nothing reached it).
REFUSED = "ClientConnectorError"


@dataclass(frozen=True)
class ChaosConfig:
    """One chaos run: the gatekeeper's settings and the load, all small so runs are quick."""

    seed: int
    tasks: int
    seconds: float | None = None
    limit: int = 4
    # Pool mode: one chaos upstream per value, each with that limit (ASR_MAX_CONCURRENT=3,2,1);
    # `limit` is then unused. Empty: one upstream with `limit`.
    pool: tuple[int, ...] = ()
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
    # Short crashes of the (single) upstream, now and then; None: none (the pool mode kills
    # one server once instead, see `Kill`).
    downtime_every: tuple[float, float] | None = (1.0, 3.0)
    downtime_length: tuple[float, float] = (0.05, 0.3)
    # Pool mode: the share of the run after which one server is killed, and how much more of
    # the run passes before it restarts (both drawn from the seed within these bounds).
    kill_at: tuple[float, float] = (0.2, 0.35)
    kill_for: tuple[float, float] = (0.2, 0.3)
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

    @property
    def limits(self) -> tuple[int, ...]:
        """Each upstream's limit, in order."""
        return self.pool or (self.limit,)

    @property
    def total_limit(self) -> int:
        """Tasks upstream at once, at most, over all upstreams."""
        return sum(self.limits)

    def upstreams(self) -> Upstreams:
        """The chaos upstream(s) this run needs (not started)."""
        if self.pool:
            return ChaosPool.of(self.pool)
        return ChaosUpstream(limit=self.limit)

    def gatekeeper_settings(self, spool_dir: str) -> dict[str, Any]:
        """Settings for an in-process gatekeeper (load_settings overrides)."""
        settings: dict[str, Any] = {
            "max_concurrent": ",".join(map(str, self.pool)) if self.pool else self.limit,
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
    upstream: Upstreams,
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


async def _after(upstream: Upstreams, kind: str, request_id: str, delay: float) -> None:
    await upstream.event(kind, request_id, 1).wait()
    await asyncio.sleep(delay)


async def run_clients(
    url: str,
    cfg: ChaosConfig,
    upstream: Upstreams,
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


# -- the gatekeeper's own pages ---------------------------------------------------------------


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    """GET a page that must answer 200: its JSON document, or its text."""
    async with session.get(url) as response:
        assert response.status == 200, f"GET {url} -> {response.status}"
        if response.content_type == "application/json":
            return await response.json()
        return await response.text()


async def settle(base: str, upstream: Upstreams, *, within: float = 20.0) -> dict[str, Any]:
    """Wait until nothing is active or queued anywhere (every upstream's leftover computing
    included); return the /stats document."""
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + within
        while True:
            doc: dict[str, Any] = await get_json(session, f"{base}/stats")
            busy = doc["active_tasks"] + doc["queued_tasks"] + doc["retrying_tasks"]
            if busy == 0 and upstream.in_flight == 0:
                return doc
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"traffic stopped but the gatekeeper is not at rest after {within} s: "
                    f"active={doc['active_tasks']} queued={doc['queued_tasks']} "
                    f"retrying={doc['retrying_tasks']} upstream in flight="
                    + ", ".join(f"{m.name}: {m.in_flight}" for m in upstream.members)
                )
            await asyncio.sleep(0.05)


async def books(base: str) -> tuple[dict[str, Any], str]:
    """/stats and /metrics, one after the other (at rest they tell the same story)."""
    async with aiohttp.ClientSession() as session:
        return await get_json(session, f"{base}/stats"), await get_json(session, f"{base}/metrics")


def verdict_text(cfg: ChaosConfig, verdict: "Verdict", upstream: Upstreams) -> str:
    """The failure message: the seed to replay, the broken promises, each server's peak."""
    shown = "\n  ".join(verdict.violations[:25])
    more = len(verdict.violations) - 25
    peaks = ", ".join(f"{m.name} {m.max_in_flight} (limit {m.limit})" for m in upstream.members)
    replay = f"CHAOS_SEED={cfg.seed} CHAOS_TASKS={cfg.tasks}"
    if cfg.seconds is not None:
        replay = f"CHAOS_SEED={cfg.seed} CHAOS_SECONDS={cfg.seconds}"
    return (
        f"chaos run with seed {cfg.seed} broke {len(verdict.violations)} promise(s) "
        f"(replay: {replay}):\n  {shown}"
        + (f"\n  … and {more} more" if more > 0 else "")
        + f"\nupstream max in flight: {peaks}"
    )


# -- faults on the upstream side that are not tied to one request ----------------------------


@dataclass
class Monkey:
    """Takes the upstream down and brings it back, and makes each upstream slow for a while
    (seeded). A pool's servers are slowed independently; they are not taken down here (`Kill`
    does that once)."""

    upstream: Upstreams
    cfg: ChaosConfig
    salt: str
    downs: int = 0
    slow_phases: int = 0
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        rng = random.Random(f"{self.cfg.seed}:monkey:{self.salt}")
        downtimes = random.Random(rng.random())
        if isinstance(self.upstream, ChaosUpstream) and self.cfg.downtime_every is not None:
            self._tasks.append(asyncio.create_task(self._downtimes(self.upstream, downtimes)))
        for member in self.upstream.members:
            slowness = random.Random(rng.random())
            self._tasks.append(asyncio.create_task(self._slowness(member, slowness)))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if isinstance(self.upstream, ChaosUpstream):
            await self.upstream.come_back()
        for member in self.upstream.members:
            member.slow_ms = 0

    async def _downtimes(self, upstream: ChaosUpstream, rng: random.Random) -> None:
        assert self.cfg.downtime_every is not None
        try:
            while True:
                await asyncio.sleep(rng.uniform(*self.cfg.downtime_every))
                upstream.go_down()
                self.downs += 1
                await asyncio.sleep(rng.uniform(*self.cfg.downtime_length))
                await upstream.come_back()
        finally:
            await upstream.come_back()

    async def _slowness(self, upstream: ChaosUpstream, rng: random.Random) -> None:
        try:
            while True:
                await asyncio.sleep(rng.uniform(*self.cfg.slow_every))
                upstream.slow_ms = self.cfg.slow_ms
                self.slow_phases += 1
                await asyncio.sleep(rng.uniform(*self.cfg.slow_length))
                upstream.slow_ms = 0
        finally:
            upstream.slow_ms = 0


@dataclass
class Kill:
    """Pool mode: one server (drawn from the seed) crashes once mid-run, like a container that
    dies: its listener closes and every connection is cut; later it restarts on its port.

    Both moments are shares of the run (`cfg.kill_at`, `cfg.kill_for`, drawn from the seed):
    of the tasks when the run is a count, of the time when it is `CHAOS_SECONDS`. The crash
    waits for the server to be working on a request, so it always cuts running work."""

    pool: ChaosPool
    cfg: ChaosConfig
    victim: ChaosUpstream = field(init=False)
    kill_share: float = field(init=False)
    back_share: float = field(init=False)
    done: int = 0
    began: float = field(default_factory=time.monotonic)
    killed_at: float | None = None
    back_at: float | None = None
    cut: list[Served] = field(default_factory=list)  # requests the crash cut
    _restart: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        rng = random.Random(f"{self.cfg.seed}:kill")
        self.victim = rng.choice(self.pool.members)
        self.kill_share = rng.uniform(*self.cfg.kill_at)
        self.back_share = self.kill_share + rng.uniform(*self.cfg.kill_for)

    def _progress(self) -> float:
        if self.cfg.seconds is not None:
            return (time.monotonic() - self.began) / self.cfg.seconds
        return self.done / max(1, self.cfg.tasks)

    def note(self, _result: ClientResult) -> None:
        """run_clients' on_result: one more task is over; maybe it is time."""
        self.done += 1
        progress = self._progress()
        if self.killed_at is None:
            working = self.victim.working()
            if progress >= self.kill_share and working:
                self.cut = working
                self.victim.go_down()
                self.killed_at = time.monotonic()
        elif self._restart is None and progress >= self.back_share:
            self._restart = asyncio.create_task(self._come_back())

    async def _come_back(self) -> None:
        await self.victim.come_back()
        self.back_at = time.monotonic()

    async def stop(self) -> None:
        """After the traffic: the victim is up again whatever happened."""
        if self._restart is not None:
            await self._restart
        elif self.killed_at is not None:
            await self._come_back()

    def figures(self) -> dict[str, Any]:
        return {
            "victim": self.victim.name,
            "victim_limit": self.victim.limit,
            "killed_after_s": None if self.killed_at is None else self.killed_at - self.began,
            "down_s": (
                None
                if self.killed_at is None or self.back_at is None
                else round(self.back_at - self.killed_at, 2)
            ),
            "cut_running": len(self.cut),
        }


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
    if doc["active_tasks"] > cfg.total_limit:
        problems.append(f"/stats active_tasks={doc['active_tasks']} > limit {cfg.total_limit}")
    if doc["queued_tasks"] > cfg.max_queue:
        problems.append(f"/stats queued_tasks={doc['queued_tasks']} > max_queue {cfg.max_queue}")
    servers = doc.get("upstreams")
    if servers is not None:  # per-server books (issue #15), with one server too
        problems.extend(_server_problems(doc, servers, cfg))
    elif cfg.pool:
        problems.append("/stats has no `upstreams` list for a pool")
    return problems


# The totals of /stats that are sums over the servers' own figures.
_SUMS = {
    "active_tasks": "active_tasks",
    "held_tasks": "held_tasks",
    "max_concurrent": "max_concurrent",
    "oom_errors": "oom_errors",
}


def _server_problems(
    doc: dict[str, Any], servers: list[dict[str, Any]], cfg: ChaosConfig
) -> list[str]:
    """One /stats reading's per-server figures: each within its limit, adding up to the totals."""
    problems = []
    if len(servers) != len(cfg.limits):
        return [f"/stats lists {len(servers)} upstreams, the run has {len(cfg.limits)}"]
    for index, (server, limit) in enumerate(zip(servers, cfg.limits, strict=True)):
        name = f"upstreams[{index}] ({server.get('name')})"
        if server["active_tasks"] > limit:
            problems.append(f"/stats {name} active_tasks={server['active_tasks']} > limit {limit}")
        if server["max_concurrent"] > limit:
            problems.append(
                f"/stats {name} max_concurrent={server['max_concurrent']} > ASR_MAX_CONCURRENT "
                f"{limit}"
            )
        if server["held_tasks"] > server["active_tasks"]:
            problems.append(f"/stats {name} holds {server['held_tasks']} of its active tasks")
    for total, part in _SUMS.items():
        summed = sum(server[part] for server in servers)
        if summed != doc[total]:
            problems.append(
                f"/stats {total}={doc[total]} but the upstreams' {part} add to {summed}"
            )
    for outcome, count in doc["upstream_attempts"].items():
        summed = sum(server["attempts"].get(outcome, 0) for server in servers)
        if summed != count:
            problems.append(
                f"/stats upstream_attempts[{outcome}]={count} but the upstreams' add to {summed}"
            )
    return problems


@dataclass
class Monitor:
    """Polls /stats while traffic flows; every reading must make sense on its own."""

    base: str
    cfg: ChaosConfig
    upstream: Upstreams
    readings: int = 0
    max_active: int = 0
    max_queued: int = 0
    problems: list[str] = field(default_factory=list)
    # Compare the upstream's in-flight count with its limit at every reading. Replicas mode
    # checks the upstream afterwards instead, from every request's start and end
    # (tests/chaos/test_chaos_replicas.py: work a frozen replica left on the GPU past its lease).
    check_upstream: bool = True
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
                    for member in self.upstream.members if self.check_upstream else ():
                        if member.in_flight > member.limit:
                            self.problems.append(
                                f"upstream {member.name} in flight {member.in_flight} > limit "
                                f"{member.limit} ({member.orphans} of them computing after the "
                                "gatekeeper hung up)"
                            )
                await asyncio.sleep(0.025)


# -- the gatekeeper's own account of clients that left ---------------------------------------


class EventLog(logging.Handler):
    """Collects the gatekeeper's events (in process) so the driver knows where clients left."""

    def __init__(self, *, keep: bool = False) -> None:
        super().__init__(logging.INFO)
        self.counts: Counter[str] = Counter()
        self.left: dict[str, str] = {}  # task_id -> stage
        self.errors: list[str] = []
        # Per server (the `upstream=` of a line; None when a line names none): events, and
        # attempts whose connection the server refused (crashed: nothing reached it).
        self.by_upstream: Counter[tuple[str, str | None]] = Counter()
        self.refused: Counter[str | None] = Counter()
        self.crashes: Counter[tuple[str | None, str]] = Counter()  # (upstream, error)
        self.keep = keep
        self.records: list[tuple[Event, dict[str, Any], float]] = []  # with `keep` only
        # A server the health probe found down gets no new task until it is back: a task that
        # starts there (`开始转录 upstream=…`) more than `down_margin` seconds after the
        # `Whisper服务不可用` line, before `Whisper服务已恢复`, is noted. The margin covers a
        # task given its slot just before the verdict that logs its start after a cool-down.
        self.down_margin = 0.25
        self.down_since: dict[str, float] = {}
        self.started_while_down: list[str] = []
        # Attempts refused by a server its probe had found down, past the same margin: a retry
        # that went back to a dead server rather than to a usable one.
        self.refused_while_down: list[str] = []

    def refused_by(self, name: str, *, only: bool) -> int:
        """Connections `name` refused; `only`: it is the only server, so lines that name no
        server are its too."""
        return self.refused[name] + (self.refused[None] if only else 0)

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "gk_event", None)
        fields: dict[str, Any] = getattr(record, "gk_fields", {}) or {}
        if event is not None:
            self.counts[event.name] += 1
            upstream = fields.get("upstream")
            self._per_upstream(event, None if upstream is None else str(upstream), fields)
            if self.keep:
                self.records.append((event, dict(fields), time.monotonic()))
            if event is Event.CLIENT_LEFT:
                self.left[str(fields.get("task_id"))] = str(fields.get("stage"))
            elif fields.get("outcome") == "cancelled":
                self.left.setdefault(str(fields.get("task_id")), "running")
        if record.levelno >= logging.ERROR:
            self.errors.append(self.format(record))

    def _per_upstream(self, event: Event, upstream: str | None, fields: dict[str, Any]) -> None:
        self.by_upstream[(event.name, upstream)] += 1
        refused = event is Event.CRASH and str(fields.get("error")) == REFUSED
        if event is Event.CRASH:
            self.crashes[(upstream, str(fields.get("error")))] += 1
            if refused:
                self.refused[upstream] += 1
        if upstream is None:
            return
        # By name: the health events came with #15.
        now = time.monotonic()
        if refused and now - self.down_since.get(upstream, now) > self.down_margin:
            self.refused_while_down.append(
                f"task {fields.get('task_id')} attempt {fields.get('attempt')} went to {upstream} "
                f"{now - self.down_since[upstream]:.2f} s after the probe found it down"
            )
        if event.name == "UPSTREAM_DOWN":
            self.down_since.setdefault(upstream, now)
        elif event.name == "UPSTREAM_UP":
            self.down_since.pop(upstream, None)
        elif event is Event.START and upstream in self.down_since:
            late = now - self.down_since[upstream]
            if late > self.down_margin:
                self.started_while_down.append(
                    f"task {fields.get('task_id')} started on {upstream} {late:.2f} s after the "
                    "health probe found it down"
                )

    def note_line(self, line: str) -> None:
        """The same from a text log line of a `gatekeeper serve` process."""
        for event in Event:
            words = event.value.split("{")[0]
            if words and f"] {words}" in line:
                self.counts[event.name] += 1
                upstream = _UPSTREAM.search(line)
                error = re.search(r"\berror=(\S+)", line)
                self._per_upstream(
                    event,
                    None if upstream is None else upstream.group(1),
                    {"error": None if error is None else error.group(1)},
                )
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
    upstream: Upstreams
    events: EventLog
    shutting_down_allowed: Callable[[ClientResult], bool] = lambda _r: False
    # Replicas mode (issue #17). Refusal reasons allowed beside queue_full and queue_timeout
    # (coordination_unavailable while Redis is down).
    extra_refusals: frozenset[str] = frozenset()
    # A client whose request was at a replica that was killed: nginx answers 502 itself (or
    # the answer breaks off). Such answers are tallied `gateway_error`, nothing more is judged.
    gateway_error_allowed: Callable[[ClientResult], bool] = lambda _r: False
    # A client whose request may have been at a replica frozen with SIGSTOP: when it wakes, its
    # timers fire at once, so a 504 or 408 need not match what the upstream did meanwhile.
    frozen: Callable[[ClientResult], bool] = lambda _r: False
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
    # The same per server (index in the pool; 0 for a single upstream).
    server_clean: Counter[tuple[int, str]] = field(default_factory=Counter)
    server_possible: Counter[tuple[int, str]] = field(default_factory=Counter)
    server_figures: dict[str, dict[str, int]] = field(default_factory=dict)

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
        if self._gateway_error(result):
            self.tally["gateway_error"] += 1
            return
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

    def _gateway_error(self, result: ClientResult) -> bool:
        """nginx's own answer (no gatekeeper reason, nginx's Server header) or a broken one, for
        a client `gateway_error_allowed` names."""
        if result.left or not self.gateway_error_allowed(result):
            return False
        nginx = result.headers.get("Server", "").startswith("nginx")
        own = "X-Gatekeeper-Reason" in result.headers
        return result.error is not None or (result.status == 502 and nginx and not own)

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
        return self.upstream.hit_by_crash(served)

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
            allowed = {"queue_full", "queue_timeout", *self.extra_refusals}
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
            if not slow and not self.frozen(result):
                self.fail(result, f"504 but the upstream's last attempt was {last}")
            if doc.get("attempts") != attempts:
                self.fail(result, "504 attempts in body and header differ")
            return
        if status == 408 and reason == "client_body_timeout":
            self.tally["408_body_timeout"] += 1
            if spec.kind != "stall_upload" and not self.frozen(result):
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
                clean = not self._crashed(served)
                self.possible_outcomes[expected] += 1
                self.clean_outcomes[expected] += clean
                self.server_possible[(served.server, expected)] += 1
                self.server_clean[(served.server, expected)] += clean
            elif served.step.startswith("reset_answer:5"):
                # Broken after the first 64 KiB the gatekeeper inspects: the status is known,
                # so it may count as `error` (else `crash`).
                self.possible_outcomes["error"] += 1
                self.server_possible[(served.server, "error")] += 1
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

    def reconcile(
        self,
        stats: dict[str, Any],
        metrics: str,
        *,
        admitted_refusals: bool,
        log_complete: bool = True,
    ) -> None:
        """At rest: the stats add up, agree with /metrics, and match what the clients saw.

        `log_complete`: every log line of the run has been read (in process it has; a
        process's stderr may lag), so the refused connections it names can be counted. A task is
        never refused queue_full after its upload (its place was counted when it began), so
        the tasks rejected after queueing are the queue timeouts (and, in a drain, the
        shutdown's refusals)."""
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
            self.fail(
                None,
                f"queue_timeout refusals {stats['rejected_by_reason']['queue_timeout']} != "
                f"rejected_after_queueing_tasks {stats['rejected_after_queueing_tasks']} "
                f"(refusals by reason: {stats['rejected_by_reason']})",
            )
        self._agree_with_metrics(stats, metrics)
        self._attempt_books(stats)
        self._server_books(stats, metrics, log_complete=log_complete)
        if self.ok_bytes_client != self.ok_bytes_upstream:
            self.fail(
                None,
                f"successful answers: clients got {self.ok_bytes_client} bytes, upstream sent "
                f"{self.ok_bytes_upstream}",
            )

    def agree_with_metrics(self, stats: dict[str, Any], metrics: str) -> None:
        """/metrics says what /stats says (one gatekeeper's pages, read at rest)."""
        self._agree_with_metrics(stats, metrics)

    def _agree_with_metrics(self, stats: dict[str, Any], metrics: str) -> None:
        metric = _metric_reader(metrics)

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

    def _server_books(self, stats: dict[str, Any], metrics: str, *, log_complete: bool) -> None:
        """Per server, at rest: its attempts add up (`server_books_problems`), each is
        classified as what that server did, and /metrics agrees with /stats."""
        problems, figures = server_books_problems(
            stats, self.upstream, self.events, log_complete=log_complete
        )
        for problem in problems:
            self.fail(None, problem)
        self.server_figures.update(figures)
        servers = stats.get("upstreams")
        if servers is not None and len(servers) == len(self.upstream.members):
            self._server_metrics(servers, metrics)
        for member in self.upstream.members:
            row = stats["upstream_attempts"] if servers is None else servers[member.index]
            self._server_outcomes(member, row if servers is None else row["attempts"])

    def _server_outcomes(self, member: ChaosUpstream, attempts: dict[str, int]) -> None:
        """The gatekeeper classified each attempt on `member` as what `member` did."""
        name, index = member.name, member.index
        for outcome in ("oom", "error", "client_error"):
            clean = self.server_clean[(index, outcome)]
            possible = self.server_possible[(index, outcome)]
            if not clean <= attempts[outcome] <= possible:
                self.fail(
                    None,
                    f"upstream {name}: {attempts[outcome]} attempts classified {outcome}, but it "
                    f"sent {possible} such answers ({clean} of them not hit by a crash)",
                )
        if attempts["timeout"] < self.server_clean[(index, "timeout")]:
            self.fail(
                None,
                f"upstream {name}: {attempts['timeout']} timeouts booked for "
                f"{self.server_clean[(index, 'timeout')]} hangs and overruns",
            )

    def _server_metrics(self, servers: list[dict[str, Any]], metrics: str) -> None:
        """/metrics says per server what /stats says."""
        metric = _metric_reader(metrics)
        for server in servers:
            name = server["name"]
            pairs = [
                (metric("upstream_active_tasks", upstream=name), server["active_tasks"], "active"),
                (
                    metric("upstream_max_concurrent", upstream=name),
                    server["max_concurrent"],
                    "max_concurrent",
                ),
                (metric("oom_errors_total", upstream=name), server["oom_errors"], "oom_errors"),
            ]
            for outcome, count in server["attempts"].items():
                pairs.append(
                    (
                        metric("upstream_attempts_total", upstream=name, outcome=outcome),
                        count,
                        f"attempts {outcome}",
                    )
                )
            for value, expected, what in pairs:
                if value != expected:
                    self.fail(None, f"/metrics {name} {what}={value} but /stats says {expected}")

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


def server_books_problems(
    stats: dict[str, Any], upstream: Upstreams, events: EventLog, *, log_complete: bool = True
) -> tuple[list[str], dict[str, dict[str, int]]]:
    """Per server, once everything has ended: the attempts the gatekeeper booked to it
    (`/stats` `upstreams[i].attempts`, summed over outcomes) are the requests it received, plus
    the connections it refused while down (the log's `Whisper服务连接中断 error=
    ClientConnectorError upstream=…`), plus at most the connections a crash cut before their
    request reached it; and no server is left with a task active, in flight or held.

    Before per-server books (#15) a single upstream is judged by the totals. Without a complete
    log (`log_complete`), the refusals are only bounded by the crashes booked. Returns the
    problems, and the figures per server."""
    members = upstream.members
    problems: list[str] = []
    figures: dict[str, dict[str, int]] = {}
    rows: list[tuple[ChaosUpstream, dict[str, int]]] = []
    servers = stats.get("upstreams")
    if servers is None:
        if len(members) != 1:
            return ["/stats has no `upstreams` list for a pool"], figures
        rows = [(members[0], stats["upstream_attempts"])]
    elif len(servers) != len(members):
        return [f"/stats lists {len(servers)} upstreams, the run has {len(members)}"], figures
    else:
        for member, server in zip(members, servers, strict=True):
            if (server["name"], server["url"]) != (member.name, member.url):
                problems.append(
                    f"/stats upstream {server['name']} {server['url']} is not {member.url}"
                )
            busy = {k: server[k] for k in ("active_tasks", "in_flight", "held_tasks") if server[k]}
            if busy:
                problems.append(f"at rest, upstream {member.name} still has {busy} (a leaked slot)")
            rows.append((member, server["attempts"]))
    for member, attempts in rows:
        booked, received = sum(attempts.values()), member.arrivals
        refused = events.refused_by(member.name, only=len(members) == 1)
        cut = member.cut_without_request
        if not log_complete:  # refused connections are crashes the upstream never saw
            refused, cut = 0, cut + attempts.get("crash", 0)
        figures[member.name] = {
            "booked": booked,
            "received": received,
            "refused": refused,
            "cut_without_request": cut,
        }
        if not received + refused <= booked <= received + refused + cut:
            problems.append(
                f"upstream {member.name}: the gatekeeper booked {booked} attempts {attempts}; it "
                f"received {received}, refused {refused} connections while down, and a crash cut "
                f"{cut} connections before their request arrived (booked must lie within "
                f"[{received + refused}, {received + refused + cut}])"
            )
    return problems, figures


def _metric_reader(metrics: str) -> Callable[..., float | None]:
    """metric(name, **labels): the sum of the samples of asr_gatekeeper_<name> whose labels
    include `labels` (None: no such sample). A total is the same question whether the series
    carries an `upstream` label or not."""
    samples: list[tuple[str, dict[str, str], float]] = [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
    ]

    def metric(name: str, **labels: str) -> float | None:
        found = [
            value
            for sample_name, sample_labels, value in samples
            if sample_name == f"asr_gatekeeper_{name}"
            and all(sample_labels.get(k) == v for k, v in labels.items())
        ]
        return sum(found) if found else None

    return metric


def summary(data: dict[str, Any]) -> str:
    """One line of figures, for the report."""
    return json.dumps(data, sort_keys=False, default=str)


def as_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)
