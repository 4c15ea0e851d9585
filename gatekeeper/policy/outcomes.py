"""The names the rest of the code uses for what happened to an upstream attempt or a task.

Pure data, no I/O: these values appear in logs, metrics labels and the stats JSON, so they are
part of the external contract (SPEC "Outcomes, retries, delays").
"""

from enum import StrEnum

__all__ = ["AttemptOutcome", "HoldEnd", "RejectReason", "TaskOutcome"]


class AttemptOutcome(StrEnum):
    """What one upstream attempt ended with."""

    OK = "ok"  # status < 400
    CLIENT_ERROR = "client_error"  # status 4xx, never retried
    OOM = "oom"  # status >= 500 and the body matches an OOM pattern
    CRASH = "crash"  # connection refused/reset/closed before a full response
    ERROR = "error"  # any other status >= 500
    TIMEOUT = "timeout"  # the attempt exceeded ASR_REQUEST_TIMEOUT

    @property
    def is_failure(self) -> bool:
        """True for the outcomes that count a task as failed when they are its last word."""
        return self in _FAILURES


_FAILURES = frozenset(
    {AttemptOutcome.OOM, AttemptOutcome.CRASH, AttemptOutcome.ERROR, AttemptOutcome.TIMEOUT}
)


class TaskOutcome(StrEnum):
    """How an admitted task ended (the `outcome` label of `tasks_total`)."""

    SUCCESS = "success"
    FAILED = "failed"
    CLIENT_ERROR = "client_error"
    CANCELLED = "cancelled"
    # Admitted (its upload begun), then refused with 503: no queue place once its upload was
    # in, a queue timeout, a retry without a slot, or the shutdown. Refusals at arrival are not
    # tasks (they are only in rejected_total). Not in the SPEC's list; without it total_tasks
    # could not be reconciled.
    REJECTED = "rejected"


class HoldEnd(StrEnum):
    """How the hold of a timed-out attempt's slot ended (SPEC: a timed-out attempt is still on
    the GPU, so its slot stays taken until the Whisper server is done with it)."""

    ANSWERED = "answered"  # the server answered at last; the answer was read and dropped
    CLOSED = "closed"  # the server closed the connection
    EXPIRED = "expired"  # ASR_TIMEOUT_HOLD ran out: the connection was closed, the slot freed
    STOPPED = "stopped"  # the shutdown's grace period ended


class RejectReason(StrEnum):
    """Why a task was refused with 503 服务繁忙."""

    QUEUE_FULL = "queue_full"
    QUEUE_TIMEOUT = "queue_timeout"
    SHUTTING_DOWN = "shutting_down"
    # Replicas (SPEC "Replicas"): Redis cannot be reached, so no free slot can be proven, and
    # the queue has no room either.
    COORDINATION_UNAVAILABLE = "coordination_unavailable"
