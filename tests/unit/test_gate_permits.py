"""The gate in permits mode (issue #17): replicas sharing each server's slots through leases.

With `permits=True` a slot on a server also needs a permit (a Redis lease the cluster shares).
The gate stays synchronous: the coordinator asks it who wants a permit (`wants`), acquires one
and hands it over (`add_permit`); a freed slot gives its permit back (`release_permit`); a lost
permit is listed (`unproven`) until a forced acquisition puts it back (`replace_permit`); while
Redis cannot be reached (`set_coordinated(False)`) nothing new starts and arrivals beyond the
queue are refused `coordination_unavailable`.

Plain tests pin each of those rules on one gate. A hypothesis state machine then drives two or
three replicas' gates against one in-memory fake of Redis's leases, with the coordinator's
steps cut at its awaits (an acquisition under way while the books change), through arrivals,
finishes, retry delays, cancellations, queue timeouts, lost leases, Redis going away and back,
live limits and health verdicts; every permit is released exactly once and nothing leaks.
"""

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from gatekeeper.clock import FakeClock
from gatekeeper.gate import Gate, Refused, Ticket
from gatekeeper.policy.memory import MemoryModel
from gatekeeper.policy.outcomes import RejectReason

CARD = MemoryModel(2.0, 0.8)
"""A task needs 2 GiB + 0.8 GiB per minute of audio (10 s → 2.13, 300 s → 6, 600 s → 10)."""
BUDGET = 18.0


@dataclass(eq=False)
class _Lease:
    """A permit as the tests hand it over: the server it is on and, by memory, what it holds
    (`count` and `audio`: what the cluster had on the card when it was granted)."""

    server: int
    weight: float = 0.0
    count: int = 1
    audio: tuple[float | None, ...] = ()


def _permit_gate(limit: int | list[int] = 1, *, max_queue: int = 5) -> tuple[Gate, list[object]]:
    """A permits gate whose given-back permits are recorded in order."""
    gate = Gate(limit=limit, max_queue=max_queue, permits=True)
    released: list[object] = []
    gate.release_permit = released.append
    return gate, released


def _memory_gate(*, backfill: float = 60.0) -> tuple[Gate, FakeClock, list[object]]:
    clock = FakeClock()
    gate = Gate(limit=8, max_queue=10, clock=clock, backfill_seconds=backfill, permits=True)
    gate.set_memory(0, budget=BUDGET, model=CARD)
    released: list[object] = []
    gate.release_permit = released.append
    return gate, clock, released


def _start(gate: Gate, ticket: Ticket) -> _Lease:
    """Play the coordinator once: `ticket` is who wants a permit; acquire it on the first server
    offered (with the weight it would cost there) and hand it over; it starts with it."""
    want = gate.wants()
    assert want is not None
    assert want[0] is ticket
    server = want[1][0]
    lease = _Lease(server, gate.permit_cost(ticket, server)[0])
    assert gate.add_permit(server, lease) is True
    assert ticket.granted
    assert ticket.permit is lease
    return lease


def _arrive(gate: Gate, audio: float | None = None) -> Ticket:
    return gate.begin_upload().enter(audio)


# -- a permit per slot ---------------------------------------------------------------------------


async def test_nothing_starts_without_a_permit() -> None:
    """An arrival waits, however many local slots are free, until a permit is handed over."""
    gate, released = _permit_gate([2, 1])
    ticket = _arrive(gate)
    assert not ticket.granted
    assert gate.counts().queued == 1
    assert gate.wants() == (ticket, [0, 1]), "the server with the most room first"
    lease = _start(gate, ticket)
    assert (ticket.server, lease.server) == (0, 0)
    assert gate.counts().active == 1
    assert released == []


async def test_a_freed_slot_gives_its_permit_back_rather_than_to_the_next_waiter() -> None:
    """A task ending releases its permit (the replicas' heads compete for it); the local waiter
    behind it does not inherit it and starts only with a permit of its own."""
    gate, released = _permit_gate(1)
    first = _arrive(gate)
    lease = _start(gate, first)
    second = _arrive(gate)
    first.leave()
    assert released == [lease]
    assert first.permit is None
    assert not second.granted
    assert gate.wants() == (second, [0])
    _start(gate, second)


async def test_the_head_keeps_its_place_while_this_replicas_own_tasks_fill_the_server() -> None:
    """`wants` names the head also for a server this replica fills (the cluster's count refuses
    it meanwhile, and it keeps its place in the cluster's order); a permit granted there
    anyway (the running task's own lease was lost) is given back, the local limit holds."""
    gate, released = _permit_gate(1)
    running = _arrive(gate)
    lost = _start(gate, running)
    head = _arrive(gate)
    assert gate.wants() == (head, [0])
    gate.permit_lost(lost)
    extra = _Lease(0)
    assert gate.add_permit(0, extra) is False
    assert released == [extra]
    assert not head.granted
    assert gate.counts().servers[0].active == 1


