"""The runner: a task that holds a slot makes its attempts, retries, and answers once.

It runs in an asyncio task of its own that the request handler only awaits through
`asyncio.shield`: a client that leaves marks the task "gone" (`Task.gone`); the runner lets
the current attempt finish (the GPU is busy with it anyway), discards the answer, makes no
further attempts, and only then gives the slot back.

"Deliver or retry after d" is one pure decision (`RetryPolicy.next_delay`); this module does
the waiting. A timed-out attempt is still on the GPU (a real Whisper server keeps transcribing
after its client leaves): the client gets its 504 at the deadline, but the slot stays taken (a
*hold*) until the server answers (read and dropped) or closes the connection, at most
ASR_TIMEOUT_HOLD. With ASR_RETRY_ON_TIMEOUT the retry waits for the hold to end.
"""

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from gatekeeper.answers import ATTEMPTS_HEADER, AUDIO_HEADER, upstream_failure
from gatekeeper.between import Between, Resume, wait_or_gone
from gatekeeper.clock import Clock
from gatekeeper.config import ProxyConfig
from gatekeeper.headers import REQUEST_ID
from gatekeeper.holds import Holds, Still
from gatekeeper.limiter import Limiter
from gatekeeper.logs import Event, log_event
from gatekeeper.policy.classify import classify
from gatekeeper.policy.outcomes import AttemptOutcome, RejectReason, TaskOutcome
from gatekeeper.policy.retry import parse_retry_after
from gatekeeper.refusals import Refusals
from gatekeeper.relay import RelayEnd, discard, finish_answer, finish_attempt, relay
from gatekeeper.state import LiveState
from gatekeeper.task import Task
from gatekeeper.upstream import AttemptResult, send, upstream_url

__all__ = ["Runner"]

_TASK_OUTCOMES = {
    AttemptOutcome.OK: TaskOutcome.SUCCESS,
    AttemptOutcome.CLIENT_ERROR: TaskOutcome.CLIENT_ERROR,
}

_ATTEMPT_EVENTS = {
    AttemptOutcome.OOM: Event.OOM,
    AttemptOutcome.TIMEOUT: Event.TIMEOUT,
    AttemptOutcome.CRASH: Event.CRASH,
    AttemptOutcome.ERROR: Event.UPSTREAM_ERROR,
}


