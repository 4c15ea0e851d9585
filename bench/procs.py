"""Starting and stopping the processes a scenario measures, on free loopback ports.

Every process is real: the gatekeeper (`python -m gatekeeper serve`, on uvloop or asyncio),
the simulator (`python -m gatekeeper sim`), the fast upstream (`python -m bench.upstream`),
HAProxy and nginx with configurations generated into the run's temporary directory. Logs go to
files there (never to a pipe nobody reads, which would stall a process that logs a lot).

Each process starts in its own session, so its process group holds it and everything it forks
(nginx's workers). Ending a process ends its group: nginx's master first gets SIGTERM and tells
its workers to exit (a master killed outright leaves them running, owned by init); SIGKILL
follows after a bounded wait, and then whatever is still alive in the group is killed too.
"""

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

__all__ = [
    "REPO",
    "HaproxyServer",
    "Proc",
    "Procs",
    "ToolMissing",
    "end_group",
    "find_tool",
    "free_port",
    "group_members",
    "peak_rss_mib",
    "redis_url",
]

REPO = Path(__file__).resolve().parents[1]
_STARTUP = 30.0
_STOP_WITHIN = 5.0  # seconds a process gets to end on its stop signal before SIGKILL
_GROUP_GONE_WITHIN = 5.0  # seconds the group's last members get to die after SIGKILL
_DEBIAN_PACKAGES = {
    "haproxy": "haproxy",
    "nginx": "nginx",
    "wrk": "wrk",
    "py-spy": "py-spy",
    "redis-server": "redis-server",
}


class ToolMissing(RuntimeError):
    """An external program the benchmark needs is not installed."""

    def __init__(self, tool: str) -> None:
        package = _DEBIAN_PACKAGES.get(tool, tool)
        how = (
            f"pip install {package}"
            if tool == "py-spy"
            else f"apt-get install {package} (Debian package {package}; "
            "./scripts/setup --test-tools installs it)"
        )
        super().__init__(f"{tool} is not installed: {how}")
        self.tool = tool


def find_tool(name: str) -> str:
    """The path of an external program (sbin directories included), or ToolMissing."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")
    if found is None:
        venv_bin = Path(sys.executable).parent / name
        if venv_bin.exists():
            return str(venv_bin)
        raise ToolMissing(name)
    return found


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _ms(seconds: float) -> str:
    """A duration for HAProxy's configuration, in whole milliseconds (at least 1)."""
    return f"{max(1, round(seconds * 1000))}ms"


def log_file(path: Path) -> IO[bytes]:
    return open(path, "wb")  # the caller closes it


def peak_rss_mib(pid: int) -> float | None:
    """VmHWM (peak resident set) of a live process, in MiB."""
    kib = _status_kib(pid, "VmHWM")
    return None if kib is None else round(kib / 1024, 1)


def group_members(pgid: int) -> list[int]:
    """The live processes (zombies left out) of process group `pgid`, read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text(encoding="ascii", errors="replace")
        except OSError:  # it ended while we looked
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = stat.rpartition(")")[2].split()
        if len(fields) >= 3 and fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


async def end_group(pgid: int, within: float = _GROUP_GONE_WITHIN) -> None:
    """SIGKILL whatever is still alive in process group `pgid` and wait (bounded) until it died.

    The last resort after a process ended: nothing it forked may outlive the run.
    """
    deadline = time.monotonic() + within
    while group_members(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            return  # stuck in the kernel (state D): nothing more a signal can do
        await asyncio.sleep(0.02)


@dataclass(frozen=True, slots=True)
class HaproxyServer:
    """One server of an HAProxy backend: where it listens and its admission limits."""

    port: int
    maxconn: int
    maxqueue: int


@dataclass
class Proc:
    """One started process and where it listens."""

    name: str
    process: asyncio.subprocess.Process
    port: int
    log: Path
    extra_pids: list[int] = field(default_factory=list)
    # Sent first when the process is ended, before SIGKILL: nginx's master must be asked, so
    # that it ends its workers; the others are killed at once.
    stop_signal: signal.Signals | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def pgid(self) -> int:
        """Its process group: it leads its own session, so the group is numbered by its pid."""
        return self.process.pid

    def peak_rss_mib(self) -> float | None:
        return peak_rss_mib(self.pid)

    def rss_mib(self) -> float | None:
        kib = _status_kib(self.pid, "VmRSS")
        return None if kib is None else round(kib / 1024, 1)

    def log_text(self) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""


async def wait_for_port(port: int, proc: Proc, within: float = _STARTUP) -> None:
    """Wait until `port` accepts connections; fail with the log's tail if the process exits."""
    deadline = time.monotonic() + within
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if proc.process.returncode is not None:
                tail = proc.log_text()[-2000:]
                msg = f"{proc.name} exited with {proc.process.returncode} at start:\n{tail}"
                raise RuntimeError(msg) from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"{proc.name} did not listen on port {port} in time") from None
            await asyncio.sleep(0.05)


