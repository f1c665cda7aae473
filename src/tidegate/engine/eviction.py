"""L3 liveness: a per-worker eviction controller fed by the worker's own measurements.

Every ``eviction_tick_s`` (run from the worker's tick: no timer or task of its own, nothing per
connection) the controller measures its worker: connections not already closing, resident
memory (``/proc/self/statm``), CPU (``os.times``, % of one core over the last tick), loop lag
(p99 of the stall detector's beats over the last tick) and output queued in user space. Each
has a ceiling (0 = not watched). Above one, the worker *sheds*: at most
``eviction_max_fraction_per_tick`` of its connections per tick, least valuable first, until
every measurement is back under ``eviction_resume_fraction`` of its ceiling (hysteresis: it
does not flap around the ceiling). For connections alone the excess is known exactly, so it
sheds just that many.

Who goes first is the handler's call (:meth:`EventHandler.eviction_rank`: the smallest rank
first, None = protected), so the engine stays protocol-agnostic; the default ranks by idle
time. A victim is told to come back later (:meth:`EventHandler.evict`, with the delay hint) and
its close counts as ``evicted``. ``eviction_dry_run`` logs what would go and counts it, closes
nothing.

Choosing victims ranks every connection of the worker (one handler call each, only on a tick
above a ceiling) and keeps the ``n`` smallest with ``heapq.nsmallest``: O(N log n), no sort of
all N.

The evictions themselves are a job of the worker's run queue (engine/runqueue.py, like the
drain's goodbyes and the hub's big fan-outs), ``EVICT_STEP`` per step: a batch of thousands
(a disconnect push and a close each) never holds the loop longer than a slice, heartbeats and
accepts run in between. The tick marks its victims ``EVICTING`` at once: a later tick neither
picks them again nor counts them among the connections it measures (they are on their way
out, like closing ones), and work stealing does not move them. When its turn comes, each victim
is looked at again: gone, closing or protected meanwhile, it is left alone; once the worker
drains, the drain's goodbye replaces the eviction.
"""

from __future__ import annotations

import collections
import heapq
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from tidegate import log
from tidegate.engine.conn import CLOSING, EVICTING, Conn
from tidegate.observe import trace
from tidegate.observe.histogram import Histogram

if TYPE_CHECKING:
    from tidegate.engine.options import EngineOptions
    from tidegate.engine.worker import Worker

__all__ = ["Ceilings", "EvictionController", "Measurements", "Plan", "plan", "select"]

_log = log.get("eviction")
T = TypeVar("T")
LOG_SAMPLE = 5  # victims described per log line (the rest are counted)
EVICT_STEP = 8  # evictions per run-queue step (a gateway one is a disconnect push and a close)


@dataclass(frozen=True, slots=True)
class Ceilings:
    """One worker's ceilings; 0 = not watched."""

    connections: int = 0
    rss_bytes: int = 0
    cpu_percent: float = 0.0
    loop_lag_ms: float = 0.0
    write_buffer_bytes: int = 0

    @classmethod
    def for_worker(cls, opts: EngineOptions, workers_total: int) -> Ceilings:
        """Node-wide ceilings split evenly over the workers; CPU and lag are per process."""
        n = max(1, workers_total)
        return cls(
            connections=_share(opts.eviction_max_connections, n),
            rss_bytes=_share(opts.eviction_max_rss_bytes, n),
            cpu_percent=opts.eviction_max_cpu_percent,
            loop_lag_ms=opts.eviction_max_loop_lag_ms,
            write_buffer_bytes=_share(opts.eviction_max_write_buffer_bytes, n),
        )

    @property
    def enabled(self) -> bool:
        return any(v > 0 for v in asdict(self).values())


