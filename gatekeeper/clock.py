"""Time, sleep and deadlines, injected so that tests of retries, cool-downs and timeouts never
really wait: a fake clock moves when a test says so, and every deadline follows it."""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

__all__ = ["Clock", "FakeClock", "SystemClock", "local_iso"]


class Clock(Protocol):
    """Where the gatekeeper gets time from."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards (for durations and deadlines)."""
        ...

    def wall(self) -> float:
        """Seconds since the epoch (for timestamps shown to people)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait this long (a fake clock advances instead)."""
        ...

    async def wait_until(self, deadline: float) -> None:
        """Return once `monotonic()` has reached `deadline`.

        For background timers (the health probe's interval): they follow time and never drive
        it, so a fake clock waits here until the test advances it past `deadline`.
        """
        ...

    def timeout_at(self, deadline: float | None) -> AbstractAsyncContextManager[object]:
        """Cancel the block when `monotonic()` reaches `deadline` and raise TimeoutError, as
        `asyncio.timeout_at` does (None: no deadline)."""
        ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    async def wait_until(self, deadline: float) -> None:
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))

    def timeout_at(self, deadline: float | None) -> AbstractAsyncContextManager[object]:
        # asyncio's own timeout, on the loop's clock: the same cost as before on the hot path.
        return asyncio.timeout(None if deadline is None else deadline - time.monotonic())


@dataclass
class FakeClock:
    """A clock that only moves when told to; `sleep` advances it and returns at once.

    Every sleep is recorded, so tests can assert the exact delays a task went through.
    Background timers (`wait_until`) do not move it: they wake when `advance()` (or a sleep)
    carries it past their deadline.
    """

    now: float = 1_000.0
    epoch_offset: float = 1_700_000_000.0
    sleeps: list[float] = field(default_factory=list)
    _timers: list[tuple[float, "asyncio.Future[None]"]] = field(
        default_factory=list, init=False, repr=False, compare=False
    )

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.epoch_offset + self.now

    def advance(self, seconds: float) -> None:
        """Move time on, waking the timers whose deadline it reaches."""
        self.now += seconds
        due = [timer for deadline, timer in self._timers if deadline <= self.now]
        self._timers[:] = [entry for entry in self._timers if entry[0] > self.now]
        for timer in due:
            if not timer.done():
                timer.set_result(None)

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)  # still yield, as a real sleep would

    async def wait_until(self, deadline: float) -> None:
        if deadline <= self.now:
            await asyncio.sleep(0)  # still yield, as a real timer would
            return
        entry = (deadline, asyncio.get_running_loop().create_future())
        self._timers.append(entry)
        try:
            await entry[1]
        finally:
            with contextlib.suppress(ValueError):  # already woken by `advance()`
                self._timers.remove(entry)

    @contextlib.asynccontextmanager
    async def timeout_at(self, deadline: float | None) -> AsyncIterator[None]:
        """asyncio's timeout, fired when `advance()` carries this clock past `deadline`."""
        async with asyncio.timeout(None) as timeout:
            if deadline is None:
                yield
                return

            async def expire() -> None:
                await self.wait_until(deadline)
                timeout.reschedule(asyncio.get_running_loop().time())

            watcher = asyncio.ensure_future(expire())
            try:
                yield
            finally:
                watcher.cancel()


def local_iso(epoch_seconds: float) -> str:
    """Local ISO 8601 time with seconds precision, as the seed's `last_oom` shows it."""
    return datetime.fromtimestamp(epoch_seconds).isoformat(timespec="seconds")
