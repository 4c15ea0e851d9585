"""Replicas (#17) end to end: three `gatekeeper serve` processes behind real nginx share one
Whisper server's limit through a real redis-server, checked where it matters, at the server.

The simulator runs in this process (a real HTTP server with its GPU model) and counts the tasks
on its GPU itself (`max_active_seen`, work whose client left included). The replicas are real
processes with ASR_REDIS_URL and a cluster name of the test's own, leases of 2 s so that faults
play out quickly, behind nginx with the shipped replicas config (tests/replicas.py starts and
stops it all; where a fault needs one replica to hold the slot, the test sends its task to that
replica directly). Redis is read directly: `gatekeeper:{<cluster>}:leases:<host:port>`, scored
by deadline on Redis's own clock, so "after one lease and no sooner" is measured on the clock
that decides it.
"""

import asyncio
import io
import json
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gatekeeper.sim import Simulator
from gatekeeper.sim.audio import silent_wav
from tests.conftest import StartSim
from tests.redis_server import redis_now_ms
from tests.replicas import HOURS, Replica, ReplicaStack, processes_of, replica_stack
from tests.waiting import until

pytestmark = pytest.mark.e2e

LEASE = 2.0
_WAV = silent_wav(0.2)  # the simulator is told each task's length (X-Sim-Audio-Seconds)
_REFUSED = "服务繁忙"


def _cluster() -> str:
    return f"e2e-{secrets.token_hex(4)}"


def _flags(limit: int, max_queue: int, queue_timeout: float = 30.0) -> list[str]:
    return [
        "--max-concurrent", str(limit),
        "--max-queue", str(max_queue),
        "--queue-timeout", str(queue_timeout),
        "--health-interval", "0.2",
    ]  # fmt: skip


@dataclass
class Answer:
    """What one client got: one HTTP answer, or the error that stood in for it."""

    request_id: str
    started: float
    ended: float = 0.0
    status: int | None = None
    headers: dict[str, str] | None = None
    body: bytes = b""
    error: str | None = None

    @property
    def reason(self) -> str | None:
        return None if self.headers is None else self.headers.get("X-Gatekeeper-Reason")

    def describe(self) -> str:
        if self.error is not None:
            return f"{self.request_id}: no answer ({self.error})"
        return f"{self.request_id}: {self.status} {self.reason or ''} {self.body[:160]!r}"


async def _task(
    session: aiohttp.ClientSession, base: str, request_id: str, audio_seconds: float
) -> Answer:
    """One transcription of `audio_seconds` of (simulated) audio."""
    answer = Answer(request_id, time.monotonic())
    form = aiohttp.FormData()
    form.add_field("audio_file", io.BytesIO(_WAV), filename="a.wav", content_type="audio/wav")
    headers = {"X-Request-ID": request_id, "X-Sim-Audio-Seconds": f"{audio_seconds:.3f}"}
    try:
        async with session.post(f"{base}/asr?output=json", data=form, headers=headers) as reply:
            answer.status, answer.headers = reply.status, dict(reply.headers)
            answer.body = await reply.read()
    except (aiohttp.ClientError, OSError) as exc:
        answer.error = f"{type(exc).__name__}: {exc}"
    answer.ended = time.monotonic()
    return answer


async def _load(
    base: str, *, tasks: int, clients: int, seed: int, prefix: str, audio: tuple[float, float]
) -> list[Answer]:
    """`tasks` tasks of random length from `clients` clients that each send one at a time
    after a random pause; the answers in the order they came."""
    rng = random.Random(seed)
    specs = iter(
        [(f"{prefix}-{i}", rng.uniform(*audio), rng.uniform(0, 0.05)) for i in range(tasks)]
    )
    answers: list[Answer] = []

    async def client(session: aiohttp.ClientSession) -> None:
        for request_id, seconds, pause in specs:
            await asyncio.sleep(pause)
            answers.append(await _task(session, base, request_id, seconds))

    async with _session() as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return answers


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=60)
    )


