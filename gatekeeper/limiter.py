"""The limiter: the gate (who waits, who goes) and the limits it enforces (fixed or adaptive).

In the manner of Netflix's concurrency-limits, the algorithm (`adaptive.AdaptiveLimit`: a number
from samples) is apart from the mechanism (`gate.Gate`); this module joins them. Callers only
report what happened (`observe`) and let time act (`tick`); nothing sets a limit from outside
but a change of settings (`reconfigure`). Each Whisper server has its own limit, fixed or
adaptive: an OOM on one card never lowers another's. With admission by memory, this is where a
task's cost will meet the room left.
"""

import logging
from collections.abc import Callable, Sequence

from gatekeeper.clock import Clock
from gatekeeper.gate import Gate
from gatekeeper.logs import Event, log_event
from gatekeeper.policy.adaptive import AdaptiveLimit, AdaptiveParams, LimitChange
from gatekeeper.policy.memory import MemoryLearner, MemoryModel, MemoryParams
from gatekeeper.policy.outcomes import AttemptOutcome
from gatekeeper.settings import QUEUE_PER_SLOT, Settings

__all__ = ["Limiter"]


def _adaptive_params(settings: Settings, maximum: int) -> AdaptiveParams | None:
    """The adaptive count's parameters; None when the count is fixed (also when admission is by
    memory: then the memory figures are what is learned, and the count only caps)."""
    if not settings.adaptive or settings.by_memory:
        return None
    return AdaptiveParams(
        minimum=settings.min_concurrent,
        maximum=maximum,
        stable_successes=settings.adaptive_stable_successes,
        stable_seconds=settings.adaptive_stable_seconds,
        fade_seconds=settings.adaptive_fade_seconds,
    )


