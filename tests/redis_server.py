"""A real redis-server for tests, and what Redis itself says about a cluster's leases.

redis-server comes from Debian's packages (`./scripts/setup --test-tools`); without it a test
fails, saying what to install, as the end-to-end tests do: they never skip.

The lease readers below spell the keys out (`gatekeeper:{<cluster>}:leases:<host:port>`, scored
by deadline in milliseconds on Redis's clock) instead of asking the product where they are, so
a test reads what Redis holds, not what the gatekeeper believes.
"""

import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import cast

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.e2e.tools import require_tool
from tests.processes import free_port

__all__ = [
    "RedisServer",
    "admin_client",
    "all_leases",
    "lease_key",
    "live_leases",
    "quiet_key",
    "quiet_until_ms",
    "redis_binary",
    "redis_now_ms",
]


def redis_binary() -> str:
    """redis-server (Debian package `redis-server`), or a test failure saying so."""
    return require_tool("redis-server", "redis-server")


class RedisServer:
    """One redis-server on a loopback port, no persistence: started, killed (SIGKILL), paused
    (SIGSTOP) and started again on the same port, as the tests need."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, within: float = 10.0) -> None:
        """Start it (again, on the same port) and return once it answers PING."""
        assert self.process is None or self.process.poll() is not None, "already running"
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.workdir),
                "--logfile", str(self.workdir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + within
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (self.workdir / "redis.log").read_text(errors="replace")[-2000:]
                self.stop()
                pytest.fail(f"redis-server did not start on port {self.port}:\n{log}")
            time.sleep(0.005)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: every connection drops, every lease is forgotten."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (Redis "slow")."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # no data to keep; works on a paused process too
            self.process.wait()


def admin_client(url: str) -> Redis:
    """A client that reads what Redis holds, and reconnects once on a reset connection (a
    pooled one from before a restart of the server)."""
    return Redis.from_url(
        url,
        decode_responses=True,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    )


def lease_key(cluster: str, server: str) -> str:
    """The sorted set of `server`'s leases in `cluster` (SPEC "Replicas"; `server` is the
    host:port of the Whisper server's URL)."""
    return f"gatekeeper:{{{cluster}}}:leases:{server}"


async def redis_now_ms(client: Redis) -> int:
    """Milliseconds on Redis's own clock."""
    seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def all_leases(client: Redis, cluster: str, server: str) -> dict[str, float]:
    """Every member of the set, live or expired: lease id -> deadline (ms, Redis's clock)."""
    scores = cast(
        list[tuple[str, float]],
        await client.zrange(lease_key(cluster, server), 0, -1, withscores=True),
    )
    return {str(lease_id): float(score) for lease_id, score in scores}


async def live_leases(client: Redis, cluster: str, server: str) -> dict[str, float]:
    """The leases Redis counts on `server` now (deadline still ahead on its clock)."""
    now = await redis_now_ms(client)
    leases = await all_leases(client, cluster, server)
    return {lease_id: deadline for lease_id, deadline in leases.items() if deadline > now}


def quiet_key(cluster: str) -> str:
    """The marker of the quiet time after Redis started empty: until when (ms, Redis's clock)
    no slot is granted (one lease, while replicas put running tasks back on the books)."""
    return f"gatekeeper:{{{cluster}}}:quiet-until"


async def quiet_until_ms(client: Redis, cluster: str) -> float | None:
    """The quiet time's end (ms, Redis's clock); None before any replica has spoken to this
    Redis since it started."""
    value = await client.get(quiet_key(cluster))
    return None if value is None else float(value)
