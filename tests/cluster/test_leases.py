"""Slots shared by replicas through a real Redis: the lease mechanism (gatekeeper/cluster).

Replicas are `Leases` instances in this process (each its own connections, clock and id) or,
where a replica must die or freeze, real processes killed with SIGKILL or paused with SIGSTOP.
Leases last 1 s here, so "after one lease and no sooner" is measured on Redis's own clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from gatekeeper.clock import SystemClock
from gatekeeper.cluster.leases import (
    CoordinationUnavailable,
    Keys,
    Lease,
    LeaseConfig,
    Leases,
    LostLease,
)
from tests.processes import read_until
from tests.waiting import until

if TYPE_CHECKING:
    from tests.cluster.conftest import RedisServer, ReplicaProcess

LEASE = 1.0
HOURS = 3600.0


class OffsetClock(SystemClock):
    """The real clock, `offset` seconds off: a replica whose clocks are wrong by hours."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def monotonic(self) -> float:
        return super().monotonic() + self.offset

    def wall(self) -> float:
        return super().wall() + self.offset

    async def wait_until(self, deadline: float) -> None:
        await super().wait_until(deadline - self.offset)

    def timeout_at(self, deadline: float | None) -> AbstractAsyncContextManager[object]:
        return super().timeout_at(None if deadline is None else deadline - self.offset)


def _config(url: str, cluster: str, **overrides: float) -> LeaseConfig:
    values = {"lease_seconds": LEASE, "timeout_seconds": 0.2, "poll_seconds": 0.2} | overrides
    return LeaseConfig(url, cluster, **values)


@asynccontextmanager
async def _replicas(
    url: str,
    cluster: str,
    count: int,
    *,
    clocks: list[SystemClock] | None = None,
    on_lost: Callable[[LostLease], None] | None = None,
    **config: float,
) -> AsyncIterator[list[Leases]]:
    """`count` started replicas of one cluster, closed afterwards (`on_lost`: the first's).
    The cluster is an established one (see `_established`)."""
    await _established(url, cluster)
    async with AsyncExitStack() as stack:
        replicas = [
            await stack.enter_async_context(
                Leases(
                    _config(url, cluster, **config),
                    clock=clocks[i] if clocks else None,
                    rng=random.Random(i),
                    on_lost=on_lost if i == 0 else None,
                )
            )
            for i in range(count)
        ]
        yield replicas


async def _established(url: str, cluster: str) -> None:
    """Mark the cluster as one Redis has known for a while: no quiet time (Redis that starts
    empty grants nothing for one lease; a new cluster looks the same to it). The tests of the
    quiet time itself restart Redis afterwards."""
    async with _admin(url) as client:
        await client.set(Keys(cluster).quiet, 0, nx=True)


