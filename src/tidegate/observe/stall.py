"""Loop-stall detector: a loop-side heartbeat, a watchdog thread, and a loop-lag histogram.

The loop side is ONE timer per worker: a ``loop.call_later(tick_s)`` chain whose callback
notes when the next beat is due and records how late it ran (the loop lag) in a fixed-bucket
:class:`~tidegate.observe.histogram.Histogram` (1 ms .. 10 s). A daemon watchdog thread sleeps
until the beat now due would be ``threshold_ms`` late; if by then the beat has run, it sleeps
again until the next one would be; if not, the loop is stuck in one callback, so the thread
samples the loop thread's Python stack
(``sys._current_frames()``) and reports the stall once: a ``tidegate.stall`` warning
``"loop stall"`` with ``stall_ms`` (so far), ``stack`` and ``gc_ms``, and ``stalls_total`` +1.
When the loop turns again the late beat logs ``"loop stall ended"`` with the stall's total
duration (``stall_ms``: how late the beat ran; resolution ``tick_s``) and updates the longest
stall.

``gc_ms`` is the cyclic GC time since the last beat (a ``gc.callbacks`` hook adds it up). When
it is most of ``stall_ms`` the collector made the stall, and the stack only shows whichever
code allocated when the collection began. More generally a stall spent inside one C call that
holds the GIL (a full GC, a huge ``json.dumps``, a regex) keeps the watchdog thread from
running too: it samples just after the call returns, so the stack points at the caller, one
line on. If the loop turns before the watchdog gets to sample, the late beat still counts the
stall and logs it as ``"loop stall"`` with ``stack: null``. Every stall is counted once.

Cost (CPython 3.11, uvloop, 2 shared vCPUs): one beat (timer callback, lock, histogram update,
``call_later`` re-arm) ~2 us of Python, but waking a sleeping process costs ~70-100 us of CPU
on this virtual machine, so what counts is wakes a second: 10 beats (``tick_s=0.1``) and ~4
watchdog wakes (``threshold_ms=200``). An idle worker costs 2.8 ms of CPU a second with it,
1.0 without; 4.9 when the watchdog polled at threshold/4 and the beat ran every 50 ms
(``bench/results/2026-11-27-idle-worker-cpu-stall-detector.json``). The GC hook adds
~0.3 us per collection. Nothing runs per connection or per message.

Wiring:
    Worker.serve, once the loop runs (in the worker, after fork: threads do not survive
    fork, so never start one in the supervisor)::

        from tidegate.observe.stall import StallDetector
        self.stall = StallDetector(self.loop, threshold_ms=200)
        self.stall.start()

    Worker.stats()::

        out["stall"] = self.stall.stats()    # JSON-safe dict: stalls_total, stall_longest_ms,
                                             # stall_ongoing_ms, loop_lag_max_ms, loop_lag (a
                                             # Histogram snapshot: bounds, counts, sum)

    Worker._shutdown()::

        self.stall.stop()

    observe/metrics.py, TidegateCollector.collect (a histogram per worker, like gc_pause)::

        yield _histogram("tidegate_loop_lag_seconds", "How late the loop ran a due timer.",
                         [(i, s.get("stall", {}).get("loop_lag", {})) for i, s in w])
        # plus counters from s["stall"]["stalls_total"] (tidegate_loop_stalls) and a gauge
        # from s["stall"]["stall_longest_ms"]; across workers: Histogram.merge / .quantile
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import threading
import time
import traceback
from typing import Any

from tidegate.observe.histogram import Histogram

# Prometheus' default upper bounds from 1 ms (seconds); Histogram adds a last +Inf bucket.
LAG_BOUNDS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class StallDetector:
    """Watch one event loop for callbacks that keep it from turning (see the module doc)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        threshold_ms: float = 200.0,
        tick_s: float = 0.1,
        logger: logging.Logger | None = None,
    ) -> None:
        if threshold_ms <= 0 or tick_s <= 0:
            raise ValueError("threshold_ms and tick_s must be > 0")
        self.loop = loop
        self.threshold_s = threshold_ms / 1000.0
        self.tick_s = tick_s
        self.min_sleep_s = 0.001  # the watchdog's shortest sleep (it wakes when a beat is overdue)
        self.lag = Histogram(LAG_BOUNDS)  # how late each beat ran, seconds
        self.lag_max_s = 0.0
        self.stalls_total = 0
        self.longest_stall_s = 0.0
        self._log = logger or logging.getLogger("tidegate.stall")
        self._lock = threading.Lock()  # beat vs watchdog: taken 1/tick, never per connection
        self._due = 0.0  # time.monotonic() the next beat is due; 0 = not beating
        self._reported = 0.0  # the _due of the stall the watchdog reported (until it ends)
        self._loop_tid = 0
        self._gc_s = 0.0  # cyclic GC time so far (the gc hook adds each collection)
        self._gc_t0 = 0.0
        self._gc_s_at_beat = 0.0  # _gc_s when the last beat ran
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
        gc.callbacks.append(self._on_gc)
        self.loop.call_soon_threadsafe(self._arm)
        self._thread = threading.Thread(
            target=self._watch, name="tidegate-stall-watchdog", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the watchdog thread and the beat."""
        self._running = False
        self._stop.set()
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
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
            "loop_lag_max_ms": round(self.lag_max_s * 1000, 1),
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
            self._gc_s_at_beat = self._gc_s
        if lag > 0.0:
            self.lag.observe(lag)
            if lag > self.lag_max_s:
                self.lag_max_s = lag
        else:
            self.lag.observe(0.0)
        if self._running:
            self._handle = self.loop.call_later(self.tick_s, self._beat)

    def _stall_ended(self, lag: float, reported: bool) -> None:
        """Under the lock, on the loop thread: the beat ran ``lag`` seconds late."""
        if lag > self.longest_stall_s:
            self.longest_stall_s = lag
        extra: dict[str, Any] = {"stall_ms": round(lag * 1000, 1), "gc_ms": self._gc_ms()}
        if reported:
            self._reported = 0.0
            self._log.warning("loop stall ended", extra=extra)
        else:  # the watchdog did not get to sample it (a C call held the GIL throughout)
            self.stalls_total += 1
            self._log.warning("loop stall", extra={**extra, "stack": None, "ended": True})

    def _gc_ms(self) -> float:
        """Cyclic GC time since the last beat, a collection still running included."""
        t0 = self._gc_t0
        running = time.perf_counter() - t0 if t0 else 0.0
        return round((self._gc_s - self._gc_s_at_beat + running) * 1000, 1)

    def _on_gc(self, phase: str, _info: dict[str, Any]) -> None:
        """A ``gc.callbacks`` hook (runs on whichever thread collects)."""
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        elif self._gc_t0:
            self._gc_s += time.perf_counter() - self._gc_t0
            self._gc_t0 = 0.0

    # ---- the watchdog thread --------------------------------------------------------
    def _watch(self) -> None:
        # Asleep until the beat now due would be overdue, not polling: every wake of an idle
        # worker costs ~70-100 us of CPU on a virtual machine, and polling at threshold/4
        # made this thread most of an idle worker's CPU. Each wake finds the beat moved on
        # (due later) and sleeps again: ~1 wake per threshold while the loop is healthy.
        while not self._stop.wait(self._until_overdue()):
            try:
                self._check()
            except Exception:  # never let the watchdog die silently
                self._log.exception("stall watchdog failed")

    def _until_overdue(self) -> float:
        due = self._due
        if not due or due == self._reported:  # not beating, or this stall already reported
            return self.threshold_s
        return max(due + self.threshold_s - time.monotonic(), self.min_sleep_s)

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
            extra = {"stall_ms": round(overdue * 1000, 1), "stack": stack, "gc_ms": self._gc_ms()}
            self._log.warning("loop stall", extra=extra)

    def _sample(self, limit: int = 60) -> str | None:
        frame = sys._current_frames().get(self._loop_tid)
        if frame is None:
            return None
        return "".join(traceback.format_stack(frame, limit=limit))
