"""The gate with several Whisper servers (issue #15): one queue, slots kept per server.

Plain tests pin each rule of the choice of server (most room, first in the list on a tie, a
server cooling down after an OOM last, a server found down skipped unless all are, a retry on
another server than the one it failed on), the live limit and health changes and the books.
A hypothesis state machine then drives a real pool gate through any interleaving of arrivals,
finishes, cancellations, retry delays, moves, health verdicts, limit changes and cool-downs
against a model of that choice, watching every grant as it happens.
"""

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

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

from gatekeeper.gate import Gate, Refused, ServerCounts, Ticket
from gatekeeper.policy.outcomes import RejectReason


def _cooling(servers: set[int]) -> Callable[[int], bool]:
    """A `cooling` callable reading a set the test changes."""
    return lambda server: server in servers


async def _start_resume(ticket: Ticket) -> "asyncio.Task[None]":
    """Let a paused ticket ask for its slot back; return the waiting task once it asked."""
    task = asyncio.get_running_loop().create_task(ticket.resume())
    await asyncio.sleep(0)  # one turn of the loop: resume() has run up to its wait
    return task


def _actives(gate: Gate) -> list[int]:
    return [s.active for s in gate.counts().servers]


# -- the choice of server ----------------------------------------------------------------------


async def test_the_first_task_goes_to_the_server_with_the_most_room() -> None:
    """With every server idle, the one with the highest limit (the most room) gets the task."""
    gate = Gate(limit=[1, 3, 2], max_queue=5)
    ticket = gate.enter()
    assert ticket.granted
    assert ticket.server == ticket.last_server == 1
    assert _actives(gate) == [0, 1, 0]


async def test_a_tie_goes_to_the_first_server_in_the_list() -> None:
    """Equal room: the first in ASR_UPSTREAM_URL's order; then room decides again each time."""
    gate = Gate(limit=[2, 2, 2], max_queue=5)
    first, second, third, fourth = (gate.enter() for _ in range(4))
    assert first.server == 0  # 2, 2, 2: a tie
    assert second.server == 1  # 1, 2, 2: servers 1 and 2 tie
    assert third.server == 2  # 1, 1, 2
    assert fourth.server == 0  # 1, 1, 1: a tie again
    assert _actives(gate) == [2, 1, 1]


async def test_a_server_cooling_down_is_passed_over_while_another_has_room() -> None:
    """A server cooling down after an OOM gets no task while another has room, even with more
    room itself; when it is the only one with room it is used (the queue does not stall)."""
    cooling = {0}
    gate = Gate(limit=[3, 1], max_queue=5, cooling=_cooling(cooling))
    first = gate.enter()
    assert first.server == 1, "server 0 has more room but cools down"
    second = gate.enter()
    assert second.server == 0, "server 1 is full: the cooling server is the only one with room"
    first.leave()
    cooling.clear()
    third = gate.enter()
    assert third.server == 0, "cooled down: most room wins again (2 against 1)"


async def test_among_cooling_servers_the_most_room_still_wins() -> None:
    """When every server with room cools down, the usual order (most room, then first) holds."""
    gate = Gate(limit=[1, 2, 2], max_queue=5, cooling=_cooling({1, 2}))
    assert gate.enter().server == 0
    assert gate.enter().server == 1
    assert gate.enter().server == 2


async def test_a_server_found_down_gets_no_new_task_while_another_is_up() -> None:
    """An unusable server (its probe said down) gets nothing new, even when it has room and the
    usable ones are full: the task waits for a usable server instead."""
    gate = Gate(limit=[3, 1], max_queue=5)
    gate.set_usable(0, False)
    assert gate.counts().servers[0] == ServerCounts(limit=3, active=0, usable=False)
    running = gate.enter()
    assert running.server == 1
    waiting = gate.enter()
    assert not waiting.granted, "server 0 has room but is down"
    assert gate.counts().queued == 1
    running.leave()
    assert waiting.granted
    assert waiting.server == 1
    assert _actives(gate) == [0, 1]