@asynccontextmanager
async def _admin(url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def _redis_now(admin: Redis) -> int:
    """Milliseconds on Redis's clock."""
    seconds, micros = await admin.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def _live(admin: Redis, cluster: str, server: str) -> dict[str, float]:
    """The leases Redis counts on `server` now: id -> deadline (ms, Redis's clock)."""
    now = await _redis_now(admin)
    scores = await admin.zrange(Keys(cluster).leases(server), 0, -1, withscores=True)
    return {lease_id: score for lease_id, score in scores if score > now}


@pytest.fixture
def cluster() -> str:
    """A cluster name no other test uses."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def admin(redis_server: RedisServer) -> AsyncIterator[Redis]:
    async with _admin(redis_server.url) as client:
        yield client


# -- the limit ---------------------------------------------------------------------------------


async def test_the_limit_holds_across_replicas_under_random_load(
    redis_server: RedisServer, admin: Redis, cluster: str
) -> None:
    """Three replicas, 24 workers taking and giving back slots on two servers at random: never
    more than a server's limit at once, counted by the holders and by Redis, and all done."""
    limits = {"gpu0:9000": 2, "gpu1:9000": 3}
    rng = random.Random(17)
    in_use = dict.fromkeys(limits, 0)
    peak = dict.fromkeys(limits, 0)
    done = 0

    async with _replicas(redis_server.url, cluster, 3, poll_seconds=0.05) as replicas:

        async def worker(leases: Leases, seed: int) -> None:
            nonlocal done
            mine = random.Random(seed)
            for _ in range(5):
                server = mine.choice(list(limits))
                wanted = time.monotonic()  # a head's wait: first come, first served
                while True:
                    mark = leases.epoch
                    lease = await leases.acquire(server, limits[server], since=wanted)
                    if lease is not None:
                        break
                    await leases.changed(mark)
                in_use[server] += 1
                peak[server] = max(peak[server], in_use[server])
                assert in_use[server] <= limits[server]
                await asyncio.sleep(mine.uniform(0, 0.01))
                in_use[server] -= 1
                assert await leases.release(lease)
                done += 1

        finished = asyncio.Event()

        async def watch() -> None:
            # Stopped by an event, not cancelled: on Python 3.11 redis-py can lose a
            # cancellation that lands as a command completes (asyncio.wait_for).
            while not finished.is_set():
                for server, limit in limits.items():
                    assert len(await _live(admin, cluster, server)) <= limit
                await asyncio.sleep(0.002)

        watcher = asyncio.create_task(watch())
        try:
            async with asyncio.timeout(10):
                await asyncio.gather(
                    *(worker(replicas[i % 3], rng.randrange(1 << 30)) for i in range(24))
                )
        finally:
            finished.set()
            await watcher  # and say what it found, if it found too many
        assert done == 24 * 5
        assert peak == limits  # the limits were reached, not just respected
        for server in limits:
            assert await _live(admin, cluster, server) == {}
        assert sum(r.counters().acquired for r in replicas) == 120
        assert all(r.held() == () for r in replicas)


# -- leases expire, renewals keep them ---------------------------------------------------------


async def test_a_killed_replicas_slot_frees_after_one_lease_and_no_sooner(
    redis_server: RedisServer, admin: Redis, cluster: str, replica_process: ReplicaProcess
) -> None:
    """A replica (its clock 7 h fast) killed with SIGKILL: its slot stays taken until its lease
    runs out on Redis's clock, then a waiter (clock 5 h slow) gets it, woken by polling since
    no release message is ever sent."""
    server = "gpu0:9000"
    url = redis_server.url
    await _established(url, cluster)
    async with (
        replica_process(url, cluster, server, lease=LEASE, skew=7 * HOURS) as proc,
        _replicas(url, cluster, 1, clocks=[OffsetClock(-5 * HOURS)], poll_seconds=0.1) as (b,),
    ):
        assert proc.stdout is not None
        line = await read_until(proc.stdout, "held ")
        crashed = line.split()[-1]
        assert await b.acquire(server, 1) is None

        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        killed = time.monotonic()
        deadline = (await _live(admin, cluster, server))[crashed]
        # Its last renewal was a moment (a third of a lease, at most) before the kill.
        assert 0 < deadline - await _redis_now(admin) <= LEASE * 1000

        woken_by: list[bool] = []
        async with asyncio.timeout(3):
            while True:
                mark = b.epoch
                before = await _redis_now(admin)
                lease = await b.acquire(server, 1)
                after = await _redis_now(admin)
                if lease is not None:
                    assert after >= deadline, "the slot was free before the lease ran out"
                    break
                assert before < deadline, "the slot was still taken after the lease ran out"
                woken_by.append(await b.changed(mark))
        assert time.monotonic() - killed <= LEASE + 0.8
        assert woken_by
        assert woken_by[-1] is False  # the poll, not a message, found it free
        assert set(await _live(admin, cluster, server)) == {lease.id}


async def test_renewals_keep_a_lease_for_as_long_as_it_is_held(
    redis_server: RedisServer, admin: Redis, cluster: str
) -> None:
    """A lease renewed for 2.2 leases stays held (and the slot taken), and no loss is
    reported; when released, a waiting replica is woken by the release message at once."""
    server = "gpu0:9000"
    lost: list[LostLease] = []
    async with _replicas(redis_server.url, cluster, 2, on_lost=lost.append, poll_seconds=5.0) as (
        a,
        b,
    ):
        lease = await a.acquire(server, 1)
        assert lease is not None
        started = time.monotonic()
        while time.monotonic() - started < 2.2 * LEASE:
            assert await b.acquire(server, 1) is None
            await asyncio.sleep(0.1)
        assert a.held() == (lease,)
        assert set(await _live(admin, cluster, server)) == {lease.id}
        assert lost == []
        assert a.counters().renewals >= 6

        mark = b.epoch
        waiter = asyncio.create_task(b.changed(mark))
        await asyncio.sleep(0.05)
        released = time.monotonic()
        assert await a.release(lease)
        assert await waiter is True  # the message, well before the 2.5-5 s poll
        assert time.monotonic() - released < 0.5
        assert await b.acquire(server, 1) is not None


async def test_a_replica_paused_longer_than_its_lease_hears_it_lost(
    redis_server: RedisServer, admin: Redis, cluster: str, replica_process: ReplicaProcess
) -> None:
    """SIGSTOP a replica holding a slot for longer than its lease: another replica gets the
    slot; woken with SIGCONT, the paused one reports its lease lost and does not revive it."""
    server = "gpu0:9000"
    url = redis_server.url
    await _established(url, cluster)
    async with (
        replica_process(url, cluster, server, lease=LEASE) as proc,
        _replicas(url, cluster, 1, poll_seconds=0.1) as (b,),
    ):
        assert proc.stdout is not None
        paused = (await read_until(proc.stdout, "held ")).split()[-1]
        proc.send_signal(signal.SIGSTOP)
        try:
            async with asyncio.timeout(3):
                while (lease := await b.acquire(server, 1)) is None:
                    await b.changed()
        finally:
            proc.send_signal(signal.SIGCONT)
        said = await read_until(proc.stdout, "lost ", within=3)
        assert said.splitlines()[-1].split() == ["lost", paused, "expired"]
        await asyncio.sleep(0.4)  # a renewal round of the woken replica
        assert set(await _live(admin, cluster, server)) == {lease.id}


async def test_a_lease_unconfirmed_for_a_whole_lease_is_lost_when_redis_is_gone(
    own_redis: RedisServer,
) -> None:
    """Redis killed: acquiring fails at once with CoordinationUnavailable; a held lease is
    reported lost (unconfirmed) one lease after its last renewal; Redis restarted on the same
    port: acquiring, the cluster view and the release messages work again by themselves."""
    server = "gpu0:9000"
    lost: list[tuple[float, LostLease]] = []

    def note(event: LostLease) -> None:
        lost.append((time.monotonic(), event))

    async with _replicas(own_redis.url, "restart", 2, on_lost=note, poll_seconds=0.3) as (a, b):
        held = await a.acquire(server, 2)
        assert held is not None
        own_redis.kill()
        killed = time.monotonic()

        with pytest.raises(CoordinationUnavailable) as refused:
            await a.acquire(server, 2)
        assert time.monotonic() - killed < 0.5
        assert refused.value.operation == "acquire"
        assert a.counters().redis_up is False

        await until(lambda: lost != [], within=3 * LEASE)
        [(when, event)] = lost
        assert event == LostLease(held, "unconfirmed")
        # Lost no later than one lease (plus a renewal's timeout) after the kill, and never
        # before a lease has passed since its last renewal (at most a third of a lease earlier).
        assert 0.4 * LEASE <= when - killed <= LEASE + 0.5
        assert a.held() == ()

        subscribed = a.epoch
        own_redis.start()
        async with asyncio.timeout(3):
            while True:
                with contextlib.suppress(CoordinationUnavailable):
                    if (mine := await b.acquire(server, 2)) is not None:
                        break
                await asyncio.sleep(0.05)
        await until(lambda: a.counters().redis_up is True, within=2)
        view = await b.cluster_view()
        assert view.taken(server) >= 1
        await until(lambda: a.epoch > subscribed, within=3)  # a subscribed again
        mark = a.epoch
        waiter = asyncio.create_task(a.changed(mark))
        await asyncio.sleep(0.02)
        assert await b.release(mine)
        assert await waiter is True


async def test_a_lease_released_overdue_while_redis_is_gone_counts_as_lost(
    own_redis: RedisServer, cluster: str
) -> None:
    """A replica frozen past its lease (no renewal ran) whose task ends as it wakes, while
    Redis cannot be reached: Redis may have let the lease go while the task held it, and nobody
    can say otherwise now, so it counts as lost (unconfirmed) — not silently forgotten."""
    clock = OffsetClock(0.0)
    lost: list[LostLease] = []
    async with _replicas(own_redis.url, cluster, 1, clocks=[clock], on_lost=lost.append) as (a,):
        lease = await a.acquire("gpu0:9000", 1)
        assert lease is not None
        own_redis.kill()
        clock.offset += 2 * LEASE  # woken: the renewal loop has not run since
        assert await a.release(lease)
        assert [(event.lease.id, event.reason) for event in lost] == [(lease.id, "unconfirmed")]
        assert a.counters().lost == 1


async def test_a_stalled_redis_is_refused_promptly_and_leaks_nothing(
    own_redis: RedisServer,
) -> None:
    """Redis paused (SIGSTOP, as a stalled server): acquiring fails after the timeout, never
    guessing; when Redis wakes and runs the abandoned acquisition late, the slot it took is
    removed (or refused by the tombstone): only the lease someone holds is counted."""
    server = "gpu0:9000"
    async with (
        _admin(own_redis.url) as admin,
        _replicas(own_redis.url, "stall", 2) as (a, b),
    ):
        held = await b.acquire(server, 2)
        assert held is not None
        own_redis.pause()
        try:
            started = time.monotonic()
            with pytest.raises(CoordinationUnavailable):
                await a.acquire(server, 2)
            assert 0.15 <= time.monotonic() - started < 0.8
        finally:
            own_redis.resume()

        async def only_the_held_lease_counts() -> bool:
            return set(await _live(admin, "stall", server)) == {held.id}

        await until(only_the_held_lease_counts, within=0.8, every=0.02)
        assert a.held() == ()
        # b renewed through the stall (0.3 s is less than a lease): it still holds its slot.
        assert b.held() == (held,)


# -- releases ----------------------------------------------------------------------------------


async def test_a_release_counts_once_and_never_frees_another_lease(
    redis_server: RedisServer, admin: Redis, cluster: str
) -> None:
    """Releasing twice is harmless, and neither a second release nor a release of a lease this
    replica does not hold removes anyone else's."""
    server = "gpu0:9000"
    async with _replicas(redis_server.url, cluster, 2) as (a, b):
        first = await a.acquire(server, 2)
        assert first is not None
        assert await a.release(first) is True
        other = await b.acquire(server, 2)
        assert other is not None
        assert await a.release(first) is False
        assert await a.release(Lease(other.id, server)) is False
        assert await b.acquire(server, 2) is not None
        assert len(await _live(admin, cluster, server)) == 2
        assert other.id in await _live(admin, cluster, server)
        assert a.counters().released == 1


async def test_the_cluster_view_names_each_replica_and_its_slots(
    redis_server: RedisServer, cluster: str
) -> None:
    """The view lists every live replica, holding slots or not, with its slots per server."""
    async with _replicas(redis_server.url, cluster, 3) as (a, b, c):
        for leases, server in ((a, "gpu0:9000"), (a, "gpu1:9000"), (b, "gpu0:9000")):
            assert await leases.acquire(server, 4) is not None
        await until(lambda: c.counters().renewals > 0)  # c's heartbeat is in
        view = await c.cluster_view()
        assert view.as_dict() == {
            "replicas": sorted(
                [
                    {
                        "replica": a.replica,
                        "alive": True,
                        "slots": {"gpu0:9000": 1, "gpu1:9000": 1},
                    },
                    {"replica": b.replica, "alive": True, "slots": {"gpu0:9000": 1}},
                    {"replica": c.replica, "alive": True, "slots": {}},
                ],
                key=lambda r: str(r["replica"]),
            )
        }
        assert view.taken("gpu0:9000") == 2


# -- clocks ------------------------------------------------------------------------------------


async def test_skewed_replica_clocks_change_nothing(
    redis_server: RedisServer, admin: Redis, cluster: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replicas whose clocks are 6 h slow, right and 9 h fast (and time.time 3 h off for all):
    one limit, and every lease's deadline is one lease from now on Redis's clock, acquired and
    renewed alike."""
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3 * HOURS)
    server = "gpu0:9000"
    clocks = [OffsetClock(-6 * HOURS), OffsetClock(0.0), OffsetClock(9 * HOURS)]
    async with _replicas(redis_server.url, cluster, 3, clocks=clocks) as replicas:
        granted = [await leases.acquire(server, 2) for leases in replicas]
        assert sum(lease is not None for lease in granted) == 2

        async def deadlines_are_one_lease_ahead() -> None:
            now = await _redis_now(admin)
            live = await _live(admin, cluster, server)
            assert len(live) == 2
            for deadline in live.values():
                assert LEASE * 1000 * 0.5 < deadline - now <= LEASE * 1000

        await deadlines_are_one_lease_ahead()
        renewed = sum(r.counters().renewals for r in replicas)
        await until(lambda: sum(r.counters().renewals for r in replicas) >= renewed + 6, within=3)
        await deadlines_are_one_lease_ahead()
        assert [len(r.held()) for r in replicas] == [lease is not None for lease in granted]


# -- cancellation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    replica: int
    keep: bool  # keep the lease (else hold it a moment and release it)
    # Cancelled after this many turns of the event loop (a Redis round trip takes a few), or
    # this many seconds; None: never cancelled.
    cancel_after: int | float | None
    hold: float


_plans = st.builds(
    _Plan,
    replica=st.integers(0, 1),
    keep=st.booleans(),
    cancel_after=st.none() | st.integers(0, 40) | st.floats(0, 0.004),
    hold=st.floats(0, 0.002),
)


async def _cancel_at_random(url: str, limit: int, plans: list[_Plan]) -> None:
    cluster = f"cancel-{uuid.uuid4().hex[:12]}"
    server = "gpu0:9000"
    kept: list[Lease] = []
    async with (
        _admin(url) as admin,
        _replicas(url, cluster, 2, lease_seconds=10.0, timeout_seconds=0.5) as replicas,
    ):

        async def run(plan: _Plan) -> None:
            leases = replicas[plan.replica]
            lease = await leases.acquire(server, limit)
            if lease is None:
                return
            if plan.keep:
                kept.append(lease)
                return
            try:
                await asyncio.sleep(plan.hold)
            finally:
                await leases.release(lease)

        async def cancel(task: asyncio.Task[None], after: int | float) -> None:
            if isinstance(after, int):
                for _ in range(after):
                    await asyncio.sleep(0)
            else:
                await asyncio.sleep(after)
            task.cancel()

        tasks = [asyncio.create_task(run(plan)) for plan in plans]
        cancellers = [
            asyncio.create_task(cancel(task, plan.cancel_after))
            for task, plan in zip(tasks, plans, strict=True)
            if plan.cancel_after is not None
        ]
        await asyncio.gather(*tasks, *cancellers, return_exceptions=True)

        expected = {lease.id for lease in kept}
        assert len(expected) <= limit

        async def known_to_their_holders() -> bool:
            held = {lease.id for leases in replicas for lease in leases.held()}
            return held == expected and set(await _live(admin, cluster, server)) == expected

        await until(known_to_their_holders, within=1, every=0.01)


# No shrinking: a failing example waits a second for the books to settle, and shrinking would
# replay hundreds of them; the examples are small already.
@settings(max_examples=40, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(limit=st.integers(1, 3), plans=st.lists(_plans, min_size=1, max_size=6))
def test_cancelling_acquire_or_release_anywhere_leaks_no_lease(
    redis_server: RedisServer, limit: int, plans: list[_Plan]
) -> None:
    """Callers cancelled at random moments of acquiring, holding or releasing: afterwards every
    lease Redis counts is one a caller got and kept, and the replica knows it holds it."""
    asyncio.run(_cancel_at_random(redis_server.url, limit, plans))


# -- wake-ups ----------------------------------------------------------------------------------


async def test_a_slot_freed_without_a_message_is_found_by_polling(
    redis_server: RedisServer, admin: Redis, cluster: str
) -> None:
    """A slot freed while its release message is lost (here: removed behind the replicas'
    backs, no PUBLISH): the waiter is not woken by a message, and still finds the slot free
    within its poll interval."""
    server = "gpu0:9000"
    async with _replicas(redis_server.url, cluster, 2, poll_seconds=0.4) as (a, b):
        await until(lambda: b.epoch > 0)  # subscribed: nothing else will wake it
        lease = await a.acquire(server, 1)
        assert lease is not None
        mark = b.epoch
        assert await b.acquire(server, 1) is None
        waiter = asyncio.create_task(b.changed(mark))
        await admin.zrem(Keys(cluster).leases(server), lease.id)
        started = time.monotonic()
        assert await waiter is False  # no message: the poll interval ran out
        assert 0.2 - 0.05 <= time.monotonic() - started <= 0.4 + 0.1
        assert await b.acquire(server, 1) is not None


async def test_a_dropped_subscription_is_made_again_and_wakes_the_waiters(
    redis_server: RedisServer, admin: Redis, cluster: str
) -> None:
    """The replicas' subscriptions killed (CLIENT KILL TYPE pubsub): each subscribes again by
    itself and wakes its waiters at once, since a release may have gone unheard meanwhile; the
    next release is heard again."""
    server = "gpu0:9000"
    channel = Keys(cluster).channel

    async def both_subscribed() -> bool:
        [(_, count)] = await admin.pubsub_numsub(channel)
        return int(count) == 2

    async with _replicas(redis_server.url, cluster, 2, poll_seconds=5.0) as (a, b):
        await until(lambda: a.epoch > 0 and b.epoch > 0)  # both subscribed
        lease = await a.acquire(server, 1)
        assert lease is not None
        waiter = asyncio.create_task(b.changed(b.epoch))
        await asyncio.sleep(0.02)
        assert await admin.client_kill_filter(_type="pubsub") >= 2
        async with asyncio.timeout(1):
            assert await waiter is True  # well before the 2.5-5 s poll
        await until(both_subscribed, within=2)
        mark = b.epoch
        waiter = asyncio.create_task(b.changed(mark))
        await asyncio.sleep(0.02)
        assert await a.release(lease)
        async with asyncio.timeout(1):
            assert await waiter is True
