"""Time and sleep, injected so that retry and cool-down tests never really wait."""

import asyncio
import time
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


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


@dataclass
class FakeClock:
    """A clock that only moves when told to; `sleep` advances it and returns at once.

    Every sleep is recorded, so tests can assert the exact delays a task went through.
    """

    now: float = 1_000.0
    epoch_offset: float = 1_700_000_000.0
    sleeps: list[float] = field(default_factory=list)

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.epoch_offset + self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)  # still yield, as a real sleep would


def local_iso(epoch_seconds: float) -> str:
    """Local ISO 8601 time with seconds precision, as the seed's `last_oom` shows it."""
    return datetime.fromtimestamp(epoch_seconds).isoformat(timespec="seconds")
