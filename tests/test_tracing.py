"""OpenTelemetry: spans of connects, API calls and publish-to-delivery, exported for real."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

from test_server_e2e import API_KEY, raw_client


def spans(log: str) -> list[dict]:
    out = []
    for line in log.splitlines():
        line = line.strip()
        if line.startswith("{") and '"context"' in line:
            out.append(json.loads(line))
    return out


def test_traces_continue_the_callers_trace_to_every_worker(gateway):
    srv = gateway("--workers", "2", "--balance", "handoff", "--tracing-exporter", "console")

    async def main() -> None:
        clients = [await raw_client(srv, f"u{i}") for i in range(2)]
        for c in clients:
            await c.call("subscribe", {"channel": "news"})
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        req = urllib.request.Request(
            f"http://127.0.0.1:{srv.port}/api/publish",
            data=b'{"channel":"news","data":{"x":1}}', method="POST",
            headers={"X-API-Key": API_KEY,
                     "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert "result" in json.loads(resp.read())
        for c in clients:
            assert (await c.push())["pub"]["data"] == {"x": 1}

        deadline = time.monotonic() + 15
        while True:
            got = spans(srv.log())
            mine = [s for s in got if s["context"]["trace_id"] == "0x" + trace_id]
            delivers = {s["resource"]["attributes"]["tidegate.worker"] for s in mine
                        if s["name"] == "deliver"}
            connects = [s for s in got if s["name"] == "ws.connect"]
            if delivers == {0, 1} and len(connects) >= 2:
                break
            assert time.monotonic() < deadline, got
            await asyncio.sleep(0.2)
        api_span = next(s for s in mine if s["name"] == "api.publish")
        assert api_span["parent_id"] == "0x00f067aa0ba902b7"  # the caller's span
        assert api_span["attributes"]["tidegate.channel"] == "news"
        root = connects[0]
        children = {s["name"] for s in got if s.get("parent_id") == root["context"]["span_id"]}
        assert children == {"ws.handshake", "client.connect"}

    asyncio.run(main())


def test_tracing_is_off_by_default(gateway):
    srv = gateway("--workers", "1")

    async def main() -> None:
        await raw_client(srv)

    asyncio.run(main())
    assert spans(srv.log()) == []


def test_root_sampling_follows_the_ratio() -> None:
    from tidegate.observe.tracing import _Tracing

    tracing = _Tracing()
    assert not tracing.sample_root()  # off: nothing is traced
    tracing.setup("console", sample_ratio=0.0)
    assert not any(tracing.sample_root() for _ in range(1000))
    tracing.setup("console", sample_ratio=0.5)
    assert 300 < sum(tracing.sample_root() for _ in range(1000)) < 700
    tracing.setup("console", sample_ratio=1.0)
    assert all(tracing.sample_root() for _ in range(100))
    tracing.shutdown()


class _OtlpSink:
    """An OTLP/HTTP collector stand-in on a thread: keeps each request's path and body."""

    def __init__(self) -> None:
        import http.server
        import threading

        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                received.append((self.path, self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_otlp_exports_a_sampled_connects_spans(monkeypatch) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from tidegate.observe.tracing import _Tracing

    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    sink = _OtlpSink()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", sink.endpoint)
    try:
        tracing = _Tracing()
        tracing.setup("otlp", sample_ratio=1.0, worker=3)
        assert tracing.sample_root()
        # The spans the gateway records for one connect (websocket_app._upgrade and after).
        root = tracing.start("ws.connect", None, **{"tidegate.transport": "websocket"})
        with tracing.span("ws.handshake", root):
            pass
        child = tracing.start("client.connect", root)
        child.end()
        root.end()
        tracing.shutdown()  # flushes the batch
        assert [path for path, _ in sink.received] == ["/v1/traces"]
        req = ExportTraceServiceRequest.FromString(sink.received[0][1])
        (rs,) = req.resource_spans
        resource = {a.key: a.value for a in rs.resource.attributes}
        assert resource["service.name"].string_value == "tidegate"
        assert resource["tidegate.worker"].int_value == 3
        got = {s.name: s for ss in rs.scope_spans for s in ss.spans}
        assert set(got) == {"ws.connect", "ws.handshake", "client.connect"}
        assert got["ws.handshake"].parent_span_id == got["ws.connect"].span_id
        assert got["client.connect"].parent_span_id == got["ws.connect"].span_id
        assert got["ws.connect"].attributes[0].value.string_value == "websocket"
    finally:
        sink.close()


_IMPORTS_PROBE = """
import sys, threading, http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *a): pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
threading.Thread(target=srv.serve_forever, daemon=True).start()
os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{srv.server_address[1]}"
from tidegate.observe.tracing import TRACING
TRACING.setup("otlp", 1.0)
booted = set(sys.modules)
span = TRACING.start("ws.connect", None)
span.end()
assert TRACING._provider.force_flush(10_000)
print(sorted(set(sys.modules) - booted))
"""


def test_otlp_exporter_imports_everything_at_boot() -> None:
    """What the first span and the first export need is imported by setup (the worker's boot,
    before its gc.freeze), not while connections arrive."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    out = subprocess.run([sys.executable, "-c", _IMPORTS_PROBE], env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == "[]", out
