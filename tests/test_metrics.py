"""/metrics: one scrape of the supervisor shows every worker's state, in Prometheus' format."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port
from test_engine import connect, echo_ok
from test_server_e2e import _close_code, _masked, _ws_raw, api


def scrape(port: int) -> dict[str, list]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {fam.name: fam.samples for fam in text_string_to_metric_families(text)}


def value(samples: list, **labels: str) -> float:
    return sum(s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items()))


def test_engine_metrics_across_workers(serve):
    mport = free_port()
    srv = serve("--workers", "2", "--balance", "handoff", "--metrics-port", str(mport),
                "--ping-interval-s", "1", "--pong-timeout-s", "5", "--tick-s", "0.1")
    conns = [connect(srv.port) for _ in range(10)]
    assert all(echo_ok(s) for s in conns)
    srv.wait_stats(lambda st: srv.total("active") == 10)
    m = scrape(mport)
    assert value(m["tidegate_connections"]) == 10
    assert {s.labels["worker"] for s in m["tidegate_connections"]} == {"0", "1"}
    assert value(m["tidegate_accepts"]) == 10
    assert value(m["tidegate_connections_capacity"]) > 10
    assert value(m["tidegate_ready"]) == 1
    assert value(m["tidegate_bytes_in"]) > 0 and value(m["tidegate_bytes_out"]) > 0
    conns[0].close()
    srv.wait_stats(lambda st: srv.total("active") == 9)
    m = scrape(mport)
    assert value(m["tidegate_closes"], reason="client_closed") == 1
    # silent clients get pinged; answering them yields server-side RTT samples
    for s in conns[1:]:
        assert echo_ok(s)
    srv.wait_stats(lambda st: srv.total("pings_sent") >= 9)
    for s in conns[1:]:
        assert echo_ok(s)
    # Every pong counted (the workers report once a second: one may have sent its stats with
    # only some of its samples in), then the scrape shows them all.
    srv.wait_stats(lambda st: sum(sum(w["heartbeat_rtt"]["counts"])
                                  for w in st["worker_stats"]) >= 9)
    m = scrape(mport)
    assert value(m["tidegate_heartbeat_rtt_seconds"], le="+Inf") >= 9


def test_gateway_metrics_count_protocol_errors_and_api_calls(gateway):
    srv = gateway("--workers", "1")
    s0 = _ws_raw(srv.port)  # a connect with a forged token: a client-side connect failure
    s0.sendall(_masked(1, b'{"id":1,"connect":{"token":"forged"}}'))
    assert _close_code(s0) == 3500
    api(srv, "publish", b"{bad json")
    api(srv, "info", b"{}", key="wrong")
    s = _ws_raw(srv.port)
    s.sendall(_masked(1, b"\xff\xfe"))
    assert _close_code(s) == 1007
    srv.wait_stats(lambda st: "protocol_error" in ",".join(srv.closes()))
    m = scrape(srv.metrics_port)
    assert value(m["tidegate_api_requests"], kind="bad_json") == 1
    assert value(m["tidegate_api_requests"], kind="unauthorized") == 1
    assert value(m["tidegate_ws_rejected"], kind="invalid_utf8") == 1
    assert value(m["tidegate_closes"], reason="protocol_error") == 1
    assert value(m["tidegate_connect_attempts"]) == 1
    assert value(m["tidegate_connect_failures"], reason="token_invalid") == 1
