"""Replicas wired into the gate (#17): gatekeepers sharing one Whisper server through Redis.

In-process gatekeepers on real sockets in front of the fake upstream, a real redis-server.
The upstream counts what it really runs at once: the limit is checked there, for all replicas
together.
"""

import asyncio
import itertools
import secrets
from collections.abc import Awaitable
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from tests.cluster.conftest import RedisServer
from tests.conftest import GatekeeperFactory
from tests.fakes import FakeUpstream
from tests.waiting import until

_LEASE = {"redis_lease": 1.5, "redis_timeout": 0.2}


def _cluster() -> str:
    return f"t-{secrets.token_hex(4)}"


async def _leases(redis: RedisServer, cluster: str, server: str) -> int:
    client = Redis.from_url(redis.url)
    try:
        return int(await client.zcard(f"gatekeeper:{{{cluster}}}:leases:{server}"))
    finally:
        await client.aclose()


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def _post(session: aiohttp.ClientSession, url: str, hold: str = "hold") -> tuple[int, Any]:
    async with session.post(url + "/asr", data=b"x" * 100, headers={"X-Fake-Hold": hold}) as r:
        return r.status, await r.json()


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as r:
        return r.status, await r.json()


async def test_three_replicas_share_one_limit(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory, redis_server: RedisServer
) -> None:
    cluster = _cluster()
    urls = [
        (
            await start_gatekeeper(
                upstream.url,
                max_concurrent=2,
                max_queue=10,
                redis_url=redis_server.url,
                cluster=cluster,
                **_LEASE,
            )
        )[0]
        for _ in range(3)
    ]
    server = upstream.url.removeprefix("http://")
    async with aiohttp.ClientSession() as session:
        tasks = [
            asyncio.create_task(_post(session, url))
            for url, _ in zip(itertools.cycle(urls), range(12), strict=False)
        ]

        async def queued() -> int:
            total = 0
            for url in urls:
                _, stats = await _get(session, url + "/stats")
                total += stats["queued_tasks"]
            return total

        # Every replica has its own queue; together they run 2.
        await until(lambda: upstream.active == 2)
        await until(lambda: _equals(queued(), 10), every=0.01)
        assert upstream.active == 2
        assert await _leases(redis_server, cluster, server) == 2
        _status, stats = await _get(session, urls[0] + "/stats")
        view = stats["cluster"]
        assert view["name"] == cluster
        assert view["redis"] == "up"
        assert sum(sum(r["slots"].values()) for r in view["replicas"]) == 2
        upstream.release()
        results = await asyncio.gather(*tasks)
        assert [status for status, _ in results] == [200] * 12
        assert upstream.max_active == 2
        await until(lambda: not upstream.active)
        for url in urls:
            _, stats = await _get(session, url + "/stats")
            assert stats["active_tasks"] == 0
            assert stats["cluster"]["leases_held"] == 0
        assert await _leases(redis_server, cluster, server) == 0
        async with session.get(urls[1] + "/metrics") as r:
            text = await r.text()
        assert "asr_gatekeeper_cluster_redis_up 1.0" in text
        assert "asr_gatekeeper_cluster_acquire_seconds_count" in text


async def test_redis_down_refuses_what_it_cannot_prove_and_recovers(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory, own_redis: RedisServer
) -> None:
    url, _ = await start_gatekeeper(
        upstream.url,
        max_concurrent=1,
        max_queue=1,
        redis_url=own_redis.url,
        cluster=_cluster(),
        **_LEASE,
    )
    async with aiohttp.ClientSession() as session:
        first = asyncio.create_task(_post(session, url, "first"))
        await until(lambda: upstream.active == 1)
        own_redis.kill()
        # Not provable: the queued task waits (no slot starts), the next one is refused.
        second = asyncio.create_task(_post(session, url, "second"))

        async def refused() -> tuple[int, Any]:
            while True:
                status, body = await _post(session, url, "never")
                if body.get("reason") == "coordination_unavailable":
                    return status, body
                assert status == 503, body
                assert body["reason"] == "queue_full", body
                await asyncio.sleep(0.02)

        status, body = await asyncio.wait_for(refused(), 5)
        assert status == 503
        assert body["error"] == "服务繁忙"
        status, health = await _get(session, url + "/health")
        assert status == 503
        assert health["status"] == "degraded"
        assert health["cluster"]["redis"] == "down"
        upstream.release("first")
        assert (await first)[0] == 200
        await asyncio.sleep(0.3)
        assert upstream.active == 0  # the queued one did not start without a lease
        own_redis.start()
        await until(lambda: upstream.active == 1)  # recovered by itself
        upstream.release("second")
        assert (await second)[0] == 200
        status, health = await _get(session, url + "/health")
        assert status == 200
        assert health["cluster"]["redis"] == "up"


