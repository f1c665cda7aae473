"""A small mergeable log-linear histogram of non-negative integers (HDR-style).

Values below ``2 * SUB_BUCKETS`` are counted exactly; above that every power of two is split into
``SUB_BUCKETS`` equal buckets, so a bucket's width is at most 1/64 of its values (relative error
under 1.6 %). Buckets are kept sparse in a dict, so a histogram serialises to a few hundred
numbers whatever it counted: the client processes send theirs to the runner, which merges them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

SUB_BITS = 6
SUB_BUCKETS = 1 << SUB_BITS  # 64
_EXACT_LIMIT = SUB_BUCKETS * 2  # 128: values below it have a bucket of their own


def bucket_index(value: int) -> int:
    """The bucket that ``value`` (clamped at 0) falls in."""
    if value < _EXACT_LIMIT:
        return value if value > 0 else 0
    shift = value.bit_length() - (SUB_BITS + 1)
    return (shift << SUB_BITS) + (value >> shift)


def bucket_bounds(index: int) -> tuple[int, int]:
    """The lowest and highest value (inclusive) of bucket ``index``."""
    if index < _EXACT_LIMIT:
        return index, index
    shift = (index >> SUB_BITS) - 1
    mantissa = index - (shift << SUB_BITS)
    return mantissa << shift, ((mantissa + 1) << shift) - 1


class Histogram:
    """Counts of integer samples (the bench records microseconds)."""

    __slots__ = ("counts", "count", "total", "min", "max")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0
        self.total = 0
        self.min: int | None = None
        self.max: int | None = None

    def record(self, value: int) -> None:
        if value < 0:
            value = 0
        if value < _EXACT_LIMIT:
            index = value
        else:
            shift = value.bit_length() - (SUB_BITS + 1)
            index = (shift << SUB_BITS) + (value >> shift)
        counts = self.counts
        counts[index] = counts.get(index, 0) + 1
        self.count += 1
        self.total += value
        if self.min is None or value < self.min:
            self.min = value
        if self.max is None or value > self.max:
            self.max = value

    def record_many(self, values: Iterable[int]) -> None:
        for value in values:
            self.record(value)

    def merge(self, other: Histogram) -> None:
        counts = self.counts
        for index, n in other.counts.items():
            counts[index] = counts.get(index, 0) + n
        self.count += other.count
        self.total += other.total
        if other.min is not None and (self.min is None or other.min < self.min):
            self.min = other.min
        if other.max is not None and (self.max is None or other.max > self.max):
            self.max = other.max

    def percentile(self, q: float) -> float | None:
        """The value at percentile ``q`` (0-100): the sample of rank ``ceil(q% * count)``.

        Exact below 128; above, the midpoint of the sample's bucket, kept within the exact
        minimum and maximum. ``None`` when nothing was recorded.
        """
        if not 0.0 <= q <= 100.0:
            raise ValueError(f"percentile {q} not within 0..100")
        if self.count == 0 or self.min is None or self.max is None:
            return None
        rank = max(1, math.ceil(self.count * q / 100.0))
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                low, high = bucket_bounds(index)
                value = (low + high) / 2.0
                return float(min(max(value, self.min), self.max))
        return float(self.max)  # unreachable: the counts add up to count

    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "sum": self.total,
            "min": self.min,
            "max": self.max,
            "buckets": {str(index): n for index, n in sorted(self.counts.items())},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Histogram:
        hist = cls()
        hist.counts = {int(index): int(n) for index, n in data.get("buckets", {}).items()}
        hist.count = int(data.get("count", sum(hist.counts.values())))
        hist.total = int(data.get("sum", 0))
        hist.min = None if data.get("min") is None else int(data["min"])
        hist.max = None if data.get("max") is None else int(data["max"])
        return hist

    def summary(self, scale: float = 1.0, digits: int = 3) -> dict[str, float | int | None]:
        """Count, mean, min, p50, p90, p99, p99.9 and max, each divided by ``scale``."""

        def scaled(value: float | int | None) -> float | None:
            return None if value is None else round(value / scale, digits)

        return {
            "count": self.count,
            "mean": scaled(self.mean()),
            "min": scaled(self.min),
            "p50": scaled(self.percentile(50)),
            "p90": scaled(self.percentile(90)),
            "p99": scaled(self.percentile(99)),
            "p999": scaled(self.percentile(99.9)),
            "max": scaled(self.max),
        }