async def test_when_no_server_is_up_all_are_used() -> None:
    """No server usable at all: the probe may be wrong, so every server is tried as if up (most
    room first), and a single server found down behaves exactly as before."""
    gate = Gate(limit=[1, 2], max_queue=5)
    gate.set_usable(0, False)
    gate.set_usable(1, False)
    assert gate.enter().server == 1
    assert gate.enter().server == 0
    assert gate.enter().server == 1
    assert not gate.enter().granted, "every slot taken: the next one queues"
    assert _actives(gate) == [1, 2]

    single = Gate(limit=2, max_queue=5)
    single.set_usable(0, False)
    assert [single.enter().granted for _ in range(3)] == [True, True, False]


async def test_the_last_server_going_down_hands_the_queue_to_all() -> None:
    """Tasks queued for the one usable server start on the others once it is found down too."""
    gate = Gate(limit=[1, 1], max_queue=5)
    gate.set_usable(1, False)
    running = gate.enter()
    waiting = gate.enter()
    assert (running.server, waiting.granted) == (0, False)
    gate.set_usable(0, False)  # nothing up: all are usable again
    assert waiting.granted
    assert waiting.server == 1


async def test_first_usable_is_the_first_server_up() -> None:
    """Requests that are not tasks go to the first usable server; with none up, the first."""
    gate = Gate(limit=[1, 1, 1], max_queue=5)
    assert gate.first_usable() == 0
    gate.set_usable(0, False)
    assert gate.first_usable() == 1
    gate.set_usable(1, False)
    gate.set_usable(2, False)
    assert gate.first_usable() == 0


# -- retries -----------------------------------------------------------------------------------


async def test_a_retry_prefers_another_server_than_the_one_it_failed_on() -> None:
    """A resumed ticket goes to another server with room, even one with less room than the
    server it failed on; `last_server` remembers where it was."""
    gate = Gate(limit=[3, 1], max_queue=5)
    ticket = gate.enter()
    assert (ticket.server, ticket.last_server) == (0, 0)
    ticket.pause()
    assert (ticket.server, ticket.last_server) == (None, 0)
    assert _actives(gate) == [0, 0]
    resumer = await _start_resume(ticket)
    assert ticket.granted
    assert ticket.server == ticket.last_server == 1, "server 0 has more room but failed it"
    await asyncio.wait_for(resumer, 5)
    assert _actives(gate) == [0, 1]


async def test_a_retry_falls_back_to_the_same_server_when_only_it_has_room() -> None:
    """When the server it failed on is the only one with room, the retry takes it at once."""
    gate = Gate(limit=[1, 1], max_queue=5)
    ticket, other = gate.enter(), gate.enter()
    assert (ticket.server, other.server) == (0, 1)
    ticket.pause()
    resumer = await _start_resume(ticket)
    assert ticket.granted
    assert ticket.server == 0
    await asyncio.wait_for(resumer, 5)


async def test_a_retry_goes_ahead_of_the_queue_on_whichever_server_frees_first() -> None:
    """A retry waiting for a slot gets the next one freed anywhere, before any queued task; its
    own slot went to the queue meanwhile (the task was only in its retry delay)."""
    gate = Gate(limit=[1, 1], max_queue=5)
    retried, other = gate.enter(), gate.enter()
    queued_first, queued_second = gate.enter(), gate.enter()
    retried.pause()
    assert queued_first.granted
    assert queued_first.server == 0, "the paused slot goes to the queue"
    resumer = await _start_resume(retried)
    assert not retried.granted
    assert gate.counts().retry_waiting == 1
    other.leave()
    assert retried.granted
    assert retried.server == 1
    assert not queued_second.granted
    await asyncio.wait_for(resumer, 5)


async def test_a_retry_avoids_a_server_found_down() -> None:
    """A retry prefers another server, but never one found down while another is up."""
    gate = Gate(limit=[1, 1, 1], max_queue=5)
    ticket = gate.enter()
    assert ticket.server == 0
    ticket.pause()
    gate.set_usable(1, False)
    resumer = await _start_resume(ticket)
    assert ticket.server == 2
    await asyncio.wait_for(resumer, 5)


