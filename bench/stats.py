"""Small statistics helpers (percentiles by linear interpolation, rounding for reports)."""

import math
from collections.abc import Sequence

__all__ = ["median", "ms", "percentile", "summarize"]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0..1) by linear interpolation between closest ranks; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def median(values: Sequence[float]) -> float | None:
    return percentile(values, 0.5)


def ms(seconds: float | None, digits: int = 3) -> float | None:
    """Seconds to rounded milliseconds (None stays None)."""
    return None if seconds is None else round(seconds * 1000, digits)


def summarize(seconds: Sequence[float]) -> dict[str, float | int | None]:
    """n, p50, p90, p99, max and mean of durations, in milliseconds."""
    return {
        "n": len(seconds),
        "p50_ms": ms(percentile(seconds, 0.5)),
        "p90_ms": ms(percentile(seconds, 0.9)),
        "p99_ms": ms(percentile(seconds, 0.99)),
        "max_ms": ms(max(seconds)) if seconds else None,
        "mean_ms": ms(sum(seconds) / len(seconds)) if seconds else None,
    }
