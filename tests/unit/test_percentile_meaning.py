"""p50, p95 and p99 mean one thing in `/stats`, `gatekeeper tune` and the benchmark.

All three take the nearest rank (`gatekeeper.state.percentile`): the value at rank ⌈q·n⌉ of the
sorted samples, always a duration that was really measured, never one between two of them.
"""

import pytest

from bench.stats import summarize
from gatekeeper.policy.quantiles import percentile

MS = 0.001


@pytest.mark.parametrize(
    ("latencies_ms", "p50", "p90", "p99"),
    [
        # Ten samples: rank ⌈0.5·10⌉ = 5, ⌈0.9·10⌉ = 9, ⌈0.99·10⌉ = 10 (interpolating gave
        # 5.5, 9.1 and 9.91 ms, durations no request took).
        ([float(n) for n in range(1, 11)], 5.0, 9.0, 10.0),
        # Two samples: the median is the faster one, not their mean.
        ([1.0, 3.0], 1.0, 3.0, 3.0),
        ([4.0], 4.0, 4.0, 4.0),
    ],
)
def test_benchmark_percentiles_are_nearest_rank(
    latencies_ms: list[float], p50: float, p90: float, p99: float
) -> None:
    """The benchmark's latency summary reports measured values at the nearest rank."""
    summary = summarize([ms * MS for ms in latencies_ms])
    assert (summary["p50_ms"], summary["p90_ms"], summary["p99_ms"]) == (p50, p90, p99)


@pytest.mark.parametrize("count", [1, 2, 3, 7, 10, 19, 20, 21, 100, 101])
def test_benchmark_and_stats_agree_for_any_sample_count(count: int) -> None:
    """For any number of samples the benchmark's p50/p90/p99 are the ones `/stats` would report."""
    seconds = [((n * 7919) % 1000) * MS for n in range(count)]
    summary = summarize(seconds)
    for key, q in (("p50_ms", 0.5), ("p90_ms", 0.9), ("p99_ms", 0.99)):
        value = percentile(tuple(seconds), q)
        assert value is not None
        assert summary[key] == round(value * 1000, 3)


def test_an_empty_sample_has_no_percentiles() -> None:
    """No samples: no percentile, in the benchmark as in `/stats`."""
    summary = summarize([])
    assert (summary["n"], summary["p50_ms"], summary["p99_ms"]) == (0, None, None)
