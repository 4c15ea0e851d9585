"""Real processes for tests: `gatekeeper serve` and `gatekeeper sim` on free loopback ports."""

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

__all__ = ["free_port", "gatekeeper_process", "read_until", "sim_process", "wait_for_port"]


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_for_port(
    port: int, proc: asyncio.subprocess.Process | None = None, within: float = 30.0
) -> None:
    """Wait until something accepts TCP connections on `port` (fail if `proc` exits first)."""
    async with asyncio.timeout(within):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                return
            except OSError:
                if proc is not None and proc.returncode is not None:
                    msg = f"process exited with {proc.returncode} during start-up"
                    raise RuntimeError(msg) from None
                await asyncio.sleep(0.01)  # a refused connect is cheap: poll often


async def read_until(stream: asyncio.StreamReader, text: str, within: float = 10.0) -> str:
    """Read a process's output line by line until a line contains `text`; return all read.

    The event the test waits for is the log line itself; the caller keeps what was read, so
    a later look at the whole log still sees it.
    """
    read: list[str] = []
    async with asyncio.timeout(within):
        while line := (await stream.readline()).decode():
            read.append(line)
            if text in line:
                return "".join(read)
    msg = f"the output ended without a line containing {text!r}:\n{''.join(read)}"
    raise AssertionError(msg)


def _clean_env(extra: dict[str, str] | None) -> dict[str, str]:
    """This environment without ASR_* variables: a test's settings are its flags alone."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASR_")}
    env.update(extra or {})
    return env


@asynccontextmanager
async def _running(
    port: int, *command: str, stdout: int | None = None, env: dict[str, str] | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run `python -m gatekeeper <command>` until it listens on `port`; kill it afterwards."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gatekeeper", *command,
        stdout=stdout,
        stderr=asyncio.subprocess.PIPE,
        env=_clean_env(env),
    )  # fmt: skip
    try:
        await wait_for_port(port, proc)
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@asynccontextmanager
async def gatekeeper_process(
    upstream_url: str, *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """Run `gatekeeper serve` on a free port until it listens; its stderr is piped.

    `env` adds variables to a copy of this environment stripped of ASR_* ones.
    """
    port = free_port()
    async with _running(
        port,
        "serve", "--upstream-url", upstream_url, "--host", "127.0.0.1", "--port", str(port),
        "--env-file", os.devnull, *args,
        env=env,
    ) as proc:  # fmt: skip
        yield proc, f"http://127.0.0.1:{port}"


@asynccontextmanager
async def sim_process(
    *args: str, port: int | None = None
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """Run `gatekeeper sim` on `port` (default: a free one) until it listens."""
    port = port or free_port()
    async with _running(
        port, "sim", "--host", "127.0.0.1", "--port", str(port), *args,
        stdout=asyncio.subprocess.DEVNULL,
    ) as proc:  # fmt: skip
        yield proc, f"http://127.0.0.1:{port}"
