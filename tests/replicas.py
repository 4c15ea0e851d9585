"""Gatekeeper replicas as real processes behind real nginx, sharing limits through a real Redis.

`replica_stack` starts the topology of SPEC "Replicas" (issue #17) around a Whisper server the
test runs itself (the simulator or the chaos upstream, in process, so it counts what reaches
it): a redis-server on a free port, `count` processes of `python -m gatekeeper serve` with the
same ASR_REDIS_URL and ASR_CLUSTER (ready once their new Redis's quiet time is over), and
Debian's nginx with the shipped `deploy/nginx/gatekeeper-replicas.conf` balancing them (one
`server` line per replica, the Docker-only resolver dropped; nothing else changed).

Each replica can be killed (SIGKILL), paused (SIGSTOP), resumed and started again on its port,
and may run with its clocks skewed (`time.time` and `time.monotonic` shifted by a wrapper before
the gatekeeper is imported). Its log is read as it is written. Everything is stopped when the
block ends, on failure too; `processes_of(cluster)` finds any process still carrying the
cluster's name in its environment (an orphan).
"""

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from redis.asyncio import Redis

from tests.e2e.nginx_harness import UPSTREAM_SERVER, Nginx, nginx_process
from tests.e2e.tools import ROOT
from tests.processes import free_port, wait_for_port
from tests.redis_server import (
    RedisServer,
    admin_client,
    all_leases,
    live_leases,
    quiet_key,
    quiet_until_ms,
    redis_binary,
    redis_now_ms,
)

__all__ = ["HOURS", "Replica", "ReplicaStack", "processes_of", "replica_stack"]

HOURS = 3600.0

# `python -c` this, then the skew, then gatekeeper's own arguments: the replica's clocks (wall
# and monotonic, which its event loop runs on) are `skew` seconds off from the start.
_SKEWED = """
import runpy, sys, time
skew = float(sys.argv.pop(1))
_time, _monotonic = time.time, time.monotonic
time.time = lambda: _time() + skew
time.monotonic = lambda: _monotonic() + skew
runpy.run_module("gatekeeper", run_name="__main__", alter_sys=True)
"""


