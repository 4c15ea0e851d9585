"""Issue #17 under fault injection: three gatekeeper replicas behind nginx, one Whisper server.

The replicas run mode puts three `gatekeeper serve` processes with the same ASR_REDIS_URL and
ASR_CLUSTER (leases of 2 s) behind Debian's nginx with the shipped replicas config
(deploy/nginx/gatekeeper-replicas.conf), in front of one chaos upstream with a limit of 3 for
all of them together. The usual seeded mix of client behaviours and per-request faults goes
through nginx, and the replicas suffer faults of their own, one after the other, each at a
seeded share of the run:

- phase A: a replica frozen with SIGSTOP while it holds a slot, for longer than its lease, then
  woken; later Redis killed (every lease forgotten) and, once every replica says degraded,
  started again empty on its port while tasks still run;
- phase B: a replica killed with SIGKILL while it holds a slot, and started again on its port.

Checked at the server: the chaos upstream's own count of what it runs (work it goes on with
after a gatekeeper hung up included) never exceeds the limit, except by work a frozen or killed
replica left running once its leases could have run out: a task that arrives over the limit
sooner than two thirds of a lease after the fault fails the run. In Redis, the leases of the
frozen or killed replica stay until their deadline on Redis's clock (SPEC: "and no sooner").
Every client gets one answer of the right kind (nginx's own 502 only for a client whose replica
was killed under it; coordination_unavailable refusals allowed); each replica's books
reconcile on their own and agree with its /metrics, its `lease lost` lines with its count of
lost leases; in phase A, where no books are lost, the replicas' books together reconcile with
what the clients saw and with what the upstream did; afterwards no live lease is left in Redis,
no process of the cluster is left, and the spool is empty.

The seed is printed first; `CHAOS_SEED=<seed>` replays a run, `CHAOS_TASKS` / `CHAOS_SECONDS`
make it a soak.
"""

import asyncio
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.chaos.chaos_upstream import ChaosUpstream, Served
from tests.chaos.driver import (
    ChaosConfig,
    ClientResult,
    EventLog,
    Monitor,
    Verdict,
    books_problems,
    get_json,
    run_clients,
    summary,
    verdict_text,
)
from tests.redis_server import redis_now_ms
from tests.replicas import Replica, ReplicaStack, processes_of, replica_stack
from tests.waiting import until

pytestmark = pytest.mark.chaos

_LEASE = 2.0
# A replica woken after a pause past its lease always says it lost the lease, also when its task
# ended before the first renewal answered (the release finds it gone: fixed after a60c08a,
# test_a_paused_replica_whose_task_ended_meanwhile_still_says_its_lease_was_lost).
_LOSS_ALWAYS_SAID = True
_PHASE_A = 0.6  # the share of the run before the kill
_MARGIN = 0.05  # seconds: timing slack where a bound is computed from a fault's moment
_REFUSALS = frozenset({"coordination_unavailable"})
_BUSY = ("uploading_tasks", "active_tasks", "held_tasks", "queued_tasks", "retrying_tasks")


def _config() -> ChaosConfig:
    # No upstream downtimes: the faults here are the replicas' and Redis's.
    return ChaosConfig.from_env(
        default_tasks=300, limit=3, downtime_every=None, clients=18, max_queue=6
    )


@dataclass
class Faults:
    """When each fault happened (time.monotonic()), and what went wrong staging it."""

    paused: Replica | None = None
    paused_at: float | None = None
    resumed_at: float | None = None
    redis_down_at: float | None = None
    degraded_at: float | None = None  # every replica said so
    redis_up_at: float | None = None
    running_at_restart: int | None = None  # tasks on the GPU as Redis came back empty
    recovered_at: float | None = None
    killed: Replica | None = None
    killed_at: float | None = None
    killed_leases: dict[str, float] = field(default_factory=dict)
    back_at: float | None = None
    problems: list[str] = field(default_factory=list)

    def renewals_stopped(self) -> list[float]:
        """The moments a replica stopped renewing its leases while it held some."""
        return [t for t in (self.paused_at, self.killed_at) if t is not None]


class Progress:
    """Counts a phase's finished tasks (run_clients' on_result) against its size or its time."""

    def __init__(self, cfg: ChaosConfig, tasks: int, seconds: float | None) -> None:
        self.cfg, self.tasks, self.seconds = cfg, tasks, seconds
        self.done = 0
        self.began = time.monotonic()

    def note(self, _result: ClientResult) -> None:
        self.done += 1

    def share(self) -> float:
        if self.seconds is not None:
            return (time.monotonic() - self.began) / self.seconds
        return self.done / max(1, self.tasks)

    async def reach(self, share: float) -> None:
        await until(lambda: self.share() >= share, within=3600, every=0.02)


