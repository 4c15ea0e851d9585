"""The request handler: routing, the upload, admission and the wait in the queue.

A task's life up to its slot: its upload is received whole (spooled; no slot, no queue place),
then it joins the queue, and once it holds a slot the runner takes over (`runner.py`). A task
never holds a slot while its body is still arriving, so a slow client cannot keep the GPU idle.

How a client that leaves is noticed: the server runs with aiohttp's `handler_cancellation`, so
a dropped connection cancels the request handler. While a task uploads or waits in the queue
that cancellation ends it at once; it never reaches the Whisper server. Once it runs, the
runner decides what the cancellation means.
"""

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import aiohttp
from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict

from gatekeeper.answers import (
    AUDIO_HEADER,
    body_broken,
    body_timeout,
    body_too_large,
    upload_timeout,
)
from gatekeeper.audio import audio_seconds
from gatekeeper.clock import Clock
from gatekeeper.config import ProxyConfig
from gatekeeper.gate import Gate, Refused, Ticket
from gatekeeper.headers import REQUEST_ID
from gatekeeper.ledger import Ledger, TaskRecord
from gatekeeper.logs import Event, log_event
from gatekeeper.policy.outcomes import RejectReason, TaskOutcome
from gatekeeper.refusals import Refusals
from gatekeeper.relay import client_write, pass_through, upstream_headers
from gatekeeper.runner import Runner
from gatekeeper.spool import BodyTimeout, BodyTooLarge, SpooledBody, UploadTimeout
from gatekeeper.state import LiveState
from gatekeeper.task import Task

__all__ = ["Handler"]


_READ_INLINE = 64 * 1024
"""Bodies up to this size have their audio read on the event loop (a few microseconds)."""


