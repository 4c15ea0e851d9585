"""The proxy: pass-through requests, and tasks that wait, run upstream, retry and answer once.

A task's life: its upload is received whole (spooled; no slot, no queue place), then it queues,
takes a slot, and its runner makes the attempts. A task never holds a slot while its body is
still arriving, so a slow client cannot keep the GPU idle.

How a client that leaves is noticed: the server runs with aiohttp's `handler_cancellation`, so
a dropped connection cancels the request handler.
- While a task uploads or waits in the queue that cancellation ends it at once; it never reaches
  the Whisper server.
- Once a task holds a slot, its work runs in a separate asyncio task (the *runner*) that the
  handler only awaits through `asyncio.shield`. A cancelled handler marks the task "client gone";
  the runner lets the current upstream attempt finish (the GPU is busy with it anyway),
  discards the answer, makes no further attempts, and only then gives the slot back.

A timed-out attempt is still on the GPU (a real Whisper server keeps transcribing after its
client leaves): the client gets its 504 at the deadline, but the slot stays taken (a *hold*)
until the server answers (read and dropped) or closes the connection, at most ASR_TIMEOUT_HOLD.
With ASR_RETRY_ON_TIMEOUT the retry waits for the hold to end.
"""

import asyncio
import logging
import os
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict

from gatekeeper.adaptive import AdaptiveLimit, AdaptiveParams, LimitChange
from gatekeeper.admission import estimate_retry_after, queue_usage
from gatekeeper.answers import (
    ATTEMPTS_HEADER,
    body_broken,
    body_timeout,
    body_too_large,
    refusal,
    upload_timeout,
    upstream_failure,
    upstream_unreachable,
)
from gatekeeper.classify import OomMatcher, classify
from gatekeeper.clock import Clock
from gatekeeper.gate import Gate, Refused, Ticket
from gatekeeper.headers import (
    REQUEST_ID,
    forward_request_headers,
    forward_response_headers,
)
from gatekeeper.logs import Event, log_event
from gatekeeper.outcomes import AttemptOutcome, HoldEnd, RejectReason, TaskOutcome
from gatekeeper.retry import RetryPolicy, parse_retry_after
from gatekeeper.settings import Settings
from gatekeeper.spool import BodyTimeout, BodyTooLarge, SpooledBody, UploadTimeout
from gatekeeper.state import LiveState, TaskRecord
from gatekeeper.upstream import AttemptResult, send, upstream_url

__all__ = ["Proxy", "ProxyConfig", "adaptive_from_settings"]

_CLIENT_CHUNK = 64 * 1024
_REFUSAL_LOG_EVERY = 1.0  # seconds between two refusal lines of the same reason
_REFUSAL_EVENTS = {
    RejectReason.QUEUE_FULL: Event.QUEUE_FULL,
    RejectReason.QUEUE_TIMEOUT: Event.QUEUE_TIMEOUT,
    RejectReason.SHUTTING_DOWN: Event.SHUTDOWN_REFUSED,
}


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """What the proxy needs from the settings, resolved once."""

    upstream: str
    gated_paths: tuple[str, ...]
    task_methods: frozenset[str]
    max_body_size: int
    spool_memory_size: int
    spool_dir: str | None
    queue_timeout: float
    request_timeout: float
    client_body_timeout: float
    upload_timeout: float
    timeout_hold: float
    oom_window: float
    oom_cooldown: float
    retry: RetryPolicy
    matcher: OomMatcher
    queue_per_slot: int | None = None
    """Adaptive mode without ASR_MAX_QUEUE: the queue is this many tasks per slot of the limit."""

    @classmethod
    def from_settings(cls, settings: Settings) -> "ProxyConfig":
        return cls(
            upstream=settings.upstream_url,
            gated_paths=settings.gated_paths,
            task_methods=frozenset(settings.task_methods),
            max_body_size=settings.max_body_size,
            spool_memory_size=settings.spool_memory_size,
            spool_dir=str(settings.spool_dir) if settings.spool_dir else None,
            queue_timeout=settings.queue_timeout,
            request_timeout=settings.request_timeout,
            client_body_timeout=settings.client_body_timeout,
            upload_timeout=settings.upload_timeout,
            timeout_hold=settings.timeout_hold_s,
            oom_window=settings.oom_window_s,
            oom_cooldown=settings.oom_cooldown_s,
            retry=RetryPolicy(
                max_retries=settings.max_retries,
                base=settings.retry_delay,
                jitter=settings.retry_jitter,
                retry_on_timeout=settings.retry_on_timeout,
            ),
            matcher=settings.oom_matcher(),
            queue_per_slot=10 if settings.queue_follows_limit else None,
        )

    def queue_for(self, limit: int) -> int | None:
        """The queue size that goes with `limit`, when the queue follows the limit."""
        return None if self.queue_per_slot is None else self.queue_per_slot * limit


def _adaptive_params(settings: Settings) -> AdaptiveParams | None:
    if not settings.adaptive:
        return None
    return AdaptiveParams(
        minimum=settings.min_concurrent,
        maximum=settings.max_concurrent,
        stable_successes=settings.adaptive_stable_successes,
        stable_seconds=settings.adaptive_stable_seconds,
        fade_seconds=settings.adaptive_fade_seconds,
    )


