"""Waiting for live state in tests, without sleeping a fixed time."""

import asyncio
from collections.abc import Callable

__all__ = ["until"]


async def until(condition: Callable[[], bool], *, within: float = 5.0) -> None:
    """Return as soon as `condition()` holds; fail with TimeoutError after `within` seconds."""
    async with asyncio.timeout(within):
        # Polls counters that have no event to wait on; 5 ms keeps tests quick and cheap.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)
