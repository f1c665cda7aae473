"""bench/fanout_slicing.py's report: which probe heartbeats count as "during the broadcast",
and the per-worker figures (pure functions of the probes' samples; no server)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fanout_slicing", ROOT / "bench/fanout_slicing.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fanout_slicing"] = mod
    spec.loader.exec_module(mod)
    return mod


def _probe(mod: ModuleType, worker: str, samples: list[tuple[float, float]],
           first_t: float, last_rx: float) -> object:
    p = mod.Probe("ws://unused", "token", "bench", 0.25, 3)
    p.worker, p.samples, p.first_t, p.last_rx = worker, samples, first_t, last_rx
    return p


def test_the_window_stops_where_the_bench_closes_its_connections() -> None:
    # The last publication reached a probe 100 s after the first, but the bench stopped waiting
    # (and closed 500k connections, stalling every worker) 80 s after it: heartbeats sent after
    # that are the close, not the fan-out, and must not count.
    mod = _script()
    t0 = 1000.0
    a = _probe(mod, "aaaa", [(t0 + 1, 0.010), (t0 + 50, 0.030), (t0 + 85, 12.0)], t0, t0 + 100)
    b = _probe(mod, "bbbb", [(t0 + 2, 0.020), (t0 + 79, 0.060), (t0 - 5, 9.0)], t0, t0 + 40)
    out = mod.summarize("chunked", {"connections_established": 500000}, [a, b], [], [],
                        cutoff_s=80.0)
    assert out["window_cut_at_bench_close"] is True
    assert out["broadcast_window_s"] == 80.0
    assert out["heartbeat_samples"] == 4  # the one before the broadcast and the 12 s one: out
    assert out["heartbeat_rtt_ms"]["max"] == 60.0
    assert out["probed_workers"] == 2
    by_worker = out["heartbeat_rtt_ms_p99_by_worker"]
    assert by_worker["worst"] == 60.0 and by_worker["best"] == 30.0
    assert by_worker["workers_over_50ms"] == 1
    # the slowest heartbeat sent in each second of the window, for a plot
    worst = out["heartbeat_rtt_ms_max_by_second"]
    assert len(worst) == 81 and worst[79] == 60.0 and worst[1] == 10.0


def test_a_broadcast_that_ends_before_the_cutoff_keeps_its_own_window() -> None:
    mod = _script()
    t0 = 50.0
    a = _probe(mod, "aaaa", [(t0 + 1, 0.004), (t0 + 3, 0.008), (t0 + 9, 0.5)], t0, t0 + 4)
    # the probes' own loop lag, inside the window only: the part of every RTT that is theirs
    own_lag = [(t0 - 1, 0.9), (t0 + 1, 0.002), (t0 + 2, 0.030), (t0 + 6, 0.7)]
    out = mod.summarize("inline", {}, [a], [], [], cutoff_s=80.0, own_lag=own_lag)
    assert out["window_cut_at_bench_close"] is False
    assert out["broadcast_window_s"] == 4.0
    assert out["heartbeat_samples"] == 2 and out["heartbeat_rtt_ms"]["max"] == 8.0
    assert out["probe_process_loop_lag_ms"]["max"] == 30.0


def test_the_plot_draws_one_line_per_mode_on_a_log_scale(tmp_path: Path) -> None:
    import json
    import subprocess
    import xml.etree.ElementTree as ET

    result = tmp_path / "r.json"
    result.write_text(json.dumps({"results": {
        "chunked": {"heartbeat_rtt_ms_max_by_second": [10.0, 100.0, 1000.0]},
        "inline": {"heartbeat_rtt_ms_max_by_second": [20000.0, 5000.0]}}}))
    out = tmp_path / "r.svg"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/plot_slicing.py"), str(result),
                           "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    svg = ET.parse(out).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    lines = svg.findall(f"{ns}polyline")
    assert [ln.findtext(f"{ns}title") for ln in lines] == ["chunked", "inline"]
    # log scale: 10 -> 100 -> 1000 ms climb by the same height each decade
    ys = [float(p.split(",")[1]) for p in lines[0].attrib["points"].split()]
    assert ys[0] > ys[1] > ys[2] and abs((ys[0] - ys[1]) - (ys[1] - ys[2])) < 0.2
    assert "target 50 ms" in out.read_text()
