"""A real redis-server for the cluster tests (tests/redis_server.py), replicas as processes.

redis-server comes from Debian's packages (`./scripts/setup --test-tools`); without it these
tests fail, saying what to install, as the end-to-end tests do: they never skip.
"""

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest

from tests import redis_server as _redis
from tests.e2e.tools import ROOT
from tests.redis_server import RedisServer

ReplicaProcess = Callable[..., AbstractAsyncContextManager[asyncio.subprocess.Process]]


@pytest.fixture(scope="session")
def redis_binary() -> str:
    """redis-server (Debian package `redis-server`)."""
    return _redis.redis_binary()


@pytest.fixture(scope="session")
def redis_server(
    redis_binary: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisServer]:
    """One redis-server the tests share; each test uses a cluster name of its own."""
    server = RedisServer(redis_binary, tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(redis_binary: str, tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server for one test alone, to kill or pause."""
    server = RedisServer(redis_binary, tmp_path)
    server.start()
    yield server
    server.stop()


# A replica as a process of its own: it takes one lease, says `held <id>`, then renews it until
# killed; `lost <id> <reason>` when it hears the lease is gone. Its clocks (time.time, and
# time.monotonic, which its event loop runs on) are `skew` seconds off.
_REPLICA = """
import asyncio, sys, time

url, cluster, server, limit, lease, skew = sys.argv[1:7]
_monotonic, _time = time.monotonic, time.time
time.monotonic = lambda: _monotonic() + float(skew)
time.time = lambda: _time() + float(skew)

from gatekeeper.cluster.leases import LeaseConfig, Leases


def lost(event):
    print("lost", event.lease.id, event.reason, flush=True)


async def main():
    config = LeaseConfig(
        url, cluster, lease_seconds=float(lease), timeout_seconds=float(lease) / 5
    )
    async with Leases(config, on_lost=lost) as leases:
        got = await leases.acquire(server, int(limit))
        print("held" if got else "refused", got.id if got else "-", flush=True)
        await asyncio.Event().wait()


asyncio.run(main())
"""


@asynccontextmanager
async def _replica_process(
    url: str, cluster: str, server: str, *, limit: int = 1, lease: float = 1.0, skew: float = 0.0
) -> AsyncIterator[asyncio.subprocess.Process]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASR_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _REPLICA, url, cluster, server, str(limit), str(lease), str(skew),
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.fixture
def replica_process() -> ReplicaProcess:
    """Runs a replica in a process of its own (killed at the end of the block)."""
    return _replica_process
