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

Several Whisper servers (one per GPU) share the one queue: each has its own limit and slots
(`ServerCounts`), and a slot is always a slot *on a server* (`Ticket.server`). A task goes to
the usable server with the most room; a server not cooling down after an OOM comes first. A
server the health probe found down is not usable, unless no server is up at all (then all are
tried: the probe may be wrong, and the retry rules handle a dead server). A retry prefers
another server than the one it failed on.

Replicas (`permits=True`, SPEC "Replicas"): a slot on a server also needs a *permit*, a lease
on one of the server's slots shared by every gatekeeper of the cluster (gatekeeper/cluster/).
The gate stays synchronous: a coordinator acquires a permit for the head of the queue (`wants`,
`add_permit`), the hand-over starts the head with it, and a freed slot gives its permit back
(`release_permit`) rather than to the next local waiter, so the replicas' heads compete for it
on equal terms. A permit nobody here can use is given back at once. While the coordinator
cannot reach Redis (`set_coordinated(False)`) no free slot can be proven: nothing new starts,
and arrivals beyond the queue's room are refused `coordination_unavailable`.
"""

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from gatekeeper.clock import Clock, SystemClock
from gatekeeper.policy.admission import Admission, Decision, decide
from gatekeeper.policy.memory import MemoryModel, fits
from gatekeeper.policy.outcomes import RejectReason

__all__ = ["Gate", "GateCounts", "Permit", "Refused", "ServerCounts", "Ticket", "Upload"]


class Permit(Protocol):
    """Replicas: the proof a slot is free in the cluster (gatekeeper/cluster/leases.Lease)."""

    @property
    def count(self) -> int:
        """The server's slots taken by all replicas once this one was granted (it included)."""

    @property
    def audio(self) -> tuple[float | None, ...]:
        """The audio seconds of those tasks (None: unknown)."""

    @property
    def weight(self) -> float:
        """GiB of the card's memory budget it holds (admission by memory; else 0)."""


class Refused(Exception):
    """A task may not run: it was refused at arrival, timed out in the queue, or we shut down."""

    def __init__(self, reason: RejectReason, admission: Admission | None = None) -> None:
        super().__init__(reason.value)
        self.reason = reason
        self.admission = admission


@dataclass(frozen=True, slots=True)
class ServerCounts:
    """One Whisper server's slots."""

    limit: int
    active: int
    usable: bool
    """False while the health probe finds the server down: it gets no new tasks."""
    memory_used: float = 0.0
    """GiB of the memory budget the running tasks' estimates hold (admission by memory)."""
    memory_budget: float | None = None
    """The card's memory budget in GiB; None: admission by count only."""


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
    servers: tuple[ServerCounts, ...] = ()
    """Per Whisper server, in ASR_UPSTREAM_URL's order (`active` and `limit` are their sums)."""


class Ticket:
    """One admitted task's place: first in the queue, then (once granted) a slot.

    `leave()` gives back whatever the ticket holds; it is idempotent, so every exit path may
    call it.
    """

    __slots__ = (
        "_gate",
        "_granted",
        "_left",
        "_paused",
        "admission",
        "audio",
        "charged",
        "last_server",
        "passed_at",
        "permit",
        "server",
        "since",
    )

    def __init__(self, gate: "Gate", admission: Admission, audio: float | None = None) -> None:
        self._gate = gate
        self.admission = admission
        self.audio = audio
        """Seconds of audio in the task's upload (None: unknown), for admission by memory."""
        self.charged = 0.0
        """GiB the ticket's slot holds of its server's memory budget (admission by memory)."""
        self.passed_at: float | None = None
        """When a later task first started ahead of this one while it was the head (memory)."""
        self._granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._left = False
        self._paused = False
        self.server: int | None = None
        """The server whose slot the ticket holds (its index), None while it holds none."""
        self.last_server: int | None = None
        """The server of the last slot held: a retry prefers another one."""
        self.since = gate._clock.monotonic()
        """When it joined the queue: how long its task has waited (replicas' fairness)."""
        self.permit: Permit | None = None
        """Replicas: the cluster's lease that proves the slot (None without one)."""

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
        self._gate._pause(self)

    @property
    def stranded(self) -> bool:
        """It holds its slot on a server found down while another server is up."""
        return self._gate.stranded(self)

    def move(self) -> bool:
        """Before a retry that kept its slot: move the slot to another usable server with room,
        if there is one (True). The slot left behind goes to the next waiter."""
        if self._left or not self.granted:
            raise RuntimeError("only a ticket holding a slot can move")
        return self._gate._move(self)

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
                self._gate._release(self)
        else:
            self._gate._drop_waiter(self)
            self._granted.cancel()

    def _grant(self, server: int) -> bool:
        if self._granted.done():
            return False
        self._granted.set_result(None)
        self._paused = False
        self.server = self.last_server = server
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

    def enter(self, audio: float | None = None) -> Ticket:
        """The body is in: admit the task to the queue (or a free slot), or raise Refused.
        `audio`: seconds of audio in it, when known (admission by memory costs it).

        The shutdown does not refuse it: its upload began before the shutdown did, and a task
        admitted before the shutdown may still run within the grace period.
        """
        self.end()
        return self._gate._enter(shutting_down=False, audio=audio, reserved=True)

    def end(self) -> None:
        if not self._done:
            self._done = True
            self._gate._upload_ended()


