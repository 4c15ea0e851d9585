"""Holding the slot of a timed-out attempt: the Whisper server may still be computing it.

A real Whisper server keeps transcribing after its client leaves, so a timed-out attempt is
still on the GPU. The client gets its 504 at the deadline, but the slot stays taken until the
server answers (read and dropped) or closes the connection, at most ASR_TIMEOUT_HOLD; then the
connection is cut and the slot freed. Each hold is logged at both ends and counted by how it
ended (`HoldEnd`).
"""

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from gatekeeper.clock import Clock
from gatekeeper.config import ProxyConfig
from gatekeeper.logs import Event, log_event
from gatekeeper.policy.outcomes import HoldEnd
from gatekeeper.state import LiveState
from gatekeeper.task import Task

__all__ = ["Holds", "Still"]

Still = Coroutine[Any, Any, HoldEnd]
"""What the Whisper server may still be doing for a timed-out attempt, to hold the slot for."""


class Holds:
    """Holds slots of timed-out attempts, in the runner or (once answered) in a task of its own."""

    def __init__(
        self,
        config: Callable[[], ProxyConfig],
        *,
        state: LiveState,
        clock: Clock,
        running: set["asyncio.Task[Any]"],
    ) -> None:
        self._config = config
        self._state = state
        self._clock = clock
        self._running = running  # the runner's set: what the shutdown and the tests wait for

    def after(self, task: Task, still: Still, free_slot: Callable[[Task], None]) -> None:
        """The task is answered, but the Whisper server may still be on its last attempt: a
        task of its own keeps the slot (and the body) until the server is done."""
        server = task.ticket.server
        assert server is not None, "a hold keeps a slot"
        began = self._began(task, server)
        hold = asyncio.create_task(self._wait(still), name=f"hold-{task.record.task_id}")

        def ended(hold: "asyncio.Task[HoldEnd]") -> None:
            # A callback, not a `finally`: it runs even if the hold is cancelled before it starts.
            still.close()  # a no-op unless it never started
            end = HoldEnd.STOPPED if hold.cancelled() else hold.result()
            self._ended(task, server, end, began)
            free_slot(task)
            self._running.discard(hold)

        hold.add_done_callback(ended)
        task.hold = hold
        self._running.add(hold)

    async def during(self, task: Task, still: Still) -> None:
        """The same hold inside the runner (a timed-out attempt to be retried: the retry waits
        for the Whisper server to be done with the first one)."""
        server = task.ticket.server
        assert server is not None, "a hold keeps a slot"
        began = self._began(task, server)
        end = HoldEnd.STOPPED
        try:
            end = await self._wait(still)
        finally:
            still.close()
            self._ended(task, server, end, began)

    async def _wait(self, still: Still) -> HoldEnd:
        """Wait until the Whisper server is done with a timed-out attempt, at most
        ASR_TIMEOUT_HOLD (then its connection is closed)."""
        try:
            async with self._clock.timeout_at(
                self._clock.monotonic() + self._config().timeout_hold
            ):
                return await still
        except TimeoutError:
            return HoldEnd.EXPIRED

    def _began(self, task: Task, server: int) -> float:
        self._state.hold_began(server)
        log_event(
            Event.HOLD,
            logging.WARNING,
            task_id=task.record.task_id,
            hold=self._config().timeout_hold,
            upstream=self._state.servers[server].name,
        )
        return self._clock.monotonic()

    def _ended(self, task: Task, server: int, end: HoldEnd, began: float) -> None:
        """The attempt has left the Whisper server (or was cut): count it and say so."""
        self._state.upstream_ended(server)
        self._state.hold_ended(end, server)
        log_event(
            Event.HOLD_ENDED,
            logging.WARNING if end is HoldEnd.EXPIRED else logging.INFO,
            task_id=task.record.task_id,
            end=end.value,
            held=self._clock.monotonic() - began,
            upstream=self._state.servers[server].name,
        )