@dataclass
class Replica:
    """One `gatekeeper serve` process on a fixed loopback port for all its lives."""

    name: str
    port: int
    args: list[str]
    env: dict[str, str]
    skew: float = 0.0
    lines: list[str] = field(default_factory=list)
    on_line: Callable[[str], None] | None = None
    process: asyncio.subprocess.Process | None = None
    pids: list[int] = field(default_factory=list)  # every life's
    _reader: asyncio.Task[None] | None = None
    _grew: asyncio.Event = field(default_factory=asyncio.Event)
    _life_began: int = 0  # where this life's lines begin

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def holds(self, lease_id: str) -> bool:
        """Whether a lease id names this life of the replica (`<host>-<pid>-<tag>/<n>`)."""
        replica = lease_id.rpartition("/")[0]
        return self.process is not None and f"-{self.pid}-" in replica

    async def start(self, within: float = 30.0) -> None:
        """Start it (again, on its port) and return once it listens."""
        assert not self.running, f"{self.name} is running"
        command = ["-m", "gatekeeper"] if not self.skew else ["-c", _SKEWED, str(self.skew)]
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, *command, *self.args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
            env=self.env,
        )  # fmt: skip
        self.pids.append(self.process.pid)
        self._life_began = len(self.lines)
        self.lines.append(f"--- {self.name} life {len(self.pids)} (pid {self.process.pid})")
        self._reader = asyncio.create_task(self._read(self.process.stderr))
        try:
            await wait_for_port(self.port, self.process, within=within)
        except (RuntimeError, TimeoutError) as exc:
            await self.kill()
            log = "\n".join(self.lines[-40:])
            raise AssertionError(f"replica {self.name} did not start ({exc}):\n{log}") from None

    async def _read(self, stream: asyncio.StreamReader | None) -> None:
        assert stream is not None
        while line := await stream.readline():
            text = line.decode("utf-8", errors="replace").rstrip("\n")
            self.lines.append(text)
            if self.on_line is not None:
                self.on_line(text)
            self._grew.set()

    def pause(self) -> None:
        """SIGSTOP: the process keeps its sockets and does nothing at all."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    async def kill(self) -> None:
        """SIGKILL (a stopped process dies too) and wait for it and its log."""
        if self.process is None:
            return
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()
        if self._reader is not None:
            await self._reader  # the pipe closes with the process
            self._reader = None

    def this_life(self) -> list[str]:
        """The log lines of the current (or last) life."""
        return self.lines[self._life_began :]

    def matching(self, *needles: str) -> list[str]:
        """Log lines (every life) that contain every one of `needles`."""
        return [line for line in self.lines if all(n in line for n in needles)]

    async def wait_for_line(self, *needles: str, within: float = 5.0) -> str:
        """The first log line containing every one of `needles`, waiting for it."""
        async with asyncio.timeout(within):
            while True:
                found = self.matching(*needles)
                if found:
                    return found[0]
                self._grew.clear()
                await self._grew.wait()


@dataclass
class ReplicaStack:
    """nginx → `count` replicas → the Whisper server, the replicas sharing one Redis."""

    redis: RedisServer
    admin: Redis
    cluster: str
    server: str  # the Whisper server as the leases name it: host:port
    replicas: list[Replica]
    nginx: Nginx
    lease: float

    @property
    def url(self) -> str:
        """Where clients send tasks: nginx."""
        return self.nginx.url

    async def live_leases(self) -> dict[str, float]:
        return await live_leases(self.admin, self.cluster, self.server)

    async def all_leases(self) -> dict[str, float]:
        return await all_leases(self.admin, self.cluster, self.server)

    async def past_quiet_time(self, within: float | None = None) -> None:
        """Return once the cluster grants slots: a Redis that starts empty (new, or restarted
        without its data) grants none for one lease, while replicas put running tasks back on
        the books."""
        async with asyncio.timeout(within or self.lease + 5):
            while True:
                quiet = await quiet_until_ms(self.admin, self.cluster)
                if quiet is not None and quiet <= await redis_now_ms(self.admin):
                    return
                await asyncio.sleep(0.02)

    def holder(self, lease_id: str) -> Replica | None:
        """The replica (current life) a lease id names."""
        return next((r for r in self.replicas if r.running and r.holds(lease_id)), None)

    async def stats(self, session: aiohttp.ClientSession, replica: Replica) -> dict[str, Any]:
        async with session.get(f"{replica.url}/stats") as response:
            assert response.status == 200, f"{replica.name} /stats -> {response.status}"
            doc: dict[str, Any] = await response.json()
            return doc

    async def metrics(self, session: aiohttp.ClientSession, replica: Replica) -> str:
        async with session.get(f"{replica.url}/metrics") as response:
            assert response.status == 200, f"{replica.name} /metrics -> {response.status}"
            return await response.text()

    async def health(
        self, session: aiohttp.ClientSession, replica: Replica
    ) -> tuple[int, dict[str, Any]]:
        async with session.get(f"{replica.url}/health") as response:
            doc: dict[str, Any] = await response.json(content_type=None)
            return response.status, doc

    def log_text(self) -> str:
        """Every replica's log, for a failure message."""
        return "\n".join(line for r in self.replicas for line in r.lines[-60:])


REPLICAS_CONF = ROOT / "deploy" / "nginx" / "gatekeeper-replicas.conf"
# What the shipped replicas config says for Docker that a test on loopback cannot use: the
# embedded DNS server, and names to re-resolve (its comments: "Outside Docker ... drop
# `resolve` and the resolver").
_DOCKER_ONLY = ("resolver 127.0.0.11 valid=10s ipv6=off;\n", "resolver_timeout 5s;\n")
_SHIPPED_SERVERS = "    server gatekeeper-a:8000 resolve;\n    server gatekeeper-b:8000 resolve;\n"


