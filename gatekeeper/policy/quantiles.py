"""Quantiles as the gatekeeper means them everywhere (/stats, `gatekeeper tune`, the benchmark)."""

import math
from collections.abc import Sequence

__all__ = ["percentile"]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0..1) of `values` by nearest rank; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, math.ceil(q * len(ordered)) - 1)
    return ordered[rank]
