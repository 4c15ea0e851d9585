"""The asyncio mechanism that makes tasks wait: slots, a first-in first-out queue, hand-over.

The decisions come from `admission.decide`; this module only keeps the books and wakes waiters.
The one invariant everything rests on: `active` (slots held) never exceeds `limit`, whatever
mix of timeouts, cancellations and errors happens. A slot is handed directly from the task that
frees it to the first waiter, so nobody can slip in between.

A task's upload is received before it joins the queue (`Gate.begin_upload`): an upload holds
no slot and no queue place, so a slow client never keeps the GPU idle. Uploads are only counted
(and bounded); an arrival is refused at once when the queue is already full.

Between two attempts (the retry delay) a task may give its slot back (`Ticket.pause`; the proxy
does so when there is no OOM cool-down): the GPU is not working for it, and an idle slot would
leave the card idle too. When its delay is over it takes a slot again (`Ticket.resume`) ahead of
every task that has not started yet, since it is older than all of them and its client has
already waited the longest.
"""

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass

from gatekeeper.clock import Clock, SystemClock
from gatekeeper.policy.admission import Admission, Decision, decide
from gatekeeper.policy.outcomes import RejectReason

__all__ = ["Gate", "GateCounts", "Refused", "Ticket", "Upload"]


class Refused(Exception):
    """A task may not run: it was refused at arrival, timed out in the queue, or we shut down."""

    def __init__(self, reason: RejectReason, admission: Admission | None = None) -> None:
        super().__init__(reason.value)
        self.reason = reason
        self.admission = admission


@dataclass(frozen=True, slots=True)
class GateCounts:
    """One consistent reading of the gate's books."""

    active: int
    queued: int
    limit: int
    max_queue: int
    shutting_down: bool
    retrying: int = 0
    """Admitted tasks between two attempts: in their retry delay, or waiting for a slot to retry
    (ahead of the queue). They hold no slot and no queue place."""
    retry_waiting: int = 0
    """Of `retrying`, those whose delay is over and that wait for a slot (ahead of the queue)."""
    uploading: int = 0
    """Tasks whose upload is still being received: they hold no slot and are not queued yet,
    but arrivals count them against the queue's room."""


class Ticket:
    """One admitted task's place: first in the queue, then (once granted) a slot.

    `leave()` gives back whatever the ticket holds; it is idempotent, so every exit path may
    call it.
    """

    __slots__ = ("_gate", "_granted", "_left", "_paused", "admission")

    def __init__(self, gate: "Gate", admission: Admission) -> None:
        self._gate = gate
        self.admission = admission
        self._granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._left = False
        self._paused = False

    @property
    def granted(self) -> bool:
        """True once the ticket holds a slot."""
        fut = self._granted
        return fut.done() and not fut.cancelled() and fut.exception() is None

    async def wait(self, max_wait: float) -> None:
        """Wait for a slot at most `max_wait` seconds; raise Refused(queue_timeout/shutting_down).

        Cancelling the caller takes the ticket out of the queue at once.
        """
        refused = self._granted.done() and not self._granted.cancelled()
        if self._left and not refused:
            raise RuntimeError("ticket already left the gate")
        if not self._granted.done():
            try:
                clock = self._gate._clock
                async with clock.timeout_at(clock.monotonic() + max_wait):
                    await asyncio.shield(self._granted)
            except TimeoutError:
                if not self._granted.done():
                    self._gate._drop_waiter(self)
                    self._granted.set_exception(Refused(RejectReason.QUEUE_TIMEOUT))
                    self._left = True
                    self._granted.exception()  # mark retrieved
        self._granted.result()  # raises Refused if the gate refused us while waiting

    def pause(self) -> None:
        """Give the slot back between two attempts; the task stays admitted, as `retrying`."""
        if self._left or not self.granted:
            raise RuntimeError("only a ticket holding a slot can pause")
        self._paused = True
        self._granted = self._granted.get_loop().create_future()
        self._gate._pause()

    async def resume(self) -> None:
        """Take a slot again after `pause`, ahead of every task that has not started yet.

        Waits as long as it takes (no queue timeout: the task was admitted long ago); cancelling
        the caller does not leave the gate — call `leave()`.
        """
        if self._left or not self._paused:
            raise RuntimeError("only a paused ticket can resume")
        self._gate._resume(self)
        await asyncio.shield(self._granted)

    def leave(self) -> None:
        """Give back the slot, or the queue place, this ticket holds (no-op the second time)."""
        if self._left:
            return
        self._left = True
        if self._paused:
            self._gate._drop_paused(self)
            self._granted.cancel()
            return
        if self._granted.done():
            if self._granted.exception() is None:
                self._gate._release()
        else:
            self._gate._drop_waiter(self)
            self._granted.cancel()

    def _grant(self) -> bool:
        if self._granted.done():
            return False
        self._granted.set_result(None)
        self._paused = False
        return True

    def _refuse(self, reason: RejectReason) -> None:
        if not self._granted.done():
            self._granted.set_exception(Refused(reason))
            self._granted.exception()  # retrieved: its handler may be gone (still uploading)
            self._left = True


class Upload:
    """One arriving task receiving its body; `enter()` then queues it, `end()` gives up.

    Both end the upload exactly once; `end()` is idempotent, so every exit path may call it.
    """

    __slots__ = ("_done", "_gate")

    def __init__(self, gate: "Gate") -> None:
        self._gate = gate
        self._done = False

    def enter(self) -> Ticket:
        """The body is in: admit the task to the queue (or a free slot), or raise Refused.

        The shutdown does not refuse it: its upload began before the shutdown did, and a task
        admitted before the shutdown may still run within the grace period.
        """
        self.end()
        return self._gate._enter(shutting_down=False)

    def end(self) -> None:
        if not self._done:
            self._done = True
            self._gate._upload_ended()


