"""What replicas share besides slots: each card's last OOM, its adaptive limit, its memory
figures (SPEC "Replicas": "… share each Whisper server's limit (and memory budget, OOM record,
adaptive limit)").

Slots and the memory budget are shared by the leases themselves (gatekeeper/cluster/leases.py:
a lease holds its task's GiB). The rest is learned by each replica from its own attempts and
shared as records in Redis, the last word winning:

- `oom:<server>`: an attempt ran out of memory there, at this many tasks on the card. Every
  replica's cool-down and `last_oom` for that card follow it, and its adaptive limit remembers
  the OOM for its ceiling (their OOM counts stay their own: Prometheus sums them).
- `limit:<server>`: the adaptive limit moved (an OOM's cut, a stable stretch's rise, a faded
  ceiling). The others take it as theirs (`AdaptiveLimit.adopt`, reason `shared`), so every
  replica acquires against the same limit. Each replica learns from the concurrency of the
  whole cluster: an attempt's `in_flight` is at least the card's leases when its slot was
  granted.
- `memory:<server>`: learned figures (GiB per task, GiB per minute of audio). The others take
  them (`MemoryLearner.adopt`); each learner's evidence is the card's tasks of every replica
  (the lease tells their audio).

A record is announced at once (pub/sub) and read again by every renewal round, so a replica
that missed the message, or started later, catches up within a third of a lease.
"""

import logging

from gatekeeper.clock import Clock
from gatekeeper.cluster.coordinator import Coordinator
from gatekeeper.limiter import Limiter
from gatekeeper.policy.memory import MemoryModel
from gatekeeper.state import LiveState

__all__ = ["share_learning"]

_log = logging.getLogger(__name__)


def share_learning(
    coordinator: Coordinator, limiter: Limiter, state: LiveState, clock: Clock
) -> None:
    """Wire the limiter's lessons to the cluster, and the cluster's to the limiter."""
    names = coordinator.servers
    index = {name: i for i, name in enumerate(names)}
    limiter.share_oom = lambda server, level, first: coordinator.share(
        f"oom:{names[server]}", f"{level},{int(first)}"
    )
    limiter.share_limit = lambda server, limit: coordinator.share(
        f"limit:{names[server]}", str(limit)
    )
    limiter.share_model = lambda server, model: coordinator.share(
        f"memory:{names[server]}", f"{model.base_gib!r},{model.per_minute_gib!r}"
    )

    def heard(name: str, value: str, age: float) -> None:
        kind, _, server_name = name.partition(":")
        server = index.get(server_name)
        if server is None:
            return  # a server this replica does not front (its list differs): not ours
        try:
            if kind == "oom":
                level, first = (int(v) for v in value.split(","))
                state.oom_elsewhere(
                    server, wall=clock.wall() - age, monotonic=clock.monotonic() - age
                )
                if age < 1.0:  # heard as it happened (an old record was learned from then)
                    limiter.note_oom(server, level, first_attempt=bool(first))
            elif kind == "limit":
                limiter.adopt_limit(server, int(value))
            elif kind == "memory":
                base, per_minute = (float(v) for v in value.split(","))
                limiter.adopt_model(server, MemoryModel(base, per_minute))
        except ValueError:
            _log.warning("ignored a shared record this version cannot read: %s=%s", name, value)

    coordinator.on_shared = heard
