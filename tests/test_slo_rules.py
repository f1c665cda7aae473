"""SLOs as code: the Prometheus rules, their promtool unit tests, the Grafana dashboard, the runbook.

* ``promtool check rules`` and ``promtool test rules`` (Debian's ``prometheus`` package, which
  ``make test`` installs through scripts/system-deps.sh) pass on deploy/prometheus/.
* Every metric name the rules and the dashboard read is one tidegate exports (EXPORTED below,
  the contract with ``/metrics``) or one the rules record: a typo fails here, not in production
  as a silently empty panel or an alert that can never fire.
* Every dashboard query is valid PromQL (promtool parses it as a recording rule).
* Every alert has a severity, a summary, a description and a runbook_url whose anchor exists in
  docs/runbook.md.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "tidegate-rules.yml"
RULE_TESTS = sorted((ROOT / "deploy" / "prometheus" / "tests").glob("*.yml"))
DASHBOARD = ROOT / "deploy" / "grafana" / "tidegate.json"
RUNBOOK = ROOT / "docs" / "runbook.md"

# What tidegate's /metrics exports (port 9100): the contract the rules and dashboard rely on.
COUNTERS = {
    "tidegate_accepts_total",
    "tidegate_refused_total",  # {reason}: capacity, no_worker, rate_limit
    "tidegate_closes_total",  # {reason}: client_closed, ping_timeout, slow_consumer, ...
    "tidegate_connect_attempts_total",
    "tidegate_connect_failures_total",  # {reason}: internal, unavailable (ours); token_* (theirs)
    "tidegate_messages_in_total",
    "tidegate_messages_out_total",
    "tidegate_bytes_in_total",
    "tidegate_bytes_out_total",
    "tidegate_evictions_total",  # {class}
    "tidegate_evictions_dry_run_total",  # {class}
    "tidegate_gc_collections_total",  # {generation}
    "tidegate_worker_restarts_total",
    "tidegate_blocking_pool_rejections_total",
    "tidegate_broker_errors_total",
    "tidegate_loop_stalls_total",  # {worker}
}
GAUGES = {
    "tidegate_connections",  # {transport, worker}
    "tidegate_connections_capacity",  # {worker}: the worker's connection ceiling
    "tidegate_write_buffer_bytes",
    "tidegate_blocking_pool_busy",
    "tidegate_ready",  # 0/1
    "tidegate_eviction_shedding",  # {worker}: 0/1
    "tidegate_eviction_pressure_ratio",  # {worker, resource}
}
HISTOGRAMS = {
    "tidegate_heartbeat_rtt_seconds",
    "tidegate_delivery_latency_seconds",  # needs an le="0.5" bucket
    "tidegate_loop_lag_seconds",  # {worker}
    "tidegate_gc_pause_seconds",
    "tidegate_broker_publish_seconds",
}
EXPORTED = COUNTERS | GAUGES | {h + s for h in HISTOGRAMS for s in ("_bucket", "_count", "_sum")}

MAKE_TEST = ("promtool not found. It comes with Debian's `prometheus` package: run `make test` "
             "(its scripts/system-deps.sh installs what the tests need), or "
             "`apt-get install -y prometheus` (the service need not run).")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(MAKE_TEST, pytrace=False)
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=240)


# ---- PromQL metric names ------------------------------------------------------------------
_KEYWORDS = {"and", "or", "unless", "bool", "inf", "nan", "offset", "by", "without", "on",
             "ignoring", "group_left", "group_right"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (Grafana variables allowed) selects."""
    s = re.sub(r"\$\{?\w+\}?", "x", expr)  # Grafana variables: $job, ${__rate_interval}
    s = re.sub(r"label_values\(\s*([^,()]*?)\s*,\s*\w+\s*\)", r"(\1)", s)  # templating queries
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', s)  # strings
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # ranges, subqueries
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\boffset\s+-?[\w.]+", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.:])[A-Za-z_:][\w:]*", s):
        if s[m.end():].lstrip().startswith("("):
            continue  # a function or an aggregation
        if m.group(0).lower() not in _KEYWORDS:
            names.add(m.group(0))
    return names