async def test_a_permit_for_a_head_that_left_is_released_at_once() -> None:
    """The head leaves while its permit is being acquired: nobody here can use the permit, so
    add_permit gives it back at once (False), and nothing starts."""
    gate, released = _permit_gate(1)
    head = _arrive(gate)
    assert gate.wants() == (head, [0])
    head.leave()  # its client hung up during the acquisition
    assert gate.wants() is None
    lease = _Lease(0)
    assert gate.add_permit(0, lease) is False
    assert released == [lease]
    counts = gate.counts()
    assert (counts.active, counts.queued) == (0, 0)


async def test_a_permit_for_a_head_that_left_goes_to_the_next_waiter() -> None:
    """The head left during the acquisition but another waiter can use the permit: it starts."""
    gate, released = _permit_gate(1)
    head, behind = _arrive(gate), _arrive(gate)
    head.leave()
    lease = _Lease(0)
    assert gate.add_permit(0, lease) is True
    assert behind.granted
    assert behind.permit is lease
    assert released == []


async def test_a_permit_on_a_server_no_longer_usable_goes_back() -> None:
    """The health probe found the server down during the acquisition (another is up): the
    permit on it is given back, and the head waits for one where it may go."""
    gate, released = _permit_gate([1, 1])
    head = _arrive(gate)
    assert gate.wants() == (head, [0, 1])
    gate.set_usable(0, False)
    assert gate.wants() == (head, [1])
    lease = _Lease(0)
    assert gate.add_permit(0, lease) is False
    assert released == [lease]
    assert not head.granted


async def test_a_retry_comes_before_the_queue_and_prefers_another_server() -> None:
    """After a pause the task wants a permit back ahead of every queued task, its failed
    server offered last."""
    gate, released = _permit_gate([2, 1])
    retried = _arrive(gate)
    lease = _start(gate, retried)
    assert retried.server == 0
    queued = _arrive(gate)
    retried.pause()
    assert released == [lease], "the retry delay gives the permit back"
    assert gate.wants() == (queued, [0, 1])
    resumer = asyncio.get_running_loop().create_task(retried.resume())
    await asyncio.sleep(0)
    assert gate.wants() == (retried, [1, 0]), "ahead of the queue; server 0 failed it"
    _start(gate, retried)
    await asyncio.wait_for(resumer, 5)
    assert retried.server == 1


async def test_slots_free_here_are_no_room_while_tasks_wait() -> None:
    """Another replica may hold the slots that look free here: once a task waits, arrivals
    get only ASR_MAX_QUEUE places, not the limit again."""
    gate, _ = _permit_gate(2, max_queue=2)
    waiting = [_arrive(gate), _arrive(gate)]  # the first took a free slot as room
    assert gate.counts().queued == 2
    assert gate.arrival_refusal() is RejectReason.QUEUE_FULL, "2 slots free here, no room"
    for ticket in waiting:
        ticket.leave()
    assert gate.arrival_refusal() is None


async def test_move_needs_a_permit() -> None:
    """A slot cannot move to another server without a permit there: `move` keeps it."""
    gate, released = _permit_gate([1, 1])
    ticket = _arrive(gate)
    _start(gate, ticket)
    assert ticket.move() is False
    assert ticket.server == 0
    assert released == []


async def test_every_change_of_the_books_moves_the_generation() -> None:
    """The coordinator sleeps on `changed(generation)`: an arrival, a departure, a lost permit
    and Redis's state each wake it."""
    gate, _ = _permit_gate(1)
    seen = gate.generation
    waiter = asyncio.get_running_loop().create_task(gate.changed(seen))
    await asyncio.sleep(0)
    assert not waiter.done()
    ticket = _arrive(gate)
    await asyncio.wait_for(waiter, 5)
    steps: list[Callable[[], object]] = [
        lambda: _start(gate, ticket),
        lambda: gate.permit_lost(ticket.permit),
        lambda: gate.set_coordinated(False),
        lambda: gate.set_coordinated(True),
        ticket.leave,
    ]
    for step in steps:
        seen = gate.generation
        step()
        assert gate.generation > seen, step


# -- Redis unreachable ---------------------------------------------------------------------------


async def test_redis_down_starts_nothing_and_refuses_overflow_coordination_unavailable() -> None:
    """Redis down: no free slot can be proven, so arrivals only queue (up to ASR_MAX_QUEUE) and
    the next is refused `coordination_unavailable`; back up, the same overflow is queue_full
    (slots free here while tasks wait are no room: other replicas may hold them)."""
    gate, released = _permit_gate(2, max_queue=2)
    running = _arrive(gate)
    lease = _start(gate, running)
    gate.set_coordinated(False)
    assert gate.coordinated is False
    waiting = [_arrive(gate), _arrive(gate)]
    assert gate.arrival_refusal() is RejectReason.COORDINATION_UNAVAILABLE
    for enter in (gate.begin_upload, gate.enter):
        with pytest.raises(Refused) as refused:
            enter()
        assert refused.value.reason is RejectReason.COORDINATION_UNAVAILABLE
    running.leave()
    assert released == [lease], "a slot given back still releases its permit"
    assert not any(t.granted for t in waiting)
    gate.set_coordinated(True)
    assert gate.arrival_refusal() is RejectReason.QUEUE_FULL
    for enter in (gate.begin_upload, gate.enter):
        with pytest.raises(Refused) as refused:
            enter()
        assert refused.value.reason is RejectReason.QUEUE_FULL