def _nginx_source(directory: Path, ports: Sequence[int]) -> Path:
    """The shipped replicas config (deploy/nginx/gatekeeper-replicas.conf) with one `server`
    line per replica: the first as the stock file's (which the harness points at a port), the
    others after it; and without what only works in Docker."""
    text = REPLICAS_CONF.read_text(encoding="utf-8")
    for old in (*_DOCKER_ONLY, _SHIPPED_SERVERS):
        count = text.count(old)
        assert count == 1, f"{REPLICAS_CONF.name}: expected {old!r} once, found it {count} times"
        text = text.replace(old, "")
    servers = f"    {UPSTREAM_SERVER}\n" + "".join(
        f"    server 127.0.0.1:{p};\n" for p in ports[1:]
    )
    marker = "    least_conn;\n"
    assert text.count(marker) == 1, f"{REPLICAS_CONF.name}: expected {marker!r} once"
    path = directory / "gatekeeper-replicas.conf"
    path.write_text(text.replace(marker, marker + servers), encoding="utf-8")
    return path


def _environment(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASR_")}
    env.update({"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "ASR_LOG_LEVEL": "INFO"})
    env.update(extra)
    return env


@asynccontextmanager
async def replica_stack(
    directory: Path,
    upstream_url: str,
    *,
    cluster: str,
    count: int = 3,
    lease: float = 2.0,
    redis_timeout: float = 0.5,
    flags: Sequence[str] = (),
    skews: Sequence[float] = (),
    on_line: Callable[[int, str], None] | None = None,
    warm: bool = True,
) -> AsyncIterator[ReplicaStack]:
    """Start Redis, `count` replicas of `cluster` in front of `upstream_url` (each with
    `flags`; replica i's clocks `skews[i]` seconds off), and nginx in front of them; `directory`
    (which exists) keeps Redis's and nginx's files.

    `warm`: Redis is one the cluster has used before (its marker of the quiet time after an
    empty start lies in the past), so a test starts in the steady state instead of waiting out
    the one lease a new Redis grants nothing; a restart within the test still has its quiet
    time."""
    redis = RedisServer(redis_binary(), directory)
    redis.start()
    host_port = upstream_url.removeprefix("http://").rstrip("/")
    env = _environment(
        {
            "ASR_REDIS_URL": redis.url,
            "ASR_CLUSTER": cluster,
            "ASR_REDIS_LEASE": str(lease),
            "ASR_REDIS_TIMEOUT": str(redis_timeout),
        }
    )
    replicas: list[Replica] = []
    for index in range(count):
        port = free_port()
        args = [
            "serve", "--upstream-url", upstream_url, "--host", "127.0.0.1", "--port", str(port),
            "--env-file", os.devnull, *flags,
        ]  # fmt: skip
        replica = Replica(
            f"r{index}",
            port,
            args,
            env,
            skew=skews[index] if index < len(skews) else 0.0,
            on_line=None if on_line is None else _bind(on_line, index),
        )
        replicas.append(replica)
    admin = admin_client(redis.url)
    try:
        if warm:
            await admin.set(quiet_key(cluster), await redis_now_ms(admin))
        async with AsyncExitStack() as stack:
            await asyncio.gather(*(replica.start() for replica in replicas))
            source = _nginx_source(directory, [r.port for r in replicas])
            nginx = await stack.enter_async_context(
                nginx_process(replicas[0].url, directory / "nginx", source=source)
            )
            ready = ReplicaStack(redis, admin, cluster, host_port, replicas, nginx, lease)
            await ready.past_quiet_time()
            yield ready
    finally:
        for replica in replicas:
            await replica.kill()
        await admin.aclose()
        redis.stop()


def _bind(on_line: Callable[[int, str], None], index: int) -> Callable[[str], None]:
    return lambda line: on_line(index, line)


def processes_of(cluster: str) -> list[str]:
    """Processes (pid and command line) whose environment names `cluster`: after a stack has
    ended there must be none (an orphan replica, or anything one started)."""
    marker = f"ASR_CLUSTER={cluster}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as file:
                environ = file.read().split(b"\0")
            with open(f"/proc/{entry}/cmdline", "rb") as file:
                command = file.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if marker in environ:
            found.append(f"{entry}: {command[:200]}")
    return found