# -- moving a slot -----------------------------------------------------------------------------


async def test_move_takes_the_slot_to_another_server_with_room() -> None:
    """Before a retry that kept its slot, `move()` takes it to another server with room (even
    one with less room) and says so; the books follow."""
    gate = Gate(limit=[1, 2], max_queue=5)
    ticket = gate.enter()
    assert ticket.server == 1
    assert ticket.move() is True
    assert ticket.server == ticket.last_server == 0
    assert _actives(gate) == [1, 0]
    assert ticket.move() is True, "server 1 has room again"
    assert ticket.server == 1
    assert _actives(gate) == [0, 1]


async def test_move_returns_false_when_no_other_server_has_room() -> None:
    """No other server with room (full, or found down): the slot stays where it is."""
    gate = Gate(limit=[1, 1, 2], max_queue=5)
    ticket, second, third = gate.enter(), gate.enter(), gate.enter()
    assert (ticket.server, second.server, third.server) == (2, 0, 1)
    assert ticket.move() is False, "servers 0 and 1 are full"
    assert ticket.server == 2
    second.leave()
    gate.set_usable(0, False)
    assert ticket.move() is False, "server 0 has room but is down"
    assert ticket.server == 2
    assert _actives(gate) == [0, 1, 1]


async def test_move_leaves_a_server_found_down() -> None:
    """A task on a server found down moves to one that is up (it kept its slot for a retry)."""
    gate = Gate(limit=[2, 1], max_queue=5)
    ticket = gate.enter()
    assert ticket.server == 0
    gate.set_usable(0, False)
    assert ticket.move() is True
    assert ticket.server == 1


async def test_move_refuses_a_ticket_without_a_slot() -> None:
    """Only a ticket holding a slot can move (a queued or paused one holds none)."""
    gate = Gate(limit=[1, 1], max_queue=5)
    first, second, queued = gate.enter(), gate.enter(), gate.enter()
    with pytest.raises(RuntimeError):
        queued.move()
    first.pause()  # its slot goes to the queued ticket
    with pytest.raises(RuntimeError):
        first.move()
    first.leave()
    second.leave()
    queued.leave()
    assert gate.counts().active == 0


# -- live limits and health ----------------------------------------------------------------------


async def test_raising_one_servers_limit_starts_waiters_there() -> None:
    """`set_server_limit` raising a server's limit hands its new slots to the queue in order."""
    gate = Gate(limit=[1, 1], max_queue=5)
    running = [gate.enter(), gate.enter()]
    assert [t.server for t in running] == [0, 1]
    waiting = [gate.enter() for _ in range(3)]
    assert not any(t.granted for t in waiting)
    gate.set_server_limit(1, 3)
    assert [t.server for t in waiting] == [1, 1, None]
    assert gate.counts().queued == 1
    assert _actives(gate) == [1, 3]


async def test_lowering_a_servers_limit_never_stops_running_tasks() -> None:
    """Lowering a limit below what runs stops nobody; that server takes no new task until it
    is below its new limit again."""
    gate = Gate(limit=[1, 3], max_queue=5)
    tickets = [gate.enter() for _ in range(4)]
    assert [t.server for t in tickets] == [1, 1, 0, 1]
    on_zero, on_one = tickets[2], [tickets[0], tickets[1], tickets[3]]
    gate.set_server_limit(1, 1)
    assert all(t.granted for t in tickets)
    assert gate.counts().servers[1] == ServerCounts(limit=1, active=3, usable=True)
    assert (gate.counts().active, gate.counts().limit) == (4, 2)
    waiting = gate.enter()
    assert not waiting.granted
    on_one[0].leave()  # server 1: 2 running, limit 1
    assert not waiting.granted
    on_one[1].leave()  # server 1: 1 running, limit 1
    assert not waiting.granted
    on_zero.leave()  # server 0 has room
    assert waiting.server == 0
    assert _actives(gate) == [1, 1]


