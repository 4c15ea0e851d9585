"""The limiter: the gate (who waits, who goes) and the limit it enforces (fixed or adaptive).

In the manner of Netflix's concurrency-limits, the algorithm (`adaptive.AdaptiveLimit`: a number
from samples) is apart from the mechanism (`gate.Gate`); this module joins them. Callers only
report what happened (`observe`) and let time act (`tick`); nothing sets the limit from outside
but a change of settings (`reconfigure`). With several Whisper servers this is where each
server's limit will live; with admission by memory, where a task's cost meets the room left.
"""

import logging
from collections.abc import Callable

from gatekeeper.clock import Clock
from gatekeeper.gate import Gate
from gatekeeper.logs import Event, log_event
from gatekeeper.policy.adaptive import AdaptiveLimit, AdaptiveParams, LimitChange
from gatekeeper.policy.outcomes import AttemptOutcome
from gatekeeper.settings import QUEUE_PER_SLOT, Settings

__all__ = ["Limiter"]


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


class Limiter:
    """Owns the gate and the adaptive limit; applies every change of the limit to the gate."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock,
        on_change: Callable[[LimitChange], None],
    ) -> None:
        self._now = clock.monotonic
        self._on_change = on_change
        self.gate = Gate(limit=settings.start_limit, max_queue=settings.queue_limit, clock=clock)
        params = _adaptive_params(settings)
        self._adaptive = (
            None
            if params is None
            else AdaptiveLimit(params, initial=settings.start_limit, now=self._now)
        )
        self._queue_follows = settings.queue_follows_limit

    @property
    def adaptive(self) -> AdaptiveLimit | None:
        """The adaptive limit (read-only: it is told results, never set), or None when fixed."""
        return self._adaptive

    def queue_for(self, limit: int) -> int | None:
        """The queue size that goes with `limit`, when the queue follows the limit."""
        return QUEUE_PER_SLOT * limit if self._queue_follows else None

    def reconfigure(self, settings: Settings) -> None:
        """Take new settings live.

        Switching the adaptive mode on, or changing its bounds, starts it afresh from the
        current limit (moved into the new bounds); switching it off fixes the limit at
        ASR_MAX_CONCURRENT.
        """
        self._queue_follows = settings.queue_follows_limit
        current = self.gate.counts().limit
        params = _adaptive_params(settings)
        if params is None:
            self._adaptive = None
            limit = settings.max_concurrent
        elif self._adaptive is not None and self._adaptive.params == params:
            limit = self._adaptive.limit
        else:
            limit = min(max(current, params.minimum), params.maximum)
            self._adaptive = AdaptiveLimit(params, initial=limit, now=self._now)
        queue = self.queue_for(limit)
        self.gate.set_limits(
            limit=limit, max_queue=settings.queue_limit if queue is None else queue
        )

    def observe(self, outcome: AttemptOutcome, *, in_flight: int, first_attempt: bool) -> None:
        """One attempt ended (`in_flight`: attempts upstream, this one included)."""
        if self._adaptive is not None:
            self._apply(
                self._adaptive.on_attempt(
                    outcome,
                    in_flight=in_flight,
                    queue_waiting=self.gate.counts().queued > 0,
                    first_attempt=first_attempt,
                )
            )

    def tick(self) -> None:
        """Let time act on the adaptive limit (a faded ceiling, a stretch that became stable)."""
        if self._adaptive is not None:
            self._apply(self._adaptive.tick())

    def adaptive_view(self, *, wall_now: float) -> dict[str, object] | None:
        """The adaptive limit's state for /stats, or None when the limit is fixed."""
        return None if self._adaptive is None else self._adaptive.snapshot(wall_now=wall_now)

    def _apply(self, change: LimitChange | None) -> None:
        if change is None:
            return
        self.gate.set_limits(limit=change.new, max_queue=self.queue_for(change.new))
        self._on_change(change)
        log_event(
            Event.LIMIT_CHANGED,
            logging.WARNING,
            old=change.old,
            new=change.new,
            reason=change.reason,
        )
