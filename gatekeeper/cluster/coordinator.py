"""The replica's side of shared limits: permits for the gate's waiters, from Redis leases.

The gate (gatekeeper/gate.py) stays synchronous and local: with `permits=True` a slot on a
server also needs a permit, and this coordinator is the only one that gets them. One loop:

1. Put back on the cluster's books the running tasks whose lease was lost (a replica paused past
   its lease, Redis restarted empty): a forced acquisition, since the GPU is on them anyway.
2. Ask the gate which waiter a permit is for and where it would start (`Gate.wants`: the head
   of the queue, or a task allowed to pass it by memory), and try those servers in order. A
   granted lease goes to the gate (`add_permit`), whose hand-over starts the waiter with it.
3. Otherwise wait until a slot may have come free anywhere: a release message from Redis
   (`Leases.changed`, with jittered polling as the fallback) or a change of the gate's books.

A slot given back in the gate releases its lease (`Gate.release_permit`), shielded, exactly
once. Only the head acquires, one acquisition at a time, so a replica never holds a lease it
has no task for (beyond the instant between the grant and the hand-over).

Redis down or slow: the acquisition raises `CoordinationUnavailable`, the gate is told it cannot
prove a free slot (`set_coordinated(False)`): nothing new starts, arrivals beyond the queue are
refused `coordination_unavailable`, `/health` says `degraded`. The loop tries again every poll
interval and the renewal loop every third of a lease; the first answer puts everything back.
"""

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from gatekeeper.clock import Clock, SystemClock
from gatekeeper.cluster.leases import (
    ClusterView,
    CoordinationUnavailable,
    Lease,
    LeaseConfig,
    LeaseCounters,
    Leases,
    LostLease,
)
from gatekeeper.gate import Gate, Permit
from gatekeeper.logs import Event, log_event
from gatekeeper.state import HistogramData

__all__ = ["ACQUIRE_BUCKETS", "ClusterSnapshot", "Coordinator"]

_log = logging.getLogger(__name__)

ACQUIRE_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
"""Seconds: one acquisition's round trip to Redis (a LAN's is about a millisecond)."""


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    """The coordinator's books at one instant, for metrics (no Redis call)."""

    cluster: str
    replica: str
    redis_up: bool | None
    counters: LeaseCounters
    lost: dict[str, int]
    held: dict[str, int]  # server name -> leases held
    acquire: HistogramData