def adaptive_from_settings(settings: Settings, now: Callable[[], float]) -> AdaptiveLimit | None:
    """The adaptive limit a fresh gatekeeper starts with, or None for a fixed limit."""
    params = _adaptive_params(settings)
    if params is None:
        return None
    return AdaptiveLimit(params, initial=settings.start_limit, now=now)


class _Resume(Enum):
    """How a retry's wait for a slot ended."""

    GRANTED = "granted"
    GONE = "gone"
    TIMED_OUT = "timed_out"
    STOPPED = "stopped"  # the shutdown's grace period ended


class _Task:
    """Everything one admitted task carries from the handler into its runner."""

    __slots__ = (
        "answering",
        "body",
        "gone",
        "headers",
        "hold",
        "record",
        "request",
        "runner",
        "ticket",
    )

    def __init__(
        self,
        request: web.Request,
        record: TaskRecord,
        ticket: Ticket,
        body: SpooledBody,
        headers: CIMultiDict[str],
    ) -> None:
        self.request = request
        self.record = record
        self.ticket = ticket
        self.body = body
        self.headers = headers
        self.gone = asyncio.Event()
        self.runner: asyncio.Task[object] | None = None
        self.answering = False  # the upstream's answer has begun to go to the client
        # A timed-out last attempt the Whisper server may still compute: it owns the slot and
        # the body from the runner's end until the server is done (or ASR_TIMEOUT_HOLD).
        self.hold: asyncio.Task[HoldEnd] | None = None