def _wrong_answers(answers: Sequence[Answer], refusals: frozenset[str]) -> list[str]:
    """Answers that are not one complete answer of a kind the client may get: the simulator's
    transcript (its task id on it, the request id echoed), or the gatekeeper's 503 服务繁忙 with
    one of `refusals` as its reason, in its JSON body and headers."""
    wrong = []
    for answer in answers:
        headers = answer.headers or {}
        if answer.error is not None or answer.status is None:
            wrong.append(answer.describe())
        elif answer.status == 200:
            if "X-Sim-Task-Id" not in headers or headers.get("X-Request-ID") != answer.request_id:
                wrong.append(f"{answer.describe()} (not the simulator's answer to it)")
        elif answer.status == 503:
            try:
                doc = json.loads(answer.body)
            except ValueError:
                doc = {}
            if not (
                answer.reason in refusals
                and doc.get("reason") == answer.reason
                and doc.get("error") == _REFUSED
                and headers.get("Retry-After") == str(doc.get("retry_after"))
            ):
                wrong.append(f"{answer.describe()} (allowed refusals: {sorted(refusals)})")
        else:
            wrong.append(answer.describe())
    return wrong


class _RedisWatch:
    """Samples the live leases in Redis while a block runs: the most seen at once, and every
    lease id seen (the key is right, and the limit holds in Redis's own books too)."""

    def __init__(self, stack: ReplicaStack) -> None:
        self._stack = stack
        self.peak = 0
        self.seen: set[str] = set()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> "_RedisWatch":
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task  # stopped by the event, not cancelled (redis-py and cancellation)

    async def _run(self) -> None:
        while not self._stop.is_set():
            live = await self._stack.live_leases()
            self.peak = max(self.peak, len(live))
            self.seen.update(live)
            await asyncio.sleep(0.005)


async def _at_rest(stack: ReplicaStack, session: aiohttp.ClientSession) -> list[dict[str, Any]]:
    """Every running replica's /stats once it has nothing active, queued or held."""

    async def rested() -> bool:
        for replica in stack.replicas:
            if replica.running:
                doc = await stack.stats(session, replica)
                busy = ("active_tasks", "queued_tasks", "held_tasks", "retrying_tasks")
                if any(doc[name] for name in busy) or doc["cluster"]["leases_held"]:
                    return False
        return True

    await until(rested, within=10, every=0.05)
    return [await stack.stats(session, r) for r in stack.replicas if r.running]


def _metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when none)."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


@asynccontextmanager
async def _stack(
    tmp_path: Path,
    sim_url: str,
    cluster: str,
    flags: list[str],
    skews: Sequence[float] = (),
    *,
    count: int = 3,
    lease: float = LEASE,
) -> AsyncIterator[ReplicaStack]:
    """The replica stack; on the way out, no process of the cluster is left (an orphan)."""
    try:
        async with replica_stack(
            tmp_path,
            sim_url,
            cluster=cluster,
            count=count,
            lease=lease,
            flags=flags,
            skews=skews,
        ) as stack:
            try:
                yield stack
            except BaseException:
                print(stack.log_text())
                raise
    finally:
        assert processes_of(cluster) == [], "processes of the cluster outlived the test"


# -- the limit, for all replicas together -----------------------------------------------------

_TASKS = 36


def _clock_offset(lines: Sequence[str]) -> float:
    """How far a replica's wall clock is off, from the time on its first log line."""
    stamp = next(line[:19] for line in lines if line[:4].isdigit())
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").timestamp() - time.time()