async def test_a_lost_lease_is_counted_and_put_back_on_the_books(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory, redis_server: RedisServer
) -> None:
    cluster = _cluster()
    server = upstream.url.removeprefix("http://")
    url, _ = await start_gatekeeper(
        upstream.url, max_concurrent=1, redis_url=redis_server.url, cluster=cluster, **_LEASE
    )
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(_post(session, url))
        await until(lambda: upstream.active == 1)
        # Redis forgets the lease (as after a pause past the lease, or a restart).
        client = Redis.from_url(redis_server.url)
        await client.delete(f"gatekeeper:{{{cluster}}}:leases:{server}")
        await client.aclose()

        async def lost() -> int:
            _, stats = await _get(session, url + "/stats")
            return int(stats["cluster"]["leases_lost"])

        await until(lambda: _equals(lost(), 1), every=0.01)
        # The task still runs on the GPU: it is on the cluster's books again.
        await until(lambda: _equals(_leases(redis_server, cluster, server), 1), every=0.01)
        upstream.release()
        assert (await task)[0] == 200
        await until(lambda: _equals(_leases(redis_server, cluster, server), 0), every=0.01)


@pytest.mark.parametrize("clustered", [False, True])
async def test_metrics_only_with_redis(
    upstream: FakeUpstream,
    start_gatekeeper: GatekeeperFactory,
    redis_server: RedisServer,
    clustered: bool,
) -> None:
    extra: dict[str, Any] = (
        {"redis_url": redis_server.url, "cluster": _cluster(), **_LEASE} if clustered else {}
    )
    url, _ = await start_gatekeeper(upstream.url, **extra)
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/metrics") as r:
            text = await r.text()
        _, stats = await _get(session, url + "/stats")
    assert ("asr_gatekeeper_cluster_leases_held" in text) is clustered
    assert (stats["cluster"] is not None) is clustered


async def test_the_head_that_waited_longest_goes_first_in_whichever_replica(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory, redis_server: RedisServer
) -> None:
    """FIFO across replicas: when A's task ends, B's head (queued before A's next one) starts
    first, though A hears of the free slot first (it released it)."""
    cluster = _cluster()
    a, b = [
        (
            await start_gatekeeper(
                upstream.url,
                max_concurrent=1,
                redis_url=redis_server.url,
                cluster=cluster,
                **_LEASE,
            )
        )[0]
        for _ in range(2)
    ]
    async with aiohttp.ClientSession() as session:
        order = []

        async def task(url: str, name: str) -> None:
            status, _ = await _post(session, url, name)
            assert status == 200
            order.append(name)

        server = upstream.url.removeprefix("http://")
        tasks = [asyncio.create_task(task(a, "a1"))]
        await until(lambda: upstream.active == 1)
        for url, name in ((b, "b1"), (a, "a2"), (b, "b2"), (a, "a3")):
            tasks.append(asyncio.create_task(task(url, name)))
            queued = len(tasks) - 1
            await until(lambda n=queued: _equals(_queued(session, a, b), n), every=0.01)
            # Each replica's head has its place in Redis (b1, then a2) before the next comes.
            heads = min(queued, 2)
            await until(lambda n=heads: _equals(_places(redis_server, cluster, server), n))
        for k, name in enumerate(("a1", "b1", "a2", "b2", "a3")):
            await until(lambda k=k: len(upstream.seen) > k)
            started = [s.headers["X-Fake-Hold"] for s in upstream.seen]
            assert started[k] == name, started
            upstream.release(name)
        await asyncio.gather(*tasks)
    started = [s.headers["X-Fake-Hold"] for s in upstream.seen]
    assert started == ["a1", "b1", "a2", "b2", "a3"]
    assert upstream.max_active == 1


async def _places(redis: RedisServer, cluster: str, server: str) -> int:
    """How many replicas' heads wait for `server` with a place in Redis."""
    client = Redis.from_url(redis.url)
    try:
        return int(await client.hlen(f"gatekeeper:{{{cluster}}}:heads:{server}"))
    finally:
        await client.aclose()


async def _queued(session: aiohttp.ClientSession, *urls: str) -> int:
    total = 0
    for url in urls:
        _, stats = await _get(session, url + "/stats")
        total += stats["queued_tasks"]
    return total


async def test_redis_restarted_empty_never_lets_a_running_task_be_forgotten(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory, own_redis: RedisServer
) -> None:
    """Redis killed and started again without its data, while replica A's task runs and B's
    waits: B must not start (the card would run two at limit 1) — nothing is granted for one
    lease, while A puts its running task back on the books; then B runs after A."""
    cluster = _cluster()
    a, b = [
        (
            await start_gatekeeper(
                upstream.url, max_concurrent=1, redis_url=own_redis.url, cluster=cluster, **_LEASE
            )
        )[0]
        for _ in range(2)
    ]
    server = upstream.url.removeprefix("http://")
    async with aiohttp.ClientSession() as session:
        first = asyncio.create_task(_post(session, a, "first"))
        await until(lambda: upstream.active == 1)
        second = asyncio.create_task(_post(session, b, "second"))
        await until(lambda: _equals(_queued(session, b), 1), every=0.01)
        own_redis.kill()
        own_redis.start()
        # A's lease is back on the books, as a lost one put back; B still waits.
        await until(lambda: _equals(_leases(own_redis, cluster, server), 1), every=0.01)
        _, stats = await _get(session, a + "/stats")
        assert stats["cluster"]["leases_lost"] == 1
        await asyncio.sleep(2 * _LEASE["redis_lease"])  # past the quiet time
        assert upstream.active == 1
        assert upstream.max_active == 1
        upstream.release("first")
        assert (await first)[0] == 200
        await until(lambda: upstream.active == 1)  # now B's
        upstream.release("second")
        assert (await second)[0] == 200
    assert upstream.max_active == 1
