"""The gate with admission by GPU memory (issue #16): a real asyncio loop and a FakeClock.

Plain tests pin each rule: a task starts on a card only when its estimated peak fits beside the
card's running tasks (the count limit still caps; a task bigger than the card runs alone, on an
empty card); the server with the most free memory is chosen; a later task that fits passes a
head that does not, for `backfill_seconds` after the head was first passed, and then the head is
served next (long files do not starve, short ones do not wait behind a meeting for nothing); the
books (`used`, what each ticket was charged) stay right through model changes, retries and
moves. A hypothesis state machine then drives a real two-card gate through any interleaving.
"""

import asyncio
import math

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
from gatekeeper.policy.memory import UNKNOWN_AUDIO_SECONDS, MemoryModel, fits
from gatekeeper.policy.outcomes import RejectReason

CARD = MemoryModel(2.0, 0.8)
"""The simulator's default card: a task needs 2 GiB + 0.8 GiB per minute of audio."""
BUDGET = 18.0
"""24 GiB less 6 reserved."""
# Costs on CARD: 10 s → 2.13, 30 s → 2.4, 60 s → 2.8, 300 s → 6, 600 s → 10, 1800 s → 26.


def _gate(
    limit: int | list[int] = 8,
    *,
    budget: float | list[float | None] | None = BUDGET,
    model: MemoryModel = CARD,
    backfill: float = 60.0,
    max_queue: int = 50,
) -> tuple[Gate, FakeClock]:
    clock = FakeClock()
    gate = Gate(limit=limit, max_queue=max_queue, clock=clock, backfill_seconds=backfill)
    servers = len(gate.counts().servers)
    budgets = budget if isinstance(budget, list) else [budget] * servers
    for server, card in enumerate(budgets):
        gate.set_memory(server, budget=card, model=model)
    return gate, clock


def _arrive(gate: Gate, audio: float | None) -> Ticket:
    """A task whose upload holds `audio` seconds (None: unreadable) arrives."""
    return gate.begin_upload().enter(audio)


def _used(gate: Gate, server: int = 0) -> float:
    return gate.counts().servers[server].memory_used


def _charged(tickets: list[Ticket], server: int = 0) -> float:
    return math.fsum(t.charged for t in tickets if t.server == server)


async def _start_resume(ticket: Ticket) -> "asyncio.Task[None]":
    """Let a paused ticket ask for its slot back; return the waiting task once it asked."""
    task = asyncio.get_running_loop().create_task(ticket.resume())
    await asyncio.sleep(0)
    return task


# -- fit beside the running tasks ----------------------------------------------------------------


async def test_a_task_starts_only_when_it_fits_beside_the_running_ones() -> None:
    gate, _ = _gate()
    first, second, third = (_arrive(gate, 300) for _ in range(3))  # 6 GiB each
    assert all(t.granted for t in (first, second, third)), "18 of 18: exactly full fits"
    assert [t.charged for t in (first, second, third)] == pytest.approx([6.0] * 3)
    assert _used(gate) == pytest.approx(18.0)
    assert gate.counts().servers[0].memory_budget == BUDGET
    short = _arrive(gate, 10)
    assert not short.granted, "2.13 GiB more does not fit, though 5 slots are free"
    assert gate.counts().queued == 1
    first.leave()
    assert short.granted
    assert short.charged == pytest.approx(2.0 + 0.8 * 10 / 60)
    assert _used(gate) == pytest.approx(12.0 + short.charged)


async def test_the_count_limit_still_caps() -> None:
    gate, _ = _gate(limit=2)
    running = [_arrive(gate, 10), _arrive(gate, 10)]
    third = _arrive(gate, 10)
    assert not third.granted, "memory has room (4.3 of 18) but the limit is 2"
    running[0].leave()
    assert third.granted


async def test_a_task_bigger_than_the_card_runs_alone_on_an_empty_card() -> None:
    """A 30-minute file (26 GiB on an 18 GiB card) waits until the card is empty, then runs
    alone: nothing starts beside it however small, until it ends."""
    gate, _ = _gate(backfill=0.0)
    small = _arrive(gate, 60)
    big = _arrive(gate, 1800)
    assert not big.granted
    small.leave()
    assert big.granted
    assert _used(gate) == pytest.approx(26.0)
    beside = _arrive(gate, 10)
    assert not beside.granted, "nothing beside a task bigger than the card"
    big.leave()
    assert beside.granted


async def test_an_unreadable_file_is_costed_as_a_long_one() -> None:
    """Unknown length: costed as an hour (50 GiB here), so it too runs alone, and is never
    refused for that."""
    gate, _ = _gate()
    unknown = _arrive(gate, None)
    assert unknown.granted
    assert unknown.charged == pytest.approx(CARD.cost(UNKNOWN_AUDIO_SECONDS))
    later = _arrive(gate, 10)
    assert not later.granted
    unknown.leave()
    assert later.granted


async def test_without_a_budget_the_count_alone_decides() -> None:
    gate, _ = _gate(limit=2, budget=None)
    first, second = _arrive(gate, 1800), _arrive(gate, None)
    assert first.granted
    assert second.granted
    assert (first.charged, second.charged, _used(gate)) == (0.0, 0.0, 0.0)
    assert gate.counts().servers[0].memory_budget is None


# Found by this file (fixed): the arrival check before the upload counted free slots, not
# memory, so with the memory full and the queue at ASR_MAX_QUEUE an upload was let in.
async def test_an_arrival_is_refused_before_its_upload_when_the_queue_is_full_by_memory() -> None:
    gate, _ = _gate(max_queue=1)
    for _ in range(3):
        _arrive(gate, 300)
    queued = _arrive(gate, 300)
    assert not queued.granted
    assert gate.counts().queued == 1
    assert gate.arrival_refusal() is RejectReason.QUEUE_FULL


# -- the choice of server ------------------------------------------------------------------------


async def test_the_server_with_the_most_free_memory_is_chosen() -> None:
    gate, _ = _gate(limit=[4, 4], budget=[12.0, 18.0])
    first = _arrive(gate, 300)  # 6 GiB
    assert first.server == 1, "18 GiB free against 12"
    second = _arrive(gate, 300)
    assert second.server == 0, "12 free on both: a tie goes to the most free slots (4 vs 3)"
    third = _arrive(gate, 300)
    assert third.server == 1, "6 free against 12"
    assert [_used(gate, 0), _used(gate, 1)] == pytest.approx([6.0, 12.0])


async def test_free_memory_comes_before_free_slots() -> None:
    gate, _ = _gate(limit=[2, 6], budget=[18.0, 8.0])
    assert _arrive(gate, 10).server == 0, "18 GiB free but 2 slots, against 8 GiB and 6 slots"


async def test_a_task_goes_where_it_fits() -> None:
    """A task too big for what is left on one card goes to the other."""
    gate, _ = _gate(limit=[8, 2], budget=[18.0, 9.0])
    meeting = _arrive(gate, 600)  # 10 GiB
    assert meeting.server == 0  # 18 against 9
    eight = _arrive(gate, 480)  # 8.4 GiB: fits only on server 1 (9 free against 8)
    assert eight.server == 1
    ten = _arrive(gate, 600)
    assert not ten.granted, "10 GiB fits on neither card"
    meeting.leave()
    assert ten.server == 0


# -- backfill: who may pass the head, and for how long -------------------------------------------


async def test_a_later_task_that_fits_passes_a_head_that_does_not() -> None:
    """A meeting at the head of the queue does not fit; the short files behind it that fit
    start at once instead of waiting behind it."""
    gate, _ = _gate(backfill=60.0)
    _arrive(gate, 300)
    _arrive(gate, 300)  # 12 of 18
    meeting = _arrive(gate, 600)  # 10: does not fit
    s1 = _arrive(gate, 60)  # 2.8 → 14.8
    s2 = _arrive(gate, 30)  # 2.4 → 17.2
    assert not meeting.granted
    assert s1.granted
    assert s2.granted
    assert gate.counts().queued == 1
    assert _used(gate) == pytest.approx(17.2)


async def test_backfill_takes_later_tasks_in_arrival_order() -> None:
    """When room comes, the later tasks that fit start in arrival order (first fit, not the
    smallest first)."""
    gate, _ = _gate(backfill=60.0)
    running = [_arrive(gate, 300) for _ in range(3)]  # 18 of 18
    meeting = _arrive(gate, 600)  # 10
    s1, s2, s3 = _arrive(gate, 60), _arrive(gate, 10), _arrive(gate, 30)  # 2.8, 2.13, 2.4
    assert not any(t.granted for t in (meeting, s1, s2, s3))
    running[2].leave()  # 6 free: s1 (2.8), then s2 (2.13); 1.07 left, s3 (2.4) waits
    assert [t.granted for t in (meeting, s1, s2, s3)] == [False, True, True, False]
    assert _used(gate) == pytest.approx(12 + 2.8 + CARD.cost(10))


async def test_after_the_bound_nothing_passes_the_head_and_it_starts_as_soon_as_it_fits() -> None:
    gate, clock = _gate(backfill=60.0)
    a, b = _arrive(gate, 300), _arrive(gate, 300)  # 12
    meeting = _arrive(gate, 600)  # 10
    s1 = _arrive(gate, 60)  # first pass, at t0: 14.8
    assert s1.granted
    clock.advance(59)
    s2 = _arrive(gate, 30)  # 59 s after the first pass: still within the bound → 17.2
    assert s2.granted
    s2.leave()  # 14.8 used: the meeting (10) still does not fit
    clock.advance(1)
    late = _arrive(gate, 10)  # 60 s after the first pass: the bound is over
    assert not late.granted, "the head has been passed for 60 s: it is served next"
    assert not meeting.granted
    b.leave()  # 8.8 used: 10 more is 18.8, still no
    assert not meeting.granted
    assert not late.granted, "fits (2.13 beside 8.8), but the head comes first"
    s1.leave()  # 6 used: the meeting fits
    assert meeting.granted
    assert not late.granted, "16 used: 2.13 more does not fit"
    a.leave()
    assert late.granted


async def test_the_bound_runs_from_the_first_pass_not_from_the_arrival() -> None:
    """A head that waited long without anybody passing it may still be passed, for the full
    bound from the first time it is."""
    gate, clock = _gate(backfill=60.0)
    running = [_arrive(gate, 300) for _ in range(3)]  # 18 of 18
    meeting = _arrive(gate, 600)
    clock.advance(500)
    running[0].leave()  # 12: the meeting does not fit; nobody is behind it
    short = _arrive(gate, 60)
    assert short.granted, "first pass, 500 s after the meeting arrived"
    clock.advance(30)
    assert _arrive(gate, 30).granted, "30 s after the first pass"
    assert not meeting.granted


async def test_a_new_head_gets_a_new_bound() -> None:
    gate, clock = _gate(backfill=60.0)
    a, b = _arrive(gate, 300), _arrive(gate, 300)  # 12
    first = _arrive(gate, 600)  # 10
    assert _arrive(gate, 60).granted  # passes `first` at t0 (14.8)
    clock.advance(120)
    second = _arrive(gate, 600)  # behind `first`
    a.leave()  # 8.8: `first` does not fit
    b.leave()  # 2.8: `first` starts (12.8); `second` (10) does not fit: it is the head now
    assert first.granted
    assert not second.granted
    short = _arrive(gate, 60)  # 15.6: passes the new head, whose bound has just begun
    assert short.granted


async def test_backfill_needs_a_memory_budget() -> None:
    """By count alone a later task fits exactly when the head does: strict order."""
    gate, _ = _gate(limit=1, budget=None)
    running = _arrive(gate, 10)
    head, later = _arrive(gate, 600), _arrive(gate, 10)
    running.leave()
    assert head.granted
    assert not later.granted


# Fixed, found by this file: backfill_seconds=0 let one task pass the head. `_backfill` only
# refuses once `_head_passed_at` is set, and it is set by the first pass itself.
# Minimal reproduction: Gate(limit=8, max_queue=10, backfill_seconds=0), set_memory(0,
# budget=18, model=(2, 0.8)); arrivals of 300 s, 300 s (run), 600 s (waits), 60 s → the 60 s
# task starts ahead of the 600 s one; a second 60 s arrival waits.
async def test_backfill_seconds_0_is_strict_first_in_first_out() -> None:
    gate, _ = _gate(backfill=0.0)
    _arrive(gate, 300)
    _arrive(gate, 300)
    meeting = _arrive(gate, 600)
    short = _arrive(gate, 60)
    assert not meeting.granted
    assert not short.granted, "ASR_BACKFILL_SECONDS=0: strict first-in first-out"


# Fixed, found by this file: the bound was kept for "the head" the hand-over last saw, so a retry
# taking its slot back (retries go ahead of the queue, so it is the head for a moment) resets
# the queue head's bound: it can be passed for another `backfill_seconds`, again at every retry.
# Minimal reproduction: backfill 60; r = 60 s, a = b = 300 s run (14.8); meeting = 600 s waits;
# s1 = 10 s passes at t0; at t0 + 60 s a 10 s arrival waits (right); r.pause(), r.resume()
# (r starts again); a.leave() → the waiting 10 s task passes the meeting at t0 + 60 s.
async def test_a_retry_does_not_reset_the_bound_of_the_head() -> None:
    gate, clock = _gate(backfill=60.0)
    retried, a, _b = _arrive(gate, 60), _arrive(gate, 300), _arrive(gate, 300)  # 14.8
    meeting = _arrive(gate, 600)
    assert _arrive(gate, 10).granted  # passes at t0: 16.93
    clock.advance(60)
    late = _arrive(gate, 10)
    assert not late.granted
    retried.pause()
    resumer = await _start_resume(retried)
    assert retried.granted
    await asyncio.wait_for(resumer, 5)
    a.leave()  # 10.93: the meeting does not fit; `late` would
    assert not meeting.granted
    assert not late.granted, "the meeting has been passed for 60 s"


# Fixed, found by this file: when the head of the queue left without a slot (its client hangs up, or
# its queue timeout), the queue does not move: a task behind it that fits keeps waiting until
# some other task ends. `Ticket.leave()` → `_drop_waiter` (and a queue timeout) only take the
# ticket out; nothing calls `_hand_over`. (By count alone this cannot happen: behind a head that
# does not fit, nothing fits.) Minimal reproduction: backfill 60; a = b = 300 s run (12);
# meeting = 600 s waits; s1 = 60 s passes; after 60 s s2 = 60 s waits (right);
# meeting.leave() → s2 (2.8 beside 14.8) still waits.
async def test_when_the_head_leaves_the_next_one_that_fits_starts() -> None:
    gate, clock = _gate(backfill=60.0)
    _arrive(gate, 300)
    _arrive(gate, 300)
    meeting = _arrive(gate, 600)
    assert _arrive(gate, 60).granted
    clock.advance(60)
    waiting = _arrive(gate, 60)
    assert not waiting.granted
    meeting.leave()
    assert waiting.granted, "2.8 GiB beside 14.8 fits, and nobody is ahead any more"


async def test_when_the_head_times_out_the_next_one_that_fits_starts() -> None:
    gate, clock = _gate(backfill=60.0)
    _arrive(gate, 300)
    _arrive(gate, 300)
    meeting = _arrive(gate, 600)
    assert _arrive(gate, 60).granted
    clock.advance(60)
    waiting = _arrive(gate, 60)
    waiter = asyncio.get_running_loop().create_task(meeting.wait(30))
    await asyncio.sleep(0)
    clock.advance(31)
    with pytest.raises(Refused) as refused:
        await asyncio.wait_for(waiter, 5)
    assert refused.value.reason is RejectReason.QUEUE_TIMEOUT
    assert waiting.granted, "2.8 GiB beside 14.8 fits, and nobody is ahead any more"


# -- long files do not starve, short ones do not wait for nothing ---------------------------------


def _stream_of_shorts(
    gate: Gate, clock: FakeClock, *, seconds: int
) -> tuple[Ticket, list[tuple[float, Ticket]], float | None]:
    """Short files (60 s of audio, 2.8 GiB) arrive every 5 s and run 20 s each; a meeting
    (600 s, 10 GiB) arrives at t = 17 s, when 4 shorts run (11.2 GiB): it needs the card down
    to 2 shorts, which the stream never leaves it at by itself. Returns the meeting, every
    short with the time it started, and when the meeting started (None: never)."""
    ends: list[tuple[float, Ticket]] = []
    started: dict[Ticket, float] = {}
    waiting: list[Ticket] = []
    meeting: Ticket | None = None
    meeting_at: float | None = None
    t0 = clock.now

    def note() -> None:
        nonlocal meeting_at
        for ticket in [t for t in waiting if t.granted]:
            waiting.remove(ticket)
            started[ticket] = clock.now - t0
            ends.append((clock.now + 20, ticket))
        if meeting is not None and meeting.granted and meeting_at is None:
            meeting_at = clock.now - t0

    for second in range(seconds + 1):
        for end, ticket in [e for e in ends if e[0] <= clock.now]:
            ends.remove((end, ticket))
            ticket.leave()
        note()
        if second % 5 == 0:
            waiting.append(_arrive(gate, 60))
        if second == 17:
            meeting = _arrive(gate, 600)
        note()
        clock.advance(1)
    assert meeting is not None
    by_time = sorted(((at, ticket) for ticket, at in started.items()), key=lambda x: x[0])
    return meeting, by_time, meeting_at


async def test_a_stream_of_short_files_cannot_starve_a_meeting() -> None:
    """The meeting waits at most the bound after it was first passed, plus the time for the
    card to drain (a short's 20 s); then short files run beside it again."""
    gate, clock = _gate(backfill=60.0)
    meeting, shorts, meeting_at = _stream_of_shorts(gate, clock, seconds=400)
    passes = [t for t, _ in shorts if t >= 17 and (meeting_at is None or t < meeting_at)]
    assert passes, "short files passed the meeting meanwhile (they did not wait for nothing)"
    first_pass = passes[0]
    assert meeting_at is not None, "the meeting never started"
    assert meeting_at <= first_pass + 60 + 20
    assert all(t < first_pass + 60 for t in passes), "nothing passed after the bound"
    assert any(t > meeting_at for t, _ in shorts), "short files run beside the meeting"
    assert meeting.charged == pytest.approx(10.0)


async def test_without_the_bound_the_meeting_would_starve() -> None:
    """The same stream with an unbounded backfill: the meeting never starts (what the bound
    is for)."""
    gate, clock = _gate(backfill=1e9)
    meeting, _, meeting_at = _stream_of_shorts(gate, clock, seconds=400)
    assert meeting_at is None
    assert not meeting.granted


# -- the books -----------------------------------------------------------------------------------


async def test_used_returns_to_zero_when_every_ticket_left() -> None:
    gate, _ = _gate(limit=8)
    tickets = [_arrive(gate, audio) for audio in (300, 90, 45, 10, 120, 600)]
    held = [t for t in tickets if t.granted]
    assert _used(gate) == pytest.approx(_charged(held))
    for ticket in tickets:
        ticket.leave()
        assert _used(gate) == pytest.approx(_charged([t for t in tickets if t.granted]))
    assert _used(gate) == 0.0
    assert all(t.charged == 0.0 for t in tickets)
    assert gate.counts().active == 0


async def test_a_model_change_costs_the_running_tasks_again() -> None:
    """`set_memory` with new figures while tasks run: the running tasks are costed again by
    them (the best estimate of what they hold now: right after an OOM raised the figures the
    same set must not look as if it fitted), new tasks too, and `used` comes back to exactly 0
    at the end."""
    gate, _ = _gate(limit=8)
    old = [_arrive(gate, 300), _arrive(gate, 60)]
    assert [t.charged for t in old] == pytest.approx([6.0, 2.8])
    gate.set_memory(0, budget=BUDGET, model=MemoryModel(4.0, 1.0))
    assert gate.memory_model(0) == MemoryModel(4.0, 1.0)
    assert [t.charged for t in old] == pytest.approx([9.0, 5.0])
    assert _used(gate) == pytest.approx(14.0)
    new = _arrive(gate, 60)
    assert not new.granted, "5 more beside 14 does not fit in 18"
    old[0].leave()
    assert new.granted
    assert _used(gate) == pytest.approx(10.0)
    gate.set_memory(0, budget=BUDGET, model=MemoryModel(1.0, 0.1))
    assert _used(gate) == pytest.approx(2 * 1.1)
    for ticket in [old[1], new]:
        ticket.leave()
    assert _used(gate) == 0.0


async def test_a_model_change_lets_waiters_in() -> None:
    """Lower figures start the tasks that now fit (the running ones are costed again by them);
    a new budget too."""
    gate, _ = _gate()
    for _ in range(3):
        _arrive(gate, 300)
    waiting = _arrive(gate, 300)
    gate.set_memory(0, budget=BUDGET, model=MemoryModel(7.0, 0.0))
    assert not waiting.granted, "the running tasks now hold 21"
    gate.set_memory(0, budget=BUDGET, model=MemoryModel(4.0, 0.0))
    assert waiting.granted, "4 beside 12 fits"
    assert waiting.charged == pytest.approx(4.0)
    late = _arrive(gate, 300)
    assert not late.granted
    gate.set_memory(0, budget=20.0)
    assert late.granted, "4 beside 16 fits the new budget"


async def test_used_comes_back_to_exactly_zero() -> None:
    """No float dust on an empty card: 2.6 + 3.2 − 2.6 − 3.2 is 4.4e-16 in floats, yet the
    books read exactly 0 once both left."""
    gate, _ = _gate()
    first, second = _arrive(gate, 45), _arrive(gate, 90)
    first.leave()
    second.leave()
    assert _used(gate) == 0.0


async def test_audio_ahead_sums_what_waits_with_unknown_counted_as_given() -> None:
    gate, _ = _gate(limit=[2, 1], budget=[BUDGET, None])
    running = [_arrive(gate, 300), _arrive(gate, 300), _arrive(gate, 300)]
    assert [t.server for t in running] == [0, 0, 1]
    queued = [_arrive(gate, 30), _arrive(gate, None), _arrive(gate, 90)]
    assert not any(t.granted for t in queued)
    assert gate.audio_ahead(unknown_as=600) == (pytest.approx(720.0), 3)
    assert gate.audio_ahead(unknown_as=0) == (pytest.approx(120.0), 3)
    running[2].pause()  # its slot on server 1 goes to the first queued (30 s)
    assert queued[0].server == 1
    resumer = await _start_resume(running[2])
    assert not running[2].granted
    assert gate.audio_ahead(unknown_as=600) == (pytest.approx(300.0 + 600.0 + 90.0), 3)
    queued[0].leave()
    await asyncio.wait_for(resumer, 5)
    assert gate.audio_ahead(unknown_as=600) == (pytest.approx(690.0), 2)


async def test_running_audio_lists_the_cards_tasks() -> None:
    gate, _ = _gate(limit=[4, 4], budget=[BUDGET, BUDGET])
    a = _arrive(gate, 300)  # server 0
    b = _arrive(gate, 45)  # server 1 (18 free against 12)
    c = _arrive(gate, None)  # 50 GiB: runs only on an empty card, and neither is: waits
    assert (a.server, b.server, c.granted) == (0, 1, False)
    d = _arrive(gate, 10)  # passes the unknown one: server 1 (15.4 free against 12)
    assert d.server == 1
    assert gate.running_audio(0) == [300]
    on_one = gate.running_audio(1)
    assert sorted(x for x in on_one if x is not None) == [10, 45]
    assert len(on_one) == 2
    a.leave()
    assert c.server == 0
    assert gate.running_audio(0) == [None]


# -- retries and moves ---------------------------------------------------------------------------


async def test_a_pause_gives_the_memory_back_and_a_resume_charges_again() -> None:
    gate, _ = _gate()
    ticket = _arrive(gate, 300)
    other = _arrive(gate, 60)
    ticket.pause()
    assert ticket.charged == 0.0
    assert ticket.server is None
    assert _used(gate) == pytest.approx(2.8)
    gate.set_memory(0, budget=BUDGET, model=MemoryModel(4.0, 1.0))
    assert _used(gate) == pytest.approx(5.0), "the running one costed by the new figures"
    resumer = await _start_resume(ticket)
    await asyncio.wait_for(resumer, 5)
    assert ticket.charged == pytest.approx(9.0), "charged by the figures of now"
    assert _used(gate) == pytest.approx(14.0)
    ticket.leave()
    other.leave()
    assert _used(gate) == 0.0


async def test_a_retry_that_does_not_fit_waits_ahead_of_the_queue() -> None:
    """A paused task whose memory was taken meanwhile waits for room; when room comes, it goes
    before the queued tasks (it is the head)."""
    gate, _ = _gate(backfill=0.0)
    retried = _arrive(gate, 600)  # 10
    _arrive(gate, 300)  # 6: 16
    retried.pause()  # 6 used
    filler = _arrive(gate, 300)  # 12
    resumer = await _start_resume(retried)
    assert not retried.granted, "10 beside 12 does not fit"
    assert gate.counts().retry_waiting == 1
    queued = _arrive(gate, 600)
    assert not queued.granted
    filler.leave()  # 6 used: the retry (10) fits first; then the queued one (10) does not
    assert retried.granted
    assert not queued.granted
    await asyncio.wait_for(resumer, 5)
    assert _used(gate) == pytest.approx(16.0)


async def test_leaving_while_paused_or_retrying_keeps_the_books() -> None:
    gate, _ = _gate()
    paused = _arrive(gate, 300)
    retrying = _arrive(gate, 300)
    blocker = [_arrive(gate, 300)]
    paused.pause()
    retrying.pause()
    filler = [_arrive(gate, 300), _arrive(gate, 300)]  # 18 again
    resumer = await _start_resume(retrying)
    assert not retrying.granted
    paused.leave()
    retrying.leave()
    resumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await resumer
    counts = gate.counts()
    assert (counts.retrying, counts.retry_waiting) == (0, 0)
    assert _used(gate) == pytest.approx(18.0)
    for ticket in blocker + filler:
        ticket.leave()
    assert _used(gate) == 0.0


async def test_move_charges_the_new_card_by_its_figures() -> None:
    gate, _ = _gate(limit=[4, 4], budget=[BUDGET, BUDGET])
    gate.set_memory(1, budget=BUDGET, model=MemoryModel(3.0, 1.0))
    ticket = _arrive(gate, 300)
    assert ticket.server == 0
    assert ticket.charged == pytest.approx(6.0)
    assert ticket.move() is True
    assert ticket.server == 1
    assert ticket.charged == pytest.approx(8.0)
    assert [_used(gate, 0), _used(gate, 1)] == pytest.approx([0.0, 8.0])
    ticket.leave()
    assert [_used(gate, 0), _used(gate, 1)] == pytest.approx([0.0, 0.0])


async def test_move_needs_memory_not_only_a_slot() -> None:
    """The other card has free slots but not the memory: the slot stays, the books too."""
    gate, _ = _gate(limit=[4, 4], budget=[BUDGET, 12.0])
    meeting = _arrive(gate, 600)  # 10 on server 0
    filler = _arrive(gate, 300)  # 6 on server 1 (12 free against 8)
    assert (meeting.server, filler.server) == (0, 1)
    assert meeting.move() is False, "10 does not fit beside 6 in 12"
    assert meeting.server == 0
    assert [_used(gate, 0), _used(gate, 1)] == pytest.approx([10.0, 6.0])
    filler.leave()
    assert meeting.move() is True
    assert [_used(gate, 0), _used(gate, 1)] == pytest.approx([0.0, 10.0])


# -- any interleaving keeps the memory books -----------------------------------------------------

SERVERS = 2
MAX_QUEUE = 6

_AUDIO = st.one_of(
    st.sampled_from([None, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0]),
    st.floats(min_value=0.0, max_value=1500.0),
)
_MODELS = st.builds(
    MemoryModel,
    st.floats(min_value=0.5, max_value=8.0),
    st.floats(min_value=0.0, max_value=2.0),
)
_BUDGETS = st.one_of(
    st.sampled_from([None, 6.0, 12.0, 18.0, 24.0]), st.floats(min_value=4.0, max_value=24.0)
)


