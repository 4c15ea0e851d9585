"""A real redis-server for the cluster tests, and replicas as real processes.

redis-server comes from Debian's packages (`./scripts/setup --test-tools`); without it these
tests fail, saying what to install, as the end-to-end tests do: they never skip.
"""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest

from tests.e2e.tools import ROOT, require_tool
from tests.processes import free_port

ReplicaProcess = Callable[..., AbstractAsyncContextManager[asyncio.subprocess.Process]]


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


@pytest.fixture(scope="session")
def redis_binary() -> str:
    """redis-server (Debian package `redis-server`)."""
    return require_tool("redis-server", "redis-server")


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
