"""The GPU scenario's workload: one seeded arrival schedule, replayed against every setup.

Durations are log-uniform between 10 s and 10 min (many short clips, a long tail of meetings:
mean ≈ 2.4 min), arrivals are Poisson. Everything is in simulated seconds; the harness divides
by the simulator's time scale to send.
"""

import math
import random
from dataclasses import dataclass

__all__ = ["Arrival", "mean_audio_seconds", "schedule"]


@dataclass(frozen=True, slots=True)
class Arrival:
    index: int
    at: float
    """Simulated seconds after the start."""
    audio_seconds: float


def schedule(
    *,
    seed: int,
    rate_per_minute: float,
    minutes: float,
    shortest: float = 10.0,
    longest: float = 600.0,
) -> list[Arrival]:
    """Poisson arrivals over `minutes` simulated minutes, log-uniform audio durations."""
    rng = random.Random(seed)
    arrivals: list[Arrival] = []
    t = 0.0
    horizon = minutes * 60.0
    while True:
        t += rng.expovariate(rate_per_minute / 60.0)
        if t >= horizon:
            return arrivals
        seconds = math.exp(rng.uniform(math.log(shortest), math.log(longest)))
        arrivals.append(Arrival(len(arrivals), t, round(seconds, 1)))


def mean_audio_seconds(shortest: float = 10.0, longest: float = 600.0) -> float:
    """Expected duration of the log-uniform draw."""
    return (longest - shortest) / math.log(longest / shortest)