def test_metric_names_parser() -> None:
    assert metric_names('sum by (job, le) (rate(tidgate_accepts_total{job=~"$job"}[5m]))') == {
        "tidgate_accepts_total"}
    assert metric_names("histogram_quantile(0.99, sum(rate(a_bucket{le=\"0.5\"}[$__rate_interval]))) "
                        "> 1e-3 and on (job) b:c:rate5m / ignoring(x) d offset 5m") == {
        "a_bucket", "b:c:rate5m", "d"}
    assert metric_names('label_values(tidegate_ready{job=~"$job"}, instance)') == {"tidegate_ready"}
    assert metric_names("(x or y * 0) / clamp_min(z, 1) > bool 14.4 * 0.001") == {"x", "y", "z"}


# ---- the rules file, read line by line (promtool validates its YAML) -----------------------
def rules_text() -> str:
    return RULES.read_text()


def recorded_names() -> set[str]:
    return set(re.findall(r"^\s*- record:\s*(\S+)\s*$", rules_text(), re.M))


def rule_exprs() -> list[str]:
    """Every `expr:` of the rules file, block scalars (| and >) included."""
    lines = rules_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)expr:\s*(.*)$", line)
        if not m:
            continue
        indent, value = len(m.group(1)), m.group(2).strip()
        if value and value[0] not in "|>":
            out.append(value)
            continue
        block = []
        for nxt in lines[i + 1:]:
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                break
            block.append(nxt.strip())
        out.append(" ".join(block))
    return out


def alert_blocks() -> dict[str, list[str]]:
    """alertname -> the text of each rule with that name."""
    blocks: dict[str, list[str]] = {}
    for chunk in re.split(r"^\s*- (?=alert:|record:)", rules_text(), flags=re.M)[1:]:
        m = re.match(r"alert:\s*(\S+)", chunk)
        if m:
            blocks.setdefault(m.group(1), []).append(chunk)
    return blocks


# ---- promtool ---------------------------------------------------------------------------
def test_promtool_check_rules() -> None:
    res = run_promtool("check", "rules", str(RULES.relative_to(ROOT)))
    assert res.returncode == 0, f"promtool check rules failed:\n{res.stdout}\n{res.stderr}"
    assert "SUCCESS" in res.stdout


def test_promtool_unit_tests() -> None:
    """Each SLO alert fires (and stays quiet) on constructed series: deploy/prometheus/tests/."""
    names = {p.name for p in RULE_TESTS}
    assert {"connect-availability.test.yml", "delivery-latency.test.yml",
            "operational.test.yml"} <= names, names
    res = run_promtool("test", "rules", *(str(p.relative_to(ROOT)) for p in RULE_TESTS))
    assert res.returncode == 0, f"promtool test rules failed:\n{res.stdout}\n{res.stderr}"
    assert res.stdout.count("SUCCESS") == len(RULE_TESTS), res.stdout


# ---- the rules: names and alert conventions ---------------------------------------------
def test_rules_read_only_exported_or_recorded_metrics() -> None:
    known = EXPORTED | recorded_names()
    exprs = rule_exprs()
    assert len(exprs) == len(re.findall(r"^\s*expr:", rules_text(), re.M)) > 50
    unknown = {n: e for e in exprs for n in metric_names(e) if n not in known}
    assert not unknown, f"rules read metrics nobody exports or records: {unknown}"


def test_slo_alerts_and_windows() -> None:
    text = rules_text()
    for sli in ("job:tidegate_connect_errors:ratio_rate", "job:tidegate_connect_availability:ratio_rate",
                "job:tidegate_delivery_slow:ratio_rate", "job:tidegate_delivery_latency:ratio_rate"):
        for window in ("5m", "30m", "1h", "2h", "6h", "1d", "3d", "30d"):
            assert sli + window in recorded_names(), sli + window
    # the workbook's four (burn rate, long window, short window, severity) pairs, both SLOs
    for budget in ("0.001", "0.01"):
        for rate, long, short in (("14.4", "1h", "5m"), ("6", "6h", "30m"),
                                  ("3", "1d", "2h"), ("1", "3d", "6h")):
            pair = (rf"ratio_rate{long} > \({rate} \* {budget}\)\s+and\s+"
                    rf"\S+:ratio_rate{short} > \({rate} \* {budget}\)")
            assert re.search(pair, text), (budget, rate, long, short)
    assert 'tidegate_delivery_latency_seconds_bucket{le="0.5"}' in text
    assert 'tidegate_connect_failures_total{reason=~"internal|unavailable"}' in text