async def test_three_replicas_behind_nginx_keep_one_limit_at_the_server(
    start_sim: StartSim, tmp_path: Path
) -> None:
    """Random load through nginx on three replicas (ASR_MAX_CONCURRENT=3 each), two of them
    with clocks hours off (7 h fast, 5 h slow: Redis's clock decides): the simulator never runs
    more than 3 at once and does run 3, every client gets its transcript, each replica served
    some and took leases, and afterwards Redis holds no lease and every replica's /stats is at
    rest and sees the three replicas."""
    skews = (0.0, 7 * HOURS, -5 * HOURS)
    sim = await start_sim(time_scale=4.0)  # 0.1 to 1 s of audio each: 2.5 to 25 ms of work
    cluster = _cluster()
    async with _stack(tmp_path, sim.url, cluster, _flags(limit=3, max_queue=20), skews) as stack:
        async with _RedisWatch(stack) as watch:
            answers = await _load(
                stack.url, tasks=_TASKS, clients=12, seed=17, prefix="load", audio=(1.0, 10.0)
            )
        async with _session() as session:
            stats = await _at_rest(stack, session)
        leases = await stack.all_leases()
        pids = {r.pid for r in stack.replicas}
        clocks = [_clock_offset(r.lines) for r in stack.replicas]
    assert [round(offset / HOURS) for offset in clocks] == [round(s / HOURS) for s in skews]
    most = _count(sim, "max_active_seen")
    assert most <= 3, f"the simulator ran {most} at once"
    assert most == 3  # the load did reach the limit
    assert _wrong_answers(answers, frozenset()) == []
    assert len(answers) == _count(sim, "tasks_done") == _TASKS  # each reached the GPU once
    assert 1 <= watch.peak <= 3, f"{watch.peak} live leases at once in Redis"
    assert leases == {}, f"leases left in Redis: {leases}"
    for doc in stats:
        view = doc["cluster"]
        assert (view["name"], view["redis"], view["leases_held"]) == (cluster, "up", 0)
        seen = {r["replica"] for r in view["replicas"] if r["alive"]}
        assert {int(replica.split("-")[-2]) for replica in seen} == pids
        assert doc["succeeded_tasks"] >= 1  # nginx spread the load
    assert sum(doc["succeeded_tasks"] for doc in stats) == _TASKS
    holders = {lease_id.rpartition("/")[0] for lease_id in watch.seen}
    assert len(holders) == 3, f"leases seen from {holders}"


# -- a replica dies, or freezes, holding slots -------------------------------------------------


async def _first_lease_of(
    stack: ReplicaStack, replica: Replica, within: float
) -> tuple[float, float]:
    """Poll Redis until `replica` holds a live lease: (when it was granted, the longest gap
    between two looks), both in ms on Redis's clock. The grant is the lease's deadline less
    one lease: true while it has not been renewed yet, which a gap under a third of a lease
    (the renewal interval) makes sure of."""
    admin = stack.admin
    previous = await redis_now_ms(admin)
    gap = 0.0
    async with asyncio.timeout(within):
        while True:
            now = await redis_now_ms(admin)
            gap = max(gap, now - previous)
            previous = now
            mine = [d for i, d in (await stack.live_leases()).items() if replica.holds(i)]
            if mine:
                return min(mine) - LEASE * 1000, gap
            await asyncio.sleep(0.005)


async def _held_by(stack: ReplicaStack, replica: Replica, count: int) -> bool:
    live = await stack.live_leases()
    return sum(1 for lease_id in live if replica.holds(lease_id)) == count


