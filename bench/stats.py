"""Percentiles of one window and medians over the interleaved repetitions of a workload."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

R = TypeVar("R")


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values that exist; None when none does."""
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def median_of(reps: Sequence[R], metric: Callable[[R], float | None]) -> float | None:
    """A metric taken in each repetition, then the median of those."""
    return median(metric(rep) for rep in reps)
