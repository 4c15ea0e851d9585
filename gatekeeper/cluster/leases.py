"""Slots shared by replicas: a crash-safe counting semaphore per Whisper server, in Redis.

Every gatekeeper with the same cluster name takes a Whisper server's slots from one sorted set
in Redis: a member is a lease id (`<replica>/<n>`, so it names its holder), its score the
lease's deadline in milliseconds on *Redis's* clock (`TIME` inside the scripts; a replica's own
clock is never sent, so replicas with skewed clocks agree). Four Lua scripts, each one atomic
step (the design madelson/DistributedLock and LiteLLM converge on):

- acquire: drop expired leases, refuse if `limit` are live, else add the lease (deadline now +
  lease). It never waits: the gate's own queue does, woken by `changed()`.
- renew: one round trip for all the leases a replica holds, every lease/3; it extends only a
  lease that is still live and names the others lost (a lost lease is never revived). The same
  call refreshes the replica's heartbeat, so `/stats` sees replicas that hold nothing.
- release: remove the lease (idempotent: it can only ever remove its own id) and PUBLISH on the
  cluster's channel so waiting replicas try again at once. Releasing an id that is not there
  leaves a tombstone for 3 leases, so an acquisition that reaches Redis late, after its caller
  gave up on it (a timeout while Redis was stalled), is refused instead of leaking a slot.
- view: the live leases and replicas, for `/stats` (read-only).

Waiting replicas wake on the channel's messages, and poll as well: a lost message (a dropped
subscription, a lease that simply expired) costs at most one poll interval, never a stuck queue.

Cancellation. `acquire` and `release` run in tasks of their own and are shielded: a caller
cancelled mid-way never leaks a slot. A cancelled `release` completes anyway. A cancelled
`acquire` never hands a lease to anyone: whatever the script granted is released as soon as it
answers (deterministically: a cancelled caller holds nothing).

Redis down or slow. Every call has a deadline (`timeout_seconds`, 0.5 s by default); a call
that misses it, or fails, raises `CoordinationUnavailable` from `acquire` (never a guess that a
slot is free). An acquisition whose outcome is unknown is released by the first renewal round
Redis answers (at most a third of a lease later; the tombstone covers its arriving even later).
`release` never raises: what it could not remove is removed the same way, and expires after one
lease if Redis never answers.

Losing a lease. A lease not renewed for `lease_seconds` (by Redis's clock) is gone, and its slot
is free for others: a SIGKILLed replica frees its slots after one lease and no sooner. A replica
that could not renew (Redis unreachable) treats a lease as lost once its renewals have failed
for a whole lease (counted from the last renewal *sent*, so always before Redis drops it); a
replica paused longer than its lease (SIGSTOP) hears that the lease is gone from its first
renewal after waking. Either way `on_lost` is told once and the lease leaves `held()`; the task
that had it keeps running (what the books say is the gate's call).

Keys (all under the hash tag `{cluster}`, so they share one Redis Cluster slot and one script
can renew leases on every server): `Keys` below spells them.
"""

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import random
import secrets
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from gatekeeper.clock import Clock, SystemClock

__all__ = [
    "DEFAULT_CLUSTER",
    "ClusterView",
    "CoordinationUnavailable",
    "Keys",
    "Lease",
    "LeaseConfig",
    "LeaseCounters",
    "Leases",
    "LostLease",
    "LostReason",
    "ReplicaSlots",
    "new_replica_id",
]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

DEFAULT_CLUSTER = "asr-gatekeeper"

# Milliseconds since the epoch on Redis's clock; every script starts with it.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Redis that starts empty (restarted without its data, flushed, or new) has forgotten the leases
# of tasks still on the GPUs: no slot is granted for one lease after that, while the replicas
# put their running tasks back on the books (their renewals find them gone). Redlock's "delayed
# restarts", done by the scripts: the marker is set (to the end of that quiet time) by the first
# script that finds it missing, and never expires.
_QUIET = """
local quiet = redis.call('GET', KEYS[QUIET])
if not quiet then
  quiet = now + tonumber(ARGV[LEASE_MS])
  redis.call('SET', KEYS[QUIET], quiet)
end
quiet = tonumber(quiet)
"""

