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