class Proxy:
    """Request handling for the whole app; owns the gate and the live state."""

    def __init__(
        self,
        config: ProxyConfig,
        *,
        gate: Gate,
        state: LiveState,
        clock: Clock,
        rng: random.Random,
        session: Callable[[], aiohttp.ClientSession],
    ) -> None:
        self.config = config
        self.gate = gate
        self.state = state
        self.clock = clock
        self.rng = rng
        self._session = session
        # Attempt loops, and holds of timed-out attempts: what still works upstream.
        self.runners: set[asyncio.Task[Any]] = set()
        # Per refusal reason: when its last line was logged, and how many refusals since.
        self._refusal_log: dict[RejectReason, tuple[float, int]] = {}
        self.adaptive: AdaptiveLimit | None = None
        # Request handlers still reading their task's body, so a shutdown can end them.
        self._uploading: set[asyncio.Task[object]] = set()
        self._uploads_stopped = False
        # Tasks between two attempts without a slot, so a shutdown can answer them.
        self._between: set[_Task] = set()
        self._retries_stopped = asyncio.Event()

    def reconfigure(self, settings: Settings) -> None:
        """Take new settings live: running tasks keep theirs, new attempts use the new ones.

        Switching the adaptive mode on, or changing its bounds, starts it afresh from the
        current limit (moved into the new bounds); switching it off fixes the limit at
        ASR_MAX_CONCURRENT.
        """
        self.config = ProxyConfig.from_settings(settings)
        current = self.gate.counts().limit
        params = _adaptive_params(settings)
        if params is None:
            self.adaptive = None
            limit = settings.max_concurrent
        elif self.adaptive is not None and self.adaptive.params == params:
            limit = self.adaptive.limit
        else:
            limit = min(max(current, params.minimum), params.maximum)
            self.adaptive = AdaptiveLimit(params, initial=limit, now=self.clock.monotonic)
        queue = self.config.queue_for(limit)
        self.gate.set_limits(
            limit=limit,
            max_queue=settings.queue_limit if queue is None else queue,
        )

    def adaptive_stats(self) -> dict[str, object]:
        """The adaptive limit's state for /stats (only when the limit is adaptive)."""
        if self.adaptive is None:
            return {"adaptive": None}
        return {"adaptive": self.adaptive.snapshot(wall_now=self.clock.wall())}

    def stop_retries(self) -> list["asyncio.Task[object]"]:
        """End of a shutdown grace period: tasks between two attempts (in a retry delay without
        a slot, or waiting for one) get 503 shutting_down now. Returns their runners."""
        self._retries_stopped.set()
        return [t.runner for t in self._between if t.runner is not None]

    def stop_uploads(self) -> int:
        """End of a shutdown grace period: tasks still uploading get 503 shutting_down now."""
        self._uploads_stopped = True
        for handler in list(self._uploading):
            handler.cancel()
        return len(self._uploading)

    def tick(self) -> None:
        """Let time act on the adaptive limit (a faded ceiling, a stretch that became stable)."""
        if self.adaptive is not None:
            self._limit_changed(self.adaptive.tick())

    def _limit_changed(self, change: LimitChange | None) -> None:
        if change is None:
            return
        self.gate.set_limits(limit=change.new, max_queue=self.config.queue_for(change.new))
        self.state.limit_changed(change.kind)
        log_event(
            Event.LIMIT_CHANGED,
            logging.WARNING,
            old=change.old,
            new=change.new,
            reason=change.reason,
        )

    # -- routing -----------------------------------------------------------------------------

    def is_task(self, method: str, path: str) -> bool:
        """Work for the GPU: a task method (POST) on a task path; the rest passes through."""
        return method in self.config.task_methods and path.startswith(self.config.gated_paths)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.is_task(request.method, request.path):
            return await self._task(request)
        return await self._pass_through(request)

    async def expect(self, request: web.Request) -> web.StreamResponse | None:
        """`Expect: 100-continue`: a task that would be refused is refused now, before the
        client sends its body (413 from Content-Length, 503 when the queue is full); otherwise
        `100 Continue`. The Expect header itself never goes upstream."""
        if request.headers.get("Expect", "").lower() != "100-continue":
            return web.Response(status=417, text="only 'Expect: 100-continue' is supported\n")
        if self.is_task(request.method, request.path):
            early = self._early_answer(request, request.headers.get(REQUEST_ID))
            if early is not None:
                early.force_close()  # the client will not send the body: start afresh
                return early
        if request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the answer's own byte count starts after this
        return None

    def _early_answer(self, request: web.Request, request_id: str | None) -> web.Response | None:
        """What a task gets before its body is read, if it cannot be taken: 413 (Content-Length
        over ASR_MAX_BODY_SIZE) or 503 (shutting down, no room in the queue)."""
        task_id = request_id or os.urandom(16).hex()
        limit = self.config.max_body_size
        if request.content_length is not None and request.content_length > limit:
            log_event(Event.BODY_TOO_LARGE, logging.WARNING, task_id=task_id, limit=limit)
            return body_too_large(limit, request_id=task_id)
        refused = self.gate.arrival_refusal()
        return None if refused is None else self._refuse(refused, task_id)

    # -- pass-through ------------------------------------------------------------------------

    async def _pass_through(self, request: web.Request) -> web.StreamResponse:
        """Non-task paths go straight upstream: never queued, never retried."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.request_timeout
        request_id = request.headers.get(REQUEST_ID) or os.urandom(16).hex()
        headers = self._upstream_headers(request, request_id)
        data = request.content if request.body_exists else None
        try:
            async with asyncio.timeout_at(deadline):
                response = await self._session().request(
                    request.method,
                    upstream_url(self.config.upstream, request.raw_path),
                    headers=headers,
                    data=data,
                    allow_redirects=False,
                )
        except TimeoutError:
            return upstream_unreachable("no answer within ASR_REQUEST_TIMEOUT")
        except (aiohttp.ClientError, OSError) as exc:
            return upstream_unreachable(str(exc) or type(exc).__name__)
        try:
            answer, _ = await self._relay(request, response, {}, deadline)
            return answer
        finally:
            response.close()

    def _upstream_headers(self, request: web.Request, request_id: str) -> CIMultiDict[str]:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        client_ip = peer[0] if isinstance(peer, tuple) and peer else request.remote
        return forward_request_headers(
            request.headers,
            client_ip=client_ip,
            scheme=request.scheme,
            host=request.host,
            request_id=request_id,
        )

    # -- tasks: admission and waiting (in the request handler) -------------------------------

    async def _task(self, request: web.Request) -> web.StreamResponse:
        request_id = request.headers.get(REQUEST_ID) or os.urandom(16).hex()
        limit = self.config.max_body_size
        if request.content_length is not None and request.content_length > limit:
            log_event(Event.BODY_TOO_LARGE, logging.WARNING, task_id=request_id, limit=limit)
            return body_too_large(limit, request_id=request_id)
        try:
            upload = self.gate.begin_upload()
        except Refused as refused:  # the hot path of a flood: nothing more to set up
            return self._refuse(refused.reason, request_id)
        record = TaskRecord(request_id, request.method, request.path, self.clock.monotonic())
        self.state.task_admitted()
        body = SpooledBody(
            memory_limit=self.config.spool_memory_size,
            directory=None if self.config.spool_dir is None else Path(self.config.spool_dir),
        )
        ticket: Ticket | None = None
        handed_over = False
        try:
            failed = await self._receive(request, record, body)
            if failed is not None:
                return failed
            if self._uploads_stopped:  # the upload ended just as the grace period did
                self.state.task_ended(TaskOutcome.REJECTED)
                return self._refuse(RejectReason.SHUTTING_DOWN, request_id, arrived=record.arrived)
            try:
                ticket = upload.enter()
            except Refused as refused:  # the queue filled up while this upload came in
                self.state.task_ended(TaskOutcome.REJECTED)
                return self._refuse(refused.reason, request_id, arrived=record.arrived)
            # ASR_QUEUE_TIMEOUT counts from here: the upload had its own limit.
            record.queued_at = self.clock.monotonic()
            try:
                await ticket.wait(self.config.queue_timeout)
            except Refused as refused:
                self.state.task_ended(TaskOutcome.REJECTED)
                return self._refuse(refused.reason, request_id, arrived=record.arrived)
            headers = self._upstream_headers(request, request_id)
            if body.size > 0:
                headers["Content-Length"] = str(body.size)  # the same for every attempt
            task = _Task(request, record, ticket, body, headers)
            runner = asyncio.create_task(self._run(task), name=f"task-{request_id}")
            handed_over = True
            self.runners.add(runner)
            runner.add_done_callback(self.runners.discard)
            return await self._await_runner(task, runner)
        except asyncio.CancelledError:
            if not handed_over:
                self.state.task_ended(TaskOutcome.CANCELLED)
                log_event(
                    Event.CLIENT_LEFT,
                    task_id=request_id,
                    stage="uploading" if ticket is None else "queued",
                    waited=self.clock.monotonic() - record.arrived,
                )
            raise
        finally:
            upload.end()
            if not handed_over:
                if ticket is not None:
                    ticket.leave()
                body.close()

    async def _receive(
        self, request: web.Request, record: TaskRecord, body: SpooledBody
    ) -> web.StreamResponse | None:
        """Receive the task's whole body into its spool; None when it is in, else the answer
        that ends the task (the upload failed, or the shutdown's grace period ended)."""
        request_id, limit = record.task_id, self.config.max_body_size
        handler = asyncio.current_task()
        assert handler is not None
        self._uploading.add(handler)
        try:
            await body.fill(
                request.content.readany,
                max_size=limit,
                idle_timeout=self.config.client_body_timeout,
                total_timeout=self.config.upload_timeout,
            )
        except asyncio.CancelledError:
            if not self._uploads_stopped:
                raise  # the client left
            handler.uncancel()  # stopped by the shutdown, not by the client: say so
            self.state.task_ended(TaskOutcome.REJECTED)
            answer = self._refuse(RejectReason.SHUTTING_DOWN, request_id, arrived=record.arrived)
            # Send it and hang up now: the rest of the upload is not worth waiting for.
            if await _client_write(answer.prepare(request)):
                await _client_write(answer.write_eof())
            request.protocol.force_close()
            return answer
        except BodyTooLarge:
            log_event(Event.BODY_TOO_LARGE, logging.WARNING, task_id=request_id, limit=limit)
            self.state.task_ended(TaskOutcome.CLIENT_ERROR)
            return body_too_large(limit, request_id=request_id)
        except BodyTimeout as stalled:
            log_event(
                Event.BODY_TIMEOUT,
                logging.WARNING,
                task_id=request_id,
                received=body.size,
                timeout=stalled.seconds,
            )
            self.state.task_ended(TaskOutcome.CLIENT_ERROR)
            return body_timeout(stalled.seconds, request_id=request_id)
        except UploadTimeout as slow:
            log_event(
                Event.UPLOAD_TIMEOUT,
                logging.WARNING,
                task_id=request_id,
                received=body.size,
                timeout=slow.seconds,
            )
            self.state.task_ended(TaskOutcome.CLIENT_ERROR)
            return upload_timeout(slow.seconds, request_id=request_id)
        except (ConnectionError, HttpProcessingError) as broken:
            # The client hung up mid-upload, or sent a truncated/garbled chunked body.
            self.state.task_ended(TaskOutcome.CANCELLED)
            log_event(
                Event.CLIENT_LEFT,
                task_id=request_id,
                stage="uploading",
                received=body.size,
                error=type(broken).__name__,
            )
            return body_broken(request_id=request_id)
        finally:
            self._uploading.discard(handler)
        return None

    async def _await_runner(
        self, task: "_Task", runner: "asyncio.Task[web.StreamResponse]"
    ) -> web.StreamResponse:
        """The handler's side of a running task: its answer, or what a cancellation means."""
        handler = asyncio.current_task()
        try:
            return await asyncio.shield(runner)
        except asyncio.CancelledError:
            stopped = runner.cancelled() and handler is not None and not handler.cancelling()
            if stopped and not task.answering:
                # The shutdown's grace period ended with this task still upstream: answer
                # it rather than cut it.
                return self._refuse_started(task, RejectReason.SHUTTING_DOWN)
            if stopped:  # its answer had begun: a 503 cannot follow it, so it is cut
                self.state.task_ended(
                    TaskOutcome.FAILED, self.clock.monotonic() - task.record.arrived
                )
            # The client left (or the server stops): the runner decides what that means.
            task.gone.set()
            raise

    def _refuse(
        self, reason: RejectReason, task_id: str, *, arrived: float | None = None, attempts: int = 0
    ) -> web.Response:
        """503 服务繁忙 for a task; `arrived` when it had been admitted (then it waited)."""
        # The hot path of an overload: read the few numbers needed, not a whole snapshot.
        usage = self.gate.counts()
        self.state.task_rejected(reason)
        retry_after = estimate_retry_after(
            reason=reason,
            mean_service=self.state.service.mean,
            limit=usage.limit,
            queued=usage.queued + usage.retrying,  # retries go ahead of the queue
        )
        # In a flood one line a second per reason says it all; metrics count every refusal.
        now = self.clock.monotonic()
        logged_at, since = self._refusal_log.get(reason, (-_REFUSAL_LOG_EVERY, 0))
        if now - logged_at < _REFUSAL_LOG_EVERY:
            self._refusal_log[reason] = (logged_at, since + 1)
        else:
            self._refusal_log[reason] = (now, 0)
            log_event(
                _REFUSAL_EVENTS[reason],
                logging.WARNING,
                task_id=task_id,
                queued=f"{usage.queued}/{usage.max_queue}",
                active=f"{usage.active}/{usage.limit}",
                retry_after=retry_after,
                not_logged_since_last=since,
                **({} if arrived is None else {"waited": now - arrived}),
            )
        return refusal(
            reason,
            retry_after=retry_after,
            queue_usage=queue_usage(usage.queued, usage.max_queue),
            request_id=task_id,
            attempts=attempts,
        )

    # -- tasks: the runner (holds the slot until the upstream work is over) ------------------

    async def _run(self, task: _Task) -> web.StreamResponse:
        record = task.record
        record.started = record.held_since = self.clock.monotonic()
        task.runner = asyncio.current_task()
        self.state.queue_waited(record.started - (record.queued_at or record.arrived))
        try:
            return await self._attempts(task)
        finally:
            if task.hold is None:
                self._free_slot(task)

    def _free_slot(self, task: _Task) -> None:
        """The task's work upstream is over: give back its slot and its spooled body."""
        record = task.record
        task.ticket.leave()
        task.body.close()
        if record.held_since is not None:
            record.held += self.clock.monotonic() - record.held_since
            record.held_since = None
        self.state.slot_held(record.held)

    async def _attempts(self, task: _Task) -> web.StreamResponse:
        record, cfg = task.record, self.config
        last_oom = self.state.last_oom_monotonic
        if (
            cfg.oom_cooldown > 0
            and last_oom is not None
            and self.clock.monotonic() - last_oom < cfg.oom_window
        ):
            record.cooldown = cfg.oom_cooldown
            log_event(Event.COOLDOWN, task_id=record.task_id, delay=cfg.oom_cooldown)
            if await self._wait_or_gone(cfg.oom_cooldown, task):
                return self._gone(task, "cooldown")
        counts = self.gate.counts()
        log_event(
            Event.START,
            task_id=record.task_id,
            active=f"{counts.active}/{counts.limit}",
            queued=counts.queued,
            path=record.path,
        )
        loop = asyncio.get_running_loop()
        url = upstream_url(cfg.upstream, task.request.raw_path)
        while True:
            record.attempts += 1
            began = self.clock.monotonic()
            deadline = loop.time() + cfg.request_timeout
            # The GPU is busy with this attempt from the request until its answer is fully read.
            self.state.upstream_began()
            held = False  # a hold took over the attempt (and ends it upstream)
            try:
                result = await send(
                    self._session(),
                    method=task.request.method,
                    url=url,
                    headers=task.headers,
                    body=task.body,
                    deadline=deadline,
                )
                outcome = classify(
                    status=result.status,
                    body=result.prefix,
                    content_type=result.response.headers.get("Content-Type")
                    if result.response is not None
                    else None,
                    error=result.error,
                    timed_out=result.timed_out,
                    matcher=cfg.matcher,
                )
                if outcome in (AttemptOutcome.OK, AttemptOutcome.CLIENT_ERROR) or not (
                    cfg.retry.should_retry(outcome, record.attempts) and not task.gone.is_set()
                ):
                    answer, outcome, client_left, still = await self._deliver(
                        task, outcome, result, deadline
                    )
                    self._record_attempt(task, outcome, result, began)
                    if still is not None:  # the client gets its answer; the slot stays taken
                        held = True
                        self._hold_after(task, still)
                    return self._conclude(task, outcome, result, answer, client_left)
                self._record_attempt(task, outcome, result, began)
                delay = cfg.retry.delay(
                    outcome,
                    record.attempts,
                    unit_random=self.rng.random(),
                    upstream_retry_after=parse_retry_after(
                        result.response.headers.get("Retry-After")
                        if result.response is not None
                        else None
                    ),
                )
                if result.still_upstream is not None:  # a timeout retried: after the GPU is done
                    held = True
                    await self._hold(task, _finish_attempt(result.still_upstream))
                elif result.response is not None:
                    await _discard(result.response, deadline)
            finally:
                if not held:
                    self.state.upstream_ended()
            record.retry_delay_total += delay
            self.state.retry_scheduled(outcome, delay)
            log_event(
                Event.RETRY,
                logging.WARNING,
                task_id=record.task_id,
                outcome=outcome.value,
                attempt=record.attempts,
                next_attempt=record.attempts + 1,
                delay=delay,
            )
            final = await self._between_attempts(task, delay)
            if final is not None:
                return final

    async def _between_attempts(self, task: _Task, delay: float) -> web.StreamResponse | None:
        """Wait out a retry delay; None when the next attempt may go, else the final answer.

        With the seed's cool-down (ASR_OOM_COOLDOWN > 0) the task keeps its slot through the
        delay: new starts are held back after an OOM anyway, and the slot keeps the memory
        free for this retry. Without it (ASR_OOM_COOLDOWN=0, the adaptive mode's default) the
        GPU would do nothing for the slot during the delay, so the task gives it to the next
        one and afterwards takes the next free slot, ahead of every queued task.
        """
        record, cfg = task.record, self.config
        if cfg.oom_cooldown > 0:
            if await self._wait_or_gone(delay, task):
                return self._gone(task, "retry_delay")
            return None
        if record.held_since is not None:
            record.held += self.clock.monotonic() - record.held_since
            record.held_since = None
        task.ticket.pause()
        self._between.add(task)
        try:
            if await self._wait_or_gone(delay, task, stop=self._retries_stopped):
                if task.gone.is_set():
                    return self._gone(task, "retry_delay")
                return self._refuse_retry(task, RejectReason.SHUTTING_DOWN)
            resumed = await self._resume_or_gone(task, within=cfg.request_timeout)
        finally:
            self._between.discard(task)
        if resumed is _Resume.GONE:
            return self._gone(task, "retry_wait")
        if resumed is _Resume.STOPPED:
            return self._refuse_retry(task, RejectReason.SHUTTING_DOWN)
        if resumed is _Resume.TIMED_OUT:
            # Retries piled up beyond the limit: refuse like a queue timeout, so the worst
            # case of a task stays bounded (gatekeeper/budget.py).
            return self._refuse_retry(task, RejectReason.QUEUE_TIMEOUT)
        record.held_since = self.clock.monotonic()
        return None

    def _refuse_started(self, task: _Task, reason: RejectReason) -> web.StreamResponse:
        """503 for a task that already reached the Whisper server (its attempts say how often):
        its retry found no slot in time, or the end of a shutdown stopped it."""
        record = task.record
        self.state.task_ended(TaskOutcome.REJECTED, self.clock.monotonic() - record.arrived)
        return self._refuse(
            reason, record.task_id, arrived=record.arrived, attempts=record.attempts
        )

    def _refuse_retry(self, task: _Task, reason: RejectReason) -> web.StreamResponse:
        """A task whose next attempt cannot go (no slot in time, or shutting down): 503."""
        record = task.record
        log_event(
            Event.RETRY_REFUSED,
            logging.WARNING,
            task_id=record.task_id,
            reason=reason.value,
            attempts=record.attempts,
            outcomes=",".join(o.value for o in record.outcomes),
            duration=self.clock.monotonic() - record.arrived,
        )
        return self._refuse_started(task, reason)

    def _observe(self, outcome: AttemptOutcome, attempt: int) -> None:
        """Feed one attempt's outcome to the adaptive limit, if there is one."""
        if self.adaptive is not None:
            # This attempt still counts as upstream: the concurrency it ran (and ended) at.
            change = self.adaptive.on_attempt(
                outcome,
                in_flight=self.state.upstream_in_flight,
                queue_waiting=self.gate.counts().queued > 0,
                first_attempt=attempt == 1,
            )
            self._limit_changed(change)

    def _record_attempt(
        self, task: _Task, outcome: AttemptOutcome, result: AttemptResult, began: float
    ) -> None:
        """Book one finished attempt: the task's record, the counters, the log, the limit."""
        task.record.outcomes.append(outcome)
        self.state.attempt_ended(
            outcome,
            self.clock.monotonic() - began,
            wall=self.clock.wall(),
            monotonic=self.clock.monotonic(),
        )
        self._log_attempt(task, outcome, result)
        self._observe(outcome, task.record.attempts)

    async def _deliver(
        self, task: _Task, outcome: AttemptOutcome, result: AttemptResult, deadline: float
    ) -> tuple[web.StreamResponse, AttemptOutcome, bool, Coroutine[Any, Any, HoldEnd] | None]:
        """Answer the client with the last attempt's result.

        Returns the answer, the attempt's final outcome (an answer the upstream broke off
        mid-way is a crash, or a timeout, however it began), whether the client had left, and,
        after a timeout, what the Whisper server may still be doing (to hold the slot for).
        """
        record = task.record
        if result.response is None:
            failure = upstream_failure(outcome, attempts=record.attempts, request_id=record.task_id)
            still = (
                None if result.still_upstream is None else _finish_attempt(result.still_upstream)
            )
            return failure, outcome, task.gone.is_set(), still
        extra = {ATTEMPTS_HEADER: str(record.attempts), REQUEST_ID: record.task_id}
        task.answering = True
        end = _RelayEnd.UPSTREAM_BROKE
        try:
            answer, end = await self._relay(task.request, result, extra, deadline, task.gone)
        finally:
            if end is not _RelayEnd.TIMED_OUT:
                result.response.close()
        if end is _RelayEnd.UPSTREAM_BROKE:
            outcome = AttemptOutcome.CRASH
        elif end is _RelayEnd.TIMED_OUT:
            # Cut mid-answer at the deadline: the server is still sending (and computing).
            still = _finish_answer(result.response)
            return answer, AttemptOutcome.TIMEOUT, task.gone.is_set(), still
        return answer, outcome, end is _RelayEnd.CLIENT_GONE or task.gone.is_set(), None

    def _hold_after(self, task: _Task, still: Coroutine[Any, Any, HoldEnd]) -> None:
        """The task is answered, but the Whisper server may still be on its last attempt: a
        task of its own keeps the slot (and the body) until the server is done."""
        began = self._hold_began(task)
        hold = asyncio.create_task(self._hold_for(still), name=f"hold-{task.record.task_id}")

        def ended(hold: "asyncio.Task[HoldEnd]") -> None:
            # A callback, not a `finally`: it runs even if the hold is cancelled before it starts.
            still.close()  # a no-op unless it never started
            end = HoldEnd.STOPPED if hold.cancelled() else hold.result()
            self._hold_ended(task, end, began)
            self._free_slot(task)
            self.runners.discard(hold)

        hold.add_done_callback(ended)
        task.hold = hold
        self.runners.add(hold)

    async def _hold(self, task: _Task, still: Coroutine[Any, Any, HoldEnd]) -> None:
        """The same hold inside the runner (a timed-out attempt to be retried: the retry waits
        for the Whisper server to be done with the first one)."""
        began = self._hold_began(task)
        end = HoldEnd.STOPPED
        try:
            end = await self._hold_for(still)
        finally:
            still.close()
            self._hold_ended(task, end, began)

    async def _hold_for(self, still: Coroutine[Any, Any, HoldEnd]) -> HoldEnd:
        """Wait until the Whisper server is done with a timed-out attempt, at most
        ASR_TIMEOUT_HOLD (then its connection is closed)."""
        try:
            async with asyncio.timeout(self.config.timeout_hold):
                return await still
        except TimeoutError:
            return HoldEnd.EXPIRED

    def _hold_began(self, task: _Task) -> float:
        self.state.hold_began()
        log_event(
            Event.HOLD,
            logging.WARNING,
            task_id=task.record.task_id,
            hold=self.config.timeout_hold,
        )
        return self.clock.monotonic()

    def _hold_ended(self, task: _Task, end: HoldEnd, began: float) -> None:
        """The attempt has left the Whisper server (or was cut): count it and say so."""
        self.state.upstream_ended()
        self.state.hold_ended(end)
        log_event(
            Event.HOLD_ENDED,
            logging.WARNING if end is HoldEnd.EXPIRED else logging.INFO,
            task_id=task.record.task_id,
            end=end.value,
            held=self.clock.monotonic() - began,
        )

    def _conclude(
        self,
        task: _Task,
        outcome: AttemptOutcome,
        result: AttemptResult,
        answer: web.StreamResponse,
        client_left: bool,
    ) -> web.StreamResponse:
        """Count the task by how it ended and log its finish line."""
        record = task.record
        if client_left:
            task_outcome = TaskOutcome.CANCELLED
        elif outcome is AttemptOutcome.OK:
            task_outcome = TaskOutcome.SUCCESS
        elif outcome is AttemptOutcome.CLIENT_ERROR:
            task_outcome = TaskOutcome.CLIENT_ERROR
        else:
            task_outcome = TaskOutcome.FAILED
        self.state.task_ended(task_outcome, self.clock.monotonic() - record.arrived)
        log_event(
            Event.FINISH if task_outcome is TaskOutcome.SUCCESS else Event.FAILED,
            logging.INFO if task_outcome is not TaskOutcome.FAILED else logging.WARNING,
            task_id=record.task_id,
            outcome=task_outcome.value,
            last=outcome.value,
            attempts=record.attempts,
            outcomes=",".join(o.value for o in record.outcomes),
            status=result.status if result.status is not None else "-",
            upload=(record.queued_at or record.arrived) - record.arrived,
            queue_wait=(record.started or record.arrived) - (record.queued_at or record.arrived),
            duration=self.clock.monotonic() - record.arrived,
            retry_delay=record.retry_delay_total,
            cooldown=record.cooldown,
        )
        return answer

    def _gone(self, task: _Task, stage: str) -> web.StreamResponse:
        record = task.record
        self.state.task_ended(TaskOutcome.CANCELLED, self.clock.monotonic() - record.arrived)
        log_event(Event.CLIENT_LEFT, task_id=record.task_id, stage=stage, attempts=record.attempts)
        # Nobody is listening; the answer only satisfies the handler's type.
        return upstream_failure(
            AttemptOutcome.CRASH, attempts=record.attempts, request_id=record.task_id
        )

    async def _wait_or_gone(
        self, seconds: float, task: _Task, *, stop: asyncio.Event | None = None
    ) -> bool:
        """Sleep `seconds` (on the injected clock); True if the client left meanwhile (or
        `stop` was set)."""
        events = [task.gone] if stop is None else [task.gone, stop]
        if not any(e.is_set() for e in events):
            await _first_of(self.clock.sleep(seconds), *(e.wait() for e in events))
        return any(e.is_set() for e in events)

    async def _resume_or_gone(self, task: _Task, *, within: float) -> "_Resume":
        """Take a slot back for the next attempt, waiting at most `within` seconds.

        The retry goes ahead of every queued task, but may still wait for a running one to end
        (the limit is full, or the adaptive limit was cut by the OOM that caused this retry).
        A slot frees within one attempt's time unless other retries are ahead; past `within`
        the task gives up its place (the caller refuses it).
        """
        if task.gone.is_set():
            return _Resume.GONE
        resumer, *_ = await _first_of(
            task.ticket.resume(), task.gone.wait(), self._retries_stopped.wait(), within=within
        )
        if resumer.done() and not resumer.cancelled():
            resumer.result()  # surfaces a bug in the gate rather than hiding it
        if task.gone.is_set():
            return _Resume.GONE
        if task.ticket.granted:
            return _Resume.GRANTED
        return _Resume.STOPPED if self._retries_stopped.is_set() else _Resume.TIMED_OUT

    def _log_attempt(self, task: _Task, outcome: AttemptOutcome, result: AttemptResult) -> None:
        record = task.record
        if outcome is AttemptOutcome.OOM:
            log_event(
                Event.OOM,
                logging.WARNING,
                task_id=record.task_id,
                oom_count=self.state.oom_errors,
                attempt=record.attempts,
                status=result.status,
            )
        elif outcome is AttemptOutcome.TIMEOUT:
            log_event(
                Event.TIMEOUT,
                logging.WARNING,
                task_id=record.task_id,
                attempt=record.attempts,
                timeout=self.config.request_timeout,
            )
        elif outcome is AttemptOutcome.CRASH:
            log_event(
                Event.CRASH,
                logging.WARNING,
                task_id=record.task_id,
                attempt=record.attempts,
                error=type(result.error).__name__ if result.error else "incomplete",
            )
        elif outcome is AttemptOutcome.ERROR:
            log_event(
                Event.UPSTREAM_ERROR,
                logging.WARNING,
                task_id=record.task_id,
                attempt=record.attempts,
                status=result.status,
            )

    # -- relaying an upstream answer ----------------------------------------------------------

    async def _relay(
        self,
        request: web.Request,
        upstream: AttemptResult | aiohttp.ClientResponse,
        extra_headers: dict[str, str],
        deadline: float,
        gone: asyncio.Event | None = None,
    ) -> tuple[web.StreamResponse, "_RelayEnd"]:
        """Send the upstream answer to the client, streaming what is not read yet.

        If the client is gone the rest is still read (and dropped) so the attempt really ends
        before the slot is given back. If the upstream breaks off or the deadline passes
        mid-answer, the client connection is cut, so the client sees a broken answer rather
        than a silently short one.
        """
        result = upstream if isinstance(upstream, AttemptResult) else AttemptResult(upstream)
        response_in = result.response
        assert response_in is not None
        headers = forward_response_headers(response_in.headers)
        headers.update(extra_headers)
        if result.complete and "Content-Type" in headers:
            # Already read whole (a transcript, an error page): one write, status to last byte.
            small = web.Response(
                status=response_in.status, reason=response_in.reason, headers=headers
            )
            small.body = result.prefix
            if gone is not None and gone.is_set():
                return small, _RelayEnd.CLIENT_GONE
            ok = await _client_write(small.prepare(request))
            if ok:
                ok = await _client_write(small.write_eof())
            return small, _RelayEnd.DELIVERED if ok else _RelayEnd.CLIENT_GONE
        response = web.StreamResponse(
            status=response_in.status, reason=response_in.reason, headers=headers
        )
        if response_in.content_length is not None:
            response.content_length = response_in.content_length
        client_ok = gone is None or not gone.is_set()
        try:
            async with asyncio.timeout_at(deadline):
                if client_ok:
                    client_ok = await _client_write(response.prepare(request))
                if result.prefix and client_ok:
                    client_ok = await _client_write(response.write(result.prefix))
                if not result.complete:
                    async for chunk in response_in.content.iter_any():
                        if client_ok:
                            client_ok = await _client_write(response.write(chunk))
                if client_ok:
                    client_ok = await _client_write(response.write_eof())
        except TimeoutError:
            _cut(request)
            return response, _RelayEnd.TIMED_OUT
        except (aiohttp.ClientError, OSError):
            _cut(request)
            return response, _RelayEnd.UPSTREAM_BROKE
        return response, _RelayEnd.DELIVERED if client_ok else _RelayEnd.CLIENT_GONE


class _RelayEnd(Enum):
    """How relaying an answer ended."""

    DELIVERED = "delivered"
    CLIENT_GONE = "client_gone"
    UPSTREAM_BROKE = "upstream_broke"
    TIMED_OUT = "timed_out"


async def _first_of(
    *waits: Coroutine[Any, Any, object], within: float | None = None
) -> list["asyncio.Future[object]"]:
    """Run `waits` until the first of them ends (or `within` seconds), cancel the others, and
    return them all in order, so the caller can see which ended and how."""
    futures: list[asyncio.Future[object]] = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(futures, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in futures:
            future.cancel()
    return futures


async def _client_write(write: "asyncio.Future[object] | object") -> bool:
    """Await one write to the client; False (not an exception) when the client has gone."""
    try:
        await write  # type: ignore[misc]
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        return False
    return True


async def _finish_attempt(attempt: "asyncio.Task[AttemptResult]") -> HoldEnd:
    """Wait for a timed-out attempt to end upstream; read and drop any answer it gets.

    Cancelling this (the hold ran out, or the shutdown) cancels the attempt: its connection
    is closed, which is all a proxy can do to stop the work.
    """
    result = await attempt
    if result.response is None:
        return HoldEnd.CLOSED
    if result.complete:
        result.response.close()
        return HoldEnd.ANSWERED
    return await _finish_answer(result.response)


async def _finish_answer(response: aiohttp.ClientResponse) -> HoldEnd:
    """Read an answer nobody wants to its end: ANSWERED, or CLOSED if the server broke off."""
    try:
        while await response.content.read(_CLIENT_CHUNK):
            pass
    except (aiohttp.ClientError, OSError):
        return HoldEnd.CLOSED
    finally:
        response.close()
    return HoldEnd.ANSWERED


async def _discard(response: aiohttp.ClientResponse, deadline: float) -> None:
    """Read an unwanted answer to its end (keeps the connection reusable), then close it."""
    try:
        async with asyncio.timeout_at(deadline):
            while await response.content.read(_CLIENT_CHUNK):
                pass
    except (TimeoutError, aiohttp.ClientError, OSError):
        pass
    finally:
        response.close()


def _cut(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
