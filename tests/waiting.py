"""Waiting for live state in tests, without sleeping a fixed time."""

import asyncio
import inspect
from collections.abc import Awaitable, Callable

__all__ = ["until"]


async def until(
    condition: Callable[[], bool | Awaitable[bool]], *, within: float = 5.0, every: float = 0.005
) -> None:
    """Return as soon as `condition()` holds; fail with TimeoutError after `within` seconds.

    `condition` may be a coroutine function (a question asked over HTTP, say); then `every`
    spaces the questions out.
    """
    async with asyncio.timeout(within):
        while True:
            met = condition()
            if inspect.isawaitable(met):
                met = await met
            if met:
                return
            # Polls counters that have no event to wait on; 5 ms keeps tests quick and cheap.
            await asyncio.sleep(every)