def _share(node_total: int, workers: int) -> int:
    return -(-node_total // workers) if node_total > 0 else 0


@dataclass(slots=True)
class Measurements:
    connections: int = 0
    rss_bytes: int = 0
    cpu_percent: float = 0.0
    loop_lag_ms: float = 0.0
    write_buffer_bytes: int = 0


def pressure(m: Measurements, c: Ceilings) -> dict[str, float]:
    """measurement / ceiling for every watched resource (1.0 = at the ceiling)."""
    out: dict[str, float] = {}
    for name, ceiling in asdict(c).items():
        if ceiling > 0:
            out[name] = getattr(m, name) / ceiling
    return out


class Plan(NamedTuple):
    shedding: bool  # above a ceiling, or not yet back under the resume level
    shed: int  # connections to shed this tick
    over: tuple[str, ...]  # resources above their ceiling
    above_resume: tuple[str, ...]  # resources above resume_fraction of their ceiling


def plan(
    m: Measurements,
    c: Ceilings,
    shedding: bool,
    resume_fraction: float,
    max_fraction: float,
) -> Plan:
    """What one tick does (sans-I/O). Starts above a ceiling, keeps going until everything is
    under ``resume_fraction`` of its ceiling, never sheds more than ``max_fraction``."""
    ratios = pressure(m, c)
    over = tuple(k for k, r in ratios.items() if r > 1.0)
    above = tuple(k for k, r in ratios.items() if r > resume_fraction)
    if not above or not (shedding or over):
        return Plan(False, 0, over, above)
    count = max(1, int(m.connections * max_fraction))
    if above == ("connections",):  # the one resource whose excess is known exactly
        count = min(count, m.connections - int(c.connections * resume_fraction))
    return Plan(True, max(0, count), over, above)


def _first(item: tuple[Any, Any]) -> Any:
    return item[0]


def select(items: Iterable[T], rank: Callable[[T], tuple[Any, ...] | None], n: int) -> list[T]:
    """The ``n`` items with the smallest rank (None = never), least valuable first."""
    if n <= 0:
        return []
    ranked = ((key, item) for item in items if (key := rank(item)) is not None)
    return [item for _, item in heapq.nsmallest(n, ranked, key=_first)]


# ---- measurements ----------------------------------------------------------------------------
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident memory of this process (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return 0


class CpuMeter:
    """Process CPU (user + system, all threads) as % of one core since the last call."""

    __slots__ = ("_cpu", "_wall")

    def __init__(self) -> None:
        self._cpu, self._wall = self._now()

    @staticmethod
    def _now() -> tuple[float, float]:
        t = os.times()
        return t.user + t.system, time.monotonic()

    def percent(self) -> float:
        cpu, wall = self._now()
        spent, elapsed = cpu - self._cpu, wall - self._wall
        self._cpu, self._wall = cpu, wall
        return 100.0 * spent / elapsed if elapsed > 0 else 0.0


class LagMeter:
    """p99 loop lag (ms) of the stall detector's beats since the last call: the window's
    bucket counts are the difference of two cumulative snapshots."""

    __slots__ = ("_hist", "_prev")

    def __init__(self, hist: Histogram | None) -> None:
        self._hist = hist
        self._prev = list(hist.counts) if hist is not None else []

    def p99_ms(self) -> float:
        hist = self._hist
        if hist is None:
            return 0.0
        counts = list(hist.counts)
        window = [a - b for a, b in zip(counts, self._prev, strict=True)]
        self._prev = counts
        q = Histogram.quantile({"bounds": hist.bounds, "counts": window}, 0.99)
        if q is None:
            return 0.0
        return 1000.0 * (hist.bounds[-1] if math.isinf(q) else q)  # +Inf: "more than 10 s"


# ---- the controller --------------------------------------------------------------------------
class EvictionController:
    """One per worker, when any ceiling is set (see the module doc)."""

    def __init__(self, worker: Worker) -> None:
        opts = worker.opts
        self._w = worker
        self.ceilings = Ceilings.for_worker(opts, worker.workers_total)
        self.interval_s = opts.eviction_tick_s
        self.max_fraction = opts.eviction_max_fraction_per_tick
        self.resume_fraction = opts.eviction_resume_fraction
        self.delay_s = opts.eviction_reconnect_delay_s
        self.dry_run = opts.eviction_dry_run
        self.shedding = False
        self.ticks = 0
        self.episodes = 0  # times the worker went above a ceiling
        self.episode_ticks = 0  # shedding ticks of the current (or last) episode
        self.over_ticks = 0  # ticks in a row that found the worker above a ceiling
        self.longest_over_ticks = 0  # the most it ever took to get back under the ceilings
        self.evictions: collections.Counter[str] = collections.Counter()
        self.would_evict: collections.Counter[str] = collections.Counter()
        self.last = Measurements()
        self.last_plan = Plan(False, 0, (), ())
        self.pending = 0  # victims marked EVICTING whose run-queue job has not reached them
        self._cpu = CpuMeter()
        self._lag = LagMeter(worker.stall.lag if worker.stall is not None else None)
        self._next_at = worker.loop.time() + self.interval_s
        if self.ceilings.loop_lag_ms > 0 and worker.stall is None:
            _log.warning("eviction_max_loop_lag_ms needs the stall detector "
                         "(stall_threshold_ms > 0); loop lag is not watched")

    @classmethod
    def create(cls, worker: Worker) -> EvictionController | None:
        """A controller when the options set any ceiling, else None (costs nothing)."""
        if not Ceilings.for_worker(worker.opts, worker.workers_total).enabled:
            return None
        return cls(worker)

    def maybe_run(self, now: float) -> None:
        """From the worker's tick: run once ``eviction_tick_s`` has passed."""
        if now < self._next_at or self._w.stopping:
            return
        self._next_at = now + self.interval_s
        try:
            self.run()
        except Exception:
            _log.exception("eviction tick failed")

    def measure(self) -> Measurements:
        w = self._w
        return Measurements(
            # closing ones and the victims of earlier ticks still queued are on their way out
            connections=w.active - len(w.close_reasons) - self.pending,
            rss_bytes=rss_bytes(),
            cpu_percent=round(self._cpu.percent(), 1),
            loop_lag_ms=round(self._lag.p99_ms(), 1),
            write_buffer_bytes=w._write_buffer_bytes(),
        )

    def run(self) -> int:
        """One tick: measure, decide, shed. Returns how many were (or would be) evicted."""
        self.ticks += 1
        m = self.last = self.measure()
        p = self.last_plan = plan(
            m, self.ceilings, self.shedding, self.resume_fraction, self.max_fraction
        )
        self.over_ticks = self.over_ticks + 1 if p.over else 0
        self.longest_over_ticks = max(self.longest_over_ticks, self.over_ticks)
        if not p.shedding:
            if self.shedding:
                self.shedding = False
                _log.info("eviction stopped: back under the ceilings",
                          extra={"episode_ticks": self.episode_ticks, **self._context(m)})
            return 0
        if not self.shedding:
            self.shedding = True
            self.episodes += 1
            self.episode_ticks = 0
        self.episode_ticks += 1
        victims = select(self._w.connections(), _rank, p.shed)
        classes = [c._h.eviction_class(c) for c in victims]
        self._log_tick(m, p, victims, classes)
        if self.dry_run:
            self.would_evict.update(classes)
            return len(victims)
        for c in victims:
            c._flags |= EVICTING
        self.pending += len(victims)
        self._w.runqueue.submit(self._evict_job(victims), "evict")
        return len(victims)

    def _evict_job(self, victims: list[Conn]) -> Iterator[None]:
        """The run-queue job of one tick: its victims, ``EVICT_STEP`` per step, each looked
        at again when its turn comes (see the module doc)."""
        w = self._w
        done = 0
        try:
            for c in victims:
                done += 1
                # not marked any more: it left meanwhile (Worker.conn_lost unmarked it)
                if (self.unmark(c) and not c._flags & CLOSING and not w.stopping
                        and c._h.eviction_rank(c) is not None):  # (None: protected since)
                    self._evict(c, c._h.eviction_class(c))
                if done % EVICT_STEP == 0:
                    yield
        finally:  # cancelled or failed: the rest are free again (and pending stays right)
            for c in victims[done:]:
                self.unmark(c)

    def unmark(self, c: Conn) -> bool:
        """``c`` is no victim-in-waiting any more; True if it was one."""
        if c._flags & EVICTING:
            c._flags &= ~EVICTING
            self.pending -= 1
            return True
        return False

    def _evict(self, c: Conn, cls: str) -> None:
        w = self._w
        w.close_reasons.setdefault(c, "evicted")  # whatever the hook closes with, it counts so
        w.trace.record_instant(trace.EVICT, id(c), cls=cls)
        self.evictions[cls] += 1
        try:
            c._h.evict(c, self.delay_s)
        except Exception:
            _log.exception("evict hook failed; closing")
            c.close("evicted")

    def _log_tick(self, m: Measurements, p: Plan, victims: list[Conn], classes: list[str]) -> None:
        extra = {
            "wanted": p.shed,
            "selected": len(victims),
            "classes": dict(collections.Counter(classes)),
            "sample": [_describe(c, cls, self._w.wheel.now, self._w.opts.tick_s)
                       for c, cls in zip(victims[:LOG_SAMPLE], classes, strict=False)],
            "episode_ticks": self.episode_ticks,
            **self._context(m),
        }
        _log.warning("eviction dry run: would evict" if self.dry_run else "evicting", extra=extra)

    def _context(self, m: Measurements) -> dict[str, Any]:
        return {
            "worker": self._w.index,
            "over": list(self.last_plan.over),
            "measurements": asdict(m),
            "ceilings": {k: v for k, v in asdict(self.ceilings).items() if v > 0},
        }

    def stats(self) -> dict[str, Any]:
        """For Worker.stats (JSON-safe)."""
        return {
            "shedding": self.shedding,
            "pending": self.pending,
            "dry_run": self.dry_run,
            "ticks": self.ticks,
            "episodes": self.episodes,
            "episode_ticks": self.episode_ticks,
            "over_ticks": self.over_ticks,
            "longest_over_ticks": self.longest_over_ticks,
            "evictions": dict(self.evictions),
            "would_evict": dict(self.would_evict),
            "over": list(self.last_plan.over),
            "measurements": asdict(self.last),
            "pressure": {k: round(v, 4) for k, v in pressure(self.last, self.ceilings).items()},
        }


def _rank(c: Conn) -> tuple[Any, ...] | None:
    if c._flags & (CLOSING | EVICTING):  # on their way out already
        return None
    return c._h.eviction_rank(c)


def _describe(c: Conn, cls: str, now_tick: int, tick_s: float) -> dict[str, Any]:
    return {"peer": str(c.remote_addr), "class": cls, "idle_s": (now_tick - c._last_rx) * tick_s}