class Gate:
    """Slots for tasks upstream, and the queue in front of them."""

    def __init__(self, *, limit: int, max_queue: int, clock: Clock | None = None) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._clock = clock or SystemClock()  # the queue timeout follows it
        self._limit = limit
        self._max_queue = max_queue
        self._uploading = 0
        self._active = 0
        self._waiters: deque[Ticket] = deque()
        self._paused = 0  # tickets between two attempts (holding nothing)
        self._retry_waiters: deque[Ticket] = deque()  # paused tickets that want a slot back
        self._shutting_down = False
        self._idle = asyncio.Event()
        self._idle.set()

    def counts(self) -> GateCounts:
        return GateCounts(
            self._active,
            len(self._waiters),
            self._limit,
            self._max_queue,
            self._shutting_down,
            self._paused,
            len(self._retry_waiters),
            self._uploading,
        )

    def arrival_refusal(self) -> RejectReason | None:
        """Why an arriving task would be refused right now, before its body is read; None: take
        it. Uploads in progress count as queued here (each will need a slot or a queue place),
        so the room of slots + queue bounds them too (memory and spool disk are finite), and a
        burst is refused queue_full at once rather than after its uploads."""
        if self._shutting_down:
            return RejectReason.SHUTTING_DOWN
        taken = self._active + len(self._waiters) + self._uploading
        if taken >= self._limit + self._max_queue:
            return RejectReason.QUEUE_FULL
        return None

    def begin_upload(self) -> Upload:
        """Let one arriving task receive its body, or raise Refused (see `arrival_refusal`)."""
        reason = self.arrival_refusal()
        if reason is not None:
            raise Refused(reason)
        self._uploading += 1
        self._idle.clear()
        return Upload(self)

    def enter(self) -> Ticket:
        """Admit one arriving task or raise Refused(queue_full/shutting_down).

        The returned ticket already holds a slot when one was free and nobody waited.
        """
        return self._enter(shutting_down=self._shutting_down)

    def _enter(self, *, shutting_down: bool) -> Ticket:
        admission = decide(
            active=self._active,
            queued=len(self._waiters),
            limit=self._limit,
            max_queue=self._max_queue,
            shutting_down=shutting_down,
        )
        if admission.decision is Decision.REJECT:
            assert admission.reason is not None
            self._check_idle()
            raise Refused(admission.reason, admission)
        ticket = Ticket(self, admission)
        self._idle.clear()
        if admission.decision is Decision.START:
            self._active += 1
            ticket._grant()
        else:
            self._waiters.append(ticket)
        return ticket

    def set_limits(
        self,
        *,
        limit: int | None = None,
        max_queue: int | None = None,
    ) -> None:
        """Change the limits live: lowering never stops running tasks, raising starts waiters."""
        if limit is not None:
            if limit < 1:
                raise ValueError("limit must be at least 1")
            self._limit = limit
        if max_queue is not None:
            self._max_queue = max_queue
        self._hand_over()

    def begin_shutdown(self) -> None:
        """Refuse newcomers from now on; queued tasks keep their place and may still run."""
        self._shutting_down = True

    def refuse_waiting(self, reason: RejectReason = RejectReason.SHUTTING_DOWN) -> int:
        """Refuse every task still in the queue (end of a shutdown grace period)."""
        refused = 0
        while self._waiters:
            self._waiters.popleft()._refuse(reason)
            refused += 1
        self._check_idle()
        return refused

    async def wait_idle(self) -> None:
        """Return once no task uploads, holds a slot, waits for one, or waits to retry."""
        await self._idle.wait()

    def _upload_ended(self) -> None:
        self._uploading -= 1
        assert self._uploading >= 0, "upload ended twice"
        self._check_idle()

    def _release(self) -> None:
        self._active -= 1
        assert self._active >= 0, "slot released twice"
        self._hand_over()

    def _pause(self) -> None:
        self._active -= 1
        assert self._active >= 0, "slot released twice"
        self._paused += 1
        self._hand_over()

    def _resume(self, ticket: Ticket) -> None:
        self._retry_waiters.append(ticket)
        self._hand_over()

    def _drop_paused(self, ticket: Ticket) -> None:
        with contextlib.suppress(ValueError):
            self._retry_waiters.remove(ticket)
        self._paused -= 1
        assert self._paused >= 0, "paused ticket left twice"
        self._check_idle()

    def _hand_over(self) -> None:
        # Retries first (they are older than every queued task), then first-in first-out: the
        # oldest waiter gets the freed slot directly.
        while self._retry_waiters and self._active < self._limit:
            if self._retry_waiters.popleft()._grant():
                self._paused -= 1
                self._active += 1
        while self._waiters and self._active < self._limit and not self._retry_waiters:
            if self._waiters.popleft()._grant():
                self._active += 1
        self._check_idle()

    def _drop_waiter(self, ticket: Ticket) -> None:
        with contextlib.suppress(ValueError):  # already handed a slot or refused
            self._waiters.remove(ticket)
        self._check_idle()

    def _check_idle(self) -> None:
        if self._active == 0 and not self._waiters and self._paused == 0 and not self._uploading:
            self._idle.set()