async def test_a_killed_replicas_slots_free_after_one_lease_and_no_sooner(
    start_sim: StartSim, tmp_path: Path
) -> None:
    """A replica running two tasks (the limit) is killed with SIGKILL: a task waiting on
    another replica gets a slot once the dead one's leases run out on Redis's clock, not
    before, and soon after; the simulator never runs more than 2 (the dead replica's work ends
    within the lease); Redis is left with no live lease and the dead replica drops out of the
    cluster's view."""
    sim = await start_sim()
    cluster = _cluster()
    async with _stack(tmp_path, sim.url, cluster, _flags(limit=2, max_queue=5)) as stack:
        victim, waiter, _ = stack.replicas
        async with _session() as session, _RedisWatch(stack) as watch:
            # 8 s of audio: 0.8 s alone, about 1.2 s two at once; well within the lease.
            doomed = [
                asyncio.ensure_future(_task(session, victim.url, f"doomed-{i}", 8.0))
                for i in range(2)
            ]
            await until(lambda: _held_by(stack, victim, 2), within=5, every=0.01)
            queued = asyncio.ensure_future(_task(session, waiter.url, "waiting", 1.0))

            async def waiting() -> bool:
                return bool((await stack.stats(session, waiter))["queued_tasks"] == 1)

            await until(waiting, within=5, every=0.01)
            await victim.kill()  # SIGKILL
            killed_at = await redis_now_ms(stack.admin)
            dead = {i: d for i, d in (await stack.all_leases()).items() if victim.holds(i)}
            granted, gap = await _first_lease_of(stack, waiter, within=LEASE + 3)
            answer = await asyncio.wait_for(queued, 10)
            lost = await asyncio.gather(*doomed)
            stats = await _at_rest(stack, session)

            async def dead_gone() -> bool:
                doc = await stack.stats(session, waiter)
                alive = {r["replica"] for r in doc["cluster"]["replicas"] if r["alive"]}
                return not any(f"-{victim.pids[0]}-" in replica for replica in alive)

            await until(dead_gone, within=LEASE + 2, every=0.05)
        await until(lambda: _no_live_leases(stack), within=LEASE + 1, every=0.05)
    assert len(dead) == 2, dead
    expiry = min(dead.values())
    # Its last renewal came a moment (a third of a lease at most) before the kill.
    assert 0 < expiry - killed_at <= LEASE * 1000
    assert gap < LEASE * 1000 / 3  # looked often enough that the grant is the first score seen
    assert granted >= expiry, (
        f"a slot was granted {expiry - granted:.0f} ms before the lease ran out"
    )
    assert granted - expiry <= 1500, f"the slot came free {granted - expiry:.0f} ms late"
    assert answer.status == 200, answer.describe()
    assert all(a.error is not None for a in lost)  # their gatekeeper died under them
    assert _count(sim, "max_active_seen") <= 2, _count(sim, "max_active_seen")
    assert watch.peak <= 2
    assert all(doc["active_tasks"] == 0 for doc in stats)


async def _no_live_leases(stack: ReplicaStack) -> bool:
    return not await stack.live_leases()