async def _holding(stack: ReplicaStack, replica: Replica) -> dict[str, float]:
    """The live leases in Redis that name `replica`."""
    return {i: d for i, d in (await stack.live_leases()).items() if replica.holds(i)}


async def _freeze_holding(
    stack: ReplicaStack, replica: Replica, within: float = 10.0
) -> dict[str, float]:
    """SIGSTOP `replica` at a moment it holds a slot: a lease still live in Redis a moment after
    the stop (a call it sent just before has landed by then) is one the frozen process holds.
    Its leases (id -> deadline); none, and running, if that never happened within `within`."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await _holding(stack, replica):
            replica.pause()
            await asyncio.sleep(2 * _MARGIN)
            held = await _holding(stack, replica)
            if held:
                return held
            replica.resume()
        await asyncio.sleep(0.01)
    return {}


async def _kept_to_the_end(
    stack: ReplicaStack, name: str, leases: dict[str, float], faults: Faults
) -> None:
    """The leases of a replica that can no longer renew or release them (frozen or dead) stay
    in Redis until their deadline on Redis's clock: none is taken away sooner."""
    gone: set[str] = set()
    while True:
        now = await redis_now_ms(stack.admin)
        present = await stack.all_leases()
        for lease_id, deadline in leases.items():
            if lease_id not in present and now < deadline and lease_id not in gone:
                gone.add(lease_id)
                faults.problems.append(
                    f"lease {lease_id} of {name}, which could not renew it, left Redis "
                    f"{deadline - now:.0f} ms before its deadline"
                )
        if now >= max(leases.values()):
            return
        await asyncio.sleep(0.01)


async def _health(stack: ReplicaStack, session: aiohttp.ClientSession, status: str) -> bool:
    """Every replica's /health says `status` (degraded: 503, ok: 200)."""
    code = 503 if status == "degraded" else 200
    for replica in stack.replicas:
        answer, doc = await stack.health(session, replica)
        if (answer, doc.get("status")) != (code, status):
            return False
    return True


async def _phase_a_faults(
    stack: ReplicaStack,
    upstream: ChaosUpstream,
    progress: Progress,
    faults: Faults,
    rng: random.Random,
) -> None:
    """A replica frozen past its lease, then Redis killed and restarted (empty)."""
    await progress.reach(rng.uniform(0.15, 0.3))
    victim = rng.choice(stack.replicas)
    held = await _freeze_holding(stack, victim)
    if not held:
        faults.problems.append(f"{victim.name} never held a slot to be frozen with")
        return
    faults.paused, faults.paused_at = victim, time.monotonic()
    await _kept_to_the_end(stack, f"frozen {victim.name}", held, faults)
    wake = faults.paused_at + _LEASE + rng.uniform(0.3, 0.8)
    await asyncio.sleep(max(0.0, wake - time.monotonic()))
    victim.resume()
    faults.resumed_at = time.monotonic()

    await progress.reach(rng.uniform(0.55, 0.7))
    async with aiohttp.ClientSession() as session:
        stack.redis.kill()
        faults.redis_down_at = time.monotonic()
        try:
            await until(lambda: _health(stack, session, "degraded"), within=_LEASE + 2, every=0.05)
            faults.degraded_at = time.monotonic()
        except TimeoutError:
            faults.problems.append("Redis down: not every replica said degraded in /health")
        # Back soon, while tasks still run: they must be put back on the books before anything
        # new starts (a restarted Redis grants nothing for one lease).
        await asyncio.sleep(rng.uniform(0.0, 0.3))
        running = upstream.in_flight
        await asyncio.to_thread(stack.redis.start)
        faults.running_at_restart = running
        faults.redis_up_at = time.monotonic()
        try:
            await until(lambda: _health(stack, session, "ok"), within=_LEASE + 3, every=0.05)
            faults.recovered_at = time.monotonic()
        except TimeoutError:
            faults.problems.append("Redis back: not every replica said ok in /health again")


