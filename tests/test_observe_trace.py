"""The lifecycle trace ring, its Chrome/Perfetto export and the GC hook."""

from __future__ import annotations

import gc
import json
import time
from typing import Any

from tidegate.observe import trace
from tidegate.observe.trace import TraceRing, export_chrome, gc_tracer, now_us

PHASES = {"i", "X", "M"}


def record_a_connection_life(ring: TraceRing, conn_id: int) -> None:
    ring.record_instant(trace.ACCEPT, conn_id)
    t0 = now_us()
    time.sleep(0.001)
    ring.record_span(trace.HANDSHAKE, t0, now_us() - t0, conn_id, transport="websocket")
    ring.record_instant(trace.SUBSCRIBE, conn_id, channel="news")
    ring.record_instant(trace.CLOSE, conn_id, reason="ping_timeout")


def validate_chrome(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The structure Perfetto's JSON importer needs; returns the non-metadata events."""
    assert set(doc) >= {"traceEvents", "displayTimeUnit"}
    assert doc["displayTimeUnit"] == "ms"
    events = doc["traceEvents"]
    assert isinstance(events, list)
    data: list[dict[str, Any]] = []
    last_ts: dict[int, float] = {}
    named_pids = set()
    named_tids = set()
    for ev in events:
        assert isinstance(ev["name"], str) and ev["ph"] in PHASES
        assert isinstance(ev["pid"], int) and isinstance(ev["tid"], int)
        assert isinstance(ev.get("args", {}), dict)
        if ev["ph"] == "M":
            if ev["name"] == "process_name":
                named_pids.add(ev["pid"])
            if ev["name"] == "thread_name":
                named_tids.add((ev["pid"], ev["tid"]))
            assert isinstance(ev["args"].get("name", ev["args"].get("sort_index")), str | int)
            continue
        assert isinstance(ev["ts"], int) and ev["ts"] >= 0
        assert ev["ts"] >= last_ts.get(ev["pid"], 0), "ts must not go back within a process"
        last_ts[ev["pid"]] = ev["ts"]
        if ev["ph"] == "X":
            assert isinstance(ev["dur"], int) and ev["dur"] >= 0
        else:
            assert ev["s"] in {"g", "p", "t"}
        assert ev["pid"] in named_pids  # metadata comes before the process's events
        assert (ev["pid"], ev["tid"]) in named_tids
        data.append(ev)
    return data


def test_export_names_processes_and_orders_events() -> None:
    rings = {0: TraceRing(64), 1: TraceRing(64)}
    record_a_connection_life(rings[0], 11)
    record_a_connection_life(rings[1], 22)
    rings[1].record_instant(trace.EVICT, 23, reason="slow_consumer")
    sup = TraceRing(16)
    sup.record_instant(trace.RESTART, 1, why="killed by SIGKILL")
    snaps: dict[int, Any] = {i: r.snapshot() for i, r in rings.items()}
    snaps[trace.SUPERVISOR_PID] = sup.snapshot()
    # Snapshots are what crosses the control channel: JSON.
    snaps = json.loads(json.dumps(snaps))
    snaps = {int(k): v for k, v in snaps.items()}

    doc = export_chrome(snaps, {1: "worker 1 (gateway)"})
    again = json.loads(json.dumps(doc))
    assert again == doc
    data = validate_chrome(again)

    names = {e["pid"]: e["args"]["name"] for e in doc["traceEvents"]
             if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {0: "worker 0", 1: "worker 1 (gateway)", trace.SUPERVISOR_PID: "supervisor"}
    w0 = [e for e in data if e["pid"] == 0]
    assert [e["name"] for e in w0] == ["accept", "handshake", "subscribe", "close"]
    hs = w0[1]
    assert hs["ph"] == "X" and hs["dur"] >= 1000 and hs["args"] == {"id": 11, "transport": "websocket"}
    assert w0[3]["args"] == {"id": 11, "reason": "ping_timeout"}
    assert min(e["ts"] for e in data) == 0  # rebased; the base is kept
    assert doc["otherData"]["base_us"] > 0
    restart = [e for e in data if e["pid"] == trace.SUPERVISOR_PID]
    assert restart[0]["name"] == "worker_restart" and restart[0]["args"]["why"].startswith("killed")
    # One thread track per kind, named after it.
    tracks = {(e["pid"], e["tid"]): e["args"]["name"] for e in doc["traceEvents"]
              if e["ph"] == "M" and e["name"] == "thread_name"}
    assert sorted(v for (pid, _), v in tracks.items() if pid == 0) == sorted(
        ["accept", "handshake", "subscribe", "close"])


def test_overlapping_spans_of_a_kind_get_their_own_tracks() -> None:
    ring = TraceRing(16)
    ring.record_span(trace.HANDSHAKE, 1000, 500, 1)
    ring.record_span(trace.HANDSHAKE, 1100, 100, 2)  # nested in the first: may share
    ring.record_span(trace.HANDSHAKE, 1400, 300, 3)  # overlaps the first's end: a new track
    ring.record_span(trace.HANDSHAKE, 1600, 100, 4)  # the first track is free again
    data = validate_chrome(export_chrome({0: ring.events()}))
    tid = {e["args"]["id"]: e["tid"] for e in data}
    assert tid[3] != tid[1]
    assert tid[4] == tid[1]
    # Within one track, spans never partly overlap (Perfetto needs them nested or disjoint).
    by_tid: dict[int, list[tuple[int, int]]] = {}
    for e in data:
        by_tid.setdefault(e["tid"], []).append((e["ts"], e["ts"] + e["dur"]))
    for spans in by_tid.values():
        open_ends: list[int] = []
        for start, end in spans:
            while open_ends and open_ends[-1] <= start:
                open_ends.pop()
            assert not open_ends or end <= open_ends[-1], spans
            open_ends.append(end)


def test_the_ring_stays_bounded() -> None:
    ring = TraceRing(100)
    for i in range(1000):
        ring.record_instant(trace.ACCEPT, i)
    assert len(ring) == 100
    ids = [e[3] for e in ring.events()]
    assert ids == list(range(900, 1000))  # the newest kept, in order
    assert len(ring.snapshot(limit=10)) == 10 and ring.snapshot(limit=10)[-1][3] == 999


def test_snapshot_since_returns_what_ended_after() -> None:
    ring = TraceRing(100)
    ring.record_instant(trace.ACCEPT, 1)
    time.sleep(0.002)
    cut = now_us()
    time.sleep(0.002)
    ring.record_instant(trace.ACCEPT, 2)
    ring.record_span(trace.HANDSHAKE, cut - 1000, 1500, 3)  # started before, ended after
    ring.record_span(trace.HANDSHAKE, cut - 1000, 500, 4)  # over before the cut
    assert [e[3] for e in ring.snapshot(cut)] == [2, 3]
    assert [e[3] for e in ring.snapshot()] == [1, 2, 3, 4]
    ring.clear()
    assert ring.snapshot() == []


def test_empty_export_is_valid() -> None:
    doc = export_chrome({})
    assert doc["traceEvents"] == [] and doc["displayTimeUnit"] == "ms"
    doc = export_chrome({0: []})
    assert validate_chrome(doc) == []


def test_gc_hook_records_a_span_per_collection() -> None:
    ring = TraceRing(64)
    cb = gc_tracer(ring)
    gc.callbacks.append(cb)
    try:
        junk: list[Any] = []
        junk.append(junk)  # a cycle for the collector to find
        del junk
        gc.collect()
    finally:
        gc.callbacks.remove(cb)
    spans = [e for e in ring.events() if e[1] == trace.GC]
    assert spans, ring.events()
    ts, kind, phase, ident, dur, args = spans[-1]
    assert phase == "X" and ident is None and dur >= 0
    assert args["generation"] == 2 and args["collected"] >= 1
    data = validate_chrome(export_chrome({0: ring.snapshot()}))
    assert data[-1]["name"] == "gc" and "id" not in data[-1]["args"]


def test_the_gc_hook_can_skip_short_collections() -> None:
    ring = TraceRing(64)
    cb = gc_tracer(ring, min_dur_us=10_000_000)
    gc.callbacks.append(cb)
    try:
        gc.collect()
    finally:
        gc.callbacks.remove(cb)
    assert len(ring) == 0