async def test_a_replica_paused_past_its_lease_loses_it_and_says_so(
    start_sim: StartSim, tmp_path: Path
) -> None:
    """A replica frozen (SIGSTOP) longer than its lease while its task holds the only slot: a
    task on another replica gets the slot once the lease ran out on Redis's clock, no sooner,
    and is served while the frozen one sleeps; woken (SIGCONT) with its task still on the GPU,
    the frozen one logs `lease lost`, counts it in /stats and /metrics, puts its running task
    back on the cluster's books, and answers its client; nothing is left held."""
    sim = await start_sim()
    cluster = _cluster()
    async with _stack(tmp_path, sim.url, cluster, _flags(limit=1, max_queue=5)) as stack:
        sleeper, waiter, _ = stack.replicas
        async with _session() as session:
            # 30 s of audio: 3 s of work, still going on when the sleeper wakes.
            frozen = asyncio.ensure_future(_task(session, sleeper.url, "frozen", 30.0))
            await until(lambda: _held_by(stack, sleeper, 1), within=5, every=0.005)
            sleeper.pause()
            paused_at = time.monotonic()
            try:
                await asyncio.sleep(0.1)  # a renewal it sent just before has landed
                [(lost_id, expiry)] = [
                    (i, d) for i, d in (await stack.all_leases()).items() if sleeper.holds(i)
                ]
                queued = asyncio.ensure_future(_task(session, waiter.url, "waiting", 1.0))
                granted, gap = await _first_lease_of(stack, waiter, within=LEASE + 3)
                answer = await asyncio.wait_for(queued, 10)
                # Past its lease for sure, then woken.
                await asyncio.sleep(max(0.0, paused_at + LEASE + 0.2 - time.monotonic()))
                slept = time.monotonic() - paused_at
            finally:
                sleeper.resume()
            line = await sleeper.wait_for_line("lease lost", within=5)
            # Its task, still on the GPU, is on the cluster's books again (a new lease).
            await until(lambda: _held_by(stack, sleeper, 1), within=LEASE, every=0.01)
            rebooked = [i for i in await stack.live_leases() if sleeper.holds(i)]
            woken = await asyncio.wait_for(frozen, 10)
            stats = await _at_rest(stack, session)
            doc = await stack.stats(session, sleeper)
            metrics = await stack.metrics(session, sleeper)
        await until(lambda: _no_live_leases(stack), within=LEASE + 1, every=0.05)
    assert gap < LEASE * 1000 / 3
    assert granted >= expiry, f"a slot came free {expiry - granted:.0f} ms before the lease ran out"
    assert granted - expiry <= 1500, f"the slot came free {granted - expiry:.0f} ms late"
    assert answer.status == 200, answer.describe()
    assert answer.ended - paused_at < slept  # served while the sleeper slept
    assert "WARNING" in line, line
    assert lost_id in line, line
    assert lost_id not in rebooked
    assert doc["cluster"]["leases_lost"] == 1
    assert _metric(metrics, "asr_gatekeeper_cluster_leases_lost_total") == 1
    assert woken.status == 200, woken.describe()
    assert all(d["active_tasks"] == 0 for d in stats)


async def test_a_paused_replica_whose_task_ended_meanwhile_still_says_its_lease_was_lost(
    start_sim: StartSim, tmp_path: Path
) -> None:
    """A replica frozen past its lease while its short task holds the only slot: the task is
    done on the GPU meanwhile, and when the replica wakes the task ends before Redis answers
    the first renewal (Redis is held for that moment, to fix the order); the replica still
    logs `lease lost` and counts it."""
    sim = await start_sim()
    cluster = _cluster()
    async with _stack(tmp_path, sim.url, cluster, _flags(limit=1, max_queue=5), count=2) as stack:
        sleeper, waiter = stack.replicas
        async with _session() as session:
            frozen = asyncio.ensure_future(_task(session, sleeper.url, "frozen", 3.0))  # 0.3 s
            # Frozen while the GPU works on it: the transcript waits in its socket.
            await until(lambda: _running(sim, "frozen"), within=5, every=0.002)
            sleeper.pause()
            paused_at = time.monotonic()
            try:
                waiting = await asyncio.wait_for(
                    _task(session, waiter.url, "waiting", 1.0), LEASE + 5
                )
                await asyncio.sleep(max(0.0, paused_at + LEASE + 0.2 - time.monotonic()))
                stack.redis.pause()
                try:
                    sleeper.resume()
                    woken = await asyncio.wait_for(frozen, 5)  # needs no Redis
                finally:
                    stack.redis.resume()
            finally:
                sleeper.resume()
            await _at_rest(stack, session)
            doc = await stack.stats(session, sleeper)
    assert (waiting.status, woken.status) == (200, 200)
    assert _count(sim, "max_active_seen") == 1
    assert sleeper.matching("lease lost"), "the woken replica said nothing of its lost lease"
    assert doc["cluster"]["leases_lost"] == 1


# -- Redis dies and comes back ------------------------------------------------------------------