async def _phase_b_faults(
    stack: ReplicaStack, progress: Progress, faults: Faults, rng: random.Random
) -> None:
    """A replica killed while it holds a slot, and started again on its port."""
    await progress.reach(rng.uniform(0.2, 0.4))
    victim = rng.choice(stack.replicas)
    held = await _freeze_holding(stack, victim)  # then killed: it dies holding the slot
    if not held:
        faults.problems.append(f"{victim.name} never held a slot to be killed with")
        return
    faults.killed_leases = held
    await victim.kill()
    faults.killed, faults.killed_at = victim, time.monotonic()
    kept = asyncio.create_task(_kept_to_the_end(stack, f"killed {victim.name}", held, faults))
    await asyncio.sleep(rng.uniform(0.3, 0.8))
    await victim.start()
    faults.back_at = time.monotonic()
    await kept


def _overlaps(result: ClientResult, began: float | None, ended: float | None) -> bool:
    if began is None:
        return False
    end = time.monotonic() if ended is None else ended
    return result.started <= end + 0.2 and (result.ended or time.monotonic()) >= began - _MARGIN


def _upstream_problems(
    upstream: ChaosUpstream, limit: int, faults: Faults
) -> tuple[list[str], int]:
    """Each request that found the upstream over its limit, unless the excess is work that
    was running when a replica stopped renewing (frozen or killed) and the request came once
    that replica's leases could have run out: no sooner than two thirds of a lease later (its
    last renewal was at most a third of a lease before). Also how many were excused so."""
    served: list[Served] = [s for arrivals in upstream.by_id.values() for s in arrivals]
    stopped = faults.renewals_stopped()
    problems = []
    excused = 0
    for new in served:
        excess = new.in_flight_at_start - limit
        if excess <= 0:
            continue
        running = [
            s
            for s in served
            if s is not new and s.started <= new.started and (s.ended == 0 or s.ended > new.started)
        ]
        left_behind = [
            s
            for s in running
            if any(
                s.started < at and new.started >= at + 2 * _LEASE / 3 - _MARGIN for at in stopped
            )
        ]
        excused += excess <= len(left_behind)
        if excess > len(left_behind):
            problems.append(
                f"{new.in_flight_at_start} tasks at the upstream (limit {limit}) when "
                f"{new.request_id}#{new.arrival} arrived; of those running, "
                f"{len(left_behind)} were left behind by a frozen or killed replica: "
                + ", ".join(f"{s.request_id}#{s.arrival} ({s.step})" for s in running)
            )
    return problems, excused


def _merged(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several replicas' /stats as one gatekeeper's: counts added up, settings kept."""
    kept = {
        "max_concurrent", "max_queue", "settings", "cluster", "adaptive", "memory_gib",
        "mean_service_seconds", "queue_wait_seconds", "upstream_duration_seconds", "last_oom",
    }  # fmt: skip

    def merge(values: list[Any], key: str | None) -> Any:
        first = values[0]
        if key in kept:
            return first
        if isinstance(first, bool) or first is None or isinstance(first, str):
            return first
        if isinstance(first, int | float):
            return sum(v for v in values if v is not None)
        if isinstance(first, dict):
            return {k: merge([v.get(k) for v in values], k) for k in first}
        if isinstance(first, list) and all(len(v) == len(first) for v in values):
            return [merge(list(items), key) for items in zip(*values, strict=True)]
        return first

    merged: dict[str, Any] = merge(docs, None)
    return merged


# Gauges that are a setting of each replica, not a count of the cluster's.
_SETTINGS = (
    "asr_gatekeeper_max_concurrent",
    "asr_gatekeeper_max_queue",
    "asr_gatekeeper_upstream_max_concurrent",
)


def _merged_metrics(texts: list[str]) -> str:
    """Several replicas' /metrics as one gatekeeper's: every sample (a reader adds them up),
    the settings once."""
    rest = [
        "\n".join(line for line in text.splitlines() if not line.startswith(_SETTINGS))
        for text in texts[1:]
    ]
    return "\n".join([texts[0], *rest]) + "\n"


async def _at_rest(
    stack: ReplicaStack, upstream: ChaosUpstream, within: float = 20.0
) -> list[dict[str, Any]]:
    """Every replica's /stats once nothing is busy anywhere (the upstream's leftover work
    included), and no replica holds a lease."""
    async with aiohttp.ClientSession() as session:

        async def rested() -> bool:
            if upstream.in_flight:
                return False
            for replica in stack.replicas:
                doc = await stack.stats(session, replica)
                if any(doc[name] for name in _BUSY) or doc["cluster"]["leases_held"]:
                    return False
            return True

        try:
            await until(rested, within=within, every=0.05)
        except TimeoutError:
            docs = [await stack.stats(session, r) for r in stack.replicas]
            busy = [
                {n: d[n] for n in _BUSY} | {"leases": d["cluster"]["leases_held"]} for d in docs
            ]
            raise AssertionError(
                f"not at rest after {within} s: {busy}, upstream {upstream.in_flight}"
            ) from None
        return [await stack.stats(session, r) for r in stack.replicas]


async def _pages(stack: ReplicaStack) -> tuple[list[dict[str, Any]], list[str]]:
    async with aiohttp.ClientSession() as session:
        docs = [await get_json(session, f"{r.url}/stats") for r in stack.replicas]
        texts = [await get_json(session, f"{r.url}/metrics") for r in stack.replicas]
    return docs, texts


def _books(
    verdict: Verdict, stack: ReplicaStack, docs: list[dict[str, Any]], texts: list[str]
) -> None:
    """Each replica's books, on their own."""
    for replica, doc, text in zip(stack.replicas, docs, texts, strict=True):
        for problem in books_problems(doc, verdict.cfg):
            verdict.fail(None, f"{replica.name}: {problem}")
        before = len(verdict.violations)
        verdict.agree_with_metrics(doc, text)
        verdict.violations[before:] = [f"{replica.name}: {v}" for v in verdict.violations[before:]]
        held = doc["cluster"]["leases_held"]
        if held:
            verdict.fail(None, f"{replica.name} at rest holds {held} leases")
        said = sum("lease lost" in line for line in replica.this_life())
        if said != doc["cluster"]["leases_lost"]:
            verdict.fail(
                None,
                f"{replica.name}: {said} 'lease lost' lines, /stats leases_lost="
                f"{doc['cluster']['leases_lost']}",
            )