class Coordinator:
    """Gets the gate's permits from Redis leases shared by the cluster's replicas."""

    def __init__(
        self,
        config: LeaseConfig,
        gate: Gate,
        servers: Sequence[str],
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._gate = gate
        self._names = tuple(servers)
        self._clock: Clock = clock or SystemClock()
        self._rng = rng or random.Random()
        self.leases = Leases(
            config,
            clock=self._clock,
            rng=self._rng,
            on_lost=self._lost,
            on_redis=self._redis,
            on_shared=self._heard,
        )
        # Told each record another replica shared: (field, value, age in seconds).
        self.on_shared: Callable[[str, str, float], None] = lambda name, value, age: None
        gate.release_permit = self._release
        self._background_tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.Task[None] | None = None
        self._acquire = HistogramData.empty(ACQUIRE_BUCKETS)
        self._lost_by: dict[str, int] = {"expired": 0, "unconfirmed": 0}
        self._view: ClusterView | None = None
        self._waiting_on: set[int] = set()  # servers where this replica's head has a place

    async def start(self) -> None:
        await self.leases.start()
        self._loop = asyncio.create_task(self._run(), name="cluster-coordinator")

    async def aclose(self) -> None:
        """Stop acquiring, finish the releases under way, close the leases (any still held
        expire after one lease: their tasks may still be on the GPU)."""
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        if self._background_tasks:
            await asyncio.wait(set(self._background_tasks), timeout=2 * self.config.timeout_seconds)
        await self.leases.aclose()

    # -- what the gate and the leases tell -------------------------------------------------------

    @property
    def servers(self) -> tuple[str, ...]:
        return self._names

    def share(self, name: str, value: str) -> None:
        """Tell the other replicas (in the background; lost when Redis cannot take it, which
        the Redis error counters show)."""
        self._background(self._share(name, value))

    async def _share(self, name: str, value: str) -> None:
        with contextlib.suppress(CoordinationUnavailable):
            await self.leases.share(name, value)

    def _heard(self, name: str, value: str, age: float) -> None:
        self.on_shared(name, value, age)

    def _release(self, permit: Permit) -> None:
        assert isinstance(permit, Lease)
        self._background(self.leases.release(permit))

    def _background(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(work)
        self._background_tasks.add(task)
        task.add_done_callback(self._background_tasks.discard)

    def _lost(self, lost: LostLease) -> None:
        self._lost_by[lost.reason] = self._lost_by.get(lost.reason, 0) + 1
        self._gate.permit_lost(lost.lease)

    def _redis(self, up: bool) -> None:
        if up != self._gate.coordinated:
            counts = self._gate.counts()
            log_event(
                Event.REDIS_UP if up else Event.REDIS_DOWN,
                logging.WARNING,
                cluster=self.config.cluster,
                active=counts.active,
                queued=counts.queued,
            )
        self._gate.set_coordinated(up)

    # -- the loop -------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            since, epoch = self._gate.generation, self.leases.epoch
            try:
                progressed = await self._step()
            except CoordinationUnavailable:
                await self._clock.sleep(self.config.poll_seconds * self._rng.uniform(0.5, 1.0))
                continue
            except Exception:  # never let the loop die: the gate would starve
                _log.exception("the cluster coordinator failed; trying again")
                await self._clock.sleep(self.config.poll_seconds)
                continue
            if not progressed:
                await self._wait(since, epoch)

    async def _step(self) -> bool:
        """Re-book unproven holders, then try to get a permit for the waiter that wants one.
        True when a permit was put to use (look again at once)."""
        for ticket, server in self._gate.unproven():
            weight, budget = self._gate.permit_cost(ticket, server)
            lease = await self.leases.acquire(
                self._names[server], 1, weight=weight, budget=budget, force=True, audio=ticket.audio
            )
            if lease is not None and not self._gate.replace_permit(ticket, lease):
                await self.leases.release(lease)
        want = self._gate.wants()
        if want is None:
            if self._waiting_on:  # the places of a head that left go at once
                await self.leases.withdraw(self._names[s] for s in sorted(self._waiting_on))
                self._waiting_on.clear()
            return False
        ticket, servers = want
        limits = self._gate.counts().servers
        for server in servers:
            self._waiting_on.add(server)
            weight, budget = self._gate.permit_cost(ticket, server)
            began = self._clock.monotonic()
            lease = await self.leases.acquire(
                self._names[server],
                limits[server].limit,
                weight=weight,
                budget=budget,
                audio=ticket.audio,
                since=ticket.since,
            )
            self._acquire = self._acquire.observe(self._clock.monotonic() - began)
            if lease is not None:
                # False: nobody here could use it any more (given back): wait for a change.
                return self._gate.add_permit(server, lease)
        return False

    async def _wait(self, since: int, epoch: int) -> None:
        """Until the gate's books change or a slot may have come free in the cluster."""
        waits = [
            asyncio.ensure_future(self._gate.changed(since)),
            asyncio.ensure_future(self.leases.changed(epoch)),
        ]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()

    # -- what operators see ---------------------------------------------------------------------

    def snapshot(self) -> ClusterSnapshot:
        held: dict[str, int] = dict.fromkeys(self._names, 0)
        for lease in self.leases.held():
            held[lease.server] = held.get(lease.server, 0) + 1
        counters = self.leases.counters()
        return ClusterSnapshot(
            cluster=self.config.cluster,
            replica=self.config.replica,
            redis_up=counters.redis_up,
            counters=counters,
            lost=dict(self._lost_by),
            held=held,
            acquire=self._acquire,
        )

    async def stats(self) -> dict[str, object]:
        """`/stats` `cluster`: this replica's books and, from Redis, every replica's slots (the
        last view read when Redis cannot answer now, marked `stale`)."""
        snap = self.snapshot()
        stale = True
        if snap.redis_up is not False:  # Redis unreachable: /stats does not wait for it
            try:
                self._view = await self.leases.cluster_view()
                stale = False
            except CoordinationUnavailable:
                pass
        view = self._view
        counters = snap.counters
        return {
            "name": snap.cluster,
            "replica": snap.replica,
            "redis": "up" if snap.redis_up else ("down" if snap.redis_up is False else "unknown"),
            "lease_seconds": self.config.lease_seconds,
            "leases_held": counters.held,
            "replicas": [] if view is None else view.as_dict()["replicas"],
            "replicas_stale": stale,
            "lease_renewals": counters.renewals,
            "leases_lost": counters.lost,
            "redis_errors": counters.redis_errors,
        }
