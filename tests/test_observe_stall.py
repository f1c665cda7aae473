"""The loop-stall detector on real event loops (uvloop and stdlib asyncio)."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvloop

from tidegate.observe.histogram import Histogram
from tidegate.observe.stall import LAG_BOUNDS, StallDetector

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.new_event_loop,
}


def block_the_loop_for_tests(seconds: float) -> None:
    time.sleep(seconds)


def run_for(loop: asyncio.AbstractEventLoop, seconds: float) -> None:
    loop.run_until_complete(asyncio.sleep(seconds))


@pytest.fixture(params=sorted(LOOPS))
def loop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop]:
    lp = LOOPS[request.param]()
    yield lp
    lp.close()


def stall_records(caplog: pytest.LogCaptureFixture, msg: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "tidegate.stall" and r.getMessage() == msg]


def test_a_blocked_loop_is_reported_once_with_the_blocking_stack(
    loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tidegate.stall")
    det = StallDetector(loop, threshold_ms=200, tick_s=0.05)
    det.start()
    try:
        loop.call_later(0.15, block_the_loop_for_tests, 0.5)
        run_for(loop, 0.9)
    finally:
        det.stop()
    reports = stall_records(caplog, "loop stall")
    assert len(reports) == 1, [r.__dict__ for r in reports]
    stack = reports[0].stack  # type: ignore[attr-defined]
    assert "block_the_loop_for_tests" in stack
    assert "time.sleep(seconds)" in stack
    assert reports[0].stall_ms > 200  # type: ignore[attr-defined]
    # Reported while the loop was stuck; the end (logged by the late beat) comes after.
    ended = stall_records(caplog, "loop stall ended")
    assert len(ended) == 1
    assert caplog.records.index(reports[0]) < caplog.records.index(ended[0])
    assert 400 <= ended[0].stall_ms <= 2000  # type: ignore[attr-defined]
    st = det.stats()
    assert st["stalls_total"] == 1
    assert st["stall_longest_ms"] == ended[0].stall_ms  # type: ignore[attr-defined]
    assert st["stall_ongoing_ms"] == 0
    assert st["loop_lag_max_ms"] == st["stall_longest_ms"]
    lag = st["loop_lag"]
    assert lag["bounds"] == list(LAG_BOUNDS)
    assert sum(lag["counts"]) >= 5
    # Exactly one beat ran more than 0.25 s late.
    assert sum(lag["counts"][LAG_BOUNDS.index(0.5) :]) == 1
    assert json.loads(json.dumps(st)) == st  # plain data: it crosses the control channel


def test_a_loop_that_does_not_block_reports_nothing(
    loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="tidegate.stall")
    det = StallDetector(loop, threshold_ms=200, tick_s=0.02)
    det.start()
    try:
        for i in range(20):  # busy but never blocking for long
            loop.call_later(i * 0.02, block_the_loop_for_tests, 0.005)
        run_for(loop, 0.6)
    finally:
        det.stop()
    assert not [r for r in caplog.records if r.name == "tidegate.stall"]
    st = det.stats()
    assert st["stalls_total"] == 0 and st["stall_longest_ms"] == 0
    assert sum(st["loop_lag"]["counts"]) >= 10
    assert Histogram.quantile(st["loop_lag"], 0.5) is not None


def test_two_stalls_are_two_reports(
    loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tidegate.stall")
    det = StallDetector(loop, threshold_ms=200, tick_s=0.02)
    det.start()
    try:
        loop.call_later(0.1, block_the_loop_for_tests, 0.4)
        loop.call_later(0.8, block_the_loop_for_tests, 0.4)
        run_for(loop, 1.5)
    finally:
        det.stop()
    assert len(stall_records(caplog, "loop stall")) == 2
    assert len(stall_records(caplog, "loop stall ended")) == 2
    assert det.stats()["stalls_total"] == 2


def test_a_stall_the_watchdog_missed_is_still_counted_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As when one C call holds the GIL throughout: the late beat reports it, stackless."""
    caplog.set_level(logging.WARNING, logger="tidegate.stall")
    loop = uvloop.new_event_loop()
    det = StallDetector(loop, threshold_ms=200, tick_s=0.02)
    monkeypatch.setattr(det, "_check", lambda: None)
    det.start()
    try:
        loop.call_later(0.1, block_the_loop_for_tests, 0.4)
        run_for(loop, 0.7)
    finally:
        det.stop()
        loop.close()
    reports = stall_records(caplog, "loop stall")
    assert len(reports) == 1
    assert reports[0].stack is None  # type: ignore[attr-defined]
    assert reports[0].stall_ms >= 300  # type: ignore[attr-defined]
    assert det.stats()["stalls_total"] == 1