async def test_chaos_replicas(tmp_path: Path) -> None:
    """A random mix through nginx and three replicas that are frozen, killed and cut off from
    Redis in turn: the limit holds at the server, every client gets one answer, the books
    reconcile per replica and (no books lost) together, lost leases are said and counted, and
    nothing is left: no lease in Redis, no process, no spool file."""
    cfg = _config()
    print(f"\nchaos replicas seed {cfg.seed} (replay with CHAOS_SEED={cfg.seed})", flush=True)
    rng = random.Random(f"{cfg.seed}:replicas")
    spool = tmp_path / "spool"
    spool.mkdir()
    upstream = ChaosUpstream(limit=cfg.limit)
    await upstream.start()
    events = EventLog()
    faults = Faults()
    cluster = f"chaos-{secrets.token_hex(4)}"
    flags = [*cfg.gatekeeper_flags(str(spool)), "--health-interval", "0.2"]
    first = round(cfg.tasks * _PHASE_A)
    seconds_a = None if cfg.seconds is None else cfg.seconds * _PHASE_A
    seconds_b = None if cfg.seconds is None else cfg.seconds - seconds_a  # type: ignore[operator]
    monitors: list[Monitor] = []
    began = time.monotonic()
    try:
        async with replica_stack(
            tmp_path,
            upstream.url,
            cluster=cluster,
            lease=_LEASE,
            flags=flags,
            on_line=lambda _index, line: events.note_line(line),
        ) as stack:
            monitors = [Monitor(r.url, cfg, upstream, check_upstream=False) for r in stack.replicas]
            for monitor in monitors:
                monitor.start()

            # Phase A: frozen replica, Redis down and back.
            phase_a = Verdict(
                cfg,
                upstream,
                events,
                extra_refusals=_REFUSALS,
                frozen=lambda r: _overlaps(r, faults.paused_at, faults.resumed_at),
            )
            progress = Progress(cfg, first, seconds_a)
            staging = asyncio.create_task(_phase_a_faults(stack, upstream, progress, faults, rng))
            results = await run_clients(
                stack.url,
                cfg,
                upstream,
                range(first),
                deadline=None if seconds_a is None else progress.began + seconds_a,
                on_result=progress.note,
            )
            await staging
            docs_a = await _at_rest(stack, upstream)
            _, texts_a = await _pages(stack)
            upstream_a, excused_a = _upstream_problems(upstream, cfg.limit, faults)
            for result in results:
                phase_a.judge(result)
                upstream.forget(result.spec.request_id)
            # nginx buffers every body and sends it on with a Content-Length: a chunked body
            # too large is refused on its length, as one that said so (not a task).
            phase_a.tally["413_too_large_cl"] += phase_a.tally.pop("413_too_large_chunked", 0)
            phase_a.reconcile(
                _merged(docs_a), _merged_metrics(texts_a), admitted_refusals=False,
                log_complete=False,
            )  # fmt: skip
            _books(phase_a, stack, docs_a, texts_a)
            paused = faults.paused
            if paused is not None and _LOSS_ALWAYS_SAID:
                if not paused.matching("lease lost"):
                    phase_a.fail(None, f"{paused.name} was frozen past its lease: no 'lease lost'")
                doc = docs_a[stack.replicas.index(paused)]
                if doc["cluster"]["leases_lost"] < 1:
                    phase_a.fail(None, f"{paused.name} /stats counts no lost lease")

            # Phase B: a replica killed holding a slot, and restarted.
            phase_b = Verdict(
                cfg,
                upstream,
                events,
                extra_refusals=_REFUSALS,
                gateway_error_allowed=lambda r: _overlaps(r, faults.killed_at, faults.back_at),
            )
            progress = Progress(cfg, cfg.tasks - first, seconds_b)
            staging = asyncio.create_task(_phase_b_faults(stack, progress, faults, rng))
            results = await run_clients(
                stack.url,
                cfg,
                upstream,
                range(first, cfg.tasks),
                deadline=None if seconds_b is None else progress.began + seconds_b,
                on_result=progress.note,
            )
            await staging
            docs_b = await _at_rest(stack, upstream)
            _, texts_b = await _pages(stack)
            upstream_b, excused_b = _upstream_problems(upstream, cfg.limit, faults)
            for result in results:
                phase_b.judge(result)
                upstream.forget(result.spec.request_id)
            _books(phase_b, stack, docs_b, texts_b)
            for monitor in monitors:
                await monitor.stop()
            try:
                await until(_no_live_lease(stack), within=_LEASE + 1, every=0.05)
            except TimeoutError:
                phase_b.fail(None, f"live leases left in Redis: {await stack.live_leases()}")
            stack_log = stack.log_text()
    finally:
        for monitor in monitors:
            await monitor.stop()
        await upstream.stop()
    elapsed = time.monotonic() - began
    verdict = phase_a
    verdict.violations += [f"phase B: {v}" for v in phase_b.violations]
    for problem in (upstream_a + upstream_b)[:20]:
        verdict.fail(None, f"at the upstream: {problem}")
    for monitor in monitors:
        for problem in monitor.problems[:10]:
            verdict.fail(None, f"while running, {monitor.base}: {problem}")
    for problem in faults.problems:
        verdict.fail(None, f"faults: {problem}")
    for line in events.errors[:10]:
        verdict.fail(None, f"error logged: {line}")
    orphans = processes_of(cluster)
    if orphans:
        verdict.fail(None, f"processes of the cluster left: {orphans}")
    if list(spool.iterdir()):
        verdict.fail(None, f"spool directory not empty: {list(spool.iterdir())[:3]}")
    print(
        summary(
            {
                "mode": "replicas",
                "seed": cfg.seed,
                "tasks": phase_a.results + phase_b.results,
                "seconds": round(elapsed, 1),
                "limit": cfg.limit,
                "upstream_max_in_flight": upstream.max_in_flight,
                "upstream_orphans": upstream.orphans_total,
                "over_limit_left_by_a_stopped_replica": excused_a + excused_b,
                "faults": {
                    "paused": faults.paused and faults.paused.name,
                    "paused_s": _span(faults.paused_at, faults.resumed_at),
                    "redis_down_s": _span(faults.redis_down_at, faults.redis_up_at),
                    "running_at_redis_restart": faults.running_at_restart,
                    "paused_said_lease_lost": bool(
                        faults.paused and faults.paused.matching("lease lost")
                    ),
                    "all_degraded_after_s": _span(faults.redis_down_at, faults.degraded_at),
                    "recovered_after_s": _span(faults.redis_up_at, faults.recovered_at),
                    "killed": faults.killed and faults.killed.name,
                    "killed_leases": len(faults.killed_leases),
                    "down_s": _span(faults.killed_at, faults.back_at),
                },
                "phase_a": phase_a.figures()["results"],
                "phase_b": phase_b.figures()["results"],
                "per_replica": {
                    r.name: {k: d[k] for k in ("total_tasks", "succeeded_tasks")}
                    | {"leases_lost": d["cluster"]["leases_lost"]}
                    for r, d in zip(stack.replicas, docs_b, strict=True)
                },
            }
        ),
        flush=True,
    )
    if verdict.violations:
        print(stack_log)
    assert not verdict.violations, verdict_text(cfg, verdict, upstream)


def _no_live_lease(stack: ReplicaStack) -> Callable[[], Any]:
    async def none() -> bool:
        return not await stack.live_leases()

    return none


def _span(began: float | None, ended: float | None) -> float | None:
    return None if began is None or ended is None else round(ended - began, 2)
