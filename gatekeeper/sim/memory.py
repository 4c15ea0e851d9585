"""The simulated GPU: how much memory a task takes, and how running tasks share the compute.

Both halves are plain bookkeeping with time passed in as an argument, so the story they tell
("three 5-minute files fit on a 24 GiB card, a fourth does not"; "two tasks at once are each
slower but together a bit faster") can be checked synchronously, without a server or a clock.
"""

import math
from dataclasses import dataclass, field

__all__ = ["GpuCompute", "GpuMemory"]

# Floating-point slack: 6 + 3 × (2 + 0.8 × 5) must count as exactly 24 GiB, not 24.0000001.
_GIB_EPS = 1e-9
# A task whose remaining exclusive-GPU work is below this many seconds is finished.
_WORK_EPS = 1e-9


@dataclass
class GpuMemory:
    """GPU memory as a whisper server experiences it.

    `reserved_gib` is held for the server's whole life (model weights and CUDA context). Each
    task holds its peak need, ``base_gib + per_minute_gib × audio minutes``, from the moment it
    starts until it is released. A task that does not fit is refused and takes nothing, which
    is what a real allocation failure looks like: the tensor is never created.
    """

    total_gib: float = 24.0
    reserved_gib: float = 6.0
    base_gib: float = 2.0
    per_minute_gib: float = 0.8
    _held: dict[str, float] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.total_gib <= 0:
            raise ValueError(f"total_gib must be > 0, got {self.total_gib}")
        if not 0 <= self.reserved_gib <= self.total_gib:
            raise ValueError(
                f"reserved_gib must be between 0 and total_gib ({self.total_gib}), "
                f"got {self.reserved_gib}"
            )
        if self.base_gib < 0 or self.per_minute_gib < 0:
            raise ValueError("base_gib and per_minute_gib must be >= 0")

    def need_gib(self, audio_seconds: float) -> float:
        """Peak memory a task over this much audio needs."""
        return self.base_gib + self.per_minute_gib * max(0.0, audio_seconds) / 60.0

    @property
    def used_gib(self) -> float:
        """Memory in use now: the reservation plus every held task."""
        return self.reserved_gib + math.fsum(self._held.values())

    @property
    def free_gib(self) -> float:
        """Memory still available to new tasks (never negative)."""
        return max(0.0, self.total_gib - self.used_gib)

    @property
    def holders(self) -> dict[str, float]:
        """A copy of who holds how much, for state reports."""
        return dict(self._held)

    def fits(self, gib: float) -> bool:
        """Whether a task needing `gib` would fit right now."""
        return self.used_gib + gib <= self.total_gib + _GIB_EPS

    def try_allocate(self, task_id: str, gib: float) -> bool:
        """Hold `gib` for `task_id` if it fits; on failure nothing is taken."""
        if task_id in self._held:
            raise ValueError(f"task {task_id!r} already holds memory")
        if gib < 0:
            raise ValueError(f"cannot allocate a negative amount ({gib} GiB)")
        if not self.fits(gib):
            return False
        self._held[task_id] = gib
        return True

    def release(self, task_id: str) -> float:
        """Give back what `task_id` holds; returns the amount (0 if it held nothing)."""
        return self._held.pop(task_id, 0.0)

    def clear(self) -> None:
        """Forget every task, as a restarted process does; the reservation stays."""
        self._held.clear()


@dataclass
class GpuCompute:
    """Processor sharing of one GPU among the tasks running on it.

    Each task brings an amount of *work*: the seconds it would take with the GPU to itself.
    With n tasks running, the GPU gets through ``min(1 + parallel_gain × (n − 1), max_speedup)``
    seconds of work per second in total (batching helps, up to a point), split evenly. Time is
    passed in (`now`), so the caller decides what a second is.
    """

    parallel_gain: float = 0.3
    max_speedup: float = 2.0
    _work: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _remaining: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _finished: list[str] = field(default_factory=list, init=False, repr=False)
    _last: float | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.parallel_gain < 0:
            raise ValueError(f"parallel_gain must be >= 0, got {self.parallel_gain}")
        if self.max_speedup < 1:
            raise ValueError(f"max_speedup must be >= 1, got {self.max_speedup}")

    def throughput(self, n: int) -> float:
        """Total work-seconds per second with `n` tasks running."""
        if n <= 0:
            return 0.0
        return min(1.0 + self.parallel_gain * (n - 1), self.max_speedup)

    def rate(self) -> float:
        """Work-seconds per second each running task gets now."""
        n = len(self._remaining)
        return self.throughput(n) / n if n else 0.0

    @property
    def running(self) -> int:
        """How many tasks share the GPU now."""
        return len(self._remaining)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._remaining

    def add(self, task_id: str, work: float, now: float) -> None:
        """Start `task_id` at `now` with `work` seconds of exclusive-GPU work."""
        if task_id in self._remaining:
            raise ValueError(f"task {task_id!r} is already running")
        self._progress_to(now)
        work = max(0.0, work)
        self._work[task_id] = work
        if work <= _WORK_EPS:
            self._finished.append(task_id)
            return
        self._remaining[task_id] = work

    def remove(self, task_id: str, now: float) -> None:
        """Take `task_id` off the GPU before it finishes (the others speed up)."""
        self._progress_to(now)
        self._remaining.pop(task_id, None)
        self._work.pop(task_id, None)

    def advance(self, now: float) -> list[str]:
        """Bring every task up to `now`; return (and forget) those that finished, in order."""
        self._progress_to(now)
        done, self._finished = self._finished, []
        for task_id in done:
            self._work.pop(task_id, None)
        return done

    def progress(self, task_id: str) -> float:
        """Fraction of `task_id`'s work done, as of the last `add`/`remove`/`advance`."""
        if task_id in self._remaining:
            work = self._work[task_id]
            return 1.0 - self._remaining[task_id] / work
        return 1.0 if task_id in self._work else 0.0

    def seconds_until(self, task_id: str, fraction: float = 1.0) -> float:
        """Seconds until `task_id` reaches `fraction` of its work if nothing else changes."""
        remaining = self._remaining.get(task_id)
        if remaining is None:
            return 0.0 if task_id in self._work else math.inf
        target = self._work[task_id] * (1.0 - min(1.0, max(0.0, fraction)))
        return max(0.0, remaining - target) / self.rate()

    def clear(self) -> None:
        """Drop every task at once (the process died)."""
        self._work.clear()
        self._remaining.clear()
        self._finished.clear()

    def _progress_to(self, now: float) -> None:
        """Spend the time since the last call on the running tasks, piece by piece.

        Within the interval a task may finish and the survivors speed up, so the interval is
        cut at every completion instead of being applied at one rate.
        """
        last, self._last = self._last, now
        if last is None or now <= last:
            return
        elapsed = now - last
        while self._remaining and elapsed > 0:
            rate = self.rate()
            first_done = min(self._remaining.values()) / rate
            step = min(elapsed, first_done)
            for task_id in self._remaining:
                self._remaining[task_id] -= step * rate
            elapsed -= step
            for task_id in [t for t, r in self._remaining.items() if r <= _WORK_EPS]:
                del self._remaining[task_id]
                self._finished.append(task_id)