# -- lost permits --------------------------------------------------------------------------------


async def test_a_lost_permit_is_listed_until_a_forced_one_replaces_it() -> None:
    """The task keeps running (the GPU is on it) and is listed by `unproven` until the
    coordinator puts it back on the books; the lost permit itself is never released then."""
    gate, released = _permit_gate([1, 1])
    ticket = _arrive(gate)
    lost = _start(gate, ticket)
    gate.permit_lost(lost)
    assert ticket.granted
    assert gate.unproven() == [(ticket, 0)]
    forced = _Lease(0)
    assert gate.replace_permit(ticket, forced) is True
    assert gate.unproven() == []
    assert ticket.permit is forced
    ticket.leave()
    assert released == [forced]


async def test_an_unproven_task_that_ends_releases_its_lost_permit_once() -> None:
    """The task ends before the forced acquisition returns: its lost permit is given back (a
    no-op for Redis), and the forced one is refused (the coordinator releases it)."""
    gate, released = _permit_gate(1)
    ticket = _arrive(gate)
    lost = _start(gate, ticket)
    gate.permit_lost(lost)
    ticket.leave()
    assert released == [lost]
    assert gate.unproven() == []
    assert gate.replace_permit(ticket, _Lease(0)) is False
    assert released == [lost]


async def test_a_lost_permit_nobody_holds_changes_nothing() -> None:
    """A loss reported for a permit already given back (its release under way) is ignored."""
    gate, released = _permit_gate(1)
    ticket = _arrive(gate)
    lease = _start(gate, ticket)
    ticket.leave()
    seen = gate.generation
    gate.permit_lost(lease)
    assert gate.unproven() == []
    assert gate.generation == seen
    assert released == [lease]


# -- admission by memory -------------------------------------------------------------------------


async def test_wants_offers_the_backfill_passer_when_the_head_fits_nowhere() -> None:
    """By memory, a head that fits on no card does not block the coordinator: `wants` names a
    later task that fits (within the backfill bound), and the permit starts it."""
    gate, clock, released = _memory_gate(backfill=60.0)
    for _ in range(2):
        _start(gate, _arrive(gate, 300))  # 6 GiB each: 12 of 18
    meeting = _arrive(gate, 600)  # 10 GiB: fits nowhere now
    short = _arrive(gate, 60)  # 2.8 GiB: fits
    assert gate.wants() == (short, [0])
    weight, budget = gate.permit_cost(short, 0)
    assert (weight, budget) == (pytest.approx(2.8), BUDGET)
    lease = _Lease(0, weight)
    assert gate.add_permit(0, lease) is True
    assert short.permit is lease
    assert not meeting.granted
    assert meeting.passed_at == clock.now
    also = _arrive(gate, 60)
    assert gate.wants() == (also, [0]), "the bound is still open"
    clock.advance(60.0)
    assert gate.wants() is None, "passed for the whole bound: the head is served next"
    assert released == []


async def test_wants_is_none_when_nobody_fits_by_memory() -> None:
    """No waiter fits beside the running tasks: the coordinator acquires nothing."""
    gate, _, _ = _memory_gate(backfill=0.0)
    for _ in range(3):
        _start(gate, _arrive(gate, 300))  # 18 of 18
    _arrive(gate, 10)
    assert gate.wants() is None


# Found while writing this file, fixed: `add_permit` started whoever the hand-over picked, with
# a permit acquired for the ticket `wants()` named, and a lease's weight is that ticket's
# estimate. When the waiter changed during the round trip (the head left, a retry came first, a
# running task ended so the head fits now and no longer needs the passer) a heavier task ran on
# a lighter lease, and the other replicas saw memory free on the card that it used. Now a permit
# starts only a ticket it covers (`_Server.permit_for`).
async def test_a_permit_never_starts_a_task_heavier_than_it_was_weighed_for() -> None:
    """A lease weighed for a 10 s file (2.13 GiB) must not start a 10-minute one (10 GiB)."""
    gate, _, released = _memory_gate(backfill=0.0)
    small = _arrive(gate, 10)
    big = _arrive(gate, 600)
    assert gate.wants() == (small, [0])
    lease = _Lease(0, gate.permit_cost(small, 0)[0])  # the coordinator acquires for `small`
    small.leave()  # its client hangs up during the round trip
    gate.add_permit(0, lease)
    if big.granted:
        assert lease.weight >= gate.permit_cost(big, 0)[0], "10 GiB runs on a 2.13 GiB lease"
    else:
        assert released == [lease]


# -- any interleaving of replicas: every permit accounted for ----------------------------------

MAX_SERVERS = 3


@dataclass(eq=False)
class _Permit:
    """One lease in the fake Redis."""

    replica: int
    server: int
    number: int
    forced: bool
    count: int = 1
    audio: tuple[float | None, ...] = ()
    weight: float = 0.0  # the machine's gates admit by count

    def __repr__(self) -> str:
        forced = " forced" if self.forced else ""
        return f"<permit {self.number} of replica {self.replica} on {self.server}{forced}>"