class Limiter:
    """Owns the gate and each server's adaptive limit; applies every change of a limit."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock,
        on_change: Callable[[int, LimitChange], None],
        cooling: Callable[[int], bool] | None = None,
    ) -> None:
        self._now = clock.monotonic
        self._on_change = on_change
        self._names = settings.upstream_names
        self.gate = Gate(
            limit=settings.start_limits,
            max_queue=settings.queue_limit,
            clock=clock,
            cooling=cooling,
            permits=settings.redis_url is not None,
        )
        self._adaptive: list[AdaptiveLimit | None] = []
        for start, maximum in zip(settings.start_limits, settings.limits, strict=True):
            params = _adaptive_params(settings, maximum)
            limit = None if params is None else AdaptiveLimit(params, initial=start, now=self._now)
            self._adaptive.append(limit)
        self._queue_follows = settings.queue_follows_limit
        # Replicas: what this gatekeeper learns is shared with the cluster (gatekeeper/cluster/).
        self.share_oom: Callable[[int, int, bool], None] = lambda server, level, first: None
        self.share_limit: Callable[[int, int], None] = lambda server, limit: None
        self.share_model: Callable[[int, MemoryModel], None] = lambda server, model: None
        self._learners: list[MemoryLearner | None] = [None] * len(self._names)
        self._memory(settings)

    def _memory(self, settings: Settings) -> None:
        """Admission by memory, per server: budget, figures, and a learner in adaptive mode
        (kept across changes that leave its budget and starting figures alone)."""
        params = MemoryParams(
            stable_starts=settings.adaptive_stable_successes,
            fade_seconds=settings.adaptive_fade_seconds,
        )
        for i, (budget, (base, per_minute)) in enumerate(
            zip(settings.memory_budgets, settings.task_memory, strict=True)
        ):
            start = MemoryModel(base, per_minute)
            learner = self._learners[i]
            if budget is None or not settings.adaptive:
                self._learners[i] = None
                model = start
            elif learner is not None and (learner.start, learner.budget, learner.params) == (
                start,
                budget,
                params,
            ):
                model = learner.model
            else:
                learner = MemoryLearner(start, budget_gib=budget, now=self._now, params=params)
                self._learners[i] = learner
                model = learner.model
            self.gate.set_memory(i, budget=budget, model=model)
        self.gate.backfill_seconds = settings.backfill_seconds

    @property
    def adaptive(self) -> AdaptiveLimit | None:
        """The first server's adaptive limit (read-only: it is told results, never set), or None
        when fixed. `adaptive_of` gives any server's."""
        return self._adaptive[0]

    def adaptive_of(self, server: int) -> AdaptiveLimit | None:
        return self._adaptive[server]

    def queue_for(self, total: int) -> int | None:
        """The queue size that goes with the servers' limits together (`total`), when the queue
        follows the limit."""
        return QUEUE_PER_SLOT * total if self._queue_follows else None

    def reconfigure(self, settings: Settings) -> None:
        """Take new settings live (the list of servers itself needs a restart).

        Switching the adaptive mode on, or changing its bounds, starts it afresh from each
        server's current limit (moved into the new bounds); switching it off fixes each limit at
        its ASR_MAX_CONCURRENT.
        """
        self._queue_follows = settings.queue_follows_limit
        current = [server.limit for server in self.gate.counts().servers]
        limits = []
        for i, maximum in enumerate(settings.limits):
            params = _adaptive_params(settings, maximum)
            adaptive = self._adaptive[i]
            if params is None:
                self._adaptive[i] = None
                limit = maximum
            elif adaptive is not None and adaptive.params == params:
                limit = adaptive.limit
            else:
                limit = min(max(current[i], params.minimum), params.maximum)
                self._adaptive[i] = AdaptiveLimit(params, initial=limit, now=self._now)
            limits.append(limit)
        queue = self.queue_for(sum(limits))
        self.gate.set_limits(
            limit=limits, max_queue=settings.queue_limit if queue is None else queue
        )
        self._memory(settings)

    def start_evidence(
        self, server: int, cluster_audio: Sequence[float | None] | None = None
    ) -> tuple[list[float | None], bool] | None:
        """What an attempt starting on `server` now tells its memory learner, if it has one:
        the audio of the card's tasks (this one included), and whether memory was the limit
        (tasks wait while the card has free slots). None when the card learns nothing, so the
        attempts of a card admitted by count pay nothing for it."""
        if self._learners[server] is None:
            return None
        counts = self.gate.counts()
        slots = counts.servers[server]
        waiting = counts.queued + counts.retry_waiting > 0
        # Replicas: the card's tasks of every replica (`cluster_audio`, told by the lease).
        audio = self.gate.running_audio(server) if cluster_audio is None else list(cluster_audio)
        return audio, waiting and slots.active < slots.limit

    def observe_start(
        self, server: int, evidence: tuple[list[float | None], bool], *, oom: bool
    ) -> None:
        """An attempt that started on `server` with `evidence` (`start_evidence`) ran out of
        memory (`oom`) or went well: evidence for that card's figures."""
        audio_seconds, memory_was_limit = evidence
        learner = self._learners[server]
        if learner is None:
            return
        model = learner.observe_start(
            oom=oom, audio_seconds=audio_seconds, memory_was_limit=memory_was_limit
        )
        if model is not None:
            self._new_model(server, model, "oom" if oom else "stable")
            self.share_model(server, model)

    def memory_view(self, server: int) -> dict[str, object] | None:
        """A server's memory admission for /stats (None: admission by count)."""
        slots = self.gate.counts().servers[server]
        if slots.memory_budget is None:
            return None
        learner = self._learners[server]
        model = self.gate.memory_model(server).rounded()
        return {
            "used": round(slots.memory_used, 3),
            "budget": slots.memory_budget,
            "task_memory_gib": model.base_gib,
            "task_memory_per_minute_gib": model.per_minute_gib,
            "learning": None if learner is None else learner.snapshot(),
        }

    def _new_model(self, server: int, model: MemoryModel, reason: str) -> None:
        self.gate.set_memory(
            server, budget=self.gate.counts().servers[server].memory_budget, model=model
        )
        log_event(
            Event.MEMORY_LEARNED,
            logging.WARNING if reason == "oom" else logging.INFO,
            upstream=self._names[server],
            task_memory_gib=round(model.base_gib, 3),
            per_minute_gib=round(model.per_minute_gib, 4),
            reason=reason,
        )

    def observe(
        self, outcome: AttemptOutcome, *, server: int, in_flight: int, first_attempt: bool
    ) -> None:
        """One attempt on `server` ended (`in_flight`: attempts on that server, this one
        included)."""
        if outcome is AttemptOutcome.OOM:
            self.share_oom(server, in_flight, first_attempt)
        adaptive = self._adaptive[server]
        if adaptive is not None:
            change = adaptive.on_attempt(
                outcome,
                in_flight=in_flight,
                queue_waiting=self.gate.counts().queued > 0,
                first_attempt=first_attempt,
            )
            self._apply(server, change)
            if change is not None:
                self.share_limit(server, change.new)

    def note_oom(self, server: int, in_flight: int, *, first_attempt: bool) -> None:
        """Replicas: another gatekeeper's attempt on `server` ran out of memory."""
        adaptive = self._adaptive[server]
        if adaptive is not None:
            adaptive.note_oom(in_flight, sample=first_attempt)

    def adopt_limit(self, server: int, limit: int) -> None:
        """Replicas: the cluster's limit for `server`, decided by another gatekeeper."""
        adaptive = self._adaptive[server]
        if adaptive is not None:
            self._apply(server, adaptive.adopt(limit))

    def adopt_model(self, server: int, model: MemoryModel) -> None:
        """Replicas: memory figures for `server` another gatekeeper learned."""
        learner = self._learners[server]
        if learner is not None and learner.adopt(model) is not None:
            self._new_model(server, model, "shared")

    def tick(self) -> None:
        """Let time act on the adaptive limits (a faded ceiling, a stretch that became stable)."""
        for server, adaptive in enumerate(self._adaptive):
            if adaptive is not None:
                change = adaptive.tick()
                self._apply(server, change)
                if change is not None:
                    self.share_limit(server, change.new)
        for server, learner in enumerate(self._learners):
            if learner is not None:
                model = learner.tick()
                if model is not None:
                    self._new_model(server, model, "faded")
                    self.share_model(server, model)

    def adaptive_view(self, server: int, *, wall_now: float) -> dict[str, object] | None:
        """A server's adaptive limit's state for /stats, or None when its limit is fixed."""
        adaptive = self._adaptive[server]
        return None if adaptive is None else adaptive.snapshot(wall_now=wall_now)

    def _apply(self, server: int, change: LimitChange | None) -> None:
        if change is None:
            return
        self.gate.set_server_limit(server, change.new)
        total = sum(slots.limit for slots in self.gate.counts().servers)
        queue = self.queue_for(total)
        if queue is not None:
            self.gate.set_limits(max_queue=queue)
        self._on_change(server, change)
        log_event(
            Event.LIMIT_CHANGED,
            logging.WARNING,
            upstream=self._names[server],
            old=change.old,
            new=change.new,
            reason=change.reason,
        )