def test_a_stall_made_by_the_collector_says_so(
    loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tidegate.stall")
    det = StallDetector(loop, threshold_ms=200, tick_s=0.02)
    assert det._on_gc not in gc.callbacks
    det.start()
    assert det._on_gc in gc.callbacks

    def collection_like_pause() -> None:  # what the gc.callbacks hook sees around a collection
        det._on_gc("start", {"generation": 2})
        block_the_loop_for_tests(0.4)
        det._on_gc("stop", {"generation": 2, "collected": 0, "uncollectable": 0})

    try:
        loop.call_later(0.05, block_the_loop_for_tests, 0.4)  # a stall with no GC in it
        loop.call_later(0.7, collection_like_pause)
        run_for(loop, 1.4)
    finally:
        det.stop()
    assert det._on_gc not in gc.callbacks
    records = [r for r in caplog.records if r.name == "tidegate.stall"]

    def report_and_end(marker: str, absent: str = "") -> tuple[logging.LogRecord, Any]:
        i = next(i for i, r in enumerate(records) if r.getMessage() == "loop stall"
                 and marker in r.stack and not (absent and absent in r.stack))  # type: ignore[attr-defined]
        end = next(r for r in records[i:] if r.getMessage() == "loop stall ended")
        return records[i], end

    plain, plain_end = report_and_end("block_the_loop_for_tests", "collection_like_pause")
    assert plain.gc_ms < 50 and plain_end.gc_ms < 50  # type: ignore[attr-defined]  # young GCs
    by_gc, by_gc_end = report_and_end("collection_like_pause")
    assert by_gc.gc_ms >= 150  # type: ignore[attr-defined]  # the collection still running
    assert by_gc_end.gc_ms >= 390


def test_stop_ends_the_watchdog_thread_and_the_beat(loop: asyncio.AbstractEventLoop) -> None:
    det = StallDetector(loop, threshold_ms=50, tick_s=0.01)
    det.start()
    run_for(loop, 0.1)
    thread = det._thread
    assert thread is not None and thread.is_alive()
    det.stop()
    assert not thread.is_alive()
    beats = det.stats()["loop_lag"]["counts"]
    run_for(loop, 0.1)
    assert det.stats()["loop_lag"]["counts"] == beats
    # Stopped: a long callback is not a stall any more.
    loop.call_soon(block_the_loop_for_tests, 0.2)
    run_for(loop, 0.25)
    assert det.stats()["stalls_total"] == 0


def test_rejects_nonsense() -> None:
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(ValueError):
            StallDetector(loop, threshold_ms=0)
        with pytest.raises(ValueError):
            StallDetector(loop, tick_s=0)
    finally:
        loop.close()


def _voluntary_switches(native_id: int) -> int:
    with open(f"/proc/self/task/{native_id}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches")


def test_the_watchdog_of_a_healthy_loop_wakes_about_once_per_threshold(
    loop: asyncio.AbstractEventLoop,
) -> None:
    # Every wake of an idle worker costs CPU (~70-100 us on a virtual machine): the watchdog
    # sleeps until a beat would be overdue instead of polling (it polled 4 times a threshold).
    det = StallDetector(loop, threshold_ms=200, tick_s=0.05)
    det.start()
    try:
        run_for(loop, 0.3)
        assert det._thread is not None and det._thread.native_id is not None
        tid = det._thread.native_id
        before = _voluntary_switches(tid)
        run_for(loop, 2.0)
        wakes = _voluntary_switches(tid) - before
    finally:
        det.stop()
    assert 4 <= wakes <= 12, wakes  # ~8 over 2 s (polling at threshold/4 made 40)