async def test_set_limits_with_a_list_changes_each_server() -> None:
    """`set_limits(limit=[...])` sets each server's limit in order and starts waiters where a
    limit rose; one number sets every server; a wrong list is refused."""
    gate = Gate(limit=[1, 1, 1], max_queue=5)
    for _ in range(3):
        gate.enter()
    waiting = [gate.enter() for _ in range(3)]
    gate.set_limits(limit=[1, 3, 1])
    assert [t.server for t in waiting] == [1, 1, None]
    assert [s.limit for s in gate.counts().servers] == [1, 3, 1]
    assert gate.counts().limit == 5
    gate.set_limits(limit=2)
    assert [t.server for t in waiting] == [1, 1, 0]
    assert [s.limit for s in gate.counts().servers] == [2, 2, 2]
    for bad in ([1, 1], [1, 1, 1, 1], [1, 0, 1]):
        with pytest.raises(ValueError, match="each server"):
            gate.set_limits(limit=bad)
    with pytest.raises(ValueError, match="each server"):
        gate.set_limits(limit=0)
    with pytest.raises(ValueError, match="at least 1"):
        gate.set_server_limit(2, 0)
    assert [s.limit for s in gate.counts().servers] == [2, 2, 2]


async def test_a_pool_needs_a_limit_of_at_least_1_for_each_server() -> None:
    """An empty list or a zero limit is refused when the gate is built."""
    for bad in ([], [1, 0], 0):
        with pytest.raises(ValueError, match="at least 1"):
            Gate(limit=bad, max_queue=5)


async def test_a_server_usable_again_takes_queued_tasks() -> None:
    """When the probe finds a server back, tasks queued meanwhile start on it in order."""
    gate = Gate(limit=[1, 2], max_queue=5)
    gate.set_usable(1, False)
    running = gate.enter()
    assert running.server == 0
    waiting = [gate.enter() for _ in range(3)]
    assert gate.counts().queued == 3
    gate.set_usable(1, True)
    assert [t.server for t in waiting] == [1, 1, None]
    assert gate.counts().servers[1] == ServerCounts(limit=2, active=2, usable=True)


async def test_a_server_found_down_keeps_its_running_tasks() -> None:
    """Found down, a server's running tasks keep their slots (the retry rules handle them)."""
    gate = Gate(limit=[1, 1], max_queue=5)
    first, second = gate.enter(), gate.enter()
    gate.set_usable(1, False)
    assert (first.server, second.server) == (0, 1)
    assert gate.counts().servers[1] == ServerCounts(limit=1, active=1, usable=False)
    second.leave()
    assert gate.counts().servers[1].active == 0


# -- books -------------------------------------------------------------------------------------


async def test_counts_per_server_and_their_sums() -> None:
    """`counts().servers` reads each server in order; `active` and `limit` are their sums."""
    gate = Gate(limit=[3, 2, 1], max_queue=7)
    tickets = [gate.enter() for _ in range(5)]
    gate.set_usable(2, False)
    counts = gate.counts()
    assert counts.servers == (
        ServerCounts(limit=3, active=3, usable=True),
        ServerCounts(limit=2, active=2, usable=True),
        ServerCounts(limit=1, active=0, usable=False),
    )
    assert (counts.active, counts.limit, counts.max_queue) == (5, 6, 7)
    tickets[0].pause()
    counts = gate.counts()
    assert (counts.active, counts.retrying) == (4, 1)
    assert sum(s.active for s in counts.servers) == counts.active
    for ticket in tickets:
        ticket.leave()
    counts = gate.counts()
    assert (counts.active, counts.retrying, counts.queued) == (0, 0, 0)
    assert [s.active for s in counts.servers] == [0, 0, 0]
    assert all(t.server is None for t in tickets)


