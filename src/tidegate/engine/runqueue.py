"""A worker's run queue: long jobs in budgeted slices, so the loop keeps turning.

A *job* is an iterator whose every ``next()`` does a small, bounded amount of work - a chunk of
a fan-out (16 writes), a batch of a drain - and whose end (``StopIteration``) is the job's end.
The queue runs its jobs until ``slice_ms`` of wall time has passed, then hands the loop back
with ``loop.call_soon``: the I/O callbacks and timers that became due meanwhile (heartbeats,
accepts, API requests) run before the next slice. Nothing is a task and nothing is per
connection: one deque of jobs and at most one pending ``call_soon`` per worker.

Scheduling is **round-robin**: each job gets ``check_every`` steps, then goes to the back of the
queue. FIFO would let an 18k-subscriber broadcast hold up a 300-subscriber channel's (or a
drain batch) for its whole length; round-robin lets a short job finish in its first turn. No
order between jobs is promised: callers that need one (the hub's publications of one channel)
keep it inside a single job. The clock is read once per ``check_every`` steps, not per step:
a slice overruns ``slice_ms`` by at most that many steps.

A job that raises is logged and dropped; the queue and the other jobs go on. ``cancel()``
drops a job (a generator is closed, so its ``finally`` runs).

``slice_ms <= 0`` turns slicing off: a job runs to its end inside ``submit`` (the behaviour
before the queue existed, kept for comparison: ``--slice-ms 0``).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Iterator
from typing import Any

from tidegate import log

__all__ = ["JobHandle", "RunQueue"]

_log = log.get("runqueue")
_clock = time.perf_counter

# JobHandle.state
QUEUED = 0
DONE = 1
FAILED = 2
CANCELLED = 3


class JobHandle:
    """A submitted job: its state, ``cancel()``, and ``wait()`` for whoever needs its end."""

    __slots__ = ("it", "name", "state", "_q", "_fut")

    def __init__(self, it: Iterator[Any], name: str, q: RunQueue) -> None:
        self.it = it
        self.name = name
        self.state = QUEUED
        self._q = q
        self._fut: asyncio.Future[None] | None = None  # made only when someone waits

    @property
    def done(self) -> bool:
        return self.state != QUEUED

    def cancel(self) -> bool:
        """Drop the job (if it has not ended); True when it was dropped."""
        if self.state != QUEUED:
            return False
        self._q._cancel(self)
        return True

    def wait(self) -> asyncio.Future[None]:
        """A future resolved when the job ends (cancelled if it is, the job's error if it
        raised)."""
        fut = self._fut
        if fut is None:
            fut = self._fut = asyncio.get_running_loop().create_future()
            if self.state != QUEUED:
                self._resolve(None)
        return fut

    def _resolve(self, exc: BaseException | None) -> None:
        fut = self._fut
        if fut is None or fut.done():
            return
        if self.state == CANCELLED:
            fut.cancel()
        elif exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(None)


class RunQueue:
    """One per worker (``worker.runqueue``); see the module doc."""

    __slots__ = (
        "slice_s", "check_every", "_loop", "_jobs", "_current", "_scheduled",
        "submitted", "jobs_done", "jobs_failed", "jobs_cancelled", "slices", "steps",
        "longest_slice_s", "depth_max",
    )

    def __init__(
        self,
        slice_ms: float = 5.0,
        check_every: int = 2,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.slice_s = max(0.0, slice_ms) / 1000.0
        self.check_every = max(1, check_every)
        self._loop = loop  # None: the running loop, looked up when a slice is scheduled
        self._jobs: collections.deque[JobHandle] = collections.deque()
        self._current: JobHandle | None = None
        self._scheduled = False
        self.submitted = 0
        self.jobs_done = 0
        self.jobs_failed = 0
        self.jobs_cancelled = 0
        self.slices = 0
        self.steps = 0
        self.longest_slice_s = 0.0
        self.depth_max = 0

    @property
    def enabled(self) -> bool:
        """Slicing is on (``slice_ms > 0``); off, jobs run to their end when submitted."""
        return self.slice_s > 0

    @property
    def depth(self) -> int:
        """Jobs not ended yet (the one running included)."""
        return len(self._jobs) + (self._current is not None)

    def submit(self, job: Iterator[Any], name: str = "job") -> JobHandle:
        """Queue ``job`` (run inline at once when slicing is off)."""
        h = JobHandle(job, name, self)
        self.submitted += 1
        if not self.enabled:
            self._run_inline(h)
            return h
        self._jobs.append(h)
        if len(self._jobs) > self.depth_max:
            self.depth_max = len(self._jobs)
        self._schedule()
        return h

    def cancel_all(self) -> int:
        """Drop every queued job; returns how many."""
        handles = list(self._jobs)
        for h in handles:
            h.cancel()
        return len(handles)

    def stats(self) -> dict[str, Any]:
        return {
            "slice_ms": self.slice_s * 1000.0,
            "depth": self.depth,
            "depth_max": self.depth_max,
            "jobs_submitted": self.submitted,
            "jobs_done": self.jobs_done,
            "jobs_failed": self.jobs_failed,
            "jobs_cancelled": self.jobs_cancelled,
            "slices": self.slices,
            "steps": self.steps,
            "longest_slice_ms": round(self.longest_slice_s * 1000.0, 3),
        }

    # ---- running ----------------------------------------------------------------------
    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            loop = self._loop or asyncio.get_running_loop()
            loop.call_soon(self._slice)

    def _slice(self) -> None:
        self._scheduled = False
        jobs = self._jobs
        every = self.check_every
        start = _clock()
        deadline = start + self.slice_s
        try:
            while jobs:
                h = jobs.popleft()
                self._current = h
                self._turn(h, every)
                self._current = None
                if _clock() >= deadline:
                    break
        finally:
            self._current = None
            took = _clock() - start
            self.slices += 1
            if took > self.longest_slice_s:
                self.longest_slice_s = took
            if jobs:
                self._schedule()  # after the I/O and timers that are due now

    def _turn(self, h: JobHandle, steps: int) -> None:
        """Run up to ``steps`` steps of ``h``; put it back at the end if it goes on."""
        it = h.it
        n = 0
        try:
            while n < steps:
                next(it)
                n += 1
                if h.state == CANCELLED:  # it cancelled itself
                    break
        except StopIteration:
            self._end(h, DONE, None)
            return
        except Exception as exc:
            self._failed(h, exc)
            return
        finally:
            self.steps += n
        if h.state == CANCELLED:
            self._close(h)
        else:
            self._jobs.append(h)

    def _run_inline(self, h: JobHandle) -> None:
        prev, self._current = self._current, h  # (a job may submit another one)
        start = _clock()
        try:
            for _ in h.it:
                self.steps += 1
                if h.state == CANCELLED:
                    self._close(h)
                    return
        except Exception as exc:
            self._failed(h, exc)
            return
        finally:
            self._current = prev
            took = _clock() - start
            if took > self.longest_slice_s:
                self.longest_slice_s = took
        self._end(h, DONE, None)

    def _failed(self, h: JobHandle, exc: Exception) -> None:
        _log.exception("run-queue job failed", extra={"job": h.name})
        self._end(h, FAILED, exc)

    def _end(self, h: JobHandle, state: int, exc: BaseException | None) -> None:
        if h.state == CANCELLED:  # it cancelled itself, then ended or raised
            h._resolve(None)
            return
        h.state = state
        if state == DONE:
            self.jobs_done += 1
        else:
            self.jobs_failed += 1
        h._resolve(exc)

    def _cancel(self, h: JobHandle) -> None:
        h.state = CANCELLED
        self.jobs_cancelled += 1
        if h is self._current:
            return  # running now (it cancelled itself): closed when its step returns
        try:
            self._jobs.remove(h)
        except ValueError:
            pass
        self._close(h)

    def _close(self, h: JobHandle) -> None:
        close = getattr(h.it, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                _log.exception("closing a cancelled run-queue job failed", extra={"job": h.name})
        h._resolve(None)