def test_every_alert_has_severity_annotations_and_a_runbook_anchor() -> None:
    anchors = runbook_anchors()
    blocks = alert_blocks()
    assert {"TidegateConnectErrorBudgetBurn", "TidegateDeliveryLatencyBudgetBurn",
            "TidegateWorkerRestartsFlapping", "TidegateLoopLagHigh", "TidegateLoopStalls",
            "TidegateNotReady", "TidegateNearCapacity", "TidegateSlowConsumerClosesSpike",
            "TidegateGCPauseHigh"} <= set(blocks)
    for name, rules in blocks.items():
        for block in rules:
            assert re.search(r"^\s+severity: (page|ticket)$", block, re.M), name
            for key in ("summary", "description"):
                assert re.search(rf"^\s+{key}: \S", block, re.M), (name, key)
            m = re.search(r"^\s+runbook_url: docs/runbook\.md#(\S+)$", block, re.M)
            assert m, f"{name}: no runbook_url docs/runbook.md#..."
            assert m.group(1) == name.lower(), (name, m.group(1))
            assert m.group(1) in anchors, f"{name}: docs/runbook.md has no #{m.group(1)}"


def test_runbook_links_resolve() -> None:
    """Every in-page link of docs/runbook.md (``](#anchor)``) has its heading."""
    anchors = runbook_anchors()
    links = set(re.findall(r"\]\(#([^)]+)\)", RUNBOOK.read_text()))
    assert links and links <= anchors, links - anchors


def runbook_anchors() -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    out = set()
    for line in RUNBOOK.read_text().splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).replace("`", "").lower()).replace(" ", "-")
            out.add(slug)
        out.update(re.findall(r'<a (?:id|name)="([^"]+)"', line))
    return out


# ---- the dashboard ----------------------------------------------------------------------
def dashboard() -> dict:
    return dict(json.loads(DASHBOARD.read_text()))


def dashboard_queries(d: dict) -> list[tuple[str, str]]:
    """(where, expr) for every panel target and templating query."""
    out = []
    for p in d["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t["expr"]))
        for sub in p.get("panels", []):  # collapsed rows
            for t in sub.get("targets", []):
                out.append((sub["title"], t["expr"]))
    for v in d["templating"]["list"]:
        q = v.get("query")
        out.append((f"${v['name']}", q["query"] if isinstance(q, dict) else q))
    return out


def test_dashboard_shape() -> None:
    d = dashboard()
    assert 36 <= d["schemaVersion"] <= 41
    assert [i["name"] for i in d["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    titles = " | ".join(p["title"] for p in d["panels"]).lower()
    for want in ("connections by worker", "accepts and refusals", "closes by reason",
                 "heartbeat rtt p50 / p99", "delivery latency p50 / p99", "loop lag p99 by worker",
                 "gc pause", "connect availability: error budget left",
                 "delivery latency: error budget left", "connect availability: burn rate",
                 "delivery latency: burn rate", "worker restarts"):
        assert want in titles, want
    for p in d["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]


def test_dashboard_reads_only_exported_or_recorded_metrics() -> None:
    known = EXPORTED | recorded_names()
    unknown = {(where, n) for where, e in dashboard_queries(dashboard())
               for n in metric_names(e) if n not in known}
    assert not unknown, f"dashboard panels read metrics nobody exports or records: {unknown}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query (Grafana variables filled in) as a recording rule."""
    rules = []
    for i, (_where, expr) in enumerate(dashboard_queries(dashboard())):
        if expr.startswith("label_values("):
            continue
        expr = (expr.replace("$__rate_interval", "5m").replace("$__range", "1d")
                .replace("$job", ".*").replace("$instance", ".*"))
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query:{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"  # JSON is YAML
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = run_promtool("check", "rules", str(path))
    assert res.returncode == 0, f"dashboard queries are not valid PromQL:\n{res.stdout}\n{res.stderr}"