class _Server:
    """One Whisper server's slots (mutable books; `ServerCounts` is the reading)."""

    __slots__ = ("active", "budget", "limit", "model", "spare", "usable", "used")

    def __init__(self, limit: int) -> None:
        self.spare: list[Permit] = []  # replicas: permits acquired for a waiter, not yet used
        self.limit = limit
        self.active = 0
        self.usable = True
        self.budget: float | None = None  # GiB for tasks; None: admission by count only
        self.model = MemoryModel(0.0)
        self.used = 0.0  # GiB the running tasks' estimates hold

    def cost(self, ticket: Ticket) -> float:
        return 0.0 if self.budget is None else self.model.cost(ticket.audio)

    def permit_for(self, ticket: Ticket) -> int | None:
        """Replicas: the index of a spare permit that covers `ticket` (by memory, one weighed
        for at least its cost: the cluster's books must not undercount the card), or None."""
        cost = self.cost(ticket) - 1e-9
        covering = [(p.weight, i) for i, p in enumerate(self.spare) if p.weight >= cost]
        return min(covering)[1] if covering else None

    def fits(self, ticket: Ticket, *, count: bool = True) -> bool:
        """Whether `ticket` may start here now (`count`: the local count of slots too)."""
        if count and self.active >= self.limit:
            return False
        if self.budget is None:
            return True
        return fits(self.cost(ticket), used=self.used, budget=self.budget, running=self.active)


