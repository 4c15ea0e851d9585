"""The simulated GPU's memory and compute model, checked without a server or a clock."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatekeeper.sim.memory import GpuCompute, GpuMemory

FIVE_MINUTES = 300.0


@pytest.mark.parametrize(
    ("audio_seconds", "need"),
    [(0.0, 2.0), (60.0, 2.8), (FIVE_MINUTES, 6.0), (600.0, 10.0), (-5.0, 2.0)],
)
def test_need_grows_with_audio_minutes(audio_seconds: float, need: float) -> None:
    """A task needs 2 GiB plus 0.8 GiB per minute of audio by default."""
    assert GpuMemory().need_gib(audio_seconds) == pytest.approx(need)


def test_three_five_minute_tasks_fit_and_a_fourth_does_not() -> None:
    """On a 24 GiB card with 6 GiB reserved, three 5-minute tasks fill it exactly."""
    memory = GpuMemory()
    need = memory.need_gib(FIVE_MINUTES)
    assert [memory.try_allocate(f"t{i}", need) for i in range(4)] == [True, True, True, False]
    assert memory.used_gib == pytest.approx(24.0)
    assert memory.free_gib == pytest.approx(0.0)


def test_a_refused_task_takes_no_memory() -> None:
    """An allocation that does not fit leaves the memory exactly as it was."""
    memory = GpuMemory()
    memory.try_allocate("big", 15.0)
    assert not memory.try_allocate("too-big", 6.0)
    assert memory.used_gib == pytest.approx(21.0)
    assert memory.holders == {"big": 15.0}


def test_release_gives_memory_back_and_unknown_tasks_give_nothing() -> None:
    """Releasing a task frees what it held; releasing an unknown task changes nothing."""
    memory = GpuMemory()
    memory.try_allocate("a", 6.0)
    assert memory.release("a") == 6.0
    assert memory.release("a") == 0.0
    assert memory.used_gib == pytest.approx(6.0)


def test_clear_keeps_only_the_reservation() -> None:
    """After a simulated restart only the model and CUDA context remain in memory."""
    memory = GpuMemory()
    memory.try_allocate("a", 6.0)
    memory.try_allocate("b", 6.0)
    memory.clear()
    assert memory.used_gib == pytest.approx(6.0)


def test_a_task_cannot_allocate_twice() -> None:
    """Allocating again for a task that already holds memory is a programming error."""
    memory = GpuMemory()
    memory.try_allocate("a", 1.0)
    with pytest.raises(ValueError, match="already holds"):
        memory.try_allocate("a", 1.0)


@pytest.mark.parametrize(
    "kwargs",
    [{"total_gib": 0.0}, {"reserved_gib": 30.0}, {"base_gib": -1.0}, {"per_minute_gib": -0.1}],
)
def test_impossible_cards_are_rejected(kwargs: dict[str, float]) -> None:
    """A card with no memory or more reserved than it has cannot be built."""
    with pytest.raises(ValueError, match="must"):
        GpuMemory(**kwargs)


@given(st.lists(st.floats(min_value=0.0, max_value=30.0), max_size=20))
def test_used_memory_never_exceeds_the_card(sizes: list[float]) -> None:
    """Whatever is asked for, used memory stays within the card and equals what is held."""
    memory = GpuMemory()
    for i, size in enumerate(sizes):
        memory.try_allocate(f"t{i}", size)
        assert memory.used_gib <= memory.total_gib + 1e-6
        assert memory.used_gib == pytest.approx(6.0 + sum(memory.holders.values()))


@pytest.mark.parametrize(
    ("n", "throughput"), [(0, 0.0), (1, 1.0), (2, 1.3), (3, 1.6), (4, 1.9), (5, 2.0), (9, 2.0)]
)
def test_throughput_grows_with_concurrency_up_to_the_cap(n: int, throughput: float) -> None:
    """Concurrent tasks get more total work done, up to twice one task alone."""
    assert GpuCompute().throughput(n) == pytest.approx(throughput)


def test_a_task_alone_finishes_after_its_work() -> None:
    """A task with the GPU to itself finishes after exactly its work in seconds."""
    gpu = GpuCompute()
    gpu.add("a", 30.0, now=0.0)
    assert gpu.advance(29.9) == []
    assert gpu.progress("a") == pytest.approx(29.9 / 30.0)
    assert gpu.seconds_until("a") == pytest.approx(0.1)
    assert gpu.advance(30.0) == ["a"]
    assert gpu.running == 0


def test_two_tasks_are_each_slower_but_together_faster() -> None:
    """Two equal tasks both finish at 2×work/1.3: later than one alone, sooner than in turn."""
    gpu = GpuCompute()
    gpu.add("a", 10.0, now=0.0)
    gpu.add("b", 10.0, now=0.0)
    finish = 20.0 / 1.3
    assert gpu.seconds_until("a") == pytest.approx(finish)
    assert gpu.advance(finish - 0.01) == []
    assert sorted(gpu.advance(finish)) == ["a", "b"]


def test_survivors_speed_up_when_a_task_finishes_mid_interval() -> None:
    """One late advance gives the same result as watching every completion happen."""
    gpu = GpuCompute()
    gpu.add("short", 1.0, now=0.0)
    gpu.add("long", 10.0, now=0.0)
    # Together each gets 0.65/s: "short" ends at 1/0.65 s, having given "long" 1.0 of work.
    # "long" then runs alone for its remaining 9.0 s.
    end = 1.0 / 0.65 + 9.0
    assert gpu.advance(end - 0.01) == ["short"]
    assert gpu.advance(end) == ["long"]


def test_removing_a_task_speeds_up_the_rest() -> None:
    """A task taken off the GPU early stops sharing it at once."""
    gpu = GpuCompute()
    gpu.add("a", 10.0, now=0.0)
    gpu.add("b", 10.0, now=0.0)
    gpu.remove("b", now=1.0)
    assert gpu.seconds_until("a") == pytest.approx(10.0 - 0.65)


def test_zero_work_finishes_immediately() -> None:
    """A task over no audio is done the moment it starts."""
    gpu = GpuCompute()
    gpu.add("empty", 0.0, now=5.0)
    assert gpu.advance(5.0) == ["empty"]


def test_seconds_until_a_progress_mark() -> None:
    """The time to reach half of a task's work is half its remaining time alone."""
    gpu = GpuCompute()
    gpu.add("a", 8.0, now=0.0)
    assert gpu.seconds_until("a", 0.5) == pytest.approx(4.0)
    assert gpu.seconds_until("unknown") == math.inf


def test_clear_forgets_every_task() -> None:
    """After a crash nothing is running and nothing will complete."""
    gpu = GpuCompute()
    gpu.add("a", 1.0, now=0.0)
    gpu.clear()
    assert gpu.running == 0
    assert gpu.advance(100.0) == []


@given(st.lists(st.floats(min_value=0.01, max_value=100.0), min_size=1, max_size=8))
def test_all_work_is_done_by_total_work_over_minimum_throughput(works: list[float]) -> None:
    """Tasks started together never take longer than doing them one after another."""
    gpu = GpuCompute()
    for i, work in enumerate(works):
        gpu.add(f"t{i}", work, now=0.0)
    assert len(gpu.advance(sum(works) + 1e-6)) == len(works)