class _FakeLeases:
    """Redis's leases in memory: per server the live permits. `acquire` grants one when fewer
    than `limit` are live (or whatever the count, `force`); a lost permit is forgotten; a
    permit is released at most once, and only when live or lost."""

    def __init__(self, servers: int) -> None:
        self.live: list[set[_Permit]] = [set() for _ in range(servers)]
        self.lost: set[_Permit] = set()
        self.released: set[_Permit] = set()
        self.up = True
        self.forced = [0] * servers  # forced grants since the books were last checked
        self._numbers = itertools.count()

    def acquire(
        self, replica: int, server: int, limit: int, *, force: bool = False
    ) -> _Permit | None:
        assert self.up
        if not force and len(self.live[server]) >= limit:
            return None
        permit = _Permit(replica, server, next(self._numbers), force)
        self.live[server].add(permit)
        if force:
            self.forced[server] += 1
        return permit

    def release(self, permit: _Permit) -> None:
        assert permit not in self.released, f"{permit} released twice"
        live = self.live[permit.server]
        assert permit in live or permit in self.lost, f"{permit} released, never granted"
        live.discard(permit)
        self.lost.discard(permit)
        self.released.add(permit)

    def lose(self, permit: _Permit) -> None:
        self.live[permit.server].remove(permit)
        self.lost.add(permit)

    def all_live(self) -> set[_Permit]:
        return set().union(*self.live)


@dataclass(eq=False)
class _Pending:
    """The coordinator's acquisition under way (it awaits Redis): granted, not handed over."""

    permit: _Permit
    ticket: Ticket  # the one `wants` named, or (forced) the unproven holder it is for
    forced: bool = False


@dataclass(eq=False)
class _Replica:
    """One gatekeeper: its gate and what the test knows of each of its tickets."""

    index: int
    gate: Gate
    limits: list[int]
    usable: list[bool]
    coordinated: bool = True
    queue: list[Ticket] = field(default_factory=list)  # waiting for a first slot, in order
    retrying: list[Ticket] = field(default_factory=list)  # delay over, waiting, in order
    paused: list[Ticket] = field(default_factory=list)  # in a retry delay, holding nothing
    holders: list[Ticket] = field(default_factory=list)
    left: list[Ticket] = field(default_factory=list)
    resumers: dict[Ticket, "asyncio.Task[None]"] = field(default_factory=dict)
    arrivals: int = 0
    refused: int = 0
    pending: _Pending | None = None
    local_ceiling: list[int] = field(default_factory=list)  # active allowed per server
    seen: tuple[int, bool] = (0, False)  # (generation, whether the coordinator had work)

    def head(self) -> Ticket | None:
        if self.retrying:
            return self.retrying[0]
        return self.queue[0] if self.queue else None

    def active(self) -> list[int]:
        active = [0] * len(self.limits)
        for ticket in self.holders:
            assert ticket.server is not None
            active[ticket.server] += 1
        return active

    def eligible(self) -> list[int]:
        servers = range(len(self.limits))
        return [i for i in servers if self.usable[i]] or list(servers)

    def room(self) -> list[int]:
        """Where the head asks for a permit, in order: every usable server, full here or not
        (the cluster's count decides), the most room first, then the first; a retry's failed
        server last."""
        active = self.active()
        room = self.eligible()
        room.sort(key=lambda i: (active[i] - self.limits[i], i))
        head = self.head()
        avoid = None if head is None else head.last_server
        if avoid in room and len(room) > 1:
            room.remove(avoid)
            room.append(avoid)
        return room


_PICK = st.integers(min_value=0, max_value=63)