class Handler:
    """Every request that is not the gatekeeper's own: tasks, and pass-through traffic."""

    def __init__(
        self,
        config: Callable[[], ProxyConfig],
        *,
        gate: Gate,
        ledger: Ledger,
        refusals: Refusals,
        runner: Runner,
        session: Callable[[], aiohttp.ClientSession],
        new_id: Callable[[], str],
        clock: Clock,
        state: LiveState,
    ) -> None:
        self._config = config
        self._state = state
        self._clock = clock
        self._new_id = new_id  # a request id for a request that brought none
        self._gate = gate
        self._ledger = ledger
        self._refusals = refusals
        self._runner = runner
        self._session = session
        # Request handlers still reading their task's body, so a shutdown can end them.
        self._uploading: set[asyncio.Task[object]] = set()
        self._uploads_stopped = False

    async def handle(self, request: web.Request) -> web.StreamResponse:
        cfg = self._config()
        if cfg.is_task(request.method, request.path):
            return await self._task(request)
        return await pass_through(
            request,
            self._session(),
            upstream=cfg.upstreams[self._gate.first_usable()],
            within=cfg.request_timeout,
            new_id=self._new_id,
            clock=self._clock,
        )

    async def expect(self, request: web.Request) -> web.StreamResponse | None:
        """`Expect: 100-continue`: a task that would be refused is refused now, before the
        client sends its body (413 from Content-Length, 503 when the queue is full); otherwise
        `100 Continue`. The Expect header itself never goes upstream."""
        if request.headers.get("Expect", "").lower() != "100-continue":
            return web.Response(status=417, text="only 'Expect: 100-continue' is supported\n")
        if self._config().is_task(request.method, request.path):
            task_id = request.headers.get(REQUEST_ID) or self._new_id()
            early = self._too_large(request, task_id)
            if early is None and (refused := self._gate.arrival_refusal()) is not None:
                early = self._refusals.refuse(refused, task_id)
            if early is not None:
                early.force_close()  # the client will not send the body: start afresh
                return early
        if request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the answer's own byte count starts after this
        return None

    def stop_uploads(self) -> int:
        """End of a shutdown grace period: tasks still uploading get 503 shutting_down now."""
        self._uploads_stopped = True
        for handler in list(self._uploading):
            handler.cancel()
        return len(self._uploading)

    def _too_large(self, request: web.Request, task_id: str) -> web.Response | None:
        """413 before the body is read, when Content-Length is over ASR_MAX_BODY_SIZE."""
        limit = self._config().max_body_size
        if request.content_length is None or request.content_length <= limit:
            return None
        log_event(Event.BODY_TOO_LARGE, logging.WARNING, task_id=task_id, limit=limit)
        return body_too_large(limit, request_id=task_id)

    async def _task(self, request: web.Request) -> web.StreamResponse:
        request_id = request.headers.get(REQUEST_ID) or self._new_id()
        too_large = self._too_large(request, request_id)
        if too_large is not None:
            return too_large
        cfg = self._config()
        try:
            upload = self._gate.begin_upload()
        except Refused as refused:  # the hot path of a flood: nothing more to set up
            return self._refusals.refuse(refused.reason, request_id)
        record = self._ledger.open(request_id, request.method, request.path)
        body = SpooledBody(
            memory_limit=cfg.spool_memory_size,
            directory=None if cfg.spool_dir is None else Path(cfg.spool_dir),
        )
        ticket: Ticket | None = None
        handed_over = False
        try:
            failed = await self._receive(request, record, body)
            if failed is not None:
                return failed
            record.audio = await self._audio(body, request.headers.get(hdrs.CONTENT_TYPE))
            ticket = upload.enter(record.audio) if not self._uploads_stopped else None
            if ticket is None:  # the upload ended just as the grace period did
                raise Refused(RejectReason.SHUTTING_DOWN)
            # ASR_QUEUE_TIMEOUT counts from here: the upload had its own limit.
            record.queued_at = self._ledger.now()
            await ticket.wait(cfg.queue_timeout)
            task = Task(
                request, record, ticket, body, self._headers(request, request_id, body.size)
            )
            handed_over = True
            return await self._await_runner(task, self._runner.start(task))
        except Refused as refused:  # no room once the upload was in, queue timeout, shutdown
            record.end(TaskOutcome.REJECTED)
            answer = self._refusals.refuse(refused.reason, request_id, arrived=record.arrived)
            answer.headers[AUDIO_HEADER] = record.audio_text
            return answer
        except asyncio.CancelledError:
            if not handed_over:
                record.end(TaskOutcome.CANCELLED)
                log_event(
                    Event.CLIENT_LEFT,
                    task_id=request_id,
                    stage="uploading" if ticket is None else "queued",
                    waited=self._ledger.now() - record.arrived,
                )
            raise
        finally:
            upload.end()
            if not handed_over:
                if ticket is not None:
                    ticket.leave()
                body.close()

    async def _audio(self, body: SpooledBody, content_type: str | None) -> float | None:
        """Seconds of audio in the upload (None: unreadable, never refused for that), from the
        spool's headers only: at once for a small body (microseconds; a refusal burst stays
        cheap), in a worker thread for a larger one, so a hostile file that keeps the reader
        busy up to its budget never holds up the event loop."""
        if body.size <= _READ_INLINE:
            seconds = audio_seconds(body, content_type)
        else:
            seconds = await asyncio.to_thread(audio_seconds, body, content_type)
        self._state.audio_read(seconds)
        return seconds

    @staticmethod
    def _headers(request: web.Request, request_id: str, size: int) -> CIMultiDict[str]:
        headers = upstream_headers(request, request_id)
        if size > 0:
            headers["Content-Length"] = str(size)  # the same for every attempt
        return headers

    async def _receive(
        self, request: web.Request, record: TaskRecord, body: SpooledBody
    ) -> web.StreamResponse | None:
        """Receive the task's whole body into its spool; None when it is in, else the answer
        that ends the task (the upload failed, or the shutdown's grace period ended)."""
        cfg = self._config()
        handler = asyncio.current_task()
        assert handler is not None
        self._uploading.add(handler)
        try:
            await body.fill(
                request.content.readany,
                max_size=cfg.max_body_size,
                idle_timeout=cfg.client_body_timeout,
                total_timeout=cfg.upload_timeout,
                clock=self._clock,
            )
        except asyncio.CancelledError:
            if not self._uploads_stopped:
                raise  # the client left
            handler.uncancel()  # stopped by the shutdown, not by the client: say so
            return await self._stopped_upload(request, record)
        except (BodyTooLarge, BodyTimeout, UploadTimeout) as failed:
            return self._client_error(record, body, failed)
        except (ConnectionError, HttpProcessingError) as broken:
            # The client hung up mid-upload, or sent a truncated/garbled chunked body.
            record.end(TaskOutcome.CANCELLED)
            log_event(
                Event.CLIENT_LEFT,
                task_id=record.task_id,
                stage="uploading",
                received=body.size,
                error=type(broken).__name__,
            )
            return body_broken(request_id=record.task_id)
        finally:
            self._uploading.discard(handler)
        return None

    def _client_error(
        self, record: TaskRecord, body: SpooledBody, failed: Exception
    ) -> web.Response:
        """413 for a body too large, 408 for an upload that stalled or took too long."""
        record.end(TaskOutcome.CLIENT_ERROR)
        task_id = record.task_id
        if isinstance(failed, BodyTooLarge):
            log_event(Event.BODY_TOO_LARGE, logging.WARNING, task_id=task_id, limit=failed.limit)
            return body_too_large(failed.limit, request_id=task_id)
        assert isinstance(failed, BodyTimeout | UploadTimeout)
        log_event(
            Event.BODY_TIMEOUT if isinstance(failed, BodyTimeout) else Event.UPLOAD_TIMEOUT,
            logging.WARNING,
            task_id=task_id,
            received=body.size,
            timeout=failed.seconds,
        )
        if isinstance(failed, BodyTimeout):
            return body_timeout(failed.seconds, request_id=task_id)
        return upload_timeout(failed.seconds, request_id=task_id)

    async def _stopped_upload(self, request: web.Request, record: TaskRecord) -> web.StreamResponse:
        """The grace period ended mid-upload: 503 shutting_down, and hang up now (the rest of
        the upload is not worth waiting for)."""
        record.end(TaskOutcome.REJECTED)
        answer = self._refusals.refuse(
            RejectReason.SHUTTING_DOWN, record.task_id, arrived=record.arrived
        )
        if await client_write(answer.prepare(request)):
            await client_write(answer.write_eof())
        request.protocol.force_close()
        return answer

    async def _await_runner(
        self, task: Task, runner: "asyncio.Task[web.StreamResponse]"
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
                return self._runner.refuse_started(task, RejectReason.SHUTTING_DOWN)
            if stopped:  # its answer had begun: a 503 cannot follow it, so it is cut
                task.record.end(TaskOutcome.FAILED)
            # The client left (or the server stops): the runner decides what that means.
            task.gone.set()
            raise
