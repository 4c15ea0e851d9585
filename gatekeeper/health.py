"""Is the Whisper server reachable? Probed in the background, never per request.

The default probe only opens a TCP connection: whisper-asr-webservice answers nothing at all
while it transcribes (its event loop is blocked), so a probe that waits for an HTTP answer would
call a busy server "down". The probe never goes through the gate, so it never queues behind
transcriptions.
"""

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from yarl import URL

from gatekeeper.clock import Clock

__all__ = ["HealthProbe", "UpstreamHealth"]


@dataclass(frozen=True, slots=True)
class UpstreamHealth:
    """The last probe's verdict."""

    up: bool | None  # None: not probed yet
    checked_at: float | None  # wall-clock seconds
    latency: float | None
    error: str | None


class HealthProbe:
    """Opens a TCP connection to the upstream every `interval` seconds."""

    def __init__(
        self,
        upstream: str,
        *,
        interval: float,
        timeout: float,
        clock: Clock,
        on_status: Callable[[UpstreamHealth], None] | None = None,
    ) -> None:
        self._on_status = on_status
        url = URL(upstream)
        self.host = url.host or "localhost"
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.interval = interval
        self.timeout = timeout
        self.clock = clock
        self.status = UpstreamHealth(None, None, None, None)
        self._task: asyncio.Task[None] | None = None

    async def check(self) -> UpstreamHealth:
        """Probe once now and remember the verdict."""
        began = self.clock.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                _, writer = await asyncio.open_connection(self.host, self.port)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            self.status = UpstreamHealth(
                True, self.clock.wall(), self.clock.monotonic() - began, None
            )
        except TimeoutError:
            self.status = UpstreamHealth(
                False, self.clock.wall(), None, f"no TCP connection within {self.timeout:g} s"
            )
        except OSError as exc:
            self.status = UpstreamHealth(False, self.clock.wall(), None, exc.strerror or str(exc))
        if self._on_status is not None:
            self._on_status(self.status)
        return self.status

    async def _loop(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="health-probe")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