class Procs:
    """The processes of one benchmark run; `aclose()` stops whatever is still running."""

    def __init__(self, workdir: Path, *, gatekeeper_path: str | None = None) -> None:
        self.workdir = workdir
        self.gatekeeper_path = gatekeeper_path
        self._running: list[Proc] = []
        self._count = 0

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ASR_")}
        paths = [str(REPO)]
        if self.gatekeeper_path:
            paths.insert(0, self.gatekeeper_path)
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    async def _spawn(
        self,
        name: str,
        argv: list[str],
        port: int,
        *,
        stdout_to_log: bool = True,
        stop_signal: signal.Signals | None = None,
    ) -> Proc:
        self._count += 1
        log = self.workdir / f"{self._count:02d}-{name}.log"
        with log_file(log) as sink:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=sink if stdout_to_log else asyncio.subprocess.DEVNULL,
                stderr=sink,
                cwd=self.workdir,
                env=self._env(),
                # A Ctrl-C at the terminal reaches only the bench, and the process and all it
                # forks share a process group that ending it empties (see `_end`).
                start_new_session=True,
            )
        proc = Proc(name, process, port, log, stop_signal=stop_signal)
        self._running.append(proc)
        try:
            await wait_for_port(port, proc)
        except BaseException:
            await self.stop(proc)
            raise
        return proc

    async def _end(self, proc: Proc, first: signal.Signals | None, within: float) -> None:
        """`first` (if any) and a bounded wait, then SIGKILL; then the rest of its group."""
        if proc in self._running:
            self._running.remove(proc)
        if first is not None and proc.process.returncode is None:
            try:
                proc.process.send_signal(first)
                async with asyncio.timeout(within):
                    await proc.process.wait()
            except (TimeoutError, ProcessLookupError):
                pass
        if proc.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.process.kill()
            await proc.process.wait()
        await end_group(proc.pgid)

    async def stop(self, proc: Proc) -> None:
        """SIGTERM (or its stop signal), then SIGKILL after a moment; nothing of it survives."""
        await self._end(proc, proc.stop_signal or signal.SIGTERM, 3.0)

    async def kill(self, proc: Proc) -> None:
        """SIGKILL at once (a gatekeeper with held tasks would drain for its grace period).

        A process with a stop signal (nginx) gets that first and a bounded wait; whatever is
        left of its process group afterwards is killed too, so no orphan survives the run.
        """
        await self._end(proc, proc.stop_signal, _STOP_WITHIN)

    async def aclose(self) -> None:
        for proc in list(reversed(self._running)):
            await self.kill(proc)

    # -- the processes --------------------------------------------------------------------

    async def upstream(self, *, delay: float = 0.001, uvloop: bool = True) -> Proc:
        port = free_port()
        argv = [sys.executable, "-m", "bench.upstream", "--port", str(port), "--delay", str(delay)]
        if uvloop:
            argv.append("--uvloop")
        return await self._spawn("upstream", argv, port)

    async def aiohttp_floor(self, upstream_url: str) -> Proc:
        port = free_port()
        argv = [sys.executable, "-m", "bench.aiohttp_floor", "--port", str(port)]
        return await self._spawn("aiohttp-floor", [*argv, "--upstream", upstream_url], port)

    async def sim(self, *args: str) -> Proc:
        port = free_port()
        argv = [sys.executable, "-m", "gatekeeper", "sim", "--host", "127.0.0.1"]
        argv += ["--port", str(port), *args]
        return await self._spawn("sim", argv, port)

    async def gatekeeper(self, upstream_url: str, settings: Mapping[str, object]) -> Proc:
        port = free_port()
        argv = [sys.executable, "-m", "gatekeeper", "serve", "--upstream-url", upstream_url]
        argv += ["--host", "127.0.0.1", "--port", str(port), "--env-file", os.devnull]
        for name, value in settings.items():
            argv += [f"--{name.replace('_', '-')}", str(value)]
        loop = settings.get("event_loop")
        return await self._spawn("gatekeeper" if loop is None else f"gatekeeper-{loop}", argv, port)

    async def haproxy(
        self,
        upstream_port: int,
        *,
        maxconn: int,
        maxqueue: int,
        timeout_queue: float,
        timeout_server: float,
        log_requests: bool = False,
    ) -> Proc:
        """HAProxy (Debian's) with the admission config equivalent to the gatekeeper's."""
        return await self.haproxy_pool(
            [HaproxyServer(upstream_port, maxconn, maxqueue)],
            queue_total=maxqueue,
            timeout_queue=timeout_queue,
            timeout_server=timeout_server,
            log_requests=log_requests,
        )

    async def haproxy_pool(
        self,
        servers: Sequence[HaproxyServer],
        *,
        queue_total: int,
        timeout_queue: float,
        timeout_server: float,
        balance: str | None = None,
        log_requests: bool = False,
    ) -> Proc:
        """HAProxy in front of one or several servers, each with its own `maxconn` and
        `maxqueue`; a request is refused with 503 once `queue_total` wait in the backend (its
        own queue and the servers' together). `balance` (e.g. `leastconn`) picks the server;
        unset, HAProxy's default (roundrobin)."""
        port = free_port()
        log_global = "    log stdout format raw local0\n" if log_requests else ""
        log_defaults = (
            "    log global\n"
            "    unique-id-format %[req.hdr(x-request-id)]\n"
            '    log-format "%ID %Tw %ST %Ta"\n'
            if log_requests
            else ""
        )
        refuse = (
            "http-request return status 503 content-type application/json hdr Retry-After 10"
            f' string \'{{"reason": "queue_full"}}\' if {{ queue(whisper) ge {queue_total} }}'
        )
        balance_line = f"    balance {balance}\n" if balance else ""
        server_lines = "".join(
            f"    server s{i} 127.0.0.1:{s.port} maxconn {s.maxconn} maxqueue {s.maxqueue}\n"
            for i, s in enumerate(servers, 1)
        )
        config = f"""\
global
    maxconn 9000
    nbthread 1
{log_global}
defaults
    mode http
{log_defaults}    option http-keep-alive
    timeout connect 5s
    timeout client 600s
    timeout http-request 60s
    timeout server {_ms(timeout_server)}
    timeout queue {_ms(timeout_queue)}

frontend fe
    bind 127.0.0.1:{port}
    maxconn 9000
    monitor-uri /health
    http-request use-service prometheus-exporter if {{ path /metrics }}
    # `maxqueue` alone does not refuse (a request no server can take waits in the backend's
    # own queue, which has no bound): refuse explicitly once the queue holds {queue_total}.
    {refuse}
    default_backend whisper

backend whisper
{balance_line}{server_lines}"""
        path = self.workdir / f"haproxy-{port}.cfg"
        path.write_text(config)
        argv = [find_tool("haproxy"), "-db", "-f", str(path)]
        return await self._spawn("haproxy", argv, port)

    async def nginx(self, upstream_port: int) -> Proc:
        """nginx, plain proxy_pass (no admission), Debian's defaults otherwise.

        Request bodies are buffered to a temporary file before they go upstream (nginx's default
        `proxy_request_buffering on`), store-and-forward like the gatekeeper's spool.
        """
        return await self.nginx_pool([upstream_port])

    async def nginx_pool(self, upstream_ports: Sequence[int]) -> Proc:
        """nginx as `nginx()`, balancing over several servers round robin (its default), as a
        team runs two or more gatekeepers behind it. A 503 is passed to the client, never
        retried on another server (`proxy_next_upstream` is left at `error timeout`)."""
        port = free_port()
        prefix = self.workdir / f"nginx-{port}"
        self.workdir.chmod(0o711)  # nginx workers (nobody) must reach their temp directories
        for sub in ("", "body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (prefix / sub).mkdir(parents=True, exist_ok=True)
            (prefix / sub).chmod(0o777)  # workers run as nobody when the master is root
        servers = "".join(f"        server 127.0.0.1:{p};\n" for p in upstream_ports)
        config = f"""\
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    client_max_body_size 0;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream whisper {{
{servers}        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://whisper;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout 600s;
        }}
    }}
}}
"""
        path = prefix / "nginx.conf"
        path.write_text(config)
        argv = [find_tool("nginx"), "-e", "stderr", "-p", str(prefix), "-c", str(path)]
        # SIGTERM is nginx's fast shutdown: the master ends its workers, then itself. Killed
        # outright, the master would leave its worker running (tests/e2e/nginx_harness.py too).
        return await self._spawn("nginx", argv, port, stop_signal=signal.SIGTERM)

    async def redis_server(self) -> Proc:
        """redis-server (Debian's) on a free loopback port: no persistence, logs to its file.

        The replicas' coordination; `redis_url(proc)` is what ASR_REDIS_URL gets."""
        port = free_port()
        workdir = self.workdir / f"redis-{port}"
        workdir.mkdir(parents=True, exist_ok=True)
        argv = [
            find_tool("redis-server"),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(workdir),
            "--logfile", "",
        ]  # fmt: skip
        return await self._spawn("redis", argv, port)


def redis_url(proc: Proc, db: int = 0) -> str:
    """ASR_REDIS_URL of a redis-server started by `Procs.redis_server`."""
    return f"redis://127.0.0.1:{proc.port}/{db}"