class Runner:
    """Starts and tracks runners (and holds); the shutdown asks it to stop retries."""

    def __init__(
        self,
        config: Callable[[], ProxyConfig],
        *,
        limiter: Limiter,
        state: LiveState,
        refusals: Refusals,
        clock: Clock,
        rng: random.Random,
        session: Callable[[], aiohttp.ClientSession],
        suspect: Callable[[int], None],
    ) -> None:
        self._config = config
        self._suspect = suspect  # a crash on a server: probe it again now
        self._limiter = limiter
        self._state = state
        self._refusals = refusals
        self._clock = clock
        self._rng = rng
        self._session = session
        # Attempt loops, and holds of timed-out attempts: what still works upstream.
        self.running: set[asyncio.Task[Any]] = set()
        self._between = Between(config, clock=clock)
        self._holds = Holds(config, state=state, clock=clock, running=self.running)

    def start(self, task: Task) -> "asyncio.Task[web.StreamResponse]":
        """Run `task` (its ticket holds a slot) in a runner of its own."""
        runner = asyncio.create_task(self._run(task), name=f"task-{task.record.task_id}")
        task.runner = runner
        self.running.add(runner)
        runner.add_done_callback(self.running.discard)
        return runner

    def stop_retries(self) -> list["asyncio.Task[web.StreamResponse]"]:
        """End of a shutdown grace period: tasks between two attempts (in a retry delay without
        a slot, or waiting for one) get 503 shutting_down now. Returns their runners."""
        return self._between.stop()

    def refuse_started(self, task: Task, reason: RejectReason) -> web.StreamResponse:
        """503 for a task that already reached the Whisper server (its attempts say how often):
        its retry found no slot in time, or the end of a shutdown stopped it."""
        record = task.record
        record.end(TaskOutcome.REJECTED)
        answer = self._refusals.refuse(
            reason, record.task_id, arrived=record.arrived, attempts=record.attempts
        )
        answer.headers[AUDIO_HEADER] = record.audio_text
        return answer

    # -- the task's life with a slot -----------------------------------------------------------

    async def _run(self, task: Task) -> web.StreamResponse:
        record = task.record
        record.started = record.held_since = self._clock.monotonic()
        self._state.queue_waited(record.started - (record.queued_at or record.arrived))
        try:
            if await self._cool_down(task):
                return self._gone(task, "cooldown")
            self._log_start(task)
            return await self._attempts(task)
        finally:
            if task.hold is None:
                self._free_slot(task)

    async def _cool_down(self, task: Task) -> bool:
        """The seed's cool-down: a task starting soon after an OOM waits first. True if the
        client left meanwhile."""
        cfg, server = self._config(), _server(task)
        last_oom = self._state.servers[server].last_oom_monotonic  # this card's OOMs only
        if cfg.oom_cooldown <= 0 or last_oom is None:
            return False
        if self._clock.monotonic() - last_oom >= cfg.oom_window:
            return False
        task.record.cooldown = cfg.oom_cooldown
        log_event(
            Event.COOLDOWN,
            task_id=task.record.task_id,
            delay=cfg.oom_cooldown,
            upstream=cfg.upstream_names[server],
        )
        return await wait_or_gone(self._clock, cfg.oom_cooldown, task)

    def _log_start(self, task: Task) -> None:
        counts = self._limiter.gate.counts()
        server = _server(task)
        slots = counts.servers[server]
        log_event(
            Event.START,
            task_id=task.record.task_id,
            active=f"{counts.active}/{counts.limit}",
            queued=counts.queued,
            path=task.record.path,
            upstream=self._config().upstream_names[server],
            upstream_active=f"{slots.active}/{slots.limit}",
            audio=task.record.audio_text,
        )

    def _free_slot(self, task: Task) -> None:
        """The task's work upstream is over: give back its slot and its spooled body."""
        record = task.record
        task.ticket.leave()
        task.body.close()
        if record.held_since is not None:
            record.held += self._clock.monotonic() - record.held_since
            record.held_since = None
        self._state.slot_held(record.held)
        if record.audio is not None and record.outcome is TaskOutcome.SUCCESS:
            self._state.slot_held_for_audio(record.held, record.audio)

    async def _attempts(self, task: Task) -> web.StreamResponse:
        """Attempt after attempt until one is delivered (or the task ends between two)."""
        while True:
            delay_or_answer = await self._attempt(task)
            if isinstance(delay_or_answer, web.StreamResponse):
                return delay_or_answer
            final = await self._between_attempts(task, delay_or_answer)
            if final is not None:
                return final

    async def _attempt(self, task: Task) -> web.StreamResponse | float:
        """One attempt upstream: the task's final answer, or the delay before the next one."""
        record, cfg, server = task.record, self._config(), _server(task)
        record.attempts += 1
        record.upstreams.append(cfg.upstream_names[server])
        permit = task.ticket.permit  # replicas: what the cluster ran when this slot was granted
        # None unless this card learns.
        evidence = self._limiter.start_evidence(server, None if permit is None else permit.audio)
        began = self._clock.monotonic()
        deadline = self._clock.monotonic() + cfg.attempt_timeout(record.audio)
        # The GPU is busy with this attempt from the request until its answer is fully read.
        self._state.upstream_began(server)
        held = False  # a hold took over the attempt (and ends it upstream)
        try:
            result = await send(
                self._session(),
                method=task.request.method,
                url=upstream_url(cfg.upstreams[server], task.request.raw_path),
                headers=task.headers,
                body=task.body,
                deadline=deadline,
                clock=self._clock,
            )
            outcome = _classify(result, cfg)
            if evidence is not None and outcome in (AttemptOutcome.OK, AttemptOutcome.OOM):
                self._limiter.observe_start(server, evidence, oom=outcome is AttemptOutcome.OOM)
            delay = cfg.retry.next_delay(
                outcome,
                record.attempts,
                client_gone=task.gone.is_set(),
                unit_random=self._rng.random,
                upstream_retry_after=_retry_after(result),
            )
            if delay is None:
                answer, outcome, client_left, still = await self._deliver(
                    task, outcome, result, deadline
                )
                self._record_attempt(task, server, outcome, result, began)
                if still is not None:  # the client gets its answer; the slot stays taken
                    held = True
                    self._holds.after(task, still, self._free_slot)
                return self._conclude(task, outcome, result, answer, client_left)
            self._record_attempt(task, server, outcome, result, began)
            if result.still_upstream is not None:  # a timeout retried: after the GPU is done
                held = True
                await self._holds.during(task, finish_attempt(result.still_upstream))
            elif result.response is not None:
                await discard(result.response, deadline, self._clock)
        finally:
            if not held:
                self._state.upstream_ended(server)
        self._retry_scheduled(task, outcome, delay)
        return delay

    def _retry_scheduled(self, task: Task, outcome: AttemptOutcome, delay: float) -> None:
        record = task.record
        record.retry_delay_total += delay
        self._state.retry_scheduled(outcome, delay)
        log_event(
            Event.RETRY,
            logging.WARNING,
            task_id=record.task_id,
            outcome=outcome.value,
            attempt=record.attempts,
            next_attempt=record.attempts + 1,
            delay=delay,
            upstream=record.upstreams[-1],
        )

    # -- between two attempts ------------------------------------------------------------------

    async def _between_attempts(self, task: Task, delay: float) -> web.StreamResponse | None:
        """Wait out a retry delay; None when the next attempt may go, else the final answer."""
        resumed, stage = await self._between.wait(task, delay)
        if resumed is Resume.GRANTED:
            return None
        if resumed is Resume.GONE:
            return self._gone(task, stage)
        if resumed is Resume.STOPPED:
            return self._refuse_retry(task, RejectReason.SHUTTING_DOWN)
        # Retries piled up beyond the limit: refuse like a queue timeout, so the worst case of
        # a task stays bounded (gatekeeper/policy/budget.py).
        return self._refuse_retry(task, RejectReason.QUEUE_TIMEOUT)

    def _refuse_retry(self, task: Task, reason: RejectReason) -> web.StreamResponse:
        """A task whose next attempt cannot go (no slot in time, or shutting down): 503."""
        record = task.record
        log_event(
            Event.RETRY_REFUSED,
            logging.WARNING,
            task_id=record.task_id,
            reason=reason.value,
            attempts=record.attempts,
            outcomes=",".join(o.value for o in record.outcomes),
            duration=self._clock.monotonic() - record.arrived,
        )
        return self.refuse_started(task, reason)

    # -- booking and answering -----------------------------------------------------------------

    def _record_attempt(
        self,
        task: Task,
        server: int,
        outcome: AttemptOutcome,
        result: AttemptResult,
        began: float,
    ) -> None:
        """Book one finished attempt: the task's record, the counters, the log, the limit."""
        record = task.record
        record.outcomes.append(outcome)
        self._state.attempt_ended(
            outcome,
            self._clock.monotonic() - began,
            server=server,
            wall=self._clock.wall(),
            monotonic=self._clock.monotonic(),
        )
        self._log_attempt(task, outcome, result)
        # This attempt still counts as upstream: the concurrency it ran (and ended) at; with
        # replicas, at least what all of them ran when its slot was granted.
        in_flight = self._state.servers[server].in_flight
        permit = task.ticket.permit
        if permit is not None:
            in_flight = max(in_flight, permit.count)
        self._limiter.observe(
            outcome, server=server, in_flight=in_flight, first_attempt=record.attempts == 1
        )
        if outcome is AttemptOutcome.CRASH:
            self._suspect(server)

    async def _deliver(
        self, task: Task, outcome: AttemptOutcome, result: AttemptResult, deadline: float
    ) -> tuple[web.StreamResponse, AttemptOutcome, bool, Still | None]:
        """Answer the client with the last attempt's result.

        Returns the answer, the attempt's final outcome (an answer the upstream broke off
        mid-way is a crash, or a timeout, however it began), whether the client had left, and,
        after a timeout, what the Whisper server may still be doing (to hold the slot for).
        """
        record = task.record
        if result.response is None:
            failure = upstream_failure(outcome, attempts=record.attempts, request_id=record.task_id)
            failure.headers[AUDIO_HEADER] = record.audio_text
            pending = result.still_upstream
            still = None if pending is None else finish_attempt(pending)
            return failure, outcome, task.gone.is_set(), still
        extra = {
            ATTEMPTS_HEADER: str(record.attempts),
            REQUEST_ID: record.task_id,
            AUDIO_HEADER: record.audio_text,
        }
        task.answering = True
        end = RelayEnd.UPSTREAM_BROKE
        try:
            answer, end = await relay(task.request, result, extra, deadline, self._clock, task.gone)
        finally:
            if end is not RelayEnd.TIMED_OUT:
                result.response.close()
        if end is RelayEnd.TIMED_OUT:
            # Cut mid-answer at the deadline: the server is still sending (and computing).
            still = finish_answer(result.response)
            return answer, AttemptOutcome.TIMEOUT, task.gone.is_set(), still
        if end is RelayEnd.UPSTREAM_BROKE:
            outcome = AttemptOutcome.CRASH
        return answer, outcome, end is RelayEnd.CLIENT_GONE or task.gone.is_set(), None

    def _conclude(
        self,
        task: Task,
        outcome: AttemptOutcome,
        result: AttemptResult,
        answer: web.StreamResponse,
        client_left: bool,
    ) -> web.StreamResponse:
        """Count the task by how it ended and log its finish line."""
        record = task.record
        task_outcome = (
            TaskOutcome.CANCELLED
            if client_left
            else _TASK_OUTCOMES.get(outcome, TaskOutcome.FAILED)
        )
        record.end(task_outcome)
        queued_at = record.queued_at or record.arrived
        log_event(
            Event.FINISH if task_outcome is TaskOutcome.SUCCESS else Event.FAILED,
            logging.INFO if task_outcome is not TaskOutcome.FAILED else logging.WARNING,
            task_id=record.task_id,
            outcome=task_outcome.value,
            last=outcome.value,
            attempts=record.attempts,
            outcomes=",".join(o.value for o in record.outcomes),
            status=result.status if result.status is not None else "-",
            upload=queued_at - record.arrived,
            queue_wait=(record.started or queued_at) - queued_at,
            duration=self._clock.monotonic() - record.arrived,
            retry_delay=record.retry_delay_total,
            cooldown=record.cooldown,
            upstream=record.upstreams[-1],
            audio=record.audio_text,
        )
        return answer

    def _gone(self, task: Task, stage: str) -> web.StreamResponse:
        record = task.record
        record.end(TaskOutcome.CANCELLED)
        log_event(Event.CLIENT_LEFT, task_id=record.task_id, stage=stage, attempts=record.attempts)
        # Nobody is listening; the answer only satisfies the handler's type.
        return upstream_failure(
            AttemptOutcome.CRASH, attempts=record.attempts, request_id=record.task_id
        )

    def _log_attempt(self, task: Task, outcome: AttemptOutcome, result: AttemptResult) -> None:
        event = _ATTEMPT_EVENTS.get(outcome)
        if event is None:
            return
        record = task.record
        facts: dict[str, object] = {"task_id": record.task_id}
        if outcome is AttemptOutcome.OOM:
            facts["oom_count"] = self._state.oom_errors
        facts["attempt"] = record.attempts
        facts["upstream"] = record.upstreams[-1]
        if outcome is AttemptOutcome.TIMEOUT:
            facts["timeout"] = self._config().attempt_timeout(record.audio)
        elif outcome is AttemptOutcome.CRASH:
            facts["error"] = type(result.error).__name__ if result.error else "incomplete"
        else:
            facts["status"] = result.status
        log_event(event, logging.WARNING, **facts)


def _server(task: Task) -> int:
    """The server whose slot the task holds."""
    server = task.ticket.server
    assert server is not None, "the task holds no slot"
    return server


def _classify(result: AttemptResult, cfg: ProxyConfig) -> AttemptOutcome:
    response = result.response
    return classify(
        status=result.status,
        body=result.prefix,
        content_type=response.headers.get("Content-Type") if response is not None else None,
        error=result.error,
        timed_out=result.timed_out,
        matcher=cfg.matcher,
    )


def _retry_after(result: AttemptResult) -> float | None:
    response = result.response
    return parse_retry_after(response.headers.get("Retry-After") if response is not None else None)