class Gate:
    """Slots for tasks upstream (per Whisper server), and the one queue in front of them."""

    def __init__(
        self,
        *,
        limit: int | Sequence[int],
        max_queue: int,
        clock: Clock | None = None,
        cooling: Callable[[int], bool] | None = None,
        backfill_seconds: float = 0.0,
        permits: bool = False,
    ) -> None:
        limits = (limit,) if isinstance(limit, int) else tuple(limit)
        if not limits or min(limits) < 1:
            raise ValueError("limit must be at least 1")
        self._clock = clock or SystemClock()  # the queue timeout follows it
        # Whether a server cools down after an OOM right now: others are preferred meanwhile.
        self._cooling = cooling or (lambda server: False)
        self._servers = [_Server(n) for n in limits]
        self._max_queue = max_queue
        self._uploading = 0
        self._active = 0
        self._waiters: deque[Ticket] = deque()
        self._holders: set[Ticket] = set()  # tickets holding a slot
        self._paused = 0  # tickets between two attempts (holding nothing)
        self._retry_waiters: deque[Ticket] = deque()  # paused tickets that want a slot back
        self._shutting_down = False
        self._idle = asyncio.Event()
        self._idle.set()
        # Admission by memory: a task that fits may pass the head of the queue (which does
        # not), but only for `backfill_seconds` after the head was first passed.
        self.backfill_seconds = backfill_seconds
        # Replicas: a slot also needs a permit (see the module's docstring).
        self._permits = permits
        self._coordinated = True  # False while the permits cannot be proven (Redis down)
        self.release_permit: Callable[[Permit], None] = lambda permit: None
        self._unproven: dict[Ticket, Permit] = {}  # holders whose permit was lost
        self.generation = 0
        self._changed = asyncio.Event()

    @property
    def _limit(self) -> int:
        return sum(server.limit for server in self._servers)

    def counts(self) -> GateCounts:
        servers = tuple(
            ServerCounts(s.limit, s.active, s.usable, s.used, s.budget) for s in self._servers
        )
        return GateCounts(
            self._active,
            len(self._waiters),
            sum(s.limit for s in servers),
            self._max_queue,
            self._shutting_down,
            self._paused,
            len(self._retry_waiters),
            self._uploading,
            servers,
        )

    def _taken(self) -> int:
        """Slots taken as admission counts them: the sum of the limits less the free slots,
        server by server (a server over a lowered limit does not eat another's room), on the
        servers a task may go to (a server found down has no room to offer)."""
        if not self._coordinated:
            return self._limit  # replicas: no free slot can be proven without Redis
        if (self._waiters or self._retry_waiters) and (
            self._permits or any(s.budget is not None for s in self._servers)
        ):
            # By memory, or with replicas (other replicas may hold the slots free here), slots
            # free while tasks wait are no room to offer.
            return self._limit
        free = sum(max(0, self._servers[i].limit - self._servers[i].active) for i in self._usable())
        return self._limit - free

    def _usable(self) -> list[int] | range:
        """The servers a task may go to: those not found down, or all when every one is."""
        servers = self._servers
        return [i for i, s in enumerate(servers) if s.usable] or range(len(servers))

    def stranded(self, ticket: Ticket) -> bool:
        """Whether `ticket` holds its slot on a server found down while another is up: its next
        attempt should wait for a slot there rather than go to a dead server."""
        server = ticket.server
        return server is not None and server not in self._usable()

    def first_usable(self) -> int:
        """The first server in the list that is usable (for requests that are not tasks)."""
        return next((i for i, s in enumerate(self._servers) if s.usable), 0)

    # -- replicas: permits ------------------------------------------------------------------------

    def wants(self) -> tuple[Ticket, list[int]] | None:
        """The waiter a permit should be acquired for, and the servers to try in order (usable,
        and where it fits by memory; the slots are counted by the cluster, which refuses while
        they are full); None when no waiter could use one."""
        head = self._first()
        if head is None:
            return None
        servers = self._ranked(head)
        if servers:
            return head, servers
        for ticket in self._passers(head):
            servers = self._ranked(ticket)
            if servers:
                return ticket, servers
        return None

    def _ranked(self, ticket: Ticket) -> list[int]:
        # Also where this replica's own tasks fill the slots: the head then keeps its place in
        # the cluster's order, and the cluster's count refuses it until a slot is free.
        room = self._room(ticket, proven=False, count=False)
        room.sort(key=self._preference, reverse=True)
        avoid = ticket.last_server
        if avoid in room and len(room) > 1:
            room.remove(avoid)
            room.append(avoid)
        return room

    def permit_cost(self, ticket: Ticket, server: int) -> tuple[float, float | None]:
        """What a permit for `ticket` on `server` must hold: its GiB estimate and the card's
        budget (None: admission by count)."""
        slots = self._servers[server]
        return slots.cost(ticket), slots.budget

    def add_permit(self, server: int, permit: Permit) -> bool:
        """A permit acquired on `server`: the hand-over starts a waiter with it (True), or
        gives it back when none can use it any longer (False)."""
        self._servers[server].spare.append(permit)
        self._hand_over()
        return any(t.permit is permit for t in self._holders)

    def permit_lost(self, permit: Permit) -> None:
        """The cluster no longer counts `permit` (it expired unrenewed). A spare one is dropped;
        a holder keeps running (the GPU is on its task) and is listed by `unproven` until the
        coordinator puts it back on the cluster's books (`replace_permit`)."""
        for slots in self._servers:
            if permit in slots.spare:
                slots.spare.remove(permit)
                return
        for ticket in self._holders:
            if ticket.permit is permit:
                self._unproven[ticket] = permit
                self._bump()
                return

    def unproven(self) -> list[tuple[Ticket, int]]:
        """Holders whose permit was lost, and their servers."""
        return [(t, t.server) for t in self._unproven if t.server is not None]

    def replace_permit(self, ticket: Ticket, permit: Permit) -> bool:
        """Give an unproven holder a new permit; False (the caller releases it) when the
        ticket no longer holds its slot."""
        if self._unproven.pop(ticket, None) is None or ticket.server is None:
            return False
        ticket.permit = permit
        return True

    @property
    def coordinated(self) -> bool:
        """False while the cluster's permits cannot be proven (Redis unreachable)."""
        return self._coordinated

    def set_coordinated(self, up: bool) -> None:
        if up != self._coordinated:
            self._coordinated = up
            self._bump()

    async def changed(self, since: int) -> None:
        """Return once `generation` has moved past `since` (the books changed)."""
        while self.generation == since:
            await self._changed.wait()

    def _bump(self) -> None:
        self.generation += 1
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def arrival_refusal(self) -> RejectReason | None:
        """Why an arriving task would be refused right now, before its body is read; None: take
        it. Uploads in progress count as queued here (each will need a slot or a queue place),
        so the room of slots + queue bounds them too (memory and spool disk are finite), and a
        burst is refused queue_full at once rather than after its uploads."""
        if self._shutting_down:
            return RejectReason.SHUTTING_DOWN
        taken = self._taken() + len(self._waiters) + self._uploading
        if taken >= self._limit + self._max_queue:
            return self._full_reason()
        return None

    def _full_reason(self) -> RejectReason:
        """queue_full, or (replicas, Redis down) coordination_unavailable: the room a slot
        would have made cannot be proven."""
        if self._coordinated:
            return RejectReason.QUEUE_FULL
        return RejectReason.COORDINATION_UNAVAILABLE

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

    def _enter(
        self, *, shutting_down: bool, audio: float | None = None, reserved: bool = False
    ) -> Ticket:
        """`reserved`: the task's place was counted when its upload began (`begin_upload`), so
        it is queued even if the queue has shrunk since (an adaptive cut, a server found
        down): a task is never refused queue_full after its upload, as tasks already waiting
        are never dropped when the queue shrinks."""
        admission = decide(
            active=self._taken(),
            queued=len(self._waiters),
            limit=self._limit,
            max_queue=self._max_queue,
            shutting_down=shutting_down,
        )
        full = admission.reason is RejectReason.QUEUE_FULL
        if admission.decision is Decision.REJECT and not (reserved and full):
            assert admission.reason is not None
            self._check_idle()
            raise Refused(self._full_reason() if full else admission.reason, admission)
        ticket = Ticket(self, admission, audio)
        self._idle.clear()
        # Into the queue, then the queue moves: the ticket starts at once when it is first and
        # fits somewhere (or, by memory, fits while the head does not, within the bound).
        self._waiters.append(ticket)
        self._hand_over()
        if not ticket.granted and not reserved and len(self._waiters) > self._max_queue:
            # Room by count but not by memory, and no queue place (ASR_MAX_QUEUE=0).
            self._waiters.remove(ticket)
            self._check_idle()
            raise Refused(self._full_reason(), admission)
        return ticket

    def set_limits(
        self,
        *,
        limit: int | Sequence[int] | None = None,
        max_queue: int | None = None,
    ) -> None:
        """Change the limits live: lowering never stops running tasks, raising starts waiters.

        `limit`: one value for every server, or one per server.
        """
        if limit is not None:
            limits = (limit,) * len(self._servers) if isinstance(limit, int) else tuple(limit)
            if len(limits) != len(self._servers) or min(limits) < 1:
                raise ValueError("give each server a limit of at least 1")
            for server, n in zip(self._servers, limits, strict=True):
                server.limit = n
        if max_queue is not None:
            self._max_queue = max_queue
        self._hand_over()

    def set_server_limit(self, server: int, limit: int) -> None:
        """Change one server's limit (its adaptive limit moved)."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._servers[server].limit = limit
        self._hand_over()

    def set_memory(
        self, server: int, *, budget: float | None, model: MemoryModel | None = None
    ) -> None:
        """Admission by memory on one server: its budget in GiB (None: by count only) and the
        figures a task is costed by. The running tasks are costed again by the new figures
        (the best estimate of what they hold now: right after an OOM raised the figures, the
        same set must not look as if it fitted)."""
        slots = self._servers[server]
        slots.budget = budget
        if model is not None:
            slots.model = model
        slots.used = 0.0
        for holder in self._holders:
            if holder.server == server:
                holder.charged = slots.cost(holder)
                slots.used += holder.charged
        self._hand_over()

    def memory_model(self, server: int) -> MemoryModel:
        """The figures tasks are costed by on `server`."""
        return self._servers[server].model

    def audio_ahead(self, *, unknown_as: float) -> tuple[float, int]:
        """Seconds of audio of the tasks waiting for a slot (retries and queue), an unknown
        length counted as `unknown_as`; and how many waited."""
        total, count = 0.0, 0
        for ticket in itertools.chain(self._retry_waiters, self._waiters):
            total += unknown_as if ticket.audio is None else ticket.audio
            count += 1
        return total, count

    def running_audio(self, server: int) -> list[float | None]:
        """The audio lengths of the tasks holding a slot on `server` (for learning)."""
        return [t.audio for t in self._holders if t.server == server]

    def set_usable(self, server: int, usable: bool) -> None:
        """The health probe's verdict: a server found down gets no new tasks until it is back."""
        self._servers[server].usable = usable
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

    def _pick(self, avoid: int | None = None, ticket: Ticket | None = None) -> int | None:
        """The server for the next slot: usable, with room (and, by memory, where `ticket`
        fits); not cooling down, then most room (free memory, or free slots), first.

        `avoid` (the server a retry failed on) is taken only when no other one has room.
        """
        room = self._room(ticket, proven=True)
        if not room:
            return None
        if avoid is not None and len(room) > 1:
            room = [i for i in room if i != avoid]
        if len(room) == 1:
            return room[0]
        return max(room, key=self._preference)

    def _room(self, ticket: Ticket | None, *, proven: bool, count: bool = True) -> list[int]:
        """The usable servers with room (for `ticket`, by memory); `proven`: with replicas,
        only those holding a spare permit; `count`: with free slots here (else the cluster's
        count decides)."""
        servers = self._servers
        usable = self._usable()
        if ticket is None:
            room = [i for i in usable if servers[i].active < servers[i].limit]
        else:
            room = [i for i in usable if servers[i].fits(ticket, count=count)]
        if proven and self._permits:
            assert ticket is not None, "with replicas a slot is always picked for a ticket"
            room = [i for i in room if servers[i].permit_for(ticket) is not None]
        return room

    def _preference(self, i: int) -> tuple[bool, float, int, int]:
        s = self._servers[i]
        free = 0.0 if s.budget is None else s.budget - s.used
        return (not self._cooling(i), free, s.limit - s.active, -i)

    def _take(self, ticket: Ticket, server: int) -> None:
        if ticket._grant(server):
            slots = self._servers[server]
            if self._permits:
                ticket.permit = slots.spare.pop(_covering(slots, ticket))
            slots.active += 1
            ticket.charged = slots.cost(ticket)
            slots.used += ticket.charged
            self._holders.add(ticket)
            self._active += 1

    def _upload_ended(self) -> None:
        self._uploading -= 1
        assert self._uploading >= 0, "upload ended twice"
        self._check_idle()

    def _free(self, ticket: Ticket) -> None:
        server = ticket.server
        assert server is not None, "slot released twice"
        ticket.server = None
        self._holders.discard(ticket)
        slots = self._servers[server]
        slots.active -= 1
        # Back to exactly 0 when the card is empty: float residue never builds up.
        slots.used = max(0.0, slots.used - ticket.charged) if slots.active else 0.0
        ticket.charged = 0.0
        self._active -= 1
        assert self._servers[server].active >= 0, "slot released twice"
        permit = ticket.permit
        if permit is not None:
            ticket.permit = None
            self._unproven.pop(ticket, None)
            self.release_permit(permit)

    def _release(self, ticket: Ticket) -> None:
        self._free(ticket)
        self._hand_over()

    def _pause(self, ticket: Ticket) -> None:
        self._free(ticket)
        self._paused += 1
        self._hand_over()

    def _move(self, ticket: Ticket) -> bool:
        current = ticket.server
        assert current is not None
        here = self._servers[current]
        charged = ticket.charged
        here.active -= 1  # as if free: may the slot be had elsewhere?
        here.used -= charged
        target = self._pick(avoid=current, ticket=ticket)
        here.active += 1
        here.used += charged
        if target is None or target == current:
            return False
        self._free(ticket)
        self._grant_again(ticket, target)
        self._hand_over()
        return True

    def _grant_again(self, ticket: Ticket, server: int) -> None:
        slots = self._servers[server]
        ticket.server = ticket.last_server = server
        if self._permits:
            ticket.permit = slots.spare.pop(_covering(slots, ticket))
        slots.active += 1
        ticket.charged = slots.cost(ticket)
        slots.used += ticket.charged
        self._holders.add(ticket)
        self._active += 1

    def _resume(self, ticket: Ticket) -> None:
        self._retry_waiters.append(ticket)
        self._hand_over()

    def _drop_paused(self, ticket: Ticket) -> None:
        with contextlib.suppress(ValueError):
            self._retry_waiters.remove(ticket)
        self._paused -= 1
        assert self._paused >= 0, "paused ticket left twice"
        self._hand_over()  # by memory, the ticket behind it may fit where it did not

    def _hand_over(self) -> None:
        # Retries first (they are older than every queued task), then first-in first-out: the
        # oldest waiter gets the freed slot directly. By memory, a later one that fits may
        # pass a head that does not, for `backfill_seconds` after the head was first passed.
        while True:
            head = self._first()
            if head is None:
                break
            server = self._pick(avoid=head.last_server, ticket=head)
            if server is not None:
                self._start(head, server)
                continue
            passer = self._backfill(head)
            if passer is None:
                break
            ticket, server = passer
            if head.passed_at is None:
                head.passed_at = self._clock.monotonic()
            self._start(ticket, server)
        self._check_idle()
        if self._permits:
            for slots in self._servers:  # permits nobody here can use now go back at once
                while slots.spare:
                    self.release_permit(slots.spare.pop())
            self._bump()

    def _first(self) -> Ticket | None:
        """The head: the oldest retry waiting for a slot, else the first in the queue."""
        if self._retry_waiters:
            return self._retry_waiters[0]
        while self._waiters and self._waiters[0]._granted.done():  # refused: not waiting
            self._waiters.popleft()
        return self._waiters[0] if self._waiters else None

    def _backfill(self, head: Ticket) -> tuple[Ticket, int] | None:
        """A later ticket that fits now while the head does not (admission by memory only),
        unless the head has been passed for `backfill_seconds` already (counted from its first
        pass, on the ticket: a retry that is head for a moment does not reset it)."""
        for ticket in self._passers(head):
            server = self._pick(avoid=ticket.last_server, ticket=ticket)
            if server is not None:
                return ticket, server
        return None

    def _passers(self, head: Ticket) -> Iterator[Ticket]:
        """The tickets that may pass `head` now, in order (see `_backfill`)."""
        if all(s.budget is None for s in self._servers):
            return  # by count, a later task fits exactly when the head does
        now = self._clock.monotonic()
        since = now if head.passed_at is None else head.passed_at
        if now - since >= self.backfill_seconds:
            return
        for ticket in itertools.chain(self._retry_waiters, self._waiters):
            if ticket is not head and not ticket._granted.done():
                yield ticket

    def _start(self, ticket: Ticket, server: int) -> None:
        if ticket._paused:
            self._retry_waiters.remove(ticket)
            self._paused -= 1
        else:
            self._waiters.remove(ticket)
        self._take(ticket, server)

    def _drop_waiter(self, ticket: Ticket) -> None:
        with contextlib.suppress(ValueError):  # already handed a slot or refused
            self._waiters.remove(ticket)
        self._hand_over()  # by memory, the ticket behind it may fit where it did not

    def _check_idle(self) -> None:
        if self._active == 0 and not self._waiters and self._paused == 0 and not self._uploading:
            self._idle.set()


def _covering(slots: _Server, ticket: Ticket) -> int:
    index = slots.permit_for(ticket)
    assert index is not None, "a slot was picked without a permit that covers the ticket"
    return index
