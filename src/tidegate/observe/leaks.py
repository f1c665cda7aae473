"""Task and connection leak report, dumped to the log on SIGUSR1.

:class:`TaskTracker` installs a task factory that notes, for each task, when it was created
(``time.monotonic()``) and where: the first frame outside asyncio and this package, found by
walking ``sys._getframe`` a few frames up (no ``traceback.extract_stack``, no source lookup;
the site is kept as a code object and an instruction offset, and turned into ``file:line`` only
in a report). The notes live in a dict keyed by weak references that remove their own entry,
so they go when their task goes. :meth:`TaskTracker.leak_report` lists the tasks still alive
past an age: name, age, creation site, the coroutine, and where it is suspended now.
:func:`stale_items` lists connections silent past a deadline, and :func:`install_sigusr1`
logs a report on SIGUSR1.

Cost (CPython 3.11, 2 shared vCPUs, best of many 2,000-task rounds): the factory adds ~1.0 us
per task (0.25 us for calling a Python factory at all, 0.3 us finding the site, 0.4 us
recording it) to a task that costs ~1.7 us to create: ``loop.create_task`` on uvloop went
from 1.55 to 2.65 us, ``asyncio.create_task`` from 2.1 to 3.6 us. The connection path
(``Conn``) creates no tasks, so per connection and per message it costs nothing (handoff mode
makes one task per adopted socket: +1 us per accept). A report walks every live task.
:func:`stale_items` with a Python ``deadline_fn`` takes 6.5 ms for a worker's 18,000
connections (0.4 s for 500,000): loop time, so run it on demand (SIGUSR1), never periodically.

Wiring:
    Worker.serve, once the loop runs and before ``h.on_boot(self)`` (so handlers' tasks are
    tracked; tasks that exist already are noted as created at install, site "(before
    tracking)")::

        from tidegate.observe import leaks
        self.tasks = leaks.TaskTracker()
        self.tasks.install(self.loop)
        self._leak_dump_off = leaks.install_sigusr1(self.loop, self.leak_report)

    Worker.leak_report (a new method; ``self.wheel.now`` and ``c._last_rx`` count ticks)::

        def leak_report(self) -> dict[str, Any]:
            o = self.opts
            return {
                "worker": self.index,
                "tasks": self.tasks.leak_report(min_age_s=60.0),
                "stale_connections": leaks.stale_items(
                    self.connections(), self.wheel.now,
                    lambda c, now: ((now - c._last_rx) * o.tick_s, c),
                    max_age_s=o.ping_interval_s + o.pong_timeout_s + 2 * o.tick_s,
                    describe=lambda c: str(c.remote_addr),   # only for the rows kept
                ),
            }

    Worker._shutdown: ``self._leak_dump_off(); self.tasks.uninstall()``.

    Supervisor (SIGUSR1's default action kills a process: the supervisor must catch and
    forward it, and a freshly forked worker must ignore it until its loop handler is in)::

        Supervisor.run:       signal.signal(signal.SIGUSR1, self._on_usr1)
        Supervisor._on_usr1:  for slot in self.slots: if slot.pid: _kill(slot.pid, signal.SIGUSR1)
        Supervisor._in_child: signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    Then ``kill -USR1 <supervisor pid>`` makes every worker log one ``tidegate.leaks``
    warning "leak report" with ``extra={"report": ...}``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
import weakref
from collections.abc import Callable, Iterable
from types import CodeType, FrameType
from typing import Any, TypeVar

T = TypeVar("T")
TaskFactory = Callable[..., "asyncio.Future[Any]"]
_Born = tuple[float, CodeType | None, int]

# Frames in these directories are skipped when looking for where a task was created.
_SKIP_DIRS = (
    os.path.dirname(asyncio.__file__) + os.sep,
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
)
_BEFORE = "(before tracking)"
# Module globals: the factory runs once per task.
_Task = asyncio.Task
_getframe = sys._getframe
_monotonic = time.monotonic
_ref = weakref.ref


class TaskTracker:
    """Notes each task's creation time and site through the loop's task factory."""

    def __init__(self) -> None:
        # weakref(task) -> (created, code object creating it or None, its f_lasti). A plain
        # dict whose weakrefs remove their own entry: half the cost of a WeakKeyDictionary.
        self._born: dict[weakref.ref[asyncio.Future[Any]], _Born] = {}
        self._drop = self._born.pop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._prev: TaskFactory | None = None
        self.created_total = 0

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Become ``loop``'s task factory (wrapping any factory already set)."""
        if self._loop is not None:
            raise RuntimeError("already installed")
        self._loop = loop
        self._prev = loop.get_task_factory()
        now = time.monotonic()
        for task in asyncio.all_tasks(loop):
            self._born.setdefault(weakref.ref(task, self._drop), (now, None, 0))
        loop.set_task_factory(self._factory)

    def uninstall(self) -> None:
        if self._loop is not None:
            self._loop.set_task_factory(self._prev)
            self._loop = None

    def _factory(
        self, loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any
    ) -> asyncio.Future[Any]:
        prev = self._prev
        task = prev(loop, coro, **kwargs) if prev else _Task(coro, loop=loop, **kwargs)
        f: FrameType | None = _getframe(1)
        while f is not None and f.f_code.co_filename.startswith(_SKIP_DIRS):
            f = f.f_back
        # f_lasti, not f_lineno: O(1); the line is looked up from it in a report.
        born = (_monotonic(), None, 0) if f is None else (_monotonic(), f.f_code, f.f_lasti)
        self._born[_ref(task, self._drop)] = born
        self.created_total += 1
        return task

    def site(self, task: asyncio.Future[Any]) -> str | None:
        """``file:line in function`` where ``task`` was created (None if not tracked)."""
        born = self._born.get(weakref.ref(task))
        return None if born is None else _site(born[1], born[2])

    def leak_report(
        self, min_age_s: float, limit: int | None = 100, include_untracked: bool = False
    ) -> list[dict[str, Any]]:
        """Tasks alive for at least ``min_age_s``, oldest first (at most ``limit``).

        Each: ``name``, ``age_s``, ``created_at`` (``file:line in function``), ``coro``
        (its qualified name), ``frame`` (``task.get_stack(limit=1)``: the task's coroutine
        and the line it is suspended on) and ``awaiting`` (the innermost awaited coroutine's
        line). Tasks made without the factory (``asyncio.Task(...)`` directly) come only
        with ``include_untracked``, with ``age_s`` None.
        """
        loop = self._loop
        if loop is None:
            return []
        now = time.monotonic()
        current = asyncio.current_task(loop)
        rows: list[dict[str, Any]] = []
        for task in asyncio.all_tasks(loop):
            if task is current:
                continue
            born = self._born.get(weakref.ref(task))
            if born is None:
                if not include_untracked:
                    continue
                age = None
            else:
                age = now - born[0]
                if age < min_age_s:
                    continue
            stack = task.get_stack(limit=1)
            coro = task.get_coro()
            rows.append(
                {
                    "name": task.get_name(),
                    "age_s": None if age is None else round(age, 3),
                    "created_at": _site(born[1], born[2]) if born else None,
                    "coro": getattr(coro, "__qualname__", repr(coro)),
                    "frame": _frame_site(stack[0]) if stack else None,
                    "awaiting": _awaiting(coro),
                }
            )
        rows.sort(key=lambda r: -1.0 if r["age_s"] is None else r["age_s"], reverse=True)
        return rows if limit is None else rows[:limit]

    def stats(self) -> dict[str, int]:
        return {"tasks_created": self.created_total, "tasks_tracked": len(self._born)}