async def test_redis_killed_and_restarted_mid_run(start_sim: StartSim, tmp_path: Path) -> None:
    """Load through nginx, and Redis killed under it: every replica says degraded in /health
    and `down` in /stats, starts nothing new, and refuses what it cannot queue with 503
    coordination_unavailable (counted in /metrics); Redis restarted empty: they recover by
    themselves, what waited is served, and later tasks too; the simulator never ran more than
    the limit, the only refusals were coordination_unavailable and queue_timeout, and no lease
    is left."""
    sim = await start_sim()
    cluster = _cluster()
    limit, max_queue = 2, 3
    flags = _flags(limit=limit, max_queue=max_queue, queue_timeout=15)
    async with _stack(tmp_path, sim.url, cluster, flags) as stack, _session() as session:
        replicas = stack.replicas
        answers: list[Answer] = []
        calm = asyncio.Event()
        # Four clients: never more than a replica's room (2 + 3) while Redis is up.
        rng = random.Random(23)

        async def client(number: int) -> None:
            for i in range(1000):
                if calm.is_set():
                    return
                answers.append(
                    await _task(session, stack.url, f"bg{number}-{i}", rng.uniform(1.0, 4.0))
                )
                await asyncio.sleep(rng.uniform(0, 0.03))

        background = [asyncio.ensure_future(client(n)) for n in range(4)]
        await until(lambda: len(answers) >= 8, within=10, every=0.01)
        await until(lambda: _count(sim, "active_tasks") > 0, within=5, every=0.005)

        stack.redis.kill()
        calm.set()  # the clients send nothing new; what they sent waits, or is answered

        async def all_degraded() -> bool:
            for replica in replicas:
                status, doc = await stack.health(session, replica)
                if (status, doc.get("status")) != (503, "degraded"):
                    return False
            return True

        await until(all_degraded, within=LEASE + 2, every=0.02)
        started = _count(sim, "tasks_started")
        # More than the queues hold (3 places a replica, some taken by the clients' tasks).
        burst = [
            asyncio.ensure_future(_task(session, stack.url, f"burst-{i}", 1.0)) for i in range(12)
        ]

        def refused() -> int:
            return sum(1 for f in burst if f.done() and f.result().status == 503)

        await until(lambda: refused() >= 12 - 3 * max_queue, within=5, every=0.01)
        down = [await stack.stats(session, r) for r in replicas]
        down_metrics = [await stack.metrics(session, r) for r in replicas]
        # What ran when Redis died is done (a task running through the restart is the next
        # test's); nothing new started meanwhile.
        await until(lambda: _count(sim, "active_tasks") == 0, within=5, every=0.005)
        assert _count(sim, "tasks_started") == started, "a task started while Redis was down"

        stack.redis.start()

        async def all_ok() -> bool:
            for replica in replicas:
                status, doc = await stack.health(session, replica)
                if (status, doc.get("status")) != (200, "ok"):
                    return False
            return True

        await until(all_ok, within=LEASE + 3, every=0.02)
        answers += await asyncio.wait_for(asyncio.gather(*burst), 30)
        await asyncio.wait_for(asyncio.gather(*background), 30)
        after = await _load(
            stack.url, tasks=9, clients=3, seed=29, prefix="after", audio=(0.5, 2.0)
        )
        stats = await _at_rest(stack, session)
        metrics = [await stack.metrics(session, r) for r in replicas]
        leases = await stack.all_leases()
    most = _count(sim, "max_active_seen")
    assert most <= limit, f"the simulator ran {most} at once"
    assert _wrong_answers(answers, frozenset({"coordination_unavailable", "queue_timeout"})) == []
    unavailable = [a for a in answers if a.reason == "coordination_unavailable"]
    assert len(unavailable) >= 12 - 3 * max_queue
    assert {a.request_id for a in unavailable} <= {f"burst-{i}" for i in range(12)}
    assert [a.status for a in after] == [200] * 9, [a.describe() for a in after]
    assert all(doc["cluster"]["redis"] == "down" for doc in down)
    assert [_metric(text, "asr_gatekeeper_cluster_redis_up") for text in down_metrics] == [0] * 3
    assert leases == {}, f"leases left in Redis: {leases}"
    for doc, text in zip(stats, metrics, strict=True):
        assert (doc["cluster"]["redis"], doc["cluster"]["leases_held"]) == ("up", 0)
        assert doc["cluster"]["redis_errors"] >= 1
        assert _metric(text, "asr_gatekeeper_cluster_redis_up") == 1
    counted = sum(
        _metric(text, "asr_gatekeeper_rejected_total", reason="coordination_unavailable")
        for text in metrics
    )
    assert counted == len(unavailable)


