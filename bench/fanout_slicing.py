"""Heartbeats on one worker during a big broadcast: gated, chunked and inline fan-out.

    python bench/fanout_slicing.py [--connections 18000] [--rate 2] [--count 8]
                                   [--probes 20] [--json PATH]
                                   [--server-workers N] [--hold S] [--bench-arg=ARG ...]

The same workload once per mode (``--modes``; all three by default), one after the other: a
one-worker gateway (``tidegate bench --protocol ws --server-workers 1``) holding
``--connections`` WebSocket subscribers of one channel (as many as one worker holds by
default: ~18,000 under a 20,000-fd limit), ``--count`` publications at ``--rate`` per second
through the HTTP API.

- **gated**: the default engine: the run queue's slices (below) and the node's CPU gate, at
  most one worker per core running long jobs (engine/cpu_gate.py; no gate with one worker);
- **chunked**: ``--slice-ms 5 --long-job-workers -1``: a publication to more than 256 local
  subscribers is written by a run-queue job, 16 writes a step, and the loop turns every 5 ms;
- **inline**: ``--slice-ms 0``: the whole fan-out of a publication in one callback (the
  behaviour before the run queue).

Heartbeat figure: besides the bench's clients this script holds ``--probes`` WebSocket
connections of its own on the same worker, each subscribed to the channel (so it knows when
the broadcast starts and ends) and sending the protocol's ``ping`` command every
``--probe-interval`` seconds. The RTT of the pings *sent during the broadcast* (from the first
publication's send time to the last publication a probe received) is reported as the worker's
heartbeat RTT. The probes run in this process, whose loop is nearly idle, so their RTT is the
worker's delay, not the load generator's; each learns its worker from the client id of its
connect reply (a per-process prefix), so with several workers (``--server-workers 0``: as many
as the bench sizes for ``--connections``, 27 for 500k here) the report also gives each probed
worker's p99 (worst, median, and how many are over 50 ms). The bench clients' own heartbeat
RTT (their loops parse every delivery, so it includes their own queueing) is reported too,
over the hold.

Also reported per mode, from the server's status file: its stall detector's loop lag (a timer
every 50 ms: how late it ran; histogram buckets 1 ms .. 10 s) and stalls over 200 ms, taken
as differences across the broadcast; the run queue's slices and longest slice; and from the
bench's report: broadcast last-delivery time, deliveries lost, delivery latency, CPU per
delivery. The result goes to ``--json`` (default
bench/results/2026-11-27-fanout-slicing-<rate>pps.json) and a table is printed.

On a shared 2-core machine keep runs short: one run at full size takes a little over a minute.

Figures, 2026-11-27 (18,000 subscribers, one worker, 8 publications; 2 shared cores; heartbeat
RTT of the probes during the broadcast, p50 / p99 / max):

    1 publication/s  (bench/results/2026-11-27-fanout-slicing-1pps.json)
      chunked    2.8 / 15.9 / 26.9 ms   0 stalls > 200 ms   last subscriber 0.68 s   27.5 us/delivery
      inline     7.6 / 510 / 525 ms     8 stalls > 200 ms   last subscriber 0.55 s   25.0 us/delivery
    2 publications/s (bench/results/2026-11-27-fanout-slicing-2pps.json; a backlog throughout)
      chunked    6.0 / 62 / 87 ms       last subscriber 2.57 s   22.7 us/delivery
      inline     303 / 924 / 973 ms     last subscriber 0.97 s   22.4 us/delivery
                 (inline, each API publish returned only after its fan-out: the publisher
                 itself was held back, so "last subscriber after the publish" looks shorter)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from tidegate.bench.runner import default_server_config  # noqa: E402
from tidegate.bench.wsprobe import WsProbe  # noqa: E402
from tidegate.gateway.auth import encode_hs256  # noqa: E402
from tidegate.gateway.config import load_config  # noqa: E402
from tidegate.observe.histogram import Histogram  # noqa: E402

DATE = "2026-11-27"
# The server's arguments per mode: "gated" is the default engine (run-queue slices, long jobs
# behind the CPU gate: engine/cpu_gate.py), "chunked" the slices without the gate, "inline"
# neither (each fan-out in one go).
MODES = {
    "gated": ["--slice-ms", "5", "--long-job-workers", "0"],
    "chunked": ["--slice-ms", "5", "--long-job-workers", "-1"],
    "inline": ["--slice-ms", "0"],
}


# ---------------------------------------------------------------------- the probes


class Probe(WsProbe):
    """One WebSocket connection: subscribed to the channel, pinging every ``interval``."""

    def __init__(self, url: str, token: str, channel: str, interval: float, count: int) -> None:
        super().__init__(url, token, channel)
        self.interval, self.count = interval, count
        self.sent: dict[int, float] = {}  # ping id -> time.time() sent
        self.samples: list[tuple[float, float]] = []  # (sent at, rtt s)
        self.first_t: float | None = None  # the first publication's send time (publisher's)
        self.last_rx: float | None = None  # when the last publication of the broadcast came
        self.pubs = 0
        self.worker = ""  # the client id's per-process prefix: which worker holds the probe

    async def while_open(self, ws: Any, stop: asyncio.Event) -> None:
        next_id = 100
        while not stop.is_set():
            next_id += 1
            self.sent[next_id] = time.time()
            await ws.send(json.dumps({"id": next_id, "ping": {}}))
            try:
                await asyncio.wait_for(stop.wait(), self.interval)
            except TimeoutError:
                pass

    def on_message(self, message: dict[str, Any], frame: bytes, now: float) -> None:
        if message.get("id") == 1:  # the connect reply: its client id names the worker
            self.worker = str(message.get("connect", {}).get("client", "")).split("-")[0]
        sent = self.sent.pop(message.get("id", 0), None)
        if sent is not None:
            self.samples.append((sent, now - sent))
            return
        data = self.publication(message)
        if data is None:
            return
        self.pubs += 1
        if data.get("seq") == 0:
            self.first_t = float(data["t"])
        if data.get("seq") == self.count - 1:
            self.last_rx = now


async def read_status(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def schedstat(pid: int) -> tuple[int, int] | None:
    """(ns on a CPU, ns runnable but waiting for one) of ``pid``'s main thread: the loop's."""
    try:
        run_ns, wait_ns, _ = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()
        return int(run_ns), int(wait_ns)
    except (OSError, ValueError):
        return None


async def watch_status(path: Path, timeline: list[tuple[float, dict[str, Any]]],
                       sched: list[tuple[float, tuple[int, int]]], stop: asyncio.Event,
                       gate: dict[str, Any]) -> None:
    """Keep (time, worker 0's stats) as the status file changes (about once a second), and
    the worker's scheduler counters four times a second; ``gate``: the node's CPU gate as last
    seen while every worker was up."""
    last = None
    while not stop.is_set():
        st = await read_status(path)
        if st.get("cpu_gate") and not st.get("draining"):
            gate.update(st["cpu_gate"])
        ws = (st.get("worker_stats") or [None])[0]
        if ws and ws != last:
            timeline.append((time.time(), ws))
            last = ws
        pid = int((ws or {}).get("pid") or 0)
        ss = schedstat(pid) if pid else None
        if ss is not None:
            sched.append((time.time(), ss))
        await asyncio.sleep(0.25)


async def watch_own_loop(lags: list[tuple[float, float]], stop: asyncio.Event) -> None:
    """This process's own loop lag (how late a 10 ms sleep wakes), as (time, lag s): the
    probes' RTT includes it, so a probe tail that is this process's shows here."""
    while not stop.is_set():
        t0 = time.monotonic()
        await asyncio.sleep(0.01)
        lags.append((time.time(), max(0.0, time.monotonic() - t0 - 0.01)))


# ---------------------------------------------------------------------- one mode


async def run_mode(mode: str, args: argparse.Namespace, token: str, workdir: Path
                   ) -> dict[str, Any]:
    logs = workdir / mode
    logs.mkdir(parents=True, exist_ok=True)
    report_path = logs / "bench.json"
    status_path = logs / "server-status.json"
    cmd = [sys.executable, "-m", "tidegate", "bench", "--protocol", "ws",
           "--connections", str(args.connections),
           *(["--server-workers", str(args.server_workers)] if args.server_workers else []),
           "--hold", str(args.hold), "--broadcast-start", str(args.broadcast_start),
           "--broadcast-rate", str(args.rate),
           "--broadcast-count", str(args.count), "--broadcast-timeout", str(args.timeout),
           "--channel", args.channel, "--no-progress", "--json", str(report_path),
           "--logs-dir", str(logs), *(f"--server-arg={a}" for a in MODES[mode]),
           "--server-arg=--stall-threshold-ms", "--server-arg=200", *args.bench_arg]
    print(f"[{mode}] {' '.join(cmd[2:])}", flush=True)
    t0 = time.monotonic()
    # The bench (and its clients, which share its session) in a session of its own: with
    # autogroup scheduling each session is one scheduling group, and the probes, in this
    # process, must not wait behind 27 busy client processes for a CPU, or their RTT measures
    # this process rather than the workers.
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=str(ROOT), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env=dict(os.environ, PYTHONPATH=str(ROOT / "src")), start_new_session=True)
    stop = asyncio.Event()
    timeline: list[tuple[float, dict[str, Any]]] = []
    sched: list[tuple[float, tuple[int, int]]] = []
    probes: list[Probe] = []
    gate: dict[str, Any] = {}
    own_lag: list[tuple[float, float]] = []
    tasks: list[asyncio.Task[None]] = []
    output = asyncio.create_task(proc.stdout.read() if proc.stdout else asyncio.sleep(0))
    # the server's port, once it is up
    port = 0
    while proc.returncode is None and not port:
        port = int((await read_status(status_path)).get("port") or 0)
        await asyncio.sleep(0.1)
    if port:
        url = f"ws://127.0.0.1:{port}/connection/websocket"
        probes = [Probe(url, token, args.channel, args.probe_interval, args.count)
                  for _ in range(args.probes)]
        tasks = [asyncio.create_task(p.run(stop)) for p in probes]
        tasks.append(asyncio.create_task(watch_status(status_path, timeline, sched, stop, gate)))
        tasks.append(asyncio.create_task(watch_own_loop(own_lag, stop)))
    try:
        await proc.wait()
    finally:
        if proc.returncode is None:  # interrupted: not in our session, so stop it ourselves
            proc.terminate()
    stop.set()
    await asyncio.gather(*tasks)
    text = await output
    elapsed = time.monotonic() - t0
    try:
        bench = json.loads(report_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        tail = (text or b"").decode(errors="replace")[-3000:]
        raise SystemExit(f"[{mode}] no bench report; its output ends with:\n{tail}") from None
    # the bench stops waiting (and closes every connection) this long after the first publish
    cutoff_s = (args.count - 1) / args.rate + args.timeout
    out = summarize(mode, bench, probes, timeline, sched, cutoff_s, own_lag)
    out["server_args"] = MODES[mode]
    out["cpu_gate"] = gate or None
    out["run_seconds"] = round(elapsed, 1)
    out["bench_exit_code"] = proc.returncode
    print(f"[{mode}] done in {elapsed:.0f} s (bench exit {proc.returncode})", flush=True)
    return out


def summarize(mode: str, bench: dict[str, Any], probes: list[Probe],
              timeline: list[tuple[float, dict[str, Any]]],
              sched: list[tuple[float, tuple[int, int]]], cutoff_s: float,
              own_lag: list[tuple[float, float]] | None = None) -> dict[str, Any]:
    """The window is the broadcast: from the first publication to the last one a probe got,
    cut at ``cutoff_s`` after the first publication, when the bench gives up waiting and
    closes its connections (at 500k a worker's 18,500 connection_lost callbacks stall its
    loop for 10-15 s: that is the close, not the fan-out)."""
    starts = [p.first_t for p in probes if p.first_t is not None]
    ends = [p.last_rx for p in probes if p.last_rx is not None]
    start = min(starts) if starts else None
    end = max(ends) if ends else None
    cut = False
    if start is not None and end is not None and end > start + cutoff_s:
        end, cut = start + cutoff_s, True
    by_worker: dict[str, list[float]] = {}
    for p in probes:
        by_worker.setdefault(p.worker or "?", []).extend(
            rtt for sent, rtt in _in_window(p, start, end))
    rtts = sorted(rtt for v in by_worker.values() for rtt in v)
    worker_p99 = sorted(_pcts(sorted(v))["p99"] or 0.0 for v in by_worker.values() if v)
    out: dict[str, Any] = {
        "mode": mode,
        "server_slice_ms": float(MODES[mode][MODES[mode].index("--slice-ms") + 1]),
        "connections": bench.get("connections_established"),
        "probe_connections": len(probes),
        "probe_errors": [p.error for p in probes if p.error],
        "broadcast_window_s": round(end - start, 3) if start and end else None,
        "window_cut_at_bench_close": cut,
        "heartbeat_rtt_ms_max_by_second": _max_by_second(probes, start, end),
        "heartbeat_rtt_ms": _pcts(rtts),
        "heartbeat_samples": len(rtts),
        "probed_workers": len([v for v in by_worker.values() if v]),
        "heartbeat_rtt_ms_p99_by_worker": {
            "worst": worker_p99[-1] if worker_p99 else None,
            "median": worker_p99[len(worker_p99) // 2] if worker_p99 else None,
            "best": worker_p99[0] if worker_p99 else None,
            "workers_over_50ms": sum(1 for v in worker_p99 if v > 50)},
        "heartbeat_rtt_ms_histogram": _buckets(rtts),
        # this (the probes') process's own loop lag over the window: a share of every RTT
        "probe_process_loop_lag_ms": _pcts(sorted(
            lag for t, lag in (own_lag or []) if start and end and start <= t <= end)),
    }
    out.update(loop_figures(timeline, start, end, bench.get("connections_established") or 0))
    out.update(cpu_figures(sched, start, end))
    keys = ["broadcast_subscribed", "broadcast_published", "broadcast_deliveries",
            "broadcast_deliveries_expected", "deliveries_lost", "deliveries_duplicated",
            "deliveries_out_of_order", "broadcast_last_delivery_s",
            "broadcast_latency_ms_p50", "broadcast_latency_ms_p99", "broadcast_api_ms",
            "server_cpu_us_per_delivery", "broadcast_server_cpu_seconds",
            "heartbeat_rtt_ms_p50", "heartbeat_rtt_ms_p99", "heartbeat_rtt_ms",
            "heartbeat_missed", "unexpected_closes", "failures"]
    out["bench"] = {k: bench.get(k) for k in keys}
    return out


def loop_figures(timeline: list[tuple[float, dict[str, Any]]], start: float | None,
                 end: float | None, held: int) -> dict[str, Any]:
    """The worker's stall detector and run queue across the broadcast (status-file deltas:
    the last report before the first publication, the first one at least a second after the
    last delivery - the worker reports every second - that still has every connection open:
    the bench's close, 18k connection_lost callbacks, stalls the loop on its own)."""
    if not timeline or start is None or end is None:
        return {}
    before = [s for t, s in timeline if t <= start] or [timeline[0][1]]
    # worker 0 holds all connections with one worker, its share with several: "still open"
    # is within 1% of the most it held (the probes on other workers, a connect retry)
    peak = max(int(s.get("active", 0)) for _, s in timeline)
    still_open = [(t, s) for t, s in timeline if int(s.get("active", 0)) >= min(held, 0.99 * peak)]
    after = ([s for t, s in still_open if t >= end + 1.0] or [s for _, s in still_open[-1:]]
             or [timeline[-1][1]])
    b, a = before[-1], after[0]
    out: dict[str, Any] = {}
    sb, sa = b.get("stall") or {}, a.get("stall") or {}
    if sb and sa:
        lag = {"bounds": sa["loop_lag"]["bounds"],
               "counts": [y - x for x, y in zip(sb["loop_lag"]["counts"],
                                                 sa["loop_lag"]["counts"], strict=True)],
               "sum": sa["loop_lag"]["sum"] - sb["loop_lag"]["sum"]}
        n = sum(lag["counts"])
        top = max((i for i, c in enumerate(lag["counts"]) if c), default=None)
        bounds = lag["bounds"] + [float("inf")]
        out["loop_lag_beats"] = n
        out["loop_lag_ms_p50_le"] = _ms(Histogram.quantile(lag, 0.5))
        out["loop_lag_ms_p99_le"] = _ms(Histogram.quantile(lag, 0.99))
        out["loop_lag_ms_max_le"] = _ms(bounds[top]) if top is not None else None
        out["loop_lag_ms_mean"] = round(lag["sum"] / n * 1000, 1) if n else None
        out["stalls_over_200ms"] = sa["stalls_total"] - sb["stalls_total"]
        out["stall_longest_ms_so_far"] = sa.get("stall_longest_ms")
    rb, ra = b.get("runqueue") or {}, a.get("runqueue") or {}
    if ra:
        out["runqueue_slices"] = ra.get("slices", 0) - rb.get("slices", 0)
        out["runqueue_jobs_done"] = ra.get("jobs_done", 0) - rb.get("jobs_done", 0)
        out["runqueue_longest_slice_ms"] = ra.get("longest_slice_ms")
    return out


def cpu_figures(sched: list[tuple[float, tuple[int, int]]], start: float | None,
                end: float | None) -> dict[str, Any]:
    """The worker's loop thread over the broadcast: time on a CPU, and time it was runnable
    but waiting for one (the machine's other processes had the cores)."""
    if start is None or end is None:
        return {}
    inside = [(t, ss) for t, ss in sched if start <= t <= end]
    if len(inside) < 2:
        return {}
    (t0, (run0, wait0)), (t1, (run1, wait1)) = inside[0], inside[-1]
    return {"worker_cpu_share_in_window": round((run1 - run0) / 1e9 / (t1 - t0), 3),
            "worker_waiting_for_cpu_share_in_window": round((wait1 - wait0) / 1e9 / (t1 - t0), 3)}


RTT_BOUNDS_MS = (2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


def _buckets(values: list[float]) -> dict[str, int]:
    """How many RTTs fell at or under each bound (ms), and over the last."""
    out = {f"<={b}": 0 for b in RTT_BOUNDS_MS}
    out[f">{RTT_BOUNDS_MS[-1]}"] = 0
    for v in values:
        ms = v * 1000
        key = next((f"<={b}" for b in RTT_BOUNDS_MS if ms <= b), f">{RTT_BOUNDS_MS[-1]}")
        out[key] += 1
    return out


def _in_window(p: Probe, start: float | None, end: float | None) -> list[tuple[float, float]]:
    """The probe's (sent at, rtt) samples whose ping was sent inside the window."""
    if start is None or end is None:
        return []
    return [(sent, rtt) for sent, rtt in p.samples if start <= sent <= end]


def _max_by_second(probes: list[Probe], start: float | None, end: float | None
                   ) -> list[float]:
    """The slowest probe heartbeat sent in each second of the window (ms): when it was bad."""
    if start is None or end is None:
        return []
    worst = [0.0] * (int(end - start) + 1)
    for p in probes:
        for sent, rtt in _in_window(p, start, end):
            i = int(sent - start)
            worst[i] = max(worst[i], round(rtt * 1000, 1))
    return worst


def _ms(seconds: float | None) -> float | None:
    if seconds is None or seconds == float("inf"):
        return None if seconds is None else float("inf")
    return round(seconds * 1000, 1)


def _pcts(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None, "mean": None}

    def pct(q: float) -> float:
        return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1)

    return {"p50": pct(0.5), "p99": pct(0.99), "max": round(values[-1] * 1000, 1),
            "mean": round(statistics.fmean(values) * 1000, 1)}


# ---------------------------------------------------------------------- the report


ROWS: list[tuple[str, Any]] = [
    ("connections held (+ probes)", lambda r: f"{r['connections']} (+{r['probe_connections']})"),
    ("heartbeat RTT ms p50 (probes)", lambda r: r["heartbeat_rtt_ms"]["p50"]),
    ("heartbeat RTT ms p99 (probes)", lambda r: r["heartbeat_rtt_ms"]["p99"]),
    ("heartbeat RTT ms max (probes)", lambda r: r["heartbeat_rtt_ms"]["max"]),
    ("heartbeat samples in window", lambda r: r["heartbeat_samples"]),
    ("workers probed", lambda r: r["probed_workers"]),
    ("probes' own loop lag ms p99 / max", lambda r: f"{r['probe_process_loop_lag_ms']['p99']} / "
                                                     f"{r['probe_process_loop_lag_ms']['max']}"),
    ("worker p99 ms worst / median", lambda r: f"{r['heartbeat_rtt_ms_p99_by_worker']['worst']} / "
                                               f"{r['heartbeat_rtt_ms_p99_by_worker']['median']}"),
    ("workers with p99 > 50 ms", lambda r: r["heartbeat_rtt_ms_p99_by_worker"]["workers_over_50ms"]),
    ("heartbeats > 50 ms", lambda r: sum(v for k, v in r["heartbeat_rtt_ms_histogram"].items()
                                         if k not in ("<=2", "<=5", "<=10", "<=20", "<=50"))),
    ("worker on CPU / waiting for CPU", lambda r: f"{r.get('worker_cpu_share_in_window')} / "
                                                  f"{r.get('worker_waiting_for_cpu_share_in_window')}"),
    ("loop lag ms p99 (<= bucket)", lambda r: r.get("loop_lag_ms_p99_le")),
    ("loop lag ms max (<= bucket)", lambda r: r.get("loop_lag_ms_max_le")),
    ("loop stalls > 200 ms", lambda r: r.get("stalls_over_200ms")),
    ("run-queue slices / longest ms", lambda r: f"{r.get('runqueue_slices')} / "
                                                f"{r.get('runqueue_longest_slice_ms')}"),
    ("CPU gate tokens / grants", lambda r: f"{r['cpu_gate']['tokens']} / {r['cpu_gate']['grants']}"
                                           if r.get("cpu_gate") else "no gate"),
    ("broadcast window s", lambda r: r["broadcast_window_s"]),
    ("last delivery s (bench)", lambda r: r["bench"]["broadcast_last_delivery_s"]),
    ("delivery latency ms p50/p99", lambda r: f"{r['bench']['broadcast_latency_ms_p50']} / "
                                              f"{r['bench']['broadcast_latency_ms_p99']}"),
    ("deliveries / lost", lambda r: f"{r['bench']['broadcast_deliveries']} / "
                                    f"{r['bench']['deliveries_lost']}"),
    ("server CPU us / delivery", lambda r: r["bench"]["server_cpu_us_per_delivery"]),
    ("bench clients' RTT ms p50/p99", lambda r: f"{r['bench']['heartbeat_rtt_ms_p50']} / "
                                                f"{r['bench']['heartbeat_rtt_ms_p99']}"),
]


def print_table(results: dict[str, dict[str, Any]]) -> None:
    modes = list(results)
    print()
    print(f"{'':34}" + "".join(f"{m:>22}" for m in modes))
    for label, fn in ROWS:
        cells = []
        for m in modes:
            try:
                cells.append(str(fn(results[m])))
            except (KeyError, TypeError):
                cells.append("-")
        print(f"{label:34}" + "".join(f"{c:>22}" for c in cells))


def compare(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """How much each mode wins (> 1) or loses (< 1) against the ones before it in MODES' order
    reversed (gated vs chunked vs inline), per figure: the other's figure over this one's."""

    def ratio(a: Any, b: Any) -> float | None:
        return round(b / a, 2) if isinstance(a, int | float) and isinstance(b, int | float) \
            and a > 0 else None

    figures = {
        "heartbeat_p99": lambda r: r["heartbeat_rtt_ms"]["p99"],
        "heartbeat_max": lambda r: r["heartbeat_rtt_ms"]["max"],
        "worst_worker_heartbeat_p99": lambda r: r["heartbeat_rtt_ms_p99_by_worker"]["worst"],
        "last_delivery": lambda r: r["bench"]["broadcast_last_delivery_s"],
        "cpu_per_delivery": lambda r: r["bench"]["server_cpu_us_per_delivery"],
    }
    out: dict[str, Any] = {}
    for better, worse in (("gated", "chunked"), ("chunked", "inline"), ("gated", "inline")):
        a, b = results.get(better), results.get(worse)
        if not a or not b:
            continue
        for name, fn in figures.items():
            try:
                out[f"{name}_{worse}_over_{better}"] = ratio(fn(a), fn(b))
            except (KeyError, TypeError):
                out[f"{name}_{worse}_over_{better}"] = None
    return out


async def amain(args: argparse.Namespace) -> int:
    # The probes' samples, the status timeline and the lag log grow to ~10^5 objects in a run:
    # a full collection of them would pause the probes (their RTT is this loop's too).
    gc.disable()
    cfg = load_config(default_server_config(), os.environ)
    token = encode_hs256({"sub": "probe", "exp": int(time.time()) + 3600}, cfg.token_hmac_secret)
    workdir = Path(tempfile.mkdtemp(prefix="fanout-slicing-"))
    results: dict[str, dict[str, Any]] = {}
    try:
        for mode in args.modes:
            results[mode] = await run_mode(mode, args, token, workdir)
    finally:
        if not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs: {workdir}")
    print_table(results)
    report: dict[str, Any] = {
        "schema": "tidegate.bench.fanout_slicing/1",
        "date": DATE,
        "command": [sys.executable, *sys.argv],
        "host": {"cores": os.cpu_count(), "python": platform.python_version(),
                 "kernel": platform.release(),
                 "note": "2 cores shared with other work during the run"},
        "workload": {"connections": args.connections,
                     "workers": args.server_workers or "the bench's default (by the fd limit)",
                     "bench_args": args.bench_arg, "rate_per_s": args.rate,
                     "count": args.count, "probes": args.probes,
                     "probe_interval_s": args.probe_interval, "channel": args.channel},
        "results": results,
        "comparison": compare(results),
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwritten: {args.json}")
    cmp_ = report["comparison"]
    if cmp_:
        print("ratios (> 1: the mode after 'over' is better): "
              + ", ".join(f"{k} {v}" for k, v in cmp_.items()))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=18_000)
    p.add_argument("--rate", type=float, default=2.0, help="publications per second")
    p.add_argument("--count", type=int, default=8, help="publications")
    p.add_argument("--timeout", type=float, default=40.0,
                   help="how long the bench waits for every delivery after the last publish")
    p.add_argument("--server-workers", type=int, default=1,
                   help="0: as many as the bench sizes for --connections (27 for 500k here)")
    p.add_argument("--hold", type=float, default=1.0, help="the bench's --hold")
    p.add_argument("--broadcast-start", type=float, default=2.0,
                   help="seconds into the hold of the first publication")
    p.add_argument("--bench-arg", action="append", default=[],
                   help="one more argument for `tidegate bench` (repeat; use --bench-arg=--x)")
    p.add_argument("--probes", type=int, default=20)
    p.add_argument("--probe-interval", type=float, default=0.05)
    p.add_argument("--channel", default="bench")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--json", help="where the result goes (default: bench/results/"
                   f"{DATE}-fanout-slicing-<rate>pps.json)")
    p.add_argument("--keep-logs", action="store_true")
    args = p.parse_args()
    if args.json is None:
        size = "" if args.connections == 18_000 else f"{args.connections // 1000}k-"
        args.json = str(ROOT / "bench" / "results"
                        / f"{DATE}-fanout-slicing-{size}{args.rate:g}pps.json")
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
