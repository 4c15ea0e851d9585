"""The stats JSON (SPEC "Stats JSON"): the seed's ten fields first, then extras for operators."""

from typing import Any

from gatekeeper.clock import local_iso
from gatekeeper.policy.admission import queue_usage
from gatekeeper.policy.outcomes import AttemptOutcome, HoldEnd, RejectReason, TaskOutcome
from gatekeeper.policy.quantiles import percentile
from gatekeeper.state import ServerSnapshot, Snapshot

__all__ = ["stats_document"]


def _quantiles(values: tuple[float, ...]) -> dict[str, float | int | None]:
    """p50/p95 over the recent window (the last few hundred tasks), in seconds."""

    def q(p: float) -> float | None:
        v = percentile(values, p)
        return None if v is None else round(v, 3)

    return {"p50": q(0.5), "p95": q(0.95), "window": len(values)}


def _upstream(server: ServerSnapshot) -> dict[str, Any]:
    """One Whisper server's part of the stats (SPEC "Several Whisper servers")."""
    return {
        "name": server.name,
        "url": server.url,
        "up": server.up,
        "state": "unknown" if server.health is None else server.health.state.value,
        "usable": server.usable,
        "max_concurrent": server.limit,
        "active_tasks": server.active,
        "in_flight": server.in_flight,
        "held_tasks": server.held,
        "oom_errors": server.oom_errors,
        "last_oom": None if server.last_oom_wall is None else local_iso(server.last_oom_wall),
        "attempts": {o.value: n for o, n in server.attempts.items()},
        "adaptive": server.adaptive,
        "memory_gib": server.memory,
    }


def stats_document(snap: Snapshot, *, extras: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build the stats JSON from one snapshot (dict order is the order operators see)."""
    doc: dict[str, Any] = {
        "max_concurrent": snap.gate.limit,
        "active_tasks": snap.gate.active,
        "queued_tasks": snap.gate.queued,
        "total_tasks": snap.total_tasks,
        "failed_tasks": snap.failed_tasks,
        "rejected_tasks": snap.rejected_tasks,
        "oom_errors": snap.oom_errors,
        "last_oom": None if snap.last_oom_wall is None else local_iso(snap.last_oom_wall),
        "success_rate": snap.success_rate,
        "queue_usage": queue_usage(snap.gate.queued, snap.gate.max_queue),
        # Extras after the seed's fields.
        "max_queue": snap.gate.max_queue,
        "retrying_tasks": snap.gate.retrying,
        "uploading_tasks": snap.gate.uploading,
        "held_tasks": snap.held_tasks,
        "timeout_holds": {end.value: snap.holds.get(end, 0) for end in HoldEnd},
        "upstream_in_flight": snap.upstream_in_flight,
        "succeeded_tasks": snap.tasks[TaskOutcome.SUCCESS],
        "client_error_tasks": snap.tasks[TaskOutcome.CLIENT_ERROR],
        "cancelled_tasks": snap.tasks[TaskOutcome.CANCELLED],
        "rejected_after_queueing_tasks": snap.tasks[TaskOutcome.REJECTED],
        "rejected_by_reason": {r.value: snap.rejected[r] for r in RejectReason},
        "upstream_attempts": {o.value: n for o, n in snap.attempts.items()},
        "retries": {o.value: n for o, n in snap.retries.items() if n},
        "retry_delay_seconds_total": round(snap.retry_delay_seconds_total, 3),
        "timeouts": snap.attempts[AttemptOutcome.TIMEOUT],
        "queue_timeouts": snap.rejected[RejectReason.QUEUE_TIMEOUT],
        "oom_errors_last_hour": snap.ooms_last_hour,
        "queue_wait_seconds": _quantiles(snap.recent_queue_waits),
        "upstream_duration_seconds": _quantiles(snap.recent_upstream_durations),
        "mean_service_seconds": round(snap.mean_service_seconds, 3),
        "shutting_down": snap.gate.shutting_down,
        "upstream_up": snap.upstream_up,
        "adaptive": snap.adaptive,
        "audio_seconds": {
            "count": snap.audio.count,
            "sum": round(snap.audio.total, 2),
            "unknown": snap.audio_unknown,
        },
        "upstreams": [_upstream(server) for server in snap.servers],
    }
    if extras:
        doc.update(extras)
    return doc
