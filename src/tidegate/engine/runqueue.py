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

**Long jobs and the node's CPU gate** (engine/cpu_gate.py): with a gate (``use_gate``), a job
that has taken ``long_after_steps`` steps is *long* and moves to a second deque, run only while
the worker holds one of the node's tokens; the queue asks for one when it has long jobs and
gives it back when they are done (or after ``cpu_gate.HOLD_S``, asking again). Short jobs - and
every job's first steps - run as before. Without a gate every job is short.

``slice_ms <= 0`` turns slicing off: a job runs to its end inside ``submit`` (the behaviour
before the queue existed, kept for comparison: ``--slice-ms 0``).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from tidegate import log

if TYPE_CHECKING:
    from tidegate.engine.cpu_gate import GateClient

__all__ = ["JobHandle", "RunQueue"]

_log = log.get("runqueue")
_clock = time.perf_counter
# Steps a job takes before it is long and waits for the CPU gate: 8 fan-out steps are 128
# writes (~2.5 ms of CPU); fan-outs under fanout_chunk_subscribers never come here at all.
LONG_AFTER_STEPS = 8

# JobHandle.state
QUEUED = 0
DONE = 1
FAILED = 2
CANCELLED = 3


class JobHandle:
    """A submitted job: its state, ``cancel()``, and ``wait()`` for whoever needs its end."""

    __slots__ = ("it", "name", "state", "steps", "_q", "_fut")

    def __init__(self, it: Iterator[Any], name: str, q: RunQueue) -> None:
        self.it = it
        self.name = name
        self.state = QUEUED
        self.steps = 0
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
        "slice_s", "check_every", "_loop", "_jobs", "_long", "_current", "_scheduled",
        "gate", "long_after_steps", "submitted", "jobs_done", "jobs_failed", "jobs_cancelled",
        "slices", "steps", "longest_slice_s", "depth_max", "long_jobs",
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
        self._long: collections.deque[JobHandle] = collections.deque()  # wait for the gate
        self.gate: GateClient | None = None
        self.long_after_steps = LONG_AFTER_STEPS
        self.long_jobs = 0  # jobs that became long
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
        return len(self._jobs) + len(self._long) + (self._current is not None)

    def use_gate(self, gate: GateClient | None) -> None:
        """Run long jobs only while holding one of ``gate``'s tokens (None: no gate; jobs that
        were waiting run as short ones, a token held or asked for goes back)."""
        old = self.gate
        if old is not None:
            old.on_grant = old.give_back
            old.give_back()
        self.gate = gate
        if gate is not None:
            gate.on_grant = self._granted
            if self._long:
                gate.ask()
        elif self._long:
            self._jobs.extend(self._long)
            self._long.clear()
            self._schedule()

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
        handles = [*self._jobs, *self._long]
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
            "long_jobs": self.long_jobs,
            "long_waiting": len(self._long),
            **({"gate": self.gate.stats()} if self.gate is not None else {}),
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
        gate = self.gate
        try:
            while jobs:
                h = jobs.popleft()
                self._current = h
                self._turn(h, every)
                self._current = None
                if _clock() >= deadline:
                    break
            long = self._long
            if gate is not None and gate.held:
                while long and _clock() < deadline:
                    h = long.popleft()
                    self._current = h
                    self._turn(h, every)
                    self._current = None
        finally:
            self._current = None
            took = _clock() - start
            self.slices += 1
            if took > self.longest_slice_s:
                self.longest_slice_s = took
            if gate is not None:
                self._gate_turn(gate)
            if jobs or (self._long and gate is not None and gate.held):
                self._schedule()  # after the I/O and timers that are due now

    def _gate_turn(self, gate: GateClient) -> None:
        """After a slice: ask for a token for the long jobs, give it back when they are done
        or it was held ``HOLD_S`` (and ask again, at the back of the line)."""
        if not self._long:
            gate.give_back()
        elif not gate.held:
            gate.ask()
        elif gate.held_too_long(time.monotonic()):
            gate.gave_back_early += 1
            gate.give_back()
            gate.ask()

    def _granted(self) -> None:
        gate = self.gate
        if gate is None:
            return
        if self._long:
            self._schedule()
        else:  # the long jobs ended (cancelled) while we waited
            gate.give_back()

    def _turn(self, h: JobHandle, steps: int) -> None:
        """Run up to ``steps`` steps of ``h``; put it back at the end if it goes on (of the
        long jobs' deque once it has taken ``long_after_steps``, when there is a gate)."""
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
            h.steps += n
        if h.state == CANCELLED:
            self._close(h)
        elif self.gate is not None and h.steps >= self.long_after_steps:
            if h.steps - n < self.long_after_steps:
                self.long_jobs += 1
            self._long.append(h)
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
        for dq in (self._jobs, self._long):
            try:
                dq.remove(h)
                break
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
