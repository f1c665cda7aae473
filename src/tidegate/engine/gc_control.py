"""Cyclic GC control: a full collection walks every live object, so at 18k connections a worker
must not collect often. Start-up objects are frozen out of the collector and the young
generation threshold is raised; pauses are timed so they can be exported."""

from __future__ import annotations

import ctypes
import gc
import time
from typing import Any

from tidegate.observe.histogram import Histogram

GC_PAUSE_BUCKETS_S = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class GcStats:
    __slots__ = ("collections", "pause_s_total", "pause_s_max", "pauses", "_t0")

    def __init__(self) -> None:
        self.pauses = Histogram(GC_PAUSE_BUCKETS_S)
        self.collections = [0, 0, 0]
        self.pause_s_total = 0.0
        self.pause_s_max = 0.0
        self._t0 = 0.0

    def callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        pause = time.perf_counter() - self._t0
        self.collections[info["generation"]] += 1
        self.pause_s_total += pause
        self.pauses.observe(pause)
        if pause > self.pause_s_max:
            self.pause_s_max = pause


def release_free_heap() -> bool:
    """Give the heap's free pages back to the kernel (glibc ``malloc_trim(0)``); False where
    there is no such call (another libc).

    After boot a worker holds a few MB that imports freed (2.3 MB measured for the gateway),
    which its first connections would reuse without growing: the worker's RSS would say less
    than what its connections use, by how much depending on what the boot allocated (a traced
    worker's SDK fills that space, an untraced one's does not). Trimmed, the RSS is what is in
    use, the same for every configuration."""
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own symbols: libc is loaded
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


def configure(gen0_threshold: int) -> GcStats:
    """Freeze what start-up allocated, raise the young threshold and give the heap's free
    pages back. Call after boot."""
    stats = GcStats()
    gc.collect()
    gc.freeze()
    release_free_heap()
    _, g1, g2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, max(g1, 20), max(g2, 10))
    gc.callbacks.append(stats.callback)
    return stats