class PermitGatesMachine(RuleBasedStateMachine):
    """Two or three replicas' permits gates (1–3 servers each, the same limits at first) share one
    fake of Redis's leases. A coordinator step is cut in two at its await, so the books may change
    while an acquisition is under way. `Gate._start` is wrapped to check every grant."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.replicas: list[_Replica] = []
        self.leases = _FakeLeases(MAX_SERVERS)
        self.servers = 0
        self.max_queue = 0
        self.cluster_ceiling: list[int] = []
        self.orphans: list[_Permit] = []  # granted while the reply was lost (Redis down)
        self.delivering: _Replica | None = None
        self.violations: list[str] = []
        self.healthy = False  # the last rule and the invariants after it all passed

    def teardown(self) -> None:
        try:
            if self.healthy and self.replicas:
                self._everything_ends()
        finally:
            for replica in self.replicas:
                for task in replica.resumers.values():
                    task.cancel()
            self._settle()
            self.loop.close()

    # -- plumbing --------------------------------------------------------------------------

    def _run(self, call: Callable[[], object]) -> object:
        """Run a synchronous gate call inside the loop (tickets are made on a running loop)."""

        async def inside() -> object:
            return call()

        return self.loop.run_until_complete(inside())

    def _settle(self) -> None:
        for _ in range(4):
            self.loop.run_until_complete(asyncio.sleep(0))
        for replica in self.replicas:
            for place in (replica.queue, replica.retrying):
                for ticket in [t for t in place if t.granted]:
                    place.remove(ticket)
                    replica.holders.append(ticket)

    def _watch(self, replica: _Replica) -> None:
        gate = replica.gate
        start, grant_again = gate._start, gate._grant_again

        def watched_start(ticket: Ticket, server: int) -> None:
            if self.delivering is not replica:
                self.violations.append(f"replica {replica.index}: a slot started, no permit")
            if not gate.coordinated:
                self.violations.append(f"replica {replica.index}: started while uncoordinated")
            if ticket is not gate._first():
                self.violations.append(f"replica {replica.index}: the head was passed")
            if not gate._servers[server].spare:
                self.violations.append(f"replica {replica.index}: no permit on server {server}")
            start(ticket, server)

        def watched_grant_again(ticket: Ticket, server: int) -> None:
            self.violations.append(f"replica {replica.index}: moved without a permit")
            grant_again(ticket, server)

        def release(permit: object) -> None:
            assert isinstance(permit, _Permit)
            if permit.replica != replica.index:
                self.violations.append(f"replica {replica.index} released {permit}")
            self.leases.release(permit)

        gate._start = watched_start  # type: ignore[method-assign]
        gate._grant_again = watched_grant_again  # type: ignore[method-assign]
        gate.release_permit = release

    def _pick(
        self, choice: int, places: Callable[[_Replica], list[Ticket]]
    ) -> tuple[_Replica, Ticket]:
        """One ticket among every replica's `places`, numbered across replicas."""
        found = [(r, t) for r in self.replicas for t in places(r)]
        return found[choice % len(found)]

    def _any(self, places: Callable[[_Replica], list[Ticket]]) -> bool:
        return any(places(r) for r in self.replicas)

    def _replica(self, choice: int) -> _Replica:
        return self.replicas[choice % len(self.replicas)]

    def _work(self, replica: _Replica) -> bool:
        """Whether its coordinator would call Redis now (not sleep on `changed`)."""
        return bool(replica.gate.unproven()) or replica.gate.wants() is not None

    def _answered(self, replica: _Replica) -> None:
        """A Redis call of this replica's leases answered or failed: they tell the gate."""
        replica.coordinated = self.leases.up
        replica.gate.set_coordinated(self.leases.up)

    def _finish_acquisition(self, replica: _Replica) -> None:
        """The coordinator's await returns: hand the permit over (or refuse it)."""
        pending = replica.pending
        assert pending is not None
        replica.pending = None
        permit = pending.permit
        if not self.leases.up:  # the reply was lost: the leases sweep it once Redis answers
            self.orphans.append(permit)
            self._answered(replica)
            return
        self._answered(replica)
        gate = replica.gate
        if pending.forced:
            ticket = pending.ticket
            if gate.replace_permit(ticket, permit):
                assert ticket.permit is permit
                assert ticket.server == permit.server, "re-booked on another server"
            else:
                assert ticket.server is None or ticket not in gate._unproven
                self.leases.release(permit)  # the coordinator gives it back
            return
        self.delivering = replica
        try:
            started = self._run(lambda: gate.add_permit(permit.server, permit))
        finally:
            self.delivering = None
        users = [t for r in self.replicas for t in r.gate._holders if t.permit is permit]
        if started:
            assert len(users) == 1
            assert users[0].server == permit.server
        else:
            assert not users
            assert permit in self.leases.released, "a permit nobody can use is given back"
        self._settle()

    # -- rules -----------------------------------------------------------------------------

    @initialize(
        replicas=st.integers(min_value=2, max_value=3),
        limits=st.lists(st.integers(min_value=1, max_value=3), min_size=1, max_size=MAX_SERVERS),
        max_queue=st.integers(min_value=0, max_value=4),
    )
    def build(self, replicas: int, limits: list[int], max_queue: int) -> None:
        self.servers = len(limits)
        self.max_queue = max_queue
        self.leases = _FakeLeases(self.servers)
        self.cluster_ceiling = list(limits)
        for index in range(replicas):

            async def make() -> Gate:
                return Gate(limit=limits, max_queue=max_queue, clock=self.clock, permits=True)

            gate = self.loop.run_until_complete(make())
            replica = _Replica(index, gate, list(limits), [True] * self.servers)
            replica.local_ceiling = list(limits)
            replica.seen = (gate.generation, False)
            self._watch(replica)
            self.replicas.append(replica)

    @rule(which=_PICK, uploads=st.lists(st.booleans(), min_size=1, max_size=3))
    def arrive(self, which: int, uploads: list[bool]) -> None:
        """Tasks arrive (after their upload, or straight in): each queues, or is refused
        queue_full, or coordination_unavailable while Redis cannot be reached."""
        self.healthy = False
        replica = self._replica(which)
        for upload in uploads:
            self._arrive(replica, upload)

    def _arrive(self, replica: _Replica, upload: bool) -> None:
        gate = replica.gate
        waiting = len(replica.queue)
        if upload and replica.coordinated and not (replica.queue or replica.retrying):
            # Nobody waits here: a local slot free counts as room (the cluster may agree).
            active = replica.active()
            free = sum(max(0, replica.limits[i] - active[i]) for i in replica.eligible())
            room = self.max_queue + free
        else:
            room = self.max_queue  # slots free here while tasks wait are no room

        def enter() -> Ticket | Refused:
            try:
                return gate.begin_upload().enter() if upload else gate.enter()
            except Refused as refused:
                return refused

        got = self._run(enter)
        replica.arrivals += 1
        if waiting < room:
            assert isinstance(got, Ticket), (got, waiting, room)
            assert not got.granted, "started without a permit"
            replica.queue.append(got)
        else:
            assert isinstance(got, Refused), (waiting, room)
            expected = (
                RejectReason.QUEUE_FULL
                if replica.coordinated
                else RejectReason.COORDINATION_UNAVAILABLE
            )
            assert got.reason is expected
            replica.refused += 1
        self._settle()

    @rule(which=_PICK, at_once=st.lists(st.booleans(), min_size=1, max_size=3))
    def coordinator_steps(self, which: int, at_once: list[bool]) -> None:
        """A replica's coordinator (one with something to do, if any) runs a few steps: each
        puts back a lost permit (forced), else acquires one for whom `wants` names on the
        servers it lists, in order. `at_once`: the reply comes back before anything else
        happens; else the acquisition stays under way and the next step takes its reply."""
        self.healthy = False
        busy = [r for r in self.replicas if r.pending is not None or self._work(r)]
        replica = (busy or self.replicas)[which % len(busy or self.replicas)]
        for now in at_once:
            self._step(replica, at_once=now)

    def _step(self, replica: _Replica, *, at_once: bool) -> None:
        if replica.pending is not None:
            self._finish_acquisition(replica)
            return
        gate = replica.gate
        if not self._work(replica):
            return
        if not self.leases.up:
            self._answered(replica)  # CoordinationUnavailable: tries again later
            return
        self._answered(replica)
        unproven = gate.unproven()
        if unproven:
            ticket, server = unproven[0]
            assert ticket in replica.holders
            forced = self.leases.acquire(replica.index, server, 1, force=True)
            assert forced is not None
            replica.pending = _Pending(forced, ticket, forced=True)
        else:
            want = gate.wants()
            assert want is not None
            ticket, servers = want
            limits = gate.counts().servers
            for server in servers:
                permit = self.leases.acquire(replica.index, server, limits[server].limit)
                if permit is not None:
                    replica.pending = _Pending(permit, ticket)
                    break
        if at_once and replica.pending is not None:
            self._finish_acquisition(replica)

    @precondition(lambda self: any(r.pending is not None for r in self.replicas))
    @rule(which=_PICK, meanwhile=st.sampled_from(["nothing", "it goes", "it pauses"]))
    def acquisition_returns(self, which: int, meanwhile: str) -> None:
        """An acquisition under way comes back (the books may have changed meanwhile); just
        before, the task it is for may go (its client hangs up, or it ends) or pause."""
        self.healthy = False
        busy = [r for r in self.replicas if r.pending is not None]
        replica = busy[which % len(busy)]
        assert replica.pending is not None
        ticket = replica.pending.ticket
        if meanwhile == "it goes":
            self._leave(replica, ticket)
        elif meanwhile == "it pauses" and ticket in replica.holders:
            self._run(ticket.pause)
            replica.holders.remove(ticket)
            replica.resumers.pop(ticket, None)
            replica.paused.append(ticket)
            self._settle()
        self._finish_acquisition(replica)

    @precondition(lambda self: self._any(lambda r: r.holders))
    @rule(which=_PICK, event=st.sampled_from(["finish", "pause", "move"]))
    def holder(self, which: int, event: str) -> None:
        """A task holding a slot ends, or an attempt failed and it gives its slot back for the
        retry delay: either way its permit is given back (nobody here inherits it). Or, before
        a retry that kept its slot, it tries to move: without a permit elsewhere it stays."""
        self.healthy = False
        replica, ticket = self._pick(which, lambda r: r.holders)
        server, permit = ticket.server, ticket.permit
        if event == "move":
            assert self._run(ticket.move) is False
            assert (ticket.server, ticket.permit) == (server, permit)
            return
        self._run(ticket.leave if event == "finish" else ticket.pause)
        replica.holders.remove(ticket)
        if event == "finish":
            replica.left.append(ticket)
        else:
            replica.resumers.pop(ticket, None)
            replica.paused.append(ticket)
        assert ticket.permit is None
        assert permit in self.leases.released
        self._settle()

    @precondition(lambda self: self._any(lambda r: r.paused))
    @rule(which=_PICK)
    def resume(self, which: int) -> None:
        """The retry delay is over: the task wants a slot again, ahead of the queue."""
        self.healthy = False
        replica, ticket = self._pick(which, lambda r: r.paused)
        replica.paused.remove(ticket)
        replica.resumers[ticket] = self.loop.create_task(ticket.resume())
        replica.retrying.append(ticket)
        self._settle()
        assert not ticket.granted, "a retry started without a permit"

    @precondition(lambda self: self._any(lambda r: [*r.queue, *r.paused, *r.retrying]))
    @rule(which=_PICK, time_out=st.booleans())
    def give_up(self, which: int, time_out: bool) -> None:
        """A task without a slot goes: the client of a queued task (the head too), of one in
        its retry delay or waiting to retry, hangs up; or a queued task waits ASR_QUEUE_TIMEOUT
        for a permit that never comes and is refused queue_timeout."""
        self.healthy = False
        replica, ticket = self._pick(which, lambda r: [*r.queue, *r.paused, *r.retrying])
        if time_out and ticket in replica.queue:
            waiting = self.loop.create_task(ticket.wait(5.0))
            self._settle()
            assert not waiting.done()
            self.clock.advance(5.0)
            self._settle()
            assert waiting.done()
            error = waiting.exception()
            assert isinstance(error, Refused)
            assert error.reason is RejectReason.QUEUE_TIMEOUT
            replica.queue.remove(ticket)
            replica.left.append(ticket)
        else:
            self._leave(replica, ticket)

    def _leave(self, replica: _Replica, ticket: Ticket) -> None:
        """The ticket leaves, wherever it is (a no-op once it left)."""
        resumer = replica.resumers.pop(ticket, None)
        if resumer is not None and not resumer.done():
            resumer.cancel()
            self._settle()
        self._run(ticket.leave)
        for place in (replica.queue, replica.paused, replica.retrying, replica.holders):
            if ticket in place:
                place.remove(ticket)
                replica.left.append(ticket)
        assert ticket.permit is None
        self._settle()

    @precondition(
        lambda self: self._any(
            lambda r: [t for t in r.holders if t.permit in self.leases.all_live()]
        )
    )
    @rule(which=_PICK)
    def lose_permit(self, which: int) -> None:
        """A running task's lease is lost (its replica paused past the lease, Redis restarted
        empty, or renewals unconfirmed while Redis was down): the cluster forgets it, the task
        keeps running and is listed as unproven."""
        self.healthy = False
        live = self.leases.all_live()
        replica, ticket = self._pick(which, lambda r: [t for t in r.holders if t.permit in live])
        permit = ticket.permit
        assert isinstance(permit, _Permit)
        self.leases.lose(permit)
        self._run(lambda: replica.gate.permit_lost(permit))
        assert (ticket, ticket.server) in replica.gate.unproven()
        assert ticket.granted

    @rule(
        which=_PICK,
        event=st.sampled_from(["replica sees up", "redis down", "replica sees down", "redis up"]),
    )
    def weather(self, which: int, event: str) -> None:
        """Redis stops or starts answering (the replicas learn it at their next call; back up,
        the acquisitions whose replies were lost are swept), or one replica's leases tell its
        gate what they saw (a renewal round, Redis slow for this replica alone)."""
        self.healthy = False
        if event.startswith("redis"):
            self._redis(event == "redis up")
        else:
            replica = self._replica(which)
            replica.coordinated = event == "replica sees up"
            self._run(lambda: replica.gate.set_coordinated(replica.coordinated))
            self._settle()

    def _redis(self, up: bool) -> None:
        self.leases.up = up
        if up:
            for permit in self.orphans:
                self.leases.release(permit)
            self.orphans.clear()

    @rule(
        which=_PICK,
        change=st.sampled_from(["server limit", "limits", "usable"]),
        everywhere=st.booleans(),
        server=st.integers(min_value=0, max_value=MAX_SERVERS - 1),
        limits=st.lists(st.integers(1, 3), min_size=MAX_SERVERS, max_size=MAX_SERVERS),
        usable=st.booleans(),
    )
    def reconfigure(
        self,
        which: int,
        change: str,
        everywhere: bool,
        server: int,
        limits: list[int],
        usable: bool,
    ) -> None:
        """On one replica, or every one: a server's limit moves (the config, or an adaptive
        limit), max_concurrent changes per server, or the health probe's verdict on a server.
        Raising starts nobody without a permit; lowering stops nobody."""
        self.healthy = False
        server %= self.servers
        limits = limits[: self.servers]
        for replica in self.replicas if everywhere else [self._replica(which)]:
            gate = replica.gate
            if change == "server limit":
                self._run(lambda gate=gate: gate.set_server_limit(server, limits[0]))
                replica.limits[server] = limits[0]
            elif change == "limits":
                self._run(lambda gate=gate: gate.set_limits(limit=limits))
                replica.limits = list(limits)
            else:
                self._run(lambda gate=gate: gate.set_usable(server, usable))
                replica.usable[server] = usable
        self._settle()

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def books(self) -> None:
        """Everything below, in one place, so `healthy` says they all passed."""
        if not self.replicas:
            return
        assert not self.violations, self.violations
        for replica in self.replicas:
            self._the_gate_agrees_with_the_test(replica)
            self._every_slot_holds_a_permit(replica)
            self._the_local_limits_hold(replica)
            self._wants_names_the_head(replica)
            self._no_wake_up_is_missed(replica)
        self._every_live_permit_is_accounted_for()
        self._the_cluster_limits_hold()
        self.healthy = True

    def _the_gate_agrees_with_the_test(self, replica: _Replica) -> None:
        counts = replica.gate.counts()
        assert replica.gate.coordinated is replica.coordinated
        assert [s.limit for s in counts.servers] == replica.limits
        assert [s.usable for s in counts.servers] == replica.usable
        assert [s.active for s in counts.servers] == replica.active()
        assert counts.active == len(replica.holders)
        assert counts.queued == len(replica.queue)
        assert counts.retrying == len(replica.paused) + len(replica.retrying)
        assert counts.retry_waiting == len(replica.retrying)
        assert counts.uploading == 0
        everyone = [
            *replica.queue,
            *replica.retrying,
            *replica.paused,
            *replica.holders,
            *replica.left,
        ]
        assert len(set(everyone)) == len(everyone) == replica.arrivals - replica.refused
        for ticket in replica.holders:
            assert ticket.granted
        for ticket in [*replica.queue, *replica.retrying, *replica.paused, *replica.left]:
            assert ticket.server is None
            assert ticket.permit is None

    def _every_slot_holds_a_permit(self, replica: _Replica) -> None:
        """A holder's permit is live in the cluster, or lost and listed by `unproven`."""
        unproven = dict(replica.gate.unproven())
        live = self.leases.all_live()
        for ticket in replica.holders:
            permit = ticket.permit
            assert isinstance(permit, _Permit), f"a slot without a permit: {permit}"
            assert (permit.replica, permit.server) == (replica.index, ticket.server)
            if ticket in unproven:
                assert unproven[ticket] == ticket.server
                assert permit in self.leases.lost
            else:
                assert permit in live, f"{permit} neither live nor listed as unproven"
        assert set(unproven) <= set(replica.holders)
        for slots in replica.gate._servers:
            assert not slots.spare, "a spare permit kept after the hand-over"

    def _every_live_permit_is_accounted_for(self) -> None:
        """Live in the fake exactly: the proven holders', the acquisitions under way, and the
        orphans of lost replies; nothing else (no leak)."""
        held = {
            t.permit for r in self.replicas for t in r.holders if t.permit in self.leases.all_live()
        }
        pending = {r.pending.permit for r in self.replicas if r.pending is not None}
        assert self.leases.all_live() == held | pending | set(self.orphans)
        assert len(held) + len(pending) + len(self.orphans) == len(self.leases.all_live())

    def _the_local_limits_hold(self, replica: _Replica) -> None:
        """Slots per server stay within the limit, unless it was lowered under running tasks
        (then no new one starts until they are below it)."""
        active = replica.active()
        for server, limit in enumerate(replica.limits):
            assert active[server] <= max(limit, replica.local_ceiling[server]), (server, active)
            replica.local_ceiling[server] = max(limit, active[server])

    def _the_cluster_limits_hold(self) -> None:
        """Live permits per server stay within the highest limit a replica acquires with,
        unless it was lowered under them or a lost permit was forced back on the books."""
        for server in range(self.servers):
            top = max(r.limits[server] for r in self.replicas)
            live = len(self.leases.live[server])
            allowed = max(top, self.cluster_ceiling[server]) + self.leases.forced[server]
            assert live <= allowed, (server, live, allowed)
            self.cluster_ceiling[server] = max(top, live)
            self.leases.forced[server] = 0
            running = sum(r.active()[server] for r in self.replicas)
            unproven = sum(1 for r in self.replicas for _, s in r.gate.unproven() if s == server)
            assert running - unproven <= live

    def _wants_names_the_head(self, replica: _Replica) -> None:
        """By count, the coordinator acquires for the head (a retry first) on every usable
        server, in the hand-over's order; for nobody when nobody waits."""
        want = replica.gate.wants()
        head = replica.head()
        assert want == (None if head is None else (head, replica.room()))

    def _no_wake_up_is_missed(self, replica: _Replica) -> None:
        """The coordinator sleeps on the gate's generation when it has nothing to do: whenever
        it has something to do again, the generation moved."""
        generation, had_work = replica.seen
        work = self._work(replica)
        if work and not had_work:
            assert replica.gate.generation != generation, "the coordinator is not woken"
        replica.seen = (replica.gate.generation, work)

    # -- the end ---------------------------------------------------------------------------

    def _everything_ends(self) -> None:
        """Every task leaves, the acquisitions under way return, the orphans are swept: no
        permit is live any more, and every gate's books are back to zero."""
        for replica in self.replicas:
            for task in replica.resumers.values():
                task.cancel()
        self._settle()
        for replica in self.replicas:
            for ticket in [*replica.holders, *replica.queue, *replica.retrying, *replica.paused]:
                self._leave(replica, ticket)
        self._redis(True)
        for replica in self.replicas:
            if replica.pending is not None:
                self._finish_acquisition(replica)
        assert self.leases.all_live() == set(), "permits leaked"
        for replica in self.replicas:
            counts = replica.gate.counts()
            assert (counts.active, counts.queued, counts.retrying) == (0, 0, 0)
            assert [s.active for s in counts.servers] == [0] * self.servers
            assert replica.gate.unproven() == []
            assert replica.gate.wants() is None


PermitGatesMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=50, deadline=None
)
TestPermitGatesInterleavings = PermitGatesMachine.TestCase
