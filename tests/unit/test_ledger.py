"""The ledger: every task is counted once when it begins and ends exactly once."""

import pytest

from gatekeeper.gate import Gate
from gatekeeper.ledger import Ledger, TaskAlreadyEnded
from gatekeeper.policy.outcomes import TaskOutcome
from gatekeeper.state import LiveState


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _ledger() -> tuple[Ledger, LiveState, _Clock]:
    clock = _Clock()
    state = LiveState(Gate(limit=1, max_queue=1), now=clock)
    return Ledger(state, now=clock), state, clock


def test_a_task_counts_when_it_opens_and_once_when_it_ends() -> None:
    """Opening counts the task in total_tasks; ending books its outcome."""
    ledger, state, _ = _ledger()
    record = ledger.open("t1", "POST", "/asr")
    assert state.snapshot().total_tasks == 1
    record.end(TaskOutcome.SUCCESS)
    snap = state.snapshot()
    assert snap.tasks[TaskOutcome.SUCCESS] == 1
    assert record.outcome is TaskOutcome.SUCCESS


def test_ending_a_task_twice_raises_and_books_nothing_more() -> None:
    """A second outcome for the same task is a bug: it raises and the books keep the first."""
    ledger, state, _ = _ledger()
    record = ledger.open("t1", "POST", "/asr")
    record.end(TaskOutcome.CANCELLED)
    with pytest.raises(TaskAlreadyEnded, match="t1 ended as failed after cancelled"):
        record.end(TaskOutcome.FAILED)
    snap = state.snapshot()
    assert (snap.tasks[TaskOutcome.CANCELLED], snap.tasks[TaskOutcome.FAILED]) == (1, 0)


def test_only_tasks_that_got_a_slot_have_a_duration() -> None:
    """A task that ended before its runner started adds no task_duration sample."""
    ledger, state, clock = _ledger()
    early = ledger.open("early", "POST", "/asr")
    early.end(TaskOutcome.CLIENT_ERROR)
    ran = ledger.open("ran", "POST", "/asr")
    ran.started = clock.t
    clock.t += 7.5
    ran.end(TaskOutcome.SUCCESS)
    duration = state.snapshot().task_duration
    assert (duration.count, duration.total) == (1, 7.5)