def stale_items(
    items: Iterable[T],
    now: float,
    deadline_fn: Callable[[T, float], tuple[float, Any] | None],
    max_age_s: float,
    limit: int | None = 100,
    describe: Callable[[Any], Any] | None = None,
) -> list[dict[str, Any]]:
    """Items (connections) with no traffic for longer than ``max_age_s``, most silent first.

    ``deadline_fn(item, now)`` returns ``(last_rx_age_s, where)`` (``where``: the remote
    address, a creation site, anything JSON-safe) or None to skip the item. Each row:
    ``{"silent_s": ..., "where": ...}``. ``now`` is only passed through, in the caller's units.
    With ``describe``, ``where`` becomes ``describe(where)``, called only for the rows returned:
    let ``deadline_fn`` return the item itself and ``describe`` look up its address, so the
    scan over every connection stays one call and one tuple per item.
    """
    found: list[tuple[float, Any]] = []
    for item in items:
        got = deadline_fn(item, now)
        if got is not None and got[0] > max_age_s:
            found.append(got)
    found.sort(key=lambda r: r[0], reverse=True)
    if limit is not None:
        del found[limit:]
    return [
        {"silent_s": round(age, 3), "where": where if describe is None else describe(where)}
        for age, where in found
    ]


def install_sigusr1(
    loop: asyncio.AbstractEventLoop,
    report_fn: Callable[[], Any],
    logger: logging.Logger | None = None,
    signum: int = signal.SIGUSR1,
) -> Callable[[], None]:
    """On ``signum``, log ``report_fn()`` as one warning; returns the function that uninstalls
    (and puts back the signal's previous disposition).

    The log line: ``tidegate.leaks`` warning "leak report", ``extra={"report": report}``.
    ``loop.add_signal_handler`` needs the main thread (a worker's loop runs there).
    """
    log = logger or logging.getLogger("tidegate.leaks")
    prev = signal.getsignal(signum)

    def dump() -> None:
        try:
            report = report_fn()
        except Exception:
            log.exception("leak report failed")
            return
        log.warning("leak report", extra={"report": report})

    loop.add_signal_handler(signum, dump)

    def uninstall() -> None:
        loop.remove_signal_handler(signum)
        # uvloop keeps its own handler when the loop is not running, and either loop resets
        # to SIG_DFL: put back what was there (SIG_IGN in a freshly forked worker).
        signal.signal(signum, signal.SIG_DFL if prev is None else prev)

    return uninstall


def _site(code: CodeType | None, lasti: int) -> str:
    if code is None:
        return _BEFORE
    line = next((ln for start, end, ln in code.co_lines() if start <= lasti < end), None)
    return f"{code.co_filename}:{line or code.co_firstlineno} in {code.co_name}"


def _frame_site(f: FrameType) -> str:
    return f"{f.f_code.co_filename}:{f.f_lineno} in {f.f_code.co_name}"


def _awaiting(coro: Any) -> str | None:
    """The innermost suspended coroutine/generator frame under ``coro``."""
    found = None
    for _ in range(100):  # a bound, not a limit a real await chain reaches
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            break
        found = frame
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        if coro is None:
            break
    return None if found is None else _frame_site(found)
