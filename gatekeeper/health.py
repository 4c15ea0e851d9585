"""Is the Whisper server reachable? Probed in the background, never per request.

The default probe only opens a TCP connection: whisper-asr-webservice answers nothing at all
while it transcribes (its event loop is blocked), so a probe that waits for an HTTP answer would
call a busy server "down". With `ASR_HEALTH_PATH` set the probe also asks that path, with a short
timeout; a server that does not answer in time *while tasks run* is reported busy, not down.
The probe never goes through the gate, so it never queues behind transcriptions.
"""

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import aiohttp
from yarl import URL

from gatekeeper.clock import Clock

__all__ = ["HealthProbe", "HealthProbes", "UpstreamHealth", "UpstreamState"]


class UpstreamState(StrEnum):
    UNKNOWN = "unknown"  # not probed yet
    UP = "up"
    BUSY = "busy"  # accepts connections, too busy transcribing to answer the health path
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class UpstreamHealth:
    """The last probe's verdict."""

    state: UpstreamState
    checked_at: float | None  # wall-clock seconds
    latency: float | None
    error: str | None

    @property
    def up(self) -> bool | None:
        """True when reachable (busy counts), False when down, None before the first check."""
        if self.state is UpstreamState.UNKNOWN:
            return None
        return self.state is not UpstreamState.DOWN


class HealthProbe:
    """Checks the upstream every `interval` seconds: TCP connect, then optionally an HTTP path.

    The interval runs on the injected clock. The probe's own timeout bounds real socket I/O,
    so it stays on the event loop's time.
    """

    def __init__(
        self,
        upstream: str,
        *,
        interval: float,
        timeout: float,
        clock: Clock,
        path: str | None = None,
        busy: Callable[[], bool] = lambda: False,
        on_status: Callable[[UpstreamHealth], None] | None = None,
    ) -> None:
        url = URL(upstream)
        self.host = url.host or "localhost"
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.url = None if path is None else URL(upstream.rstrip("/") + path, encoded=True)
        self.interval = interval
        self.timeout = timeout
        self.clock = clock
        self._busy = busy
        self._on_status = on_status
        self.status = UpstreamHealth(UpstreamState.UNKNOWN, None, None, None)
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._soon = asyncio.Event()

    def check_soon(self) -> None:
        """Probe again now rather than at the next interval (an attempt just crashed there)."""
        self._soon.set()

    async def check(self) -> UpstreamHealth:
        """Probe once now and remember the verdict."""
        began = self.clock.monotonic()
        state, error = await self._probe()
        latency = self.clock.monotonic() - began if state is UpstreamState.UP else None
        self.status = UpstreamHealth(state, self.clock.wall(), latency, error)
        if self._on_status is not None:
            self._on_status(self.status)
        return self.status

    async def _probe(self) -> tuple[UpstreamState, str | None]:
        try:
            async with asyncio.timeout(self.timeout):
                _, writer = await asyncio.open_connection(self.host, self.port)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        except TimeoutError:
            return UpstreamState.DOWN, f"no TCP connection within {self.timeout:g} s"
        except OSError as exc:
            return UpstreamState.DOWN, exc.strerror or str(exc) or type(exc).__name__
        if self.url is None:
            return UpstreamState.UP, None
        return await self._probe_http(self.url)

    async def _probe_http(self, url: URL) -> tuple[UpstreamState, str | None]:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout), trust_env=False
            )
        try:
            async with self._session.get(url, allow_redirects=False) as response:
                await response.read()
                if response.status >= 500:
                    return UpstreamState.DOWN, f"{url.path} answered HTTP {response.status}"
                return UpstreamState.UP, None
        except TimeoutError:
            if self._busy():
                return (
                    UpstreamState.BUSY,
                    f"{url.path} gave no answer within {self.timeout:g} s while tasks run",
                )
            return UpstreamState.DOWN, f"{url.path} gave no answer within {self.timeout:g} s"
        except aiohttp.ClientError as exc:
            return UpstreamState.DOWN, str(exc) or type(exc).__name__

    async def _loop(self) -> None:
        while True:
            self._soon.clear()
            await self.check()
            # A timer on the injected clock: a test moves a fake clock past it instead of
            # waiting real intervals, and the probe never moves that clock itself.
            due = self.clock.monotonic() + self.interval
            waits = [
                asyncio.ensure_future(self.clock.wait_until(due)),
                asyncio.ensure_future(self._soon.wait()),
            ]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="health-probe")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None


class HealthProbes:
    """One probe per Whisper server, started and stopped together."""

    def __init__(self, probes: list[HealthProbe]) -> None:
        self.probes = probes

    def __getitem__(self, server: int) -> HealthProbe:
        return self.probes[server]

    def check_soon(self, server: int) -> None:
        self.probes[server].check_soon()

    def start(self) -> None:
        for probe in self.probes:
            probe.start()

    async def stop(self) -> None:
        for probe in self.probes:
            await probe.stop()
