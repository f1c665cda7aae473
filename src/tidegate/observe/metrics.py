"""``/metrics``: the supervisor aggregates what its workers report and exposes it.

Workers send their counters and histogram snapshots every second over the control channel
(see ``Worker.stats``); this collector turns the latest ones into Prometheus metric families
with ``prometheus_client`` (its exposition, its HTTP server). A scrape reads memory that is
already there: it costs the workers nothing. Labels are bounded: worker index, close reason,
transport, GC generation; never a connection or a channel.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from tidegate.observe.histogram import Histogram

WorkerStats = Callable[[], Iterable[dict[str, Any]]]
SupervisorStats = Callable[[], dict[str, Any]]


def _buckets(snap: dict[str, Any]) -> list[tuple[str, float]]:
    out, acc = [], 0
    for bound, n in zip([*snap["bounds"], float("inf")], snap["counts"], strict=True):
        acc += n
        out.append(("+Inf" if bound == float("inf") else repr(float(bound)), float(acc)))
    return out


def _histogram(name: str, doc: str, snaps: list[tuple[str, dict[str, Any]]]) -> Metric:
    fam = HistogramMetricFamily(name, doc, labels=["worker"])
    for worker, snap in snaps:
        if snap:
            fam.add_metric([worker], _buckets(snap), sum_value=snap["sum"])
    return fam


class TidegateCollector:
    def __init__(self, workers: WorkerStats, supervisor: SupervisorStats) -> None:
        self._workers = workers
        self._supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        stats = [s for s in self._workers() if s]
        sup = self._supervisor()
        w = [(str(s.get("index", i)), s) for i, s in enumerate(stats)]

        conns = GaugeMetricFamily("tidegate_connections", "Open connections.", labels=["worker"])
        cap = GaugeMetricFamily("tidegate_connections_capacity",
                                "Connections the worker can hold (fd budget).", labels=["worker"])
        wbuf = GaugeMetricFamily("tidegate_write_buffer_bytes",
                                 "Output queued by connections above the high-water mark.",
                                 labels=["worker"])
        for idx, s in w:
            conns.add_metric([idx], s.get("active", 0))
            cap.add_metric([idx], s.get("capacity", 0))
            wbuf.add_metric([idx], s.get("write_buffer_bytes", 0))
        yield from (conns, cap, wbuf)

        for name, key, doc in (
            ("tidegate_accepts", "accepted", "Connections accepted."),
            ("tidegate_heartbeat_pings", "pings_sent", "Server heartbeat pings sent."),
            ("tidegate_bytes_in", "bytes_in", "Bytes read from clients."),
            ("tidegate_bytes_out", "bytes_out", "Bytes written to clients."),
            ("tidegate_messages_out", "writes", "Messages (writes) sent to clients."),
            ("tidegate_migrated_in", "migrated_in", "Connections taken from other workers."),
            ("tidegate_migrated_out", "migrated_out", "Connections given to other workers."),
        ):
            fam = CounterMetricFamily(name, doc, labels=["worker"])
            for idx, s in w:
                fam.add_metric([idx], s.get(key, 0))
            yield fam

        refused = CounterMetricFamily("tidegate_refused", "Connections refused.", labels=["reason"])
        reasons: dict[str, int] = {}
        for _, s in w:
            for reason, n in s.get("refusals", {}).items():
                reasons[reason] = reasons.get(reason, 0) + n
        for reason, n in sorted(reasons.items()):
            refused.add_metric([reason], n)
        refused.add_metric(["no_worker"], sup.get("refused_handoff", 0))
        yield refused

        closes = CounterMetricFamily("tidegate_closes", "Connections closed, by reason.",
                                     labels=["reason"])
        merged: dict[str, int] = {}
        for _, s in w:
            for reason, n in s.get("closes", {}).items():
                merged[_reason(reason)] = merged.get(_reason(reason), 0) + n
        for reason, n in sorted(merged.items()):
            closes.add_metric([reason], n)
        yield closes

        gcs = CounterMetricFamily("tidegate_gc_collections", "Cyclic GC collections.",
                                  labels=["generation"])
        for gen in range(3):
            gcs.add_metric([str(gen)], sum(s.get("gc_collections", [0, 0, 0])[gen] for _, s in w))
        yield gcs

        yield _histogram("tidegate_heartbeat_rtt_seconds", "Server ping to client input.",
                         [(i, s.get("heartbeat_rtt", {})) for i, s in w])
        yield _histogram("tidegate_gc_pause_seconds", "Cyclic GC pauses.",
                         [(i, s.get("gc_pause", {})) for i, s in w])
        yield _histogram("tidegate_loop_lag_seconds", "How late the loop ran a due timer.",
                         [(i, s.get("stall", {}).get("loop_lag", {})) for i, s in w])
        stalls = CounterMetricFamily("tidegate_loop_stalls", "Loop stalls past the threshold.",
                                     labels=["worker"])
        for idx, s in w:
            stalls.add_metric([idx], s.get("stall", {}).get("stalls_total", 0))
        yield stalls
        yield from _eviction_metrics(w)

        busy = GaugeMetricFamily("tidegate_blocking_pool_busy", "Blocking-pool threads busy.",
                                 labels=["worker"])
        rejected = CounterMetricFamily("tidegate_blocking_pool_rejections",
                                       "Blocking-pool calls refused (full or past deadline).",
                                       labels=["worker"])
        for idx, s in w:
            b = s.get("blocking", {})
            busy.add_metric([idx], b.get("busy", 0))
            rejected.add_metric([idx], b.get("rejections", 0))
        yield from (busy, rejected)

        yield from _cpu_gate_metrics(w, sup)

        restarts = CounterMetricFamily("tidegate_worker_restarts", "Workers restarted.")
        restarts.add_metric([], sup.get("restarts", 0))
        yield restarts
        ready = GaugeMetricFamily("tidegate_ready", "1 when every worker is up and accepting.")
        ready.add_metric([], 1 if sup.get("ready") else 0)
        yield ready
        yield from _app_metrics(w)


def _cpu_gate_metrics(w: list[tuple[str, dict[str, Any]]], sup: dict[str, Any]
                      ) -> Iterator[Metric]:
    """The CPU gate (engine/cpu_gate.py): tokens each worker got, how long it waited for
    them, and the line at the supervisor. Nothing when the node has no gate."""
    node = sup.get("cpu_gate")
    if not node:
        return
    grants = CounterMetricFamily("tidegate_cpu_gate_grants",
                                 "CPU-gate tokens granted for long run-queue jobs.",
                                 labels=["worker"])
    wait = CounterMetricFamily("tidegate_cpu_gate_wait_seconds",
                               "Time long run-queue jobs waited for a CPU-gate token.",
                               labels=["worker"])
    for idx, s in w:
        g = (s.get("runqueue") or {}).get("gate") or {}
        grants.add_metric([idx], g.get("grants", 0))
        wait.add_metric([idx], g.get("wait_s_total", 0.0))
    waiting = GaugeMetricFamily("tidegate_cpu_gate_waiting",
                                "Workers waiting for a CPU-gate token.")
    waiting.add_metric([], node.get("waiting", 0))
    tokens = GaugeMetricFamily("tidegate_cpu_gate_tokens",
                               "Workers that may run long run-queue jobs at once.")
    tokens.add_metric([], node.get("tokens", 0))
    yield from (grants, wait, waiting, tokens)


def _eviction_metrics(w: list[tuple[str, dict[str, Any]]]) -> Iterator[Metric]:
    """The L3 eviction controller (engine/eviction.py): sheds by class, summed over workers
    (labels: the handler's bounded classes), and per worker its state and pressure."""
    evicted = CounterMetricFamily("tidegate_evictions",
                                  "Connections shed by the eviction controller, by class.",
                                  labels=["class"])
    would = CounterMetricFamily("tidegate_evictions_dry_run",
                                "Connections the eviction controller would have shed (dry run).",
                                labels=["class"])
    shedding = GaugeMetricFamily("tidegate_eviction_shedding",
                                 "1 while the worker is above an eviction ceiling and shedding.",
                                 labels=["worker"])
    ratio = GaugeMetricFamily("tidegate_eviction_pressure_ratio",
                              "Last measurement / its eviction ceiling (1 = at the ceiling).",
                              labels=["worker", "resource"])
    totals: dict[str, dict[str, int]] = {"evictions": {}, "would_evict": {}}
    for idx, s in w:
        ev = s.get("eviction")
        if not ev:
            continue
        for key, merged in totals.items():
            for cls, n in ev.get(key, {}).items():
                merged[cls] = merged.get(cls, 0) + n
        shedding.add_metric([idx], 1 if ev.get("shedding") else 0)
        for resource, r in sorted(ev.get("pressure", {}).items()):
            ratio.add_metric([idx, resource], r)
    for fam, key in ((evicted, "evictions"), (would, "would_evict")):
        for cls, n in sorted(totals[key].items()):
            fam.add_metric([cls], n)
    yield from (evicted, would, shedding, ratio)


def _reason(reason: str) -> str:
    """Bound the label: ``disconnect_3008`` stays, free-form details are cut at ':'."""
    return reason.split(":", 1)[0]


def _app_metrics(w: list[tuple[str, dict[str, Any]]]) -> Iterator[Metric]:
    """Counters apps report (``EventHandler.stats``): summed over workers, one family each."""
    counters: dict[str, dict[str, float]] = {}
    hists: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for idx, s in w:
        for app in s.get("apps", []):
            for key, value in app.items():
                if isinstance(value, dict) and "bounds" in value:
                    hists.setdefault(key, []).append((idx, value))
                elif isinstance(value, dict):
                    for label, n in value.items():
                        counters.setdefault(key, {})
                        counters[key][label] = counters[key].get(label, 0) + n
                elif isinstance(value, int | float):
                    counters.setdefault(key, {})
                    counters[key][""] = counters[key].get("", 0) + value
    for key, values in sorted(counters.items()):
        key, _, label_name = key.partition(":")  # "closes_total:reason" labels by reason
        name = f"tidegate_{key}"
        if name.endswith("_total"):
            name = name[: -len("_total")]
        if "" in values and len(values) == 1:
            if key.endswith("_total"):
                counter = CounterMetricFamily(name, key)
                counter.add_metric([], values[""])
                yield counter
            else:
                gauge = GaugeMetricFamily(name, key)
                gauge.add_metric([], values[""])
                yield gauge
            continue
        by_kind = CounterMetricFamily(name, key, labels=[label_name or "kind"])
        for label, n in sorted(values.items()):
            by_kind.add_metric([label or "all"], n)
        yield by_kind
    for key, snaps in sorted(hists.items()):
        yield _histogram(f"tidegate_{key}", key, snaps)


def serve(port: int, workers: WorkerStats, supervisor: SupervisorStats, host: str = "") -> Any:
    """Start the /metrics HTTP server (a thread in the supervisor). Returns the server."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TidegateCollector(workers, supervisor))
    server, _thread = start_http_server(port, addr=host or "0.0.0.0", registry=registry)
    return server


def merged_quantile(snaps: list[dict[str, Any]], q: float) -> float | None:
    merged = Histogram.merge(snaps)
    return None if merged is None else Histogram.quantile(merged, q)
