"""Between two attempts: the retry delay, and the wait for a slot to retry in.

With the seed's cool-down (ASR_OOM_COOLDOWN > 0) a task keeps its slot through the delay: new
starts are held back after an OOM anyway, and the slot keeps the memory free for this retry.
Without it (ASR_OOM_COOLDOWN=0, the adaptive mode's default) the GPU would do nothing for the
slot during the delay, so the task gives it to the next one and afterwards takes the next free
slot, ahead of every queued task, waiting at most ASR_REQUEST_TIMEOUT for it. The shutdown's
end of grace stops the tasks in here (`stop`).
"""

import asyncio
from collections.abc import Callable, Coroutine
from enum import Enum
from typing import Any

from gatekeeper.clock import Clock
from gatekeeper.config import ProxyConfig
from gatekeeper.task import Task

__all__ = ["Between", "Resume", "first_of", "wait_or_gone"]


class Resume(Enum):
    """How the time between two attempts ended."""

    GRANTED = "granted"  # the next attempt may go (a slot is held again)
    GONE = "gone"  # the client left
    TIMED_OUT = "timed_out"  # no slot within ASR_REQUEST_TIMEOUT after the delay
    STOPPED = "stopped"  # the shutdown's grace period ended


class Between:
    """Waits out retry delays and slot waits; knows who is in between, for the shutdown."""

    def __init__(self, config: Callable[[], ProxyConfig], *, clock: Clock) -> None:
        self._config = config
        self._clock = clock
        # Tasks between two attempts without a slot, so a shutdown can answer them.
        self._tasks: set[Task] = set()
        self._stopped = asyncio.Event()

    def stop(self) -> list["asyncio.Task[Any]"]:
        """End of a shutdown grace period: tasks in here end now. Returns their runners."""
        self._stopped.set()
        return [t.runner for t in self._tasks if t.runner is not None]

    async def wait(self, task: Task, delay: float) -> tuple[Resume, str]:
        """Wait out a retry delay (and, without a cool-down, the wait for a slot after it).

        Returns how it ended, and the stage it ended in (for the log line of a client gone).
        """
        if self._config().oom_cooldown > 0:
            gone = await wait_or_gone(self._clock, delay, task)
            if gone:
                return Resume.GONE, "retry_delay"
            task.ticket.move()  # a retry prefers another server, when one has room
            if not task.ticket.stranded:
                return Resume.GRANTED, "retry_delay"
            # Its server was found down while it waited and no other has room yet: give the
            # slot back and wait for one on a server that is up, as without a cool-down.
            delay = 0.0
        record = task.record
        if record.held_since is not None:
            record.held += self._clock.monotonic() - record.held_since
            record.held_since = None
        task.ticket.pause()
        self._tasks.add(task)
        try:
            if await wait_or_gone(self._clock, delay, task, stop=self._stopped):
                return (Resume.GONE if task.gone.is_set() else Resume.STOPPED), "retry_delay"
            within = self._config().request_timeout
            resumed = await self._resume_or_gone(task, within=within)
        finally:
            self._tasks.discard(task)
        if resumed is Resume.GRANTED:
            record.held_since = self._clock.monotonic()
        return resumed, "retry_wait"

    async def _resume_or_gone(self, task: Task, *, within: float) -> Resume:
        """Take a slot back for the next attempt, waiting at most `within` seconds.

        The retry goes ahead of every queued task, but may still wait for a running one to end
        (the limit is full, or the adaptive limit was cut by the OOM that caused this retry).
        A slot frees within one attempt's time unless other retries are ahead; past `within`
        the task gives up its place (the caller refuses it).
        """
        if task.gone.is_set():
            return Resume.GONE
        resumer, *_ = await first_of(
            task.ticket.resume(),
            task.gone.wait(),
            self._stopped.wait(),
            self._clock.wait_until(self._clock.monotonic() + within),
        )
        if resumer.done() and not resumer.cancelled():
            resumer.result()  # surfaces a bug in the gate rather than hiding it
        if task.gone.is_set():
            return Resume.GONE
        if task.ticket.granted:
            return Resume.GRANTED
        return Resume.STOPPED if self._stopped.is_set() else Resume.TIMED_OUT


async def wait_or_gone(
    clock: Clock, seconds: float, task: Task, *, stop: asyncio.Event | None = None
) -> bool:
    """Sleep `seconds` (on the injected clock); True if the client left meanwhile (or `stop`
    was set)."""
    events = [task.gone] if stop is None else [task.gone, stop]
    if not any(e.is_set() for e in events):
        await first_of(clock.sleep(seconds), *(e.wait() for e in events))
    return any(e.is_set() for e in events)


async def first_of(*waits: Coroutine[Any, Any, object]) -> list["asyncio.Future[object]"]:
    """Run `waits` until the first of them ends, cancel the others, and return them all in
    order, so the caller can see which ended and how."""
    futures: list[asyncio.Future[object]] = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in futures:
            future.cancel()
    return futures
