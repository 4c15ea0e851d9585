"""Refusing a task with 503 服务繁忙: the honest Retry-After, the count, a log line a second."""

import logging

from aiohttp import web

from gatekeeper.answers import refusal
from gatekeeper.clock import Clock
from gatekeeper.gate import Gate
from gatekeeper.logs import Event, log_event
from gatekeeper.policy.admission import estimate_retry_after, queue_usage, work_ahead_steps
from gatekeeper.policy.outcomes import RejectReason
from gatekeeper.state import LiveState

__all__ = ["Refusals"]

_LOG_EVERY = 1.0  # seconds between two refusal lines of the same reason
_EVENTS = {
    RejectReason.QUEUE_FULL: Event.QUEUE_FULL,
    RejectReason.QUEUE_TIMEOUT: Event.QUEUE_TIMEOUT,
    RejectReason.SHUTTING_DOWN: Event.SHUTDOWN_REFUSED,
    RejectReason.COORDINATION_UNAVAILABLE: Event.COORDINATION_REFUSED,
}


class Refusals:
    """Makes every 503 服务繁忙 the task path sends, and counts it."""

    def __init__(self, gate: Gate, state: LiveState, clock: Clock) -> None:
        self._gate = gate
        self._state = state
        self._clock = clock
        # Per reason: when its last line was logged, and how many refusals since.
        self._logged: dict[RejectReason, tuple[float, int]] = {}

    def refuse(
        self, reason: RejectReason, task_id: str, *, arrived: float | None = None, attempts: int = 0
    ) -> web.Response:
        """503 服务繁忙 for a task; `arrived` when it had been admitted (then it waited)."""
        # The hot path of an overload: read the few numbers needed, not a whole snapshot.
        usage = self._gate.counts()
        self._state.task_rejected(reason)
        ahead = usage.queued + usage.retrying  # retries go ahead of the queue
        mean_service = self._state.service.mean
        per_audio = self._state.seconds_per_audio_second
        if per_audio is not None and ahead and reason is not RejectReason.SHUTTING_DOWN:
            # The audio queued ahead, at the measured seconds per second of audio.
            audio, _ = self._gate.audio_ahead(unknown_as=self._state.mean_audio_seconds())
            mean_service = work_ahead_steps(
                reason=reason,
                seconds_per_audio_second=per_audio,
                audio_ahead=audio,
                tasks_ahead=ahead,
            )
        retry_after = estimate_retry_after(
            reason=reason, mean_service=mean_service, limit=usage.limit, queued=ahead
        )
        # In a flood one line a second per reason says it all; metrics count every refusal.
        now = self._clock.monotonic()
        logged_at, since = self._logged.get(reason, (-_LOG_EVERY, 0))
        if now - logged_at < _LOG_EVERY:
            self._logged[reason] = (logged_at, since + 1)
        else:
            self._logged[reason] = (now, 0)
            log_event(
                _EVENTS[reason],
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