async def test_arrival_refusal_counts_the_sum_of_the_limits() -> None:
    """The room of slots + queue is the sum of every server's limit plus ASR_MAX_QUEUE."""
    gate = Gate(limit=[2, 1], max_queue=2)
    for _ in range(4):
        assert gate.arrival_refusal() is None
        gate.enter()
    assert gate.counts().queued == 1
    assert gate.arrival_refusal() is None
    gate.enter()
    assert gate.arrival_refusal() is RejectReason.QUEUE_FULL
    with pytest.raises(Refused) as refused:
        gate.enter()
    assert refused.value.reason is RejectReason.QUEUE_FULL
    gate.set_server_limit(1, 2)  # a queued task starts: a place is free again
    assert gate.counts().queued == 1
    assert gate.arrival_refusal() is None


# Found by this file (issue #15): an arrival was admitted by the sum of the limits, so a server
# over its lowered limit (the adaptive limit after an OOM) kept a newcomer off an idle server.
async def test_an_arrival_starts_on_an_idle_server_while_another_is_over_its_limit() -> None:
    """A server over its (lowered) limit does not keep a newcomer off an idle server."""
    gate = Gate(limit=[3, 1], max_queue=0)
    running = [gate.enter() for _ in range(3)]
    assert [t.server for t in running] == [0, 0, 0]
    gate.set_server_limit(0, 1)
    assert gate.arrival_refusal() is None, "server 1 has room: not queue_full"
    newcomer = gate.enter()
    assert newcomer.granted
    assert newcomer.server == 1


# -- any interleaving keeps the books per server -----------------------------------------------

SERVERS = 3
MAX_QUEUE = 3


@dataclass(frozen=True, slots=True)
class _Grant:
    """One slot granted, with the gate's books read just before it was taken."""

    ticket: Ticket
    server: int
    servers: tuple[ServerCounts, ...]
    retry_waiting: int