async def test_redis_restarted_empty_keeps_the_slot_of_a_task_still_running(
    start_sim: StartSim, tmp_path: Path
) -> None:
    """Redis (no persistence) killed and started again at once while one replica's task holds
    the only slot: the holder puts its running task back on the books (a lost lease, counted),
    and a task then sent to the other replica waits until the running one is done, past the
    restarted Redis's quiet time; the simulator never runs two."""
    sim = await start_sim()
    cluster = _cluster()
    async with _stack(tmp_path, sim.url, cluster, _flags(limit=1, max_queue=5), count=2) as stack:
        holder, other = stack.replicas
        async with _session() as session:
            # 30 s of audio: 3 s of work, longer than the quiet time after the restart.
            running = asyncio.ensure_future(_task(session, holder.url, "running", 30.0))
            await until(lambda: _running(sim, "running"), within=5, every=0.005)
            stack.redis.kill()
            stack.redis.start()  # on its port again, empty
            later = await asyncio.wait_for(_task(session, other.url, "later", 1.0), 15)
            first = await asyncio.wait_for(running, 15)
            await _at_rest(stack, session)
            doc = await stack.stats(session, holder)
    assert _count(sim, "max_active_seen") == 1, "the Whisper server ran two tasks at once"
    assert later.ended > first.ended  # it waited for the slot
    assert (first.status, later.status) == (200, 200), (first.describe(), later.describe())
    assert doc["cluster"]["leases_lost"] == 1


def _running(sim: Simulator, request_id: str) -> bool:
    """The simulator is working on the task with this request id."""
    recent = sim.state()["recent"]
    assert isinstance(recent, list)
    return any(
        isinstance(task, dict) and task["request_id"] == request_id and task["outcome"] == "running"
        for task in recent
    )


def _count(sim: Simulator, name: str) -> int:
    """One of the simulator's own counts (GET /sim/state), read in process."""
    value = sim.state()[name]
    assert isinstance(value, int), (name, value)
    return value


async def test_a_replica_queues_no_more_than_its_max_queue(
    start_sim: StartSim, tmp_path: Path
) -> None:
    """The only slot held by one replica's task: another replica with ASR_MAX_QUEUE=1 queues
    one task and refuses the next one queue_full at once, as a lone gatekeeper would."""
    sim = await start_sim()
    cluster = _cluster()
    async with _stack(tmp_path, sim.url, cluster, _flags(limit=1, max_queue=1), count=2) as stack:
        holder, other = stack.replicas
        async with _session() as session:
            running = asyncio.ensure_future(_task(session, holder.url, "running", 10.0))  # 1 s
            await until(lambda: _held_by(stack, holder, 1), within=5, every=0.005)
            queued = asyncio.ensure_future(_task(session, other.url, "queued", 1.0))

            async def queued_on_other() -> int:
                return int((await stack.stats(session, other))["queued_tasks"])

            await until(lambda: _equals(queued_on_other(), 1), within=5, every=0.01)
            extra = asyncio.ensure_future(_task(session, other.url, "extra", 1.0))

            async def refused_or_queued() -> bool:
                return extra.done() or await queued_on_other() == 2

            await until(refused_or_queued, within=5, every=0.01)
            most = await queued_on_other()
            answers = await asyncio.wait_for(asyncio.gather(running, queued, extra), 15)
            await _at_rest(stack, session)
    assert most <= 1, f"{most} tasks queued on a replica with ASR_MAX_QUEUE=1"
    assert [(a.status, a.reason) for a in answers] == [
        (200, None),
        (200, None),
        (503, "queue_full"),
    ]


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected
