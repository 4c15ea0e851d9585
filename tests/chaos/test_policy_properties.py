"""Property tests of the pure policies and of the gate, over inputs nobody thought to list.

The pure policies (admission, retry schedule, classification) must never crash on any input and
keep their bounds; the gate must keep its books for any interleaving of arrive, start, finish,
cancel, time out, limit changes and shutdown (a hypothesis state machine drives a real Gate on an
event loop, step by step, against a model of what a fair FIFO gate must do).
"""

import asyncio
import html
import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from gatekeeper.gate import Gate, Refused, Ticket
from gatekeeper.policy.admission import (
    RETRY_AFTER_MAX,
    RETRY_AFTER_MIN,
    Decision,
    ServiceTimeEstimate,
    decide,
    estimate_retry_after,
    queue_usage,
)
from gatekeeper.policy.classify import CLASSIFY_BODY_LIMIT, OomMatcher, body_text, classify
from gatekeeper.policy.outcomes import AttemptOutcome, RejectReason
from gatekeeper.policy.retry import RETRY_AFTER_CAP, RetryPolicy, base_delay, parse_retry_after

pytestmark = pytest.mark.chaos

_MATCHER = OomMatcher()
_counts = st.integers(min_value=0, max_value=10_000)
_any_float = st.floats(allow_nan=True, allow_infinity=True)


# -- admission ---------------------------------------------------------------------------------


@given(
    active=_counts,
    queued=_counts,
    limit=st.integers(min_value=1, max_value=1024),
    max_queue=_counts,
    shutting_down=st.booleans(),
)
def test_decide_is_total_and_fair(
    active: int, queued: int, limit: int, max_queue: int, shutting_down: bool
) -> None:
    """Any situation gets exactly one decision: start only when a slot is free and nobody waits,
    queue only when there is room, refuse otherwise (or while shutting down)."""
    admission = decide(
        active=active, queued=queued, limit=limit, max_queue=max_queue, shutting_down=shutting_down
    )
    if shutting_down:
        assert (admission.decision, admission.reason) == (
            Decision.REJECT,
            RejectReason.SHUTTING_DOWN,
        )
    elif active < limit and queued == 0:
        assert (admission.decision, admission.reason) == (Decision.START, None)
    elif queued < max_queue:
        assert (admission.decision, admission.reason) == (Decision.QUEUE, None)
    else:
        assert (admission.decision, admission.reason) == (Decision.REJECT, RejectReason.QUEUE_FULL)
    assert (admission.active, admission.queued, admission.limit) == (active, queued, limit)
    assert admission.queue_usage == queue_usage(queued, max_queue)


@given(
    reason=st.sampled_from(RejectReason),
    mean=st.floats(min_value=0, max_value=1e6),
    limit=st.integers(min_value=-5, max_value=1024),
    queued=st.integers(min_value=-5, max_value=100_000),
)
def test_retry_after_is_always_within_1_and_120(
    reason: RejectReason, mean: float, limit: int, queued: int
) -> None:
    """Retry-After is a whole number of seconds in 1..120 for any plausible service time."""
    seconds = estimate_retry_after(reason=reason, mean_service=mean, limit=limit, queued=queued)
    assert isinstance(seconds, int)
    assert RETRY_AFTER_MIN <= seconds <= RETRY_AFTER_MAX


@given(mean=_any_float, queued=st.integers(min_value=0, max_value=100))
@example(mean=math.inf, queued=0)
@example(mean=1.7e308, queued=1)
def test_retry_after_survives_any_float(mean: float, queued: int) -> None:
    """Even an absurd service-time estimate (inf, NaN, 1e308) gives a Retry-After in 1..120."""
    seconds = estimate_retry_after(
        reason=RejectReason.QUEUE_TIMEOUT, mean_service=mean, limit=1, queued=queued
    )
    assert RETRY_AFTER_MIN <= seconds <= RETRY_AFTER_MAX


@given(st.lists(st.floats(min_value=-1e6, max_value=1e6), min_size=1, max_size=50))
def test_service_estimate_stays_between_the_samples(samples: list[float]) -> None:
    """The service-time mean never leaves the range of what was measured (negatives as 0)."""
    estimate = ServiceTimeEstimate(30.0)
    for sample in samples:
        estimate = estimate.observe(sample)
    clipped = [max(0.0, s) for s in samples]
    assert min(clipped) - 1e-6 <= estimate.mean <= max(clipped) + 1e-6
    assert estimate.samples == len(samples)


# -- retry schedule ----------------------------------------------------------------------------

_RETRIED = (AttemptOutcome.OOM, AttemptOutcome.CRASH, AttemptOutcome.ERROR, AttemptOutcome.TIMEOUT)


@given(
    outcome=st.sampled_from(_RETRIED),
    retry_number=st.integers(min_value=-3, max_value=101),
    base=st.floats(min_value=0, max_value=1e4),
    jitter=st.floats(min_value=0, max_value=0.99),
    unit=_any_float,
    upstream=st.one_of(st.none(), st.floats(min_value=0, max_value=1e9), st.just(math.inf)),
)
def test_delay_stays_within_its_bounds(
    outcome: AttemptOutcome,
    retry_number: int,
    base: float,
    jitter: float,
    unit: float,
    upstream: float | None,
) -> None:
    """Every delay is the schedule's value ± jitter, raised to an upstream Retry-After capped
    at 300 s, and never negative or NaN, whatever random number comes in."""
    policy = RetryPolicy(max_retries=100, base=base, jitter=jitter, retry_on_timeout=True)
    delay = policy.delay(outcome, retry_number, unit_random=unit, upstream_retry_after=upstream)
    kind = AttemptOutcome.CRASH if outcome is AttemptOutcome.TIMEOUT else outcome
    nominal = base_delay(kind, retry_number, base)
    low, high = nominal * (1 - jitter), nominal * (1 + jitter)
    if upstream is not None:
        floor = min(upstream, RETRY_AFTER_CAP)
        low, high = max(low, floor), max(high, floor)
    assert not math.isnan(delay)
    assert delay >= 0
    assert low * (1 - 1e-9) <= delay <= high * (1 + 1e-9)


@given(
    outcomes=st.lists(st.sampled_from(AttemptOutcome), min_size=1, max_size=120),
    max_retries=st.integers(min_value=0, max_value=100),
    retry_on_timeout=st.booleans(),
)
def test_a_task_never_makes_more_than_1_plus_max_retries_attempts(
    outcomes: list[AttemptOutcome], max_retries: int, retry_on_timeout: bool
) -> None:
    """Following should_retry, a task stops at its first ok, 4xx or (by default) timeout, and
    after 1 + max_retries attempts at the latest."""
    policy = RetryPolicy(
        max_retries=max_retries, base=1, jitter=0, retry_on_timeout=retry_on_timeout
    )
    attempts = 0
    for outcome in outcomes:
        attempts += 1
        if not policy.should_retry(outcome, attempts):
            break
        assert outcome not in (AttemptOutcome.OK, AttemptOutcome.CLIENT_ERROR)
        assert outcome is not AttemptOutcome.TIMEOUT or retry_on_timeout
    assert attempts <= max_retries + 1


@given(st.one_of(st.none(), st.text(), st.from_regex(r"\A\s*\d{1,6}(\.\d{1,3})?\s*\Z")))
@example("120")
@example(" 7 ")
@example("nan")
@example("-1")
@example("1e999")
@example("Wed, 21 Oct 2015 07:28:00 GMT")
def test_parse_retry_after_never_crashes(value: str | None) -> None:
    """Any header value gives None or a non-negative number of seconds (never NaN)."""
    seconds = parse_retry_after(value)
    assert seconds is None or (seconds >= 0 and not math.isnan(seconds))
    if value is not None and value.strip().isascii() and value.strip().isdigit():
        assert seconds == float(value.strip())


# -- classification ----------------------------------------------------------------------------

_OOM_TEXTS = st.sampled_from(
    [
        "CUDA out of memory. Tried to allocate 2.00 GiB.",
        "torch.OutOfMemoryError: CUDA out of memory.",
        "RuntimeError: CUDA failed with error out of memory",
        "ggml_backend_cuda_buffer_type_alloc_buffer: cudaMalloc failed: out of memory",
        "CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)",
        "std::bad_alloc",
    ]
)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    status=st.one_of(st.none(), st.integers(min_value=-1000, max_value=10_000)),
    body=st.binary(max_size=2048),
    content_type=st.one_of(
        st.none(),
        st.text(max_size=60),
        st.sampled_from(["utf-8", "latin-1", "idna", "zlib", "rot13", "hex", "utf-7", "x"]).map(
            lambda c: f"text/plain; charset={c}"
        ),
    ),
    error=st.one_of(st.none(), st.just(ConnectionResetError("reset"))),
    timed_out=st.booleans(),
)
def test_classify_never_crashes_and_follows_its_order(
    status: int | None,
    body: bytes,
    content_type: str | None,
    error: BaseException | None,
    timed_out: bool,
) -> None:
    """Any status, body, charset and error is classified, in the documented order: timeout,
    then crash, then by status, and OOM only for a 5xx."""
    outcome = classify(
        status=status,
        body=body,
        content_type=content_type,
        error=error,
        timed_out=timed_out,
        matcher=_MATCHER,
    )
    if timed_out:
        assert outcome is AttemptOutcome.TIMEOUT
    elif error is not None or status is None:
        assert outcome is AttemptOutcome.CRASH
    elif status < 400:
        assert outcome is AttemptOutcome.OK
    elif status < 500:
        assert outcome is AttemptOutcome.CLIENT_ERROR
    else:
        assert outcome in (AttemptOutcome.OOM, AttemptOutcome.ERROR)


@given(
    oom=_OOM_TEXTS,
    before=st.text(max_size=300).map(lambda s: s + "\n"),
    after=st.text(max_size=300).map(lambda s: " " + s),
    wrapper=st.sampled_from(["plain", "json-detail", "json-openai", "html", "ascii-json"]),
    status=st.integers(min_value=500, max_value=599),
)
def test_an_oom_text_is_found_in_any_wrapper(
    oom: str, before: str, after: str, wrapper: str, status: int
) -> None:
    """A real OOM message inside any text, JSON (escaped or not) or HTML page makes a 5xx OOM."""
    message = before + oom + after
    body: Any
    if wrapper == "plain":
        body = message
    elif wrapper == "json-detail":
        body = json.dumps({"detail": message}, ensure_ascii=False)
    elif wrapper == "ascii-json":
        body = json.dumps({"detail": message})
    elif wrapper == "json-openai":
        body = json.dumps({"error": {"message": message, "type": "server_error"}})
    else:
        body = f"<html><body><pre>{html.escape(message)}</pre></body></html>"
    encoded = body.encode()
    assume(len(encoded) <= CLASSIFY_BODY_LIMIT)
    outcome = classify(
        status=status, body=encoded, content_type="text/html; charset=utf-8", matcher=_MATCHER
    )
    assert outcome is AttemptOutcome.OOM, body_text(encoded, None)[:300]


@given(st.lists(st.text(max_size=40), max_size=4))
@example(["(?i)cuda"])
@example(["^Internal Server Error$"])
def test_oom_patterns_compile_or_are_refused_with_a_value_error(patterns: list[str]) -> None:
    """Any operator pattern list either compiles or is refused with a ValueError naming it."""
    try:
        matcher = OomMatcher.from_patterns(patterns)
    except ValueError:
        return
    assert matcher.matches("CUDA out of memory")


@pytest.mark.parametrize("pattern", ["a{4294967296}", "(" * 1000 + ")" * 1000])
def test_an_impossible_oom_pattern_is_refused_with_a_value_error(pattern: str) -> None:
    """A pattern the regular expression engine cannot build is a ValueError, like a typo."""
    with pytest.raises(ValueError, match="invalid OOM pattern"):
        OomMatcher.from_patterns([pattern])


# -- the gate: any interleaving keeps the books ------------------------------------------------


def _ignore_unread_refusals(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # A ticket refused at the end of the grace period while nobody waited on it (its handler
    # was still uploading) holds an exception nobody reads; anything else is reported.
    if not isinstance(context.get("exception"), Refused):
        loop.default_exception_handler(context)


class GateMachine(RuleBasedStateMachine):
    """Drives a real Gate through arrivals, waits, finishes, cancellations, queue timeouts,
    retry delays (pause, resume, leaving while paused), limit changes and shutdown, checking it
    against a model of a fair FIFO gate where retries go ahead of the queue."""

    tickets = Bundle("tickets")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(_ignore_unread_refusals)
        self.limit, self.max_queue = 2, 3
        self.gate = Gate(limit=self.limit, max_queue=self.max_queue)
        self.active: list[Ticket] = []  # holding a slot, in the order they got it
        self.queue: list[Ticket] = []  # waiting, first in first out
        self.paused: list[Ticket] = []  # in a retry delay, holding nothing
        self.retrying: list[Ticket] = []  # delay over, waiting for a slot ahead of the queue
        self.resumers: dict[int, asyncio.Task[None]] = {}
        self.gone: set[int] = set()
        self.waiters: dict[int, asyncio.Task[None]] = {}
        self.shutting_down = False
        self.granted_over_limit = False

    def teardown(self) -> None:
        for task in [*self.waiters.values(), *self.resumers.values()]:
            task.cancel()
        self._settle()
        self.loop.close()

    def _run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def _settle(self) -> None:
        for _ in range(3):
            self._run(asyncio.sleep(0))

    def _hand_over(self) -> None:
        while self.retrying and len(self.active) < self.limit:
            self.active.append(self.retrying.pop(0))
        while self.queue and len(self.active) < self.limit and not self.retrying:
            self.active.append(self.queue.pop(0))

    # -- rules ---------------------------------------------------------------------------

    @rule(target=tickets)
    def arrive(self) -> Ticket | None:
        async def enter() -> Ticket | Refused:
            try:
                return self.gate.enter()
            except Refused as refused:
                return refused

        got = self._run(enter())
        if self.shutting_down:
            assert isinstance(got, Refused)
            assert got.reason is RejectReason.SHUTTING_DOWN
            return None
        if len(self.active) < self.limit and not self.queue:
            assert isinstance(got, Ticket)
            assert got.granted, "a free slot and nobody waiting: it must start"
            self.active.append(got)
        elif len(self.queue) < self.max_queue:
            assert isinstance(got, Ticket)
            assert not got.granted, "someone holds every slot or waits first: it must queue"
            self.queue.append(got)
        else:
            assert isinstance(got, Refused)
            assert got.reason is RejectReason.QUEUE_FULL
            return None
        return got

    @rule(ticket=tickets)
    def wait(self, ticket: Ticket | None) -> None:
        """The handler finished the upload and waits for its slot (at most once per ticket)."""
        if ticket is None or id(ticket) in self.waiters or id(ticket) in self.gone:
            return
        if ticket not in self.queue and ticket not in self.active:
            return  # paused or retrying: those wait through resume()
        self.waiters[id(ticket)] = self.loop.create_task(ticket.wait(3600))
        self._settle()

    @rule(ticket=tickets)
    def finish(self, ticket: Ticket | None) -> None:
        """A task that holds a slot ends (success, failure or client gone after it started)."""
        if ticket is None or ticket not in self.active:
            return
        ticket.leave()
        self.active.remove(ticket)
        self.gone.add(id(ticket))
        self._hand_over()
        self._settle()

    @rule(ticket=tickets)
    def cancel(self, ticket: Ticket | None) -> None:
        """The client of a queued task hangs up: its handler is cancelled, the ticket left."""
        if ticket is None or ticket not in self.queue:
            return
        waiter = self.waiters.get(id(ticket))
        if waiter is not None:
            waiter.cancel()
            self._settle()
            assert waiter.cancelled()
        ticket.leave()
        self.queue.remove(ticket)
        self.gone.add(id(ticket))
        self._settle()

    @rule(ticket=tickets)
    def time_out(self, ticket: Ticket | None) -> None:
        """A queued task whose ASR_QUEUE_TIMEOUT is used up (wait with nothing left) is refused."""
        if ticket is None or ticket not in self.queue or id(ticket) in self.waiters:
            return

        async def wait_nothing() -> Refused | None:
            try:
                await ticket.wait(0)
            except Refused as refused:
                return refused
            return None

        refused = self._run(wait_nothing())
        assert refused is not None
        assert refused.reason is RejectReason.QUEUE_TIMEOUT
        ticket.leave()
        self.queue.remove(ticket)
        self.gone.add(id(ticket))

    @rule(ticket=tickets)
    def pause(self, ticket: Ticket | None) -> None:
        """An attempt failed and its task goes into the retry delay: the slot is handed on."""
        if ticket is None or ticket not in self.active:
            return
        ticket.pause()
        self.resumers.pop(id(ticket), None)  # a task may retry more than once
        self.active.remove(ticket)
        self.paused.append(ticket)
        self._hand_over()
        self._settle()

    @rule(ticket=tickets)
    def resume(self, ticket: Ticket | None) -> None:
        """The retry delay is over: the task wants a slot back, ahead of every queued task."""
        if ticket is None or ticket not in self.paused:
            return
        self.resumers[id(ticket)] = self.loop.create_task(ticket.resume())
        self.paused.remove(ticket)
        self.retrying.append(ticket)
        self._hand_over()
        self._settle()

    @rule(ticket=tickets)
    def leave_between_attempts(self, ticket: Ticket | None) -> None:
        """The client of a task in its retry delay (or waiting to retry) hangs up."""
        if ticket is None or (ticket not in self.paused and ticket not in self.retrying):
            return
        resumer = self.resumers.get(id(ticket))
        if resumer is not None and not resumer.done():
            resumer.cancel()
            self._settle()
        ticket.leave()
        for place in (self.paused, self.retrying):
            if ticket in place:
                place.remove(ticket)
        self.gone.add(id(ticket))
        self._hand_over()
        self._settle()

    @rule(limit=st.integers(min_value=1, max_value=5))
    def change_limit(self, limit: int) -> None:
        """The limit changes live: lowering stops nobody, raising starts waiters in order."""
        self.gate.set_limits(limit=limit)
        self.limit = limit
        self._hand_over()
        self._settle()

    @rule(max_queue=st.integers(min_value=0, max_value=5))
    def change_max_queue(self, max_queue: int) -> None:
        """The queue size changes live; nobody already queued is dropped."""
        self.gate.set_limits(max_queue=max_queue)
        self.max_queue = max_queue

    @precondition(lambda self: not self.shutting_down)
    @rule()
    def begin_shutdown(self) -> None:
        """SIGTERM: newcomers are refused; queued tasks keep their place."""
        self.gate.begin_shutdown()
        self.shutting_down = True

    @precondition(lambda self: self.shutting_down)
    @rule()
    def end_of_grace(self) -> None:
        """The grace period is over: every waiting task is refused with shutting_down."""
        refused = self.gate.refuse_waiting(RejectReason.SHUTTING_DOWN)
        assert refused == len(self.queue)
        self._settle()
        for ticket in self.queue:
            waiter = self.waiters.get(id(ticket))
            if waiter is not None:
                assert waiter.done()
                exc = waiter.exception()
                assert isinstance(exc, Refused)
                assert exc.reason is RejectReason.SHUTTING_DOWN
            ticket.leave()  # the handler's `finally`: a no-op now
            self.gone.add(id(ticket))
        self.queue.clear()

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def books_match_the_model(self) -> None:
        counts = self.gate.counts()
        assert counts.active == len(self.active), (counts, len(self.active))
        assert counts.queued == len(self.queue)
        assert (counts.limit, counts.max_queue) == (self.limit, self.max_queue)
        assert counts.shutting_down == self.shutting_down
        assert counts.retrying == len(self.paused) + len(self.retrying)

    @invariant()
    def slots_go_first_in_first_out(self) -> None:
        for ticket in self.active:
            assert ticket.granted
            waiter = self.waiters.get(id(ticket))
            if waiter is not None:
                assert waiter.done()
                assert waiter.exception() is None
        for ticket in self.queue:
            assert not ticket.granted
            waiter = self.waiters.get(id(ticket))
            assert waiter is None or not waiter.done()
        for ticket in [*self.paused, *self.retrying]:
            assert not ticket.granted
            resumer = self.resumers.get(id(ticket))
            assert resumer is None or not resumer.done()
        for ticket in self.active:
            resumer = self.resumers.get(id(ticket))
            if resumer is not None:
                assert resumer.done()
                assert resumer.exception() is None

    @invariant()
    def never_over_the_limit_by_starting_someone(self) -> None:
        # Only lowering the limit may leave more running than it; then nobody new starts
        # until enough have finished (the model grants only below the limit, and the gate's
        # grants must equal the model's).
        if len(self.active) > self.limit:
            assert all(not t.granted for t in [*self.queue, *self.retrying])

    @invariant()
    def idle_exactly_when_empty(self) -> None:
        waiter = self.loop.create_task(self.gate.wait_idle())
        self._run(asyncio.sleep(0))
        idle = waiter.done()
        waiter.cancel()
        self._run(asyncio.sleep(0))
        assert idle == (
            not self.active and not self.queue and not self.paused and not self.retrying
        )


GateMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestGateInterleavings = GateMachine.TestCase


async def test_a_ticket_refused_while_uploading_is_told_why() -> None:
    """A task still uploading when the grace period ends learns it was refused for shutdown."""
    gate = Gate(limit=1, max_queue=5)
    running = gate.enter()
    uploading = gate.enter()  # queued; its handler is still reading the body
    gate.begin_shutdown()
    gate.refuse_waiting(RejectReason.SHUTTING_DOWN)
    with pytest.raises(Refused) as refused:
        await uploading.wait(10)
    assert refused.value.reason is RejectReason.SHUTTING_DOWN
    running.leave()
