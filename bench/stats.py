"""Small statistics helpers: latency summaries with the gatekeeper's percentile, medians, rounding.

Percentiles are `gatekeeper.state.percentile` (nearest rank), so a p50/p95/p99 here means the
same as in `/stats` and `gatekeeper tune`: a duration that was measured.
"""

import statistics
from collections.abc import Sequence

from gatekeeper.policy.quantiles import percentile

__all__ = ["median", "ms", "summarize"]


def median(values: Sequence[float]) -> float | None:
    """The middle of repeated measurements (the mean of the middle two for an even count)."""
    return statistics.median(values) if values else None


def ms(seconds: float | None, digits: int = 3) -> float | None:
    """Seconds to rounded milliseconds (None stays None)."""
    return None if seconds is None else round(seconds * 1000, digits)


def summarize(seconds: Sequence[float]) -> dict[str, float | int | None]:
    """n, p50, p90, p99, max and mean of durations, in milliseconds."""
    values = tuple(seconds)
    return {
        "n": len(values),
        "p50_ms": ms(percentile(values, 0.5)),
        "p90_ms": ms(percentile(values, 0.9)),
        "p99_ms": ms(percentile(values, 0.99)),
        "max_ms": ms(max(values)) if values else None,
        "mean_ms": ms(sum(values) / len(values)) if values else None,
    }
