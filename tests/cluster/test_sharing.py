"""Replicas share more than slots (#17): a card's OOM record, adaptive limit and memory figures.

Two in-process gatekeepers of one cluster on real sockets, in front of the fake upstream, and a
real redis-server: what one learns, the other holds within a moment.
"""

import secrets
from typing import Any

import aiohttp
from aiohttp import web

from gatekeeper.app import PROXY
from gatekeeper.policy.memory import MemoryModel
from tests.cluster.conftest import RedisServer
from tests.conftest import GatekeeperFactory
from tests.fakes import FakeUpstream
from tests.waiting import until

_FAST = {"redis_lease": 1.5, "redis_timeout": 0.2}


async def _pair(
    upstream: FakeUpstream, start: GatekeeperFactory, redis: RedisServer, **settings: Any
) -> list[tuple[str, web.Application]]:
    cluster = f"s-{secrets.token_hex(4)}"
    return [
        await start(upstream.url, redis_url=redis.url, cluster=cluster, **_FAST, **settings)
        for _ in range(2)
    ]


async def _stats(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url + "/stats") as r:
        return await r.json()


async def test_an_oom_cuts_the_limit_of_every_replica(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory, redis_server: RedisServer
) -> None:
    (a, _), (b, _) = await _pair(
        upstream,
        start_gatekeeper,
        redis_server,
        adaptive=True,
        max_concurrent=4,
        initial_concurrent=4,
        retry_delay=0,
        retry_jitter=0,
    )
    async with aiohttp.ClientSession() as session:
        headers = {"X-Fake-Script": "oom,ok", "X-Request-ID": "one"}
        async with session.post(a + "/asr", data=b"x", headers=headers) as r:
            assert r.status == 200
        first = await _stats(session, a)
        cut = first["upstreams"][0]["adaptive"]["limit"]
        assert cut < 4
        assert first["oom_errors"] == 1

        async def b_follows() -> bool:
            stats = await _stats(session, b)
            return bool(
                stats["upstreams"][0]["adaptive"]["limit"] == cut and stats["last_oom"] is not None
            )

        await until(b_follows, every=0.01)
        stats = await _stats(session, b)
        assert stats["oom_errors"] == 0  # its own count: the OOM happened on the other one
        adaptive = stats["upstreams"][0]["adaptive"]
        assert adaptive["changes"][-1]["reason"] == "shared"
        # Remembered for its ceiling too, at the card's concurrency then.
        assert [oom["in_flight"] for oom in adaptive["recent_ooms"]] == [1]
        assert stats["max_concurrent"] == cut


async def test_memory_figures_learned_by_one_replica_reach_the_other(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory, redis_server: RedisServer
) -> None:
    (_, app_a), (_, app_b) = await _pair(
        upstream, start_gatekeeper, redis_server, adaptive=True, gpu_memory_gib=20
    )
    learned = MemoryModel(3.5, 0.5)
    # What the learner's change does on replica A (Limiter._new_model's caller shares it).
    app_a[PROXY].limiter.share_model(0, learned)
    gate_b = app_b[PROXY].gate
    await until(lambda: gate_b.memory_model(0) == learned)
    view = app_b[PROXY].limiter.memory_view(0)
    assert view is not None
    assert view["task_memory_gib"] == 3.5


async def test_a_replica_started_later_catches_up_from_the_records(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory, redis_server: RedisServer
) -> None:
    cluster = f"s-{secrets.token_hex(4)}"
    settings: dict[str, Any] = {
        "redis_url": redis_server.url,
        "cluster": cluster,
        "adaptive": True,
        "max_concurrent": 4,
        "initial_concurrent": 4,
        **_FAST,
    }
    _, first = await start_gatekeeper(upstream.url, **settings)
    first[PROXY].limiter.share_limit(0, 2)
    # Nobody heard the message: the record is read by the next renewal round.
    _, late = await start_gatekeeper(upstream.url, **settings)
    gate = late[PROXY].gate
    await until(lambda: gate.counts().servers[0].limit == 2)
