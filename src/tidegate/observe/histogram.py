"""A fixed-bucket histogram cheap enough for per-message use, and mergeable across workers.

Buckets are Prometheus-style upper bounds (seconds). ``observe`` is a bisect and two adds;
``snapshot`` is a plain dict that crosses the worker -> supervisor channel as JSON.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)


class Histogram:
    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def observe_n(self, value: float, n: int) -> None:
        """``n`` observations of the same value (a fan-out: every subscriber of one loop)."""
        self.counts[bisect_left(self.bounds, value)] += n
        self.sum += value * n
        self.count += n

    def snapshot(self) -> dict[str, Any]:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.sum}

    @staticmethod
    def merge(snapshots: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Sum snapshots with the same bounds (one per worker) into one."""
        snaps = [s for s in snapshots if s]
        if not snaps:
            return None
        out = {"bounds": snaps[0]["bounds"], "counts": list(snaps[0]["counts"]), "sum": 0.0}
        for s in snaps:
            if s["bounds"] != out["bounds"]:
                continue
            if s is not snaps[0]:
                out["counts"] = [a + b for a, b in zip(out["counts"], s["counts"], strict=True)]
            out["sum"] += s["sum"]
        return out

    @staticmethod
    def quantile(snapshot: dict[str, Any], q: float) -> float | None:
        """Upper bound of the bucket holding the q-quantile (what Prometheus would say)."""
        counts = snapshot["counts"]
        total = sum(counts)
        if not total:
            return None
        rank, seen = q * total, 0
        for bound, n in zip([*snapshot["bounds"], float("inf")], counts, strict=True):
            seen += n
            if seen >= rank:
                return float(bound)
        return float("inf")