class PoolGateMachine(RuleBasedStateMachine):
    """Drives a real pool Gate (3 servers, limits 1–3) against a model of the choice of server:
    arrivals, finishes, cancellations, retry delays (pause, resume, leaving while paused),
    moves, health verdicts, limit changes and cool-downs. `Gate._take` is wrapped to read the
    books at the moment of every grant."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.limits = [1] * SERVERS
        self.usable = [True] * SERVERS
        self.cooling: set[int] = set()
        self.gate: Gate | None = None
        self.holder: dict[Ticket, int] = {}  # holding a slot: on which server
        self.queue: list[Ticket] = []  # waiting, first in first out
        self.paused: list[Ticket] = []  # in a retry delay, holding nothing
        self.retrying: list[Ticket] = []  # delay over, waiting for a slot ahead of the queue
        self.last: dict[Ticket, int] = {}  # the server of the last slot held
        self.arrival: dict[Ticket, int] = {}  # arrival order
        self.resumed: dict[Ticket, int] = {}  # order of asking for a slot back
        self.resumers: dict[Ticket, asyncio.Task[None]] = {}
        self.left: list[Ticket] = []
        self.arrivals = 0
        self.refused = 0
        self.resumes = 0
        self.grants: list[_Grant] = []
        self.last_first_grant = -1  # arrival number of the last task granted its first slot
        self.last_retry_grant = -1  # resume number of the last retry granted

    def teardown(self) -> None:
        for task in self.resumers.values():
            task.cancel()
        self._settle()
        self.loop.close()

    # -- plumbing ------------------------------------------------------------------------

    def _settle(self) -> None:
        for _ in range(3):
            self.loop.run_until_complete(asyncio.sleep(0))

    @property
    def _gate(self) -> Gate:
        assert self.gate is not None
        return self.gate

    def _watch(self, gate: Gate) -> None:
        take = gate._take

        def watched(ticket: Ticket, server: int) -> None:
            if not ticket.granted:  # a real grant (a paused ticket's future is a new one)
                counts = gate.counts()
                self.grants.append(_Grant(ticket, server, counts.servers, counts.retry_waiting))
            take(ticket, server)

        gate._take = watched  # type: ignore[method-assign]

    def _all(self) -> list[Ticket]:
        return [*self.holder, *self.queue, *self.paused, *self.retrying, *self.left]

    # -- the model -----------------------------------------------------------------------

    def _active(self) -> list[int]:
        active = [0] * SERVERS
        for server in self.holder.values():
            active[server] += 1
        return active

    def _eligible(self) -> list[int]:
        """Servers a new slot may be on: the usable ones, or all when none is."""
        return [i for i in range(SERVERS) if self.usable[i]] or list(range(SERVERS))

    def _pick(self, avoid: int | None = None, active: list[int] | None = None) -> int | None:
        """Usable with room; another than `avoid` if any; not cooling, most room, first."""
        active = self._active() if active is None else active
        room = [i for i in self._eligible() if active[i] < self.limits[i]]
        others = [i for i in room if i != avoid]
        room = others or room
        if not room:
            return None
        return max(room, key=lambda i: (i not in self.cooling, self.limits[i] - active[i], -i))

    def _grant(self, ticket: Ticket, server: int, expected: list[tuple[Ticket, int]]) -> None:
        self.holder[ticket] = server
        self.last[ticket] = server
        expected.append((ticket, server))

    def _hand_over(self, expected: list[tuple[Ticket, int]]) -> None:
        while self.retrying:
            server = self._pick(avoid=self.last[self.retrying[0]])
            if server is None:
                break
            self._grant(self.retrying.pop(0), server, expected)
        while self.queue and not self.retrying:
            server = self._pick()
            if server is None:
                break
            self._grant(self.queue.pop(0), server, expected)

    def _check_grants(self, expected: list[tuple[Ticket, int]]) -> None:
        """The gate granted exactly what the model did, in order, each within the rules."""
        got = [(g.ticket, g.server) for g in self.grants]
        assert got == expected, (
            [(self.arrival[t], s) for t, s in got],
            [(self.arrival[t], s) for t, s in expected],
        )
        for grant in self.grants:
            seen = grant.servers[grant.server]
            assert seen.active < seen.limit, f"granted on a full server: {grant}"
            any_usable = any(s.usable for s in grant.servers)
            assert seen.usable or not any_usable, f"granted on a server found down: {grant}"
            room_up = [s for s in grant.servers if s.usable and s.active < s.limit]
            assert seen.usable or not room_up
            if grant.ticket in self.resumed:  # a retry: in the order they asked
                number = self.resumed.pop(grant.ticket)
                assert number > self.last_retry_grant, "retries out of order"
                self.last_retry_grant = number
            else:  # a first slot: first in first out, and after every retry waiting
                number = self.arrival[grant.ticket]
                assert number > self.last_first_grant, "the queue was overtaken"
                self.last_first_grant = number
                assert grant.retry_waiting == 0, "a queued task went ahead of a retry"
        self.grants.clear()

    # -- rules ---------------------------------------------------------------------------

    @initialize(limits=st.lists(st.integers(min_value=1, max_value=3), min_size=3, max_size=3))
    def build(self, limits: list[int]) -> None:
        """The pool starts: three servers with their own limits."""

        async def make() -> Gate:
            return Gate(limit=limits, max_queue=MAX_QUEUE, cooling=lambda i: i in self.cooling)

        self.gate = self.loop.run_until_complete(make())
        self.limits = list(limits)
        self._watch(self.gate)

    @rule()
    def arrive(self) -> None:
        """A task arrives: it starts on the chosen server, queues, or is refused queue_full."""
        gate = self._gate

        async def enter() -> Ticket | Refused:
            try:
                return gate.enter()
            except Refused as refused:
                return refused

        got = self.loop.run_until_complete(enter())
        expected: list[tuple[Ticket, int]] = []
        server = None if self.queue or self.retrying else self._pick()
        if server is not None:
            assert isinstance(got, Ticket), got
            self.arrival[got] = self.arrivals
            self._grant(got, server, expected)
        elif len(self.queue) < MAX_QUEUE:
            assert isinstance(got, Ticket), got
            self.arrival[got] = self.arrivals
            self.queue.append(got)
        else:
            assert isinstance(got, Refused), got
            assert got.reason is RejectReason.QUEUE_FULL
            self.refused += 1
        self.arrivals += 1
        self._check_grants(expected)

    @precondition(lambda self: bool(self.holder))
    @rule(pick=st.integers(min_value=0, max_value=63))
    def finish(self, pick: int) -> None:
        """A task holding a slot ends: its slot goes to a retry first, else the queue."""
        ticket = list(self.holder)[pick % len(self.holder)]
        ticket.leave()
        del self.holder[ticket]
        self.left.append(ticket)
        expected: list[tuple[Ticket, int]] = []
        self._hand_over(expected)
        self._settle()
        self._check_grants(expected)

    @precondition(lambda self: bool(self.queue))
    @rule(pick=st.integers(min_value=0, max_value=63))
    def cancel(self, pick: int) -> None:
        """The client of a queued task hangs up: its place is given up, nobody else moves."""
        ticket = self.queue.pop(pick % len(self.queue))
        ticket.leave()
        self.left.append(ticket)
        self._settle()
        self._check_grants([])

    @precondition(lambda self: bool(self.holder))
    @rule(pick=st.integers(min_value=0, max_value=63))
    def pause(self, pick: int) -> None:
        """An attempt failed: the task gives its slot back for its retry delay."""
        ticket = list(self.holder)[pick % len(self.holder)]
        ticket.pause()
        self.resumers.pop(ticket, None)  # a task may retry more than once
        del self.holder[ticket]
        self.paused.append(ticket)
        expected: list[tuple[Ticket, int]] = []
        self._hand_over(expected)
        self._settle()
        self._check_grants(expected)

    @precondition(lambda self: bool(self.paused))
    @rule(pick=st.integers(min_value=0, max_value=63))
    def resume(self, pick: int) -> None:
        """The retry delay is over: the task asks for a slot, ahead of the queue, preferably
        on another server than the one it failed on."""
        ticket = self.paused.pop(pick % len(self.paused))
        self.resumers[ticket] = self.loop.create_task(ticket.resume())
        self.retrying.append(ticket)
        self.resumed[ticket] = self.resumes
        self.resumes += 1
        expected: list[tuple[Ticket, int]] = []
        self._hand_over(expected)
        self._settle()
        self._check_grants(expected)

    @precondition(lambda self: bool(self.paused or self.retrying))
    @rule(pick=st.integers(min_value=0, max_value=63))
    def leave_between_attempts(self, pick: int) -> None:
        """The client of a task in its retry delay (or waiting to retry) hangs up."""
        between = [*self.paused, *self.retrying]
        ticket = between[pick % len(between)]
        resumer = self.resumers.get(ticket)
        if resumer is not None and not resumer.done():
            resumer.cancel()
            self._settle()
        ticket.leave()
        for place in (self.paused, self.retrying):
            if ticket in place:
                place.remove(ticket)
        self.resumed.pop(ticket, None)
        self.left.append(ticket)
        self._settle()
        self._check_grants([])

    @precondition(lambda self: bool(self.holder))
    @rule(pick=st.integers(min_value=0, max_value=63))
    def move(self, pick: int) -> None:
        """Before a retry that kept its slot: the slot moves to another server with room."""
        ticket = list(self.holder)[pick % len(self.holder)]
        current = self.holder[ticket]
        active = self._active()
        active[current] -= 1
        target = self._pick(avoid=current, active=active)
        before = self._gate.counts().servers
        moved = ticket.move()
        expected: list[tuple[Ticket, int]] = []
        if target is None or target == current:
            assert moved is False
            assert ticket.server == current
        else:
            assert moved is True
            seen = before[target]
            assert seen.active < seen.limit, "moved to a full server"
            assert seen.usable or not any(s.usable for s in before), "moved to a server down"
            self.holder[ticket] = self.last[ticket] = target
            self._hand_over(expected)
        self._settle()
        self._check_grants(expected)

    @rule(server=st.integers(min_value=0, max_value=SERVERS - 1), usable=st.booleans())
    def set_usable(self, server: int, usable: bool) -> None:
        """The health probe's verdict on one server changes (or is repeated)."""
        self._gate.set_usable(server, usable)
        self.usable[server] = usable
        expected: list[tuple[Ticket, int]] = []
        self._hand_over(expected)
        self._settle()
        self._check_grants(expected)

    @rule(server=st.integers(min_value=0, max_value=SERVERS - 1), limit=st.integers(1, 3))
    def set_server_limit(self, server: int, limit: int) -> None:
        """One server's (adaptive) limit moves: raising starts waiters, lowering stops none."""
        self._gate.set_server_limit(server, limit)
        self.limits[server] = limit
        expected: list[tuple[Ticket, int]] = []
        self._hand_over(expected)
        self._settle()
        self._check_grants(expected)

    @rule(
        limit=st.one_of(
            st.integers(1, 3), st.lists(st.integers(1, 3), min_size=SERVERS, max_size=SERVERS)
        )
    )
    def set_limits(self, limit: int | list[int]) -> None:
        """The operator changes max_concurrent live: one number, or one per server."""
        self._gate.set_limits(limit=limit)
        self.limits = [limit] * SERVERS if isinstance(limit, int) else list(limit)
        expected: list[tuple[Ticket, int]] = []
        self._hand_over(expected)
        self._settle()
        self._check_grants(expected)

    @rule(server=st.integers(min_value=0, max_value=SERVERS - 1))
    def toggle_cooling(self, server: int) -> None:
        """A server starts (or ends) its cool-down after an OOM: only a preference, so nobody
        starts or stops."""
        self.cooling ^= {server}
        self._settle()
        self._check_grants([])

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def books_per_server_match(self) -> None:
        counts = self._gate.counts()
        tickets = self._all()
        assert [s.limit for s in counts.servers] == self.limits
        assert [s.usable for s in counts.servers] == self.usable
        held = [0] * SERVERS
        for ticket in tickets:
            if ticket.server is not None:
                held[ticket.server] += 1
        assert [s.active for s in counts.servers] == held == self._active()
        assert counts.active == sum(s.active for s in counts.servers)
        assert counts.limit == sum(s.limit for s in counts.servers)
        assert counts.queued == len(self.queue)
        assert counts.retrying == len(self.paused) + len(self.retrying)
        assert counts.retry_waiting == len(self.retrying)

    @invariant()
    def every_ticket_is_where_the_model_says(self) -> None:
        for ticket, server in self.holder.items():
            assert ticket.granted
            assert ticket.server == ticket.last_server == server
            resumer = self.resumers.get(ticket)
            if resumer is not None:
                assert resumer.done()
                assert resumer.exception() is None
        for ticket in self.queue:
            assert not ticket.granted
            assert ticket.server is None
        for ticket in [*self.paused, *self.retrying]:
            assert not ticket.granted
            assert ticket.server is None
            assert ticket.last_server == self.last[ticket]
            resumer = self.resumers.get(ticket)
            assert (resumer is None) == (ticket in self.paused)
            assert resumer is None or not resumer.done()
        for ticket in self.left:
            assert ticket.server is None

    @invariant()
    def nothing_is_lost(self) -> None:
        counts = self._gate.counts()
        placed = counts.active + counts.queued + counts.retrying
        assert placed + self.refused + len(self.left) == self.arrivals
        assert len(set(self._all())) == len(self._all()) == self.arrivals - self.refused

    @invariant()
    def nobody_waits_while_a_usable_server_has_room(self) -> None:
        if not (self.queue or self.retrying):
            return
        active = self._active()
        room = [i for i in self._eligible() if active[i] < self.limits[i]]
        assert not room, (room, active, self.limits)


PoolGateMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestPoolGateInterleavings = PoolGateMachine.TestCase
