"""A bounded pool for work that must leave the event loop (DNS, file I/O, CPU-heavy auth).

A hard cap on threads (Go's ``debug.SetMaxThreads``) and on waiting callers: past them a
caller gets :class:`Overloaded` at once, or after its deadline, never an unbounded pile of
threads or futures. Occupancy and rejections are counted for /metrics.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class Overloaded(Exception):
    """The blocking pool is full, or the call waited past its deadline for a thread."""


class BlockingPool:
    def __init__(self, max_threads: int = 8, max_waiting: int = 64,
                 default_timeout_s: float = 5.0) -> None:
        self.max_threads = max_threads
        self.max_waiting = max_waiting
        self.default_timeout_s = default_timeout_s
        self._executor = concurrent.futures.ThreadPoolExecutor(max_threads, "tidegate-blocking")
        self._slots: asyncio.Semaphore | None = None
        self.busy = 0
        self.waiting = 0
        self.rejections = 0
        self.completed = 0

    async def run(self, fn: Callable[..., T], *args: Any, timeout_s: float | None = None) -> T:
        """Run ``fn(*args)`` on a pool thread; the deadline covers waiting and running."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_threads)
        if self.busy >= self.max_threads and self.waiting >= self.max_waiting:
            self.rejections += 1
            raise Overloaded(f"{self.busy} running and {self.waiting} waiting")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.default_timeout_s if timeout_s is None else timeout_s)
        self.waiting += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), max(0.0, deadline - loop.time()))
        except TimeoutError:
            self.rejections += 1
            raise Overloaded("no thread free before the deadline") from None
        finally:
            self.waiting -= 1
        self.busy += 1
        try:
            fut = loop.run_in_executor(self._executor, fn, *args)
            try:
                return await asyncio.wait_for(fut, max(0.0, deadline - loop.time()))
            except TimeoutError:
                self.rejections += 1
                raise Overloaded("the call ran past its deadline") from None
        finally:
            self.busy -= 1
            self.completed += 1
            self._slots.release()

    def stats(self) -> dict[str, int]:
        return {"busy": self.busy, "waiting": self.waiting, "rejections": self.rejections,
                "completed": self.completed, "max_threads": self.max_threads}

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