class MemoryGateMachine(RuleBasedStateMachine):
    """Drives a real two-card gate with memory budgets through arrivals, finishes,
    cancellations, retries, moves, new figures and time, watching every grant.

    `Gate._start` and `Gate._grant_again` are wrapped to read the books at each grant. The
    bound is kept per ticket, from the first time a later task passed it while it was the
    head."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.gate: Gate | None = None
        self.budgets: list[float | None] = [None] * SERVERS
        self.models = [MemoryModel(0.0)] * SERVERS
        self.backfill = 0.0
        self.queue: list[Ticket] = []  # waiting for a first slot, in arrival order
        self.paused: list[Ticket] = []  # in a retry delay, holding nothing
        self.retrying: list[Ticket] = []  # delay over, waiting for a slot, in that order
        self.holders: list[Ticket] = []
        self.resumers: dict[Ticket, asyncio.Task[None]] = {}
        self.left: list[Ticket] = []
        self.refused = 0
        self.first_passed: dict[Ticket, float] = {}  # a head, and when it was first passed
        self.ever_passed: set[Ticket] = set()
        self.violations: list[str] = []

    def teardown(self) -> None:
        for task in self.resumers.values():
            task.cancel()
        self._settle()
        self.loop.close()

    # -- plumbing --------------------------------------------------------------------------

    def _settle(self) -> None:
        for _ in range(3):
            self.loop.run_until_complete(asyncio.sleep(0))
        for ticket in [t for t in [*self.queue, *self.retrying] if t.granted]:
            (self.queue if ticket in self.queue else self.retrying).remove(ticket)
            self.holders.append(ticket)

    @property
    def _gate(self) -> Gate:
        assert self.gate is not None
        return self.gate

    def _head(self) -> Ticket | None:
        if self.retrying:
            return self.retrying[0]
        return self.queue[0] if self.queue else None

    def _check_grant(self, ticket: Ticket, server: int, before: tuple[int, float]) -> None:
        active, used = before
        counts = self._gate.counts().servers[server]
        budget = self.budgets[server]
        if active >= counts.limit:
            self.violations.append(f"granted on a full server {server}")
        expected = 0.0 if budget is None else self.models[server].cost(ticket.audio)
        if not math.isclose(ticket.charged, expected, rel_tol=1e-12, abs_tol=1e-12):
            self.violations.append(f"charged {ticket.charged}, costs {expected}")
        if budget is not None and active > 0 and used + ticket.charged > budget + 1e-9:
            self.violations.append(f"server {server} over its budget: {used} + {ticket.charged}")

    def _watch(self, gate: Gate) -> None:
        start, grant_again = gate._start, gate._grant_again

        def watched_start(ticket: Ticket, server: int) -> None:
            head = gate._first()
            if ticket is not head and head is not None:  # a pass
                now = self.clock.now
                since = self.first_passed.setdefault(head, now)
                if now - since >= self.backfill:
                    self.violations.append(f"passed a head first passed {now - since} s ago")
                self.ever_passed.add(head)
            slots = gate.counts().servers[server]
            before = (slots.active, slots.memory_used)
            start(ticket, server)
            self._check_grant(ticket, server, before)

        def watched_grant_again(ticket: Ticket, server: int) -> None:
            slots = gate.counts().servers[server]
            before = (slots.active, slots.memory_used)
            grant_again(ticket, server)
            self._check_grant(ticket, server, before)

        gate._start = watched_start  # type: ignore[method-assign]
        gate._grant_again = watched_grant_again  # type: ignore[method-assign]

    def _fits(self, ticket: Ticket, server: int) -> bool:
        slots = self._gate.counts().servers[server]
        if slots.active >= slots.limit:
            return False
        budget = self.budgets[server]
        if budget is None:
            return True
        cost = self.models[server].cost(ticket.audio)
        return fits(cost, used=slots.memory_used, budget=budget, running=slots.active)

    # -- rules -----------------------------------------------------------------------------

    @initialize(
        limits=st.lists(st.integers(min_value=1, max_value=4), min_size=SERVERS, max_size=SERVERS),
        budgets=st.lists(_BUDGETS, min_size=SERVERS, max_size=SERVERS),
        models=st.lists(_MODELS, min_size=SERVERS, max_size=SERVERS),
        backfill=st.sampled_from([0.0, 30.0, 120.0]),
    )
    def build(
        self,
        limits: list[int],
        budgets: list[float | None],
        models: list[MemoryModel],
        backfill: float,
    ) -> None:
        async def make() -> Gate:
            return Gate(
                limit=limits, max_queue=MAX_QUEUE, clock=self.clock, backfill_seconds=backfill
            )

        self.gate = self.loop.run_until_complete(make())
        self._watch(self.gate)
        self.backfill = backfill
        for server in range(SERVERS):
            self._set_memory(server, budgets[server], models[server])

    def _set_memory(self, server: int, budget: float | None, model: MemoryModel) -> None:
        self.budgets[server], self.models[server] = budget, model
        self._gate.set_memory(server, budget=budget, model=model)
        self._settle()

    @rule(audios=st.lists(_AUDIO, min_size=1, max_size=4))
    def arrive(self, audios: list[float | None]) -> None:
        """Tasks arrive one after the other: each starts, queues or is refused queue_full."""
        gate = self._gate

        async def enter(audio: float | None) -> Ticket | Refused:
            try:
                return gate.begin_upload().enter(audio)
            except Refused as refused:
                return refused

        for audio in audios:
            got = self.loop.run_until_complete(enter(audio))
            if isinstance(got, Refused):
                assert got.reason is RejectReason.QUEUE_FULL
                self.refused += 1
            else:
                self.queue.append(got)
            self._settle()

    @precondition(lambda self: bool(self.holders))
    @rule(pick=st.integers(min_value=0, max_value=63))
    def finish(self, pick: int) -> None:
        ticket = self.holders.pop(pick % len(self.holders))
        ticket.leave()
        self.left.append(ticket)
        self._settle()

    @precondition(lambda self: bool(self.queue))
    @rule(pick=st.integers(min_value=0, max_value=63))
    def cancel(self, pick: int) -> None:
        """The client of a queued task (the head too) hangs up."""
        ticket = self.queue[pick % len(self.queue)]
        self.queue.remove(ticket)
        ticket.leave()
        self.left.append(ticket)
        self._settle()

    @precondition(lambda self: bool(self.holders))
    @rule(pick=st.integers(min_value=0, max_value=63))
    def pause(self, pick: int) -> None:
        ticket = self.holders.pop(pick % len(self.holders))
        ticket.pause()
        self.resumers.pop(ticket, None)
        self.paused.append(ticket)
        self._settle()

    @precondition(lambda self: bool(self.paused))
    @rule(pick=st.integers(min_value=0, max_value=63))
    def resume(self, pick: int) -> None:
        ticket = self.paused.pop(pick % len(self.paused))
        self.resumers[ticket] = self.loop.create_task(ticket.resume())
        self.retrying.append(ticket)
        self._settle()

    @precondition(lambda self: bool(self.paused) or bool(self.retrying))
    @rule(pick=st.integers(min_value=0, max_value=63))
    def leave_between_attempts(self, pick: int) -> None:
        """The client of a task in its retry delay, or waiting to retry, leaves."""
        between = [*self.paused, *self.retrying]
        ticket = between[pick % len(between)]
        resumer = self.resumers.pop(ticket, None)
        if resumer is not None and not resumer.done():
            resumer.cancel()
            self._settle()
        ticket.leave()
        (self.paused if ticket in self.paused else self.retrying).remove(ticket)
        self.left.append(ticket)
        self._settle()

    @precondition(lambda self: bool(self.holders))
    @rule(pick=st.integers(min_value=0, max_value=63))
    def move(self, pick: int) -> None:
        ticket = self.holders[pick % len(self.holders)]
        current = ticket.server
        before = self._gate.counts().servers
        moved = ticket.move()
        assert ticket.granted
        if moved:
            assert ticket.server != current
        else:
            assert ticket.server == current
            after = self._gate.counts().servers
            for old, new in zip(before, after, strict=True):
                assert new.memory_used == pytest.approx(old.memory_used, abs=1e-9)
        self._settle()

    @rule(server=st.integers(min_value=0, max_value=SERVERS - 1), budget=_BUDGETS, model=_MODELS)
    def set_memory(self, server: int, budget: float | None, model: MemoryModel) -> None:
        self._set_memory(server, budget, model)

    @rule(seconds=st.sampled_from([1.0, 10.0, 29.0, 30.0, 60.0, 119.0, 120.0, 500.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self._settle()

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def no_grant_broke_a_rule(self) -> None:
        assert not self.violations, self.violations

    @invariant()
    def used_is_the_sum_of_what_the_holders_were_charged(self) -> None:
        if self.gate is None:
            return
        counts = self._gate.counts()
        for server, slots in enumerate(counts.servers):
            holders = [t for t in self.holders if t.server == server]
            assert slots.active == len(holders)
            assert slots.memory_used >= 0.0
            assert slots.memory_used == pytest.approx(_charged(holders, server), abs=1e-9)
            if not holders:
                assert slots.memory_used == 0.0, "an empty card holds exactly nothing"
            assert slots.memory_budget == self.budgets[server]
        for ticket in [*self.queue, *self.paused, *self.retrying, *self.left]:
            assert ticket.server is None
            assert ticket.charged == 0.0
        assert counts.queued == len(self.queue)
        assert counts.retry_waiting == len(self.retrying)
        assert counts.retrying == len(self.paused) + len(self.retrying)

    @invariant()
    def nothing_is_lost(self) -> None:
        everyone = [*self.queue, *self.paused, *self.retrying, *self.holders, *self.left]
        assert len(set(everyone)) == len(everyone)
        for ticket in self.holders:
            assert ticket.granted

    @invariant()
    def the_head_starts_as_soon_as_it_fits(self) -> None:
        head = self._head()
        if head is None:
            return
        assert not any(self._fits(head, s) for s in range(SERVERS)), "the head fits but waits"

    @invariant()
    def a_head_never_passed_lets_those_that_fit_pass(self) -> None:
        """Backfill happens: while the head does not fit and has never been passed (so its
        bound, of any length > 0, is open), no later waiter fits anywhere."""
        head = self._head()
        if head is None or self.backfill <= 0 or head in self.ever_passed:
            return
        if all(budget is None for budget in self.budgets):
            return
        for ticket in [*self.retrying, *self.queue]:
            if ticket is not head:
                assert not any(self._fits(ticket, s) for s in range(SERVERS)), "backfill missed"


MemoryGateMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None
)
TestMemoryGateInterleavings = MemoryGateMachine.TestCase