# KEYS: the server's leases, the servers seen, the tombstones, the leases' facts, the replicas'
#   waiting heads, the quiet-time marker
# ARGV: lease id, limit, lease ms, server, force ('1': add even if full), weight (GiB), budget
#   ('' none), audio seconds ('-' unknown), replica, how long its head has waited (ms), how long
#   its head's place is kept without a new attempt (ms), the head (a token of the caller's)
# -> {1, count, audio of every live lease} granted, {0, count} full, {-1, 0} given up on by its
#   caller already, {-2, count, ms left} Redis started empty a moment ago (quiet time)
_ACQUIRE = (
    _NOW
    + """
local ms = tonumber(ARGV[3])
"""
    + _QUIET.replace("QUIET", "6").replace("LEASE_MS", "3")
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if redis.call('ZSCORE', KEYS[3], ARGV[1]) then
  return {-1, 0}
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local count = redis.call('ZCARD', KEYS[1])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return {1, count}  -- a retry of an acquisition that went through (a reset connection)
end
-- The memory the live leases hold and their audio ("weight,audio" per lease); the facts of a
-- lease that is gone are dropped on the way.
local used = 0
local audio = {}
local facts = redis.call('HGETALL', KEYS[4])
for i = 1, #facts, 2 do
  if redis.call('ZSCORE', KEYS[1], facts[i]) then
    local w, a = string.match(facts[i + 1], '^([^,]*),(.*)$')
    used = used + tonumber(w)
    audio[#audio + 1] = a
  else
    redis.call('HDEL', KEYS[4], facts[i])
  end
end
local weight = tonumber(ARGV[6])
local function fits(w)
  -- By memory: beside the others, or alone (a task bigger than the card runs alone).
  return ARGV[7] == '' or count == 0 or used + w <= tonumber(ARGV[7]) + 1e-9
end
if ARGV[5] ~= '1' then
  -- Fair across replicas: the heads of other replicas that have waited longer, and would fit,
  -- go first (a head's place: "since,until,weight"; a place not renewed is dropped).
  local me, since, head = ARGV[9], now - tonumber(ARGV[10]), ARGV[12]
  -- The same head asking again keeps the earliest time it was seen waiting: each attempt's
  -- measure is late by its own trip to Redis, and a late one must not let a younger head by.
  local mine = redis.call('HGET', KEYS[5], me)
  if mine then
    local s, h = string.match(mine, '^([^,]*),[^,]*,[^,]*,(.*)$')
    if h == head and tonumber(s) < since then
      since = tonumber(s)
    end
  end
  local older = 0
  local heads = redis.call('HGETALL', KEYS[5])
  for i = 1, #heads, 2 do
    local s, u, w = string.match(heads[i + 1], '^([^,]*),([^,]*),([^,]*)')
    if tonumber(u) <= now then
      redis.call('HDEL', KEYS[5], heads[i])
    elseif heads[i] ~= me and tonumber(s) < since and fits(tonumber(w)) then
      older = older + 1
    end
  end
  if quiet > now or count + older >= tonumber(ARGV[2]) or not fits(weight) then
    local place = since .. ',' .. (now + tonumber(ARGV[11])) .. ',' .. ARGV[6] .. ',' .. head
    redis.call('HSET', KEYS[5], me, place)
    redis.call('PEXPIRE', KEYS[5], 3 * ms)
    if quiet > now then
      return {-2, count, quiet - now}
    end
    return {0, count}
  end
  redis.call('HDEL', KEYS[5], me)
end
redis.call('ZADD', KEYS[1], now + ms, ARGV[1])
redis.call('PEXPIRE', KEYS[1], 3 * ms)
redis.call('HSET', KEYS[4], ARGV[1], ARGV[6] .. ',' .. ARGV[8])
redis.call('PEXPIRE', KEYS[4], 3 * ms)
audio[#audio + 1] = ARGV[8]
redis.call('SADD', KEYS[2], ARGV[4])
redis.call('PEXPIRE', KEYS[2], 3 * ms)
return {1, count + 1, audio}
"""
)

# KEYS: the replicas' heartbeats, the servers seen, the shared records, the quiet-time marker,
#   then the leases of each server renewed
# ARGV: lease ms, replica, then (index into KEYS, lease id) pairs
# -> {the ids of the leases that were gone (expired, or removed), the shared records, now}
_RENEW = (
    _NOW
    + """
"""
    + _QUIET.replace("QUIET", "4").replace("LEASE_MS", "1")
    + """
local ms = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + ms, ARGV[2])
redis.call('PEXPIRE', KEYS[1], 3 * ms)
redis.call('PEXPIRE', KEYS[2], 3 * ms)
local lost = {}
for i = 3, #ARGV, 2 do
  local key = KEYS[tonumber(ARGV[i])]
  local score = redis.call('ZSCORE', key, ARGV[i + 1])
  if score and tonumber(score) > now then
    redis.call('ZADD', key, 'XX', now + ms, ARGV[i + 1])
    redis.call('PEXPIRE', key, 3 * ms)
  else
    if score then
      redis.call('ZREM', key, ARGV[i + 1])
    end
    lost[#lost + 1] = ARGV[i + 1]
  end
end
return {lost, redis.call('HGETALL', KEYS[3]), now}
"""
)

# KEYS: the server's leases, the tombstones
# ARGV: lease id, lease ms, channel, server
# -> 1 removed (and announced), 0 was not there (tombstoned)
_RELEASE = (
    """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('PUBLISH', ARGV[3], ARGV[4])
  return 1
end
"""
    + _NOW
    + """
local ms = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZADD', KEYS[2], now + 3 * ms, ARGV[1])
redis.call('PEXPIRE', KEYS[2], 3 * ms)
return 0
"""
)

# KEYS: the shared records
# ARGV: field, value, channel, time to keep (ms)
# -> now; the record is kept as "value@now" and announced as "field=value@now"
_SHARE = (
    _NOW
    + """
local record = ARGV[2] .. '@' .. now
redis.call('HSET', KEYS[1], ARGV[1], record)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
redis.call('PUBLISH', ARGV[3], ARGV[1] .. '=' .. record)
return now
"""
)

# KEYS: the replicas' heartbeats, then the leases of each server
# -> {live replicas, live lease ids of KEYS[2], of KEYS[3], ...}
_VIEW = (
    _NOW
    + """
local after = string.format('(%d', now)
local out = {redis.call('ZRANGE', KEYS[1], after, '+inf', 'BYSCORE')}
for i = 2, #KEYS do
  out[#out + 1] = redis.call('ZRANGE', KEYS[i], after, '+inf', 'BYSCORE')
end
return out
"""
)

LostReason = Literal["expired", "unconfirmed"]


def new_replica_id() -> str:
    """A name for this replica, unique in the cluster: host, process and a random tag."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass(frozen=True, slots=True)
class LeaseConfig:
    """How a replica takes part in a cluster (`ASR_REDIS_URL`, `ASR_CLUSTER`, `ASR_REDIS_LEASE`).

    `timeout_seconds` bounds every Redis call; `poll_seconds` is the longest a waiter sleeps
    without a message (each wait is jittered between half of it and all of it).
    """

    url: str
    cluster: str = DEFAULT_CLUSTER
    lease_seconds: float = 15.0
    timeout_seconds: float = 0.5
    poll_seconds: float = 1.0
    replica: str = field(default_factory=new_replica_id)

    def __post_init__(self) -> None:
        if not self.cluster or "{" in self.cluster or "}" in self.cluster:
            msg = f"a cluster name is not empty and has no braces: {self.cluster!r}"
            raise ValueError(msg)
        if not self.replica or "/" in self.replica:
            msg = f"a replica name is not empty and has no '/': {self.replica!r}"
            raise ValueError(msg)
        if not 0 < self.timeout_seconds < self.lease_seconds / 3:
            msg = (
                f"the Redis timeout ({self.timeout_seconds} s) must be positive and shorter than "
                f"a third of the lease ({self.lease_seconds} s), the renewal interval"
            )
            raise ValueError(msg)
        if not self.poll_seconds > 0:
            msg = f"the poll interval must be positive: {self.poll_seconds}"
            raise ValueError(msg)


@dataclass(frozen=True, slots=True)
class Keys:
    """Where a cluster lives in Redis; every key carries the hash tag `{cluster}`."""

    cluster: str

    @property
    def _prefix(self) -> str:
        return f"gatekeeper:{{{self.cluster}}}"

    def leases(self, server: str) -> str:
        """Sorted set: the live leases on `server`, scored by deadline (ms, Redis's clock)."""
        return f"{self._prefix}:leases:{server}"

    def weights(self, server: str) -> str:
        """Hash: lease id -> "GiB,audio seconds": the memory budget of `server` it holds
        (admission by memory; 0 by count) and its task's audio ('-' unknown)."""
        return f"{self._prefix}:weights:{server}"

    def heads(self, server: str) -> str:
        """Hash: replica -> "since,until,GiB,head": when its head began waiting for `server`
        (ms, Redis's clock), until when that place is kept, what the head would hold, and
        which head it is (the caller's token: its `since`)."""
        return f"{self._prefix}:heads:{server}"

    @property
    def quiet(self) -> str:
        """String: until when (ms, Redis's clock) no slot is granted after Redis started empty;
        it never expires, so its absence means Redis lost its data."""
        return f"{self._prefix}:quiet-until"

    @property
    def shared(self) -> str:
        """Hash: what replicas share besides slots (an OOM's time, a limit, memory figures):
        field -> "value@ms" (Redis's clock)."""
        return f"{self._prefix}:shared"

    @property
    def shared_channel(self) -> str:
        """Pub/sub channel: a shared record, "field=value@ms", as it is written."""
        return f"{self._prefix}:shared-records"

    @property
    def servers(self) -> str:
        """Set: the servers leases were taken on."""
        return f"{self._prefix}:servers"

    @property
    def replicas(self) -> str:
        """Sorted set: each replica's heartbeat deadline."""
        return f"{self._prefix}:replicas"

    @property
    def revoked(self) -> str:
        """Sorted set: tombstones of lease ids released before (or without) being granted."""
        return f"{self._prefix}:revoked"

    @property
    def channel(self) -> str:
        """Pub/sub channel: a released lease's server."""
        return f"{self._prefix}:released"


@dataclass(frozen=True, slots=True)
class Lease:
    """One slot on one Whisper server, held by this replica until released or lost."""

    id: str
    server: str
    count: int = field(default=0, compare=False)
    """Leases live on the server once this one was granted (itself included): what the GPU
    ran at the start, all replicas together."""
    audio: tuple[float | None, ...] = field(default=(), compare=False)
    """The audio seconds of those leases' tasks (None: unknown), this one's last."""
    weight: float = field(default=0.0, compare=False)
    """GiB of the card's memory budget it holds (admission by memory; else 0)."""

    @property
    def replica(self) -> str:
        return self.id.rpartition("/")[0]


@dataclass(frozen=True, slots=True)
class LostLease:
    """A lease this replica held and no longer does, though nobody released it.

    `expired`: Redis said it was gone (it outlived its lease unrenewed: the process was
    paused, or Redis lost its data). `unconfirmed`: Redis could not be reached to renew it for
    a whole lease, so it must be taken as gone.
    """

    lease: Lease
    reason: LostReason


@dataclass(frozen=True, slots=True)
class LeaseCounters:
    """What this replica's leases went through, for metrics (one snapshot)."""

    acquired: int
    refused: int
    released: int
    renewals: int
    lost: int
    redis_errors: int
    held: int
    redis_up: bool | None  # None until the first call


@dataclass(frozen=True, slots=True)
class ReplicaSlots:
    """One replica as the cluster sees it: whether its heartbeat is live, its slots."""

    replica: str
    alive: bool
    slots: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class ClusterView:
    """Every replica seen (alive, or still holding a lease) and the slots each holds."""

    replicas: tuple[ReplicaSlots, ...]

    def taken(self, server: str) -> int:
        """Slots held on `server` by all replicas together."""
        return sum(replica.slots.get(server, 0) for replica in self.replicas)

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape for `/stats`."""
        return {
            "replicas": [
                {"replica": r.replica, "alive": r.alive, "slots": dict(r.slots)}
                for r in self.replicas
            ]
        }


class CoordinationUnavailable(Exception):
    """Redis did not answer `operation` in time, or failed: nothing can be proven about slots."""

    def __init__(self, operation: str, error: BaseException) -> None:
        self.operation = operation
        self.error = error
        super().__init__(f"Redis could not {operation}: {type(error).__name__}: {error}")


def _reraise_cancellation(error: BaseException) -> None:
    """Raise CancelledError if the current task is being cancelled: redis-py may replace the
    CancelledError with the error its clean-up raised, and a loop that swallowed it would
    never stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from error


async def _cancel(tasks: "Iterable[asyncio.Task[Any]]") -> None:
    """Cancel `tasks` and wait for them to end, cancelling again any that carried on: on
    Python 3.11, `asyncio.wait_for` (redis-py sends commands with it) loses a cancellation
    that arrives as the command completes."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)


@dataclass(slots=True)
class _Held:
    lease: Lease
    deadline: float  # on the injected clock's monotonic time: surely expired at Redis by then


class Leases:
    """This replica's side of the cluster: acquire and release slots, keep held ones renewed.

    `start()` runs the renewal loop and the subscription; `aclose()` stops them (held leases
    are *not* released then: their tasks may still be on the GPU, so they expire after one
    lease, like a crashed replica's). Use `async with Leases(...) as leases:`.
    """

    def __init__(
        self,
        config: LeaseConfig,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        on_lost: Callable[[LostLease], None] | None = None,
        on_redis: Callable[[bool], None] | None = None,
        on_shared: Callable[[str, str, float], None] | None = None,
    ) -> None:
        self.config = config
        self._on_redis = on_redis  # told when Redis stops or starts answering
        # Told each shared record another replica wrote: field, value, age in seconds.
        self._on_shared = on_shared
        self._shared_seen: dict[str, str] = {}
        self._quiet_logged = False
        self.keys = Keys(config.cluster)
        self._clock: Clock = clock or SystemClock()
        self._rng = rng or random.Random()
        self._on_lost = on_lost
        self._lease_ms = max(1, round(config.lease_seconds * 1000))
        self._redis = Redis.from_url(
            config.url,
            decode_responses=True,
            socket_timeout=config.timeout_seconds,
            socket_connect_timeout=config.timeout_seconds,
            # One immediate retry on a reset connection (a stale pooled one after Redis
            # restarted); every script is safe to run twice. Never on a timeout.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            client_name=f"asr-gatekeeper:{config.replica}",
        )
        self._acquire_script = self._redis.register_script(_ACQUIRE)
        self._renew_script = self._redis.register_script(_RENEW)
        self._release_script = self._redis.register_script(_RELEASE)
        self._view_script = self._redis.register_script(_VIEW)
        self._share_script = self._redis.register_script(_SHARE)
        self._ids = itertools.count(1)
        self._held: dict[str, _Held] = {}
        # Leases Redis may hold though nobody here does (an acquisition with an unknown outcome,
        # a release that failed): removed by the first renewal round Redis answers.
        self._orphans: dict[str, Lease] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._epoch = 0
        self._event = asyncio.Event()
        self._closed = False
        self._redis_up: bool | None = None
        self._acquired = self._refused = self._released = 0
        self._renewals = self._lost = self._errors = 0

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def replica(self) -> str:
        return self.config.replica

    async def start(self) -> None:
        """Run the renewal loop and the subscription (Redis need not be up yet)."""
        if self._closed:
            raise RuntimeError("these leases are closed")
        if not self._loops:
            self._loops = [
                asyncio.create_task(self._renewing(), name=f"leases-renew-{self.replica}"),
                asyncio.create_task(self._listening(), name=f"leases-listen-{self.replica}"),
            ]

    async def aclose(self) -> None:
        """Stop renewing and listening, finish the acquisitions and releases under way, try
        once more to remove orphans, leave the heartbeat set and close the connections."""
        if self._closed:
            return
        self._closed = True
        await _cancel(self._loops)
        await self._settle(within=2 * self.config.timeout_seconds)
        await _cancel(self._tasks)
        with contextlib.suppress(CoordinationUnavailable):
            await self._sweep_orphans()
            await self._call("leave", lambda: self._redis.zrem(self.keys.replicas, self.replica))
        await self._redis.aclose()

    # -- slots ----------------------------------------------------------------------------------

    async def acquire(
        self,
        server: str,
        limit: int,
        *,
        weight: float = 0.0,
        budget: float | None = None,
        force: bool = False,
        audio: float | None = None,
        since: float | None = None,
    ) -> Lease | None:
        """A lease on one of `server`'s `limit` slots, or None when all are taken. Never waits
        for a slot; raises CoordinationUnavailable when Redis cannot say.

        By memory, the lease also holds `weight` GiB of the card's `budget`: it is granted only
        if it fits beside the live leases' weights (or alone). `force`: grant it whatever the
        count (a task that runs already and lost its lease is put back on the books). `audio`:
        the task's audio seconds, kept with the lease (a granted lease tells every live lease's
        audio, for the memory learner).

        Fair across replicas: `since` is when the caller's head began to wait (monotonic, on
        this replica's clock; what is sent is how long ago, measured as the call goes out: a
        duration, so skew does not matter; None: now). A slot goes to the head that has waited
        longest, in whichever replica: a refused caller keeps its head's place for a few poll
        intervals (each attempt renews it; `withdraw` gives it up), and a caller whose head is
        younger than others that would fit is refused while only their slots are free.

        Shielded: if the caller is cancelled, the acquisition still finishes and whatever it
        granted is released at once (the caller holds nothing).
        """
        self._check_open()
        lease = Lease(f"{self.replica}/{next(self._ids)}", server)
        attempt = self._spawn(self._acquire(lease, limit, weight, budget, force, audio, since))
        try:
            return await asyncio.shield(attempt)
        except asyncio.CancelledError:
            attempt.add_done_callback(functools.partial(self._abandoned, lease))
            raise

    async def release(self, lease: Lease) -> bool:
        """Give the slot back: True the first time, False for a lease not held (released
        already, or lost). Never frees another lease's slot; never raises for Redis (what could
        not be removed now is removed by the first renewal round Redis answers, or expires
        after one lease).

        Shielded: a cancelled caller's release completes anyway.
        """
        held = self._held.pop(lease.id, None)
        if held is None:
            return False
        # Unrenewed for a whole lease while held (this replica was paused, or Redis was out of
        # reach): if Redis cannot say now whether it let the lease go, it counts as lost.
        overdue = self._clock.monotonic() >= held.deadline
        await asyncio.shield(self._spawn(self._release(lease, overdue=overdue)))
        return True

    async def share(self, name: str, value: str, *, keep_seconds: float = 86400.0) -> None:
        """Write a record every replica reads (`on_shared`): announced at once, and read again
        by every renewal round (so a replica that missed the message, or started later, gets
        it). Raises CoordinationUnavailable when Redis cannot take it."""
        record = f"{self.replica}|{value}"
        keys = [self.keys.shared]
        args: list[str | int] = [name, record, self.keys.shared_channel, round(keep_seconds * 1000)]
        now_ms = await self._call("share", lambda: self._share_script(keys=keys, args=args))
        self._shared_seen[name] = f"{record}@{now_ms}"  # its own: never told back

    def _heard(self, name: str, record: str, *, now_ms: int | None) -> None:
        """A shared record: tell `on_shared` once per version, unless this replica wrote it."""
        if self._shared_seen.get(name) == record:
            return
        self._shared_seen[name] = record
        body, _, at = record.rpartition("@")
        writer, _, value = body.partition("|")
        if writer == self.replica or self._on_shared is None or not at.isdigit():
            return
        age = 0.0 if now_ms is None else max(0.0, (now_ms - int(at)) / 1000)
        try:
            self._on_shared(name, value, age)
        except Exception:
            _log.exception("on_shared failed for %s", name)

    async def withdraw(self, servers: Iterable[str]) -> None:
        """This replica has no head waiting for `servers` any more: give up its places (else
        they lapse after a few poll intervals). Raises CoordinationUnavailable."""
        keys = [self.keys.heads(server) for server in servers]
        if keys:
            await self._call("withdraw", lambda: self._withdraw(keys))

    async def _withdraw(self, keys: list[str]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hdel(key, self.replica)
            await pipe.execute()

    def held(self) -> tuple[Lease, ...]:
        """The leases this replica holds, as far as it knows (each renewed or not yet due)."""
        return tuple(held.lease for held in self._held.values())

    # -- wake-ups -------------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """Counts the wake-ups (releases heard, subscriptions made); see `changed`."""
        return self._epoch

    async def changed(self, since: int | None = None) -> bool:
        """Wait until a slot may have freed: True on a release message (or at once if `epoch`
        moved past `since`), False after a jittered poll interval without one.

        A waiter reads `epoch` before it tries `acquire`, and passes it here when refused, so a
        release heard between the two is never missed.
        """
        if since is not None and since != self._epoch:
            return True
        event = self._event
        wait = self.config.poll_seconds * self._rng.uniform(0.5, 1.0)
        try:
            async with self._clock.timeout_at(self._clock.monotonic() + wait):
                await event.wait()
        except TimeoutError:
            return False
        return True

    # -- what the cluster looks like ------------------------------------------------------------

    async def cluster_view(self) -> ClusterView:
        """The replicas seen and the slots each holds, from Redis (two round trips)."""
        known: set[str] = await self._call("view", lambda: self._redis.smembers(self.keys.servers))
        servers = sorted(known | {held.lease.server for held in self._held.values()})
        keys = [self.keys.replicas, *(self.keys.leases(server) for server in servers)]
        alive, *live = await self._call("view", lambda: self._view_script(keys=keys, args=[]))
        slots: dict[str, dict[str, int]] = {replica: {} for replica in alive}
        for server, ids in zip(servers, live, strict=True):
            for lease_id in ids:
                per_server = slots.setdefault(Lease(lease_id, server).replica, {})
                per_server[server] = per_server.get(server, 0) + 1
        return ClusterView(
            tuple(
                ReplicaSlots(replica, replica in alive, slots[replica]) for replica in sorted(slots)
            )
        )

    def counters(self) -> LeaseCounters:
        return LeaseCounters(
            acquired=self._acquired,
            refused=self._refused,
            released=self._released,
            renewals=self._renewals,
            lost=self._lost,
            redis_errors=self._errors,
            held=len(self._held),
            redis_up=self._redis_up,
        )

    # -- the work -------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("these leases are closed")

    def _spawn(self, work: Awaitable[_T]) -> "asyncio.Task[_T]":
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _settle(self, within: float) -> None:
        """Wait (at most `within`) for the acquisitions and releases under way, including the
        releases that cancelled acquisitions start when they finish."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while self._tasks:
                    await asyncio.wait(set(self._tasks))

    async def _call(self, operation: str, command: Callable[[], Awaitable[Any]]) -> Any:
        """One Redis call within the timeout; failures become CoordinationUnavailable."""
        try:
            async with asyncio.timeout(self.config.timeout_seconds):
                result = await command()
        except (RedisError, OSError, TimeoutError) as error:
            _reraise_cancellation(error)
            self._errors += 1
            if self._redis_up is not False:
                _log.warning("Redis unreachable, slots cannot be shared: %s: %s", operation, error)
                self._redis_status(up=False)
            raise CoordinationUnavailable(operation, error) from error
        if self._redis_up is not True:
            if self._redis_up is False:
                _log.warning("Redis reachable again")
            self._redis_status(up=True)
        return result

    def _redis_status(self, *, up: bool) -> None:
        self._redis_up = up
        if self._on_redis is not None:
            try:
                self._on_redis(up)
            except Exception:
                _log.exception("on_redis failed")

    async def _acquire(
        self,
        lease: Lease,
        limit: int,
        weight: float,
        budget: float | None,
        force: bool,
        audio: float | None,
        since: float | None,
    ) -> Lease | None:
        sent = self._clock.monotonic()
        server = lease.server
        keys = [
            self.keys.leases(server),
            self.keys.servers,
            self.keys.revoked,
            self.keys.weights(server),
            self.keys.heads(server),
            self.keys.quiet,
        ]
        args: list[str | int] = [
            lease.id,
            limit,
            self._lease_ms,
            server,
            "1" if force else "0",
            repr(max(0.0, weight)),
            "" if budget is None else repr(budget),
            "-" if audio is None else repr(float(audio)),
            self.replica,
            0 if since is None else max(0, round((self._clock.monotonic() - since) * 1000)),
            round(3 * self.config.poll_seconds * 1000 + 2 * self.config.timeout_seconds * 1000),
            "-" if since is None else repr(since),
        ]
        try:
            granted, count, *facts = await self._call(
                "acquire", lambda: self._acquire_script(keys=keys, args=args)
            )
        except (CoordinationUnavailable, asyncio.CancelledError):
            # The script may have run (or may run yet): remove what it granted once Redis answers.
            self._orphans[lease.id] = lease
            raise
        if granted != 1:
            self._refused += 1
            if granted == -2 and not self._quiet_logged:
                self._quiet_logged = True
                _log.warning(
                    "Redis has started empty (restarted without its data, or new): no new task "
                    "starts for %.1f s, one lease, while every replica puts its running tasks "
                    "back on the books",
                    int(facts[0]) / 1000 if facts else 0.0,
                )
            return None
        self._quiet_logged = False
        self._acquired += 1
        running = tuple(None if a == "-" else float(a) for a in (facts[0] if facts else ()))
        lease = Lease(lease.id, lease.server, int(count), running, max(0.0, weight))
        self._held[lease.id] = _Held(lease, sent + self.config.lease_seconds)
        return lease

    def _abandoned(self, lease: Lease, attempt: "asyncio.Task[Lease | None]") -> None:
        """An acquisition whose caller was cancelled has finished: release what it granted."""
        if attempt.cancelled() or attempt.exception() is not None:
            return  # orphaned by _acquire already
        if attempt.result() is not None and self._held.pop(lease.id, None) is not None:
            self._spawn(self._release(lease))

    async def _release(self, lease: Lease, *, overdue: bool = False) -> None:
        try:
            removed = await self._release_call(lease)
        except CoordinationUnavailable:
            self._orphans[lease.id] = lease
            if overdue:
                self._report(LostLease(lease, "unconfirmed"))
            return
        except asyncio.CancelledError:  # only aclose() cancels it
            self._orphans[lease.id] = lease
            raise
        self._released += 1
        if not removed:
            # Redis had let it go before its task ended (this replica was paused past its
            # lease, or Redis lost it) and no renewal round told so in time: said now.
            self._report(LostLease(lease, "expired"))

    async def _release_call(self, lease: Lease) -> bool:
        """Remove the lease in Redis; False when it was not there any more."""
        keys = [self.keys.leases(lease.server), self.keys.revoked]
        args: list[str | int] = [lease.id, self._lease_ms, self.keys.channel, lease.server]
        removed = await self._call("release", lambda: self._release_script(keys=keys, args=args))
        return bool(removed)

    async def _sweep_orphans(self) -> None:
        """Remove every orphan from Redis; stop at the first failure (the next round retries)."""
        while self._orphans:
            lease = next(iter(self._orphans.values()))
            await self._release_call(lease)
            self._orphans.pop(lease.id, None)

    async def _renewing(self) -> None:
        period = self.config.lease_seconds / 3
        while not self._closed:
            started = self._clock.monotonic()
            await self._renew_round()
            wake = started + period
            if self._held:
                # Wake at a lease's deadline too: that is when an unconfirmed one is lost.
                wake = min(wake, *(held.deadline for held in self._held.values()))
            await self._clock.wait_until(max(wake, self._clock.monotonic() + 0.001))

    async def _renew_round(self) -> None:
        """Renew every held lease and the heartbeat in one call; report the lost ones."""
        held = list(self._held.values())
        servers = sorted({h.lease.server for h in held})
        keys = [
            self.keys.replicas,
            self.keys.servers,
            self.keys.shared,
            self.keys.quiet,
            *map(self.keys.leases, servers),
        ]
        index = {server: i + 5 for i, server in enumerate(servers)}  # Lua's KEYS count from 1
        args: list[str | int] = [self._lease_ms, self.replica]
        for h in held:
            args += [index[h.lease.server], h.lease.id]
        sent = self._clock.monotonic()
        try:
            lost_ids, shared, now_ms = await self._call(
                "renew", lambda: self._renew_script(keys=keys, args=args)
            )
        except CoordinationUnavailable:
            now = self._clock.monotonic()
            for h in held:
                if h.deadline <= now and self._held.get(h.lease.id) is h:
                    del self._held[h.lease.id]
                    self._orphans[h.lease.id] = h.lease  # it may be in Redis still
                    self._report(LostLease(h.lease, "unconfirmed"))
            return
        self._renewals += 1
        gone = set(lost_ids)
        for name, record in zip(shared[::2], shared[1::2], strict=True):
            self._heard(name, record, now_ms=int(now_ms))
        for h in held:
            if self._held.get(h.lease.id) is not h:
                continue  # released during the round (the release says if it was gone)
            if h.lease.id in gone:
                del self._held[h.lease.id]
                self._report(LostLease(h.lease, "expired"))
            else:
                h.deadline = sent + self.config.lease_seconds
        with contextlib.suppress(CoordinationUnavailable):
            await self._sweep_orphans()

    def _report(self, lost: LostLease) -> None:
        self._lost += 1
        _log.warning(
            "lease lost (%s): %s on %s; its slot counts for other replicas now",
            lost.reason,
            lost.lease.id,
            lost.lease.server,
        )
        if self._on_lost is not None:
            try:
                self._on_lost(lost)
            except Exception:
                _log.exception("on_lost failed for %s", lost.lease.id)

    def _wake(self) -> None:
        self._epoch += 1
        self._event.set()
        self._event = asyncio.Event()

    async def _listening(self) -> None:
        """Stay subscribed to the release channel; on any sign of trouble subscribe afresh.

        A (re)subscription wakes the waiters too: a release may have gone unheard meanwhile.
        """
        shared = self.keys.shared_channel
        while not self._closed:
            pubsub = self._redis.pubsub()
            errors = self._errors
            try:
                async with asyncio.timeout(self.config.timeout_seconds):
                    await pubsub.subscribe(self.keys.channel, self.keys.shared_channel)
                # Another call failing means this connection may be half-dead too.
                while self._errors == errors:
                    message = await pubsub.get_message(timeout=self.config.poll_seconds)
                    if message is None or message["type"] not in ("message", "subscribe"):
                        continue
                    if message["type"] == "message" and message["channel"] == shared:
                        name, _, record = str(message["data"]).partition("=")
                        self._heard(name, record, now_ms=None)
                    else:
                        self._wake()
            except (RedisError, OSError, TimeoutError) as error:
                _reraise_cancellation(error)
                _log.debug("release channel: %s", error)
            finally:
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    async with asyncio.timeout(self.config.timeout_seconds):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py's
            await self._clock.sleep(self.config.poll_seconds * self._rng.uniform(0.5, 1.0))
