"""`tidegate bench --protocol ws`: the WebSocket gateway client's frame handling, the broadcast
bookkeeping, and a real run against a real gateway with a broadcast.

No assertion here depends on how fast the machine is: only counts and the presence of figures.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from test_bench import FakeTransport  # the asyncio transport under a client connection
from tidegate.bench import procstat
from tidegate.bench.client import (
    CLOSED,
    CLOSING,
    OPEN,
    PENDING,
    PING_ID_BASE,
    PROTOCOLS,
    WS_CONNECTING,
    WS_PONG_FRAME,
    WS_READY,
    WS_SUBSCRIBING,
    ClientConfig,
    Deliveries,
    HandshakeError,
    Stats,
    WsConnection,
    WsDriver,
    ping_id,
)
from tidegate.bench.runner import BROADCAST_KEYS, REQUIRED_KEYS
from tidegate.protocol import websocket as ws

# ------------------------------------------------------------------------------ frames


def server_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """An unmasked server frame (7-, 16- or 64-bit length)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big")
    return head + payload


def client_payloads(written: list[bytes]) -> list[bytes]:
    """Decode what the client wrote (after the upgrade request) with the server's codec: every
    frame must be a valid masked client frame."""
    codec = ws.WebSocketFrameCodec(1 << 20)  # require_mask: what the server insists on
    out: list[bytes] = []
    data = b"".join(w for w in written if not w.startswith(b"GET "))
    pos = 0
    while pos < len(data):
        frame, pos = codec.decode(data, pos, len(data))
        assert frame is not None and frame.fin, data
        out.append(bytes(frame.payload))
    return out


def _driver(stats: Stats, count: int = 4) -> WsDriver:
    config = ClientConfig(index=0, host="127.0.0.1", port=8000, sources=["127.0.0.2"],
                          connections=1, protocol="ws", broadcast_count=count)
    return WsDriver(stats, config)


def _accept_head(driver: WsDriver) -> bytes:
    key = driver.upgrade.split(b"Sec-WebSocket-Key: ")[1].split(b"\r\n")[0].decode()
    return ws.accept_response(key, None)


def _connection(stats: Stats, count: int = 4) -> tuple[WsConnection, FakeTransport, WsDriver]:
    driver = _driver(stats, count)
    conn = WsConnection()
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport, driver


def _established(stats: Stats, count: int = 4) -> tuple[WsConnection, FakeTransport]:
    conn, transport, driver = _connection(stats, count)
    conn.data_received(_accept_head(driver))
    conn.data_received(server_frame(b'{"id":1,"connect":{"client":"c1"}}'))
    conn.data_received(server_frame(b'{"id":2,"subscribe":{}}'))
    assert conn.phase == WS_READY
    conn.state = OPEN  # what the client process does once the connect is done
    stats.open += 1
    transport.written.clear()
    return conn, transport


def test_ws_driver_is_registered() -> None:
    assert PROTOCOLS["ws"] is WsDriver


def test_ws_handshake_connect_subscribe_in_order() -> None:
    loop = asyncio.new_event_loop()
    try:
        stats = Stats()
        conn, transport, driver = _connection(stats)
        conn.waiter = waiter = loop.create_future()
        assert driver.upgrade.startswith(b"GET /connection/websocket HTTP/1.1\r\n")
        assert b"Sec-WebSocket-Version: 13\r\n" in driver.upgrade
        head = _accept_head(driver)
        conn.data_received(head[:10])  # a head split across reads
        assert conn.phase != WS_CONNECTING and transport.written == []
        conn.data_received(head[10:])
        assert conn.phase == WS_CONNECTING
        [connect] = client_payloads(transport.written)
        assert json.loads(connect) == {"id": 1, "connect": {"name": "tidegate-bench"}}
        conn.data_received(server_frame(b'{"id":1,"connect":{"client":"c1","ping":25}}'))
        assert conn.phase == WS_SUBSCRIBING
        assert json.loads(client_payloads(transport.written)[1]) == {
            "id": 2, "subscribe": {"channel": "bench"}}
        assert not waiter.done()
        conn.data_received(server_frame(b'{"id":2,"subscribe":{}}'))
        assert conn.phase == WS_READY and waiter.done() and waiter.result() is None
        assert conn.waiter is None and stats.errors == {} and stats.protocol_errors == 0
    finally:
        loop.close()


def test_ws_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDEGATE_BENCH_TOKEN", "tok.en.x")
    stats = Stats()
    conn, transport, driver = _connection(stats)
    conn.data_received(_accept_head(driver))
    [connect] = client_payloads(transport.written)
    assert json.loads(connect)["connect"]["token"] == "tok.en.x"


@pytest.mark.parametrize(("replies", "reason"), [
    ([b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"], "http_403"),
    ([b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: nope\r\n\r\n"],
     "bad_sec_websocket_accept"),
    (["ACCEPT", server_frame(b'{"id":1,"error":{"code":109,"message":"token expired"}}')],
     "connect_error_109"),
    (["ACCEPT", server_frame(b'{"id":1,"connect":{}}'),
      server_frame(b'{"id":2,"error":{"code":103,"message":"permission denied"}}')],
     "subscribe_error_103"),
    (["ACCEPT", server_frame(b"\x0d\xacinvalid token", 0x8)], "ws_close_3500"),
])
def test_ws_refused_connects_fail_with_a_reason(replies: list[Any], reason: str) -> None:
    loop = asyncio.new_event_loop()
    try:
        stats = Stats()
        conn, transport, driver = _connection(stats)
        conn.waiter = waiter = loop.create_future()
        for reply in replies:
            conn.data_received(_accept_head(driver) if reply == "ACCEPT" else reply)
        exc = waiter.exception()
        assert isinstance(exc, HandshakeError) and exc.reason == reason
        assert transport.closed
        assert stats.unexpected_closes == 0  # a failed connect, not a close
    finally:
        loop.close()


def test_ws_answers_server_pings_and_measures_its_own() -> None:
    stats = Stats()
    conn, transport = _established(stats)
    # Server pings: the empty reply, alone, batched with "\n", and a WebSocket-level ping.
    conn.data_received(server_frame(b"{}") + server_frame(b"{}\n{}") + server_frame(b"p", 0x9))
    assert transport.written == [WS_PONG_FRAME] * 3 + [b"\x8a\x81\0\0\0\0p"]
    assert stats.server_pings == 4
    transport.written.clear()
    token = time.monotonic_ns()
    assert conn.ping(token)
    stats.outstanding += 1
    [payload] = client_payloads(transport.written)
    pid = ping_id(token)
    assert payload == b'{"id":%d,"ping":{}}' % pid and pid >= PING_ID_BASE
    assert json.loads(payload)["id"] < 1 << 31  # the protocol's ids are uint32
    other = ping_id(token - (1 << 20))
    conn.data_received(server_frame(b'{"id":%d,"ping":{}}' % other))  # not the one we wait for
    assert stats.late_pongs == 1 and conn.ping_sent == token
    reply = server_frame(b'{"id":%d,"ping":{}}' % pid)
    for i in range(len(reply)):  # one byte at a time
        conn.data_received(reply[i : i + 1])
    assert stats.pongs == 1 and stats.outstanding == 0 and conn.ping_sent == 0
    assert stats.rtt_connect_phase_us.count == 1 and stats.rtt_hold_us.count == 0
    stats.hold_since_ns = time.monotonic_ns()
    token = time.monotonic_ns()
    assert conn.ping(token)
    conn.data_received(server_frame(b'{"id":%d,"ping":{}}' % ping_id(token)))
    assert stats.rtt_hold_us.count == 1
    assert stats.protocol_errors == 0 and stats.errors == {}


def test_ws_counts_publications_per_seq() -> None:
    stats = Stats()
    conn, _ = _established(stats, count=4)
    conn2, _ = _established(stats, count=4)
    d = WsConnection.deliveries
    t = time.time() - 0.5

    def push(seq: int, offset: int, channel: str = "bench") -> bytes:
        data = json.dumps({"seq": seq, "t": t}).encode()
        return b'{"push":{"channel":"%s","pub":{"data":%s,"offset":%d}}}' % (
            channel.encode(), data, offset)

    big = b'{"push":{"channel":"bench","pub":{"data":{"seq":2,"t":%r,"pad":"%s"},"offset":3}}}' % (
        t, b"x" * 70000)
    conn.data_received(server_frame(push(0, 1)) + server_frame(push(1, 2) + b"\n" + big))
    conn2.data_received(server_frame(push(0, 1)))
    conn2.data_received(server_frame(push(0, 1)))  # a duplicate: not counted again
    conn2.data_received(server_frame(push(2, 3)))
    conn2.data_received(server_frame(push(1, 2)))  # out of order: counted, and flagged
    conn.data_received(server_frame(push(0, 9, "other")))  # another channel
    conn.data_received(server_frame(push(7, 10)))  # a seq beyond the broadcast
    assert d.received == [2, 2, 2, 0]
    assert d.total == 6 and d.duplicates == 1 and d.out_of_order == 1 and d.other == 2
    assert d.latency_us.count == 6 and d.latency_us.min is not None
    assert d.latency_us.min >= 400_000  # t was half a second ago
    assert all(d.first_ns[i] and d.last_ns[i] >= d.first_ns[i] for i in range(3))
    assert d.first_ns[3] == d.last_ns[3] == 0
    out = d.to_dict()
    assert out["received"] == [2, 2, 2, 0] and out["latency_us"]["count"] == 6
    assert stats.protocol_errors == 0


def test_deliveries_parse_cache_is_bounded() -> None:
    d = Deliveries(2, "bench")
    for i in range(1000):
        d.parse(b'{"push":{"channel":"bench","pub":{"data":{"seq":1,"t":%d}}}}' % i)
    assert len(d.cache) <= 256
    assert d.parse(b"not json") == (-1, 0)


def test_ws_close_kinds() -> None:
    stats = Stats()
    conn, transport = _established(stats)
    conn.data_received(server_frame(b"\x0b\xb9shutdown", 0x8))  # 3001 by the server
    assert transport.closed
    conn.connection_lost(None)
    assert stats.unexpected_closes == 1 and stats.unexpected_close_reasons == {"ws_close_3001": 1}
    assert stats.open == 0 and conn.state == CLOSED
    conn2, transport2 = _established(stats)
    conn2.close()
    assert conn2.state == CLOSING and transport2.closed
    conn2.connection_lost(None)
    assert stats.unexpected_closes == 1 and stats.open == 0
    conn3, _ = _established(stats)
    conn3.data_received(b"\x81\x85\0\0\0\0hello")  # a masked server frame: a protocol error
    assert stats.protocol_errors == 1 and stats.errors == {"protocol_ws_masked_server_frame": 1}
    # Lost while connecting: the connect's failure, no close counted.
    conn4, _, _ = _connection(stats)
    assert conn4.state == PENDING
    conn4.connection_lost(ConnectionResetError())
    assert stats.unexpected_closes == 1 and conn4.state == CLOSED


# ------------------------------------------------------------------------------ real runs


def _bench(tmp_path: Path, *args: str, timeout: float = 280) -> tuple[int, dict[str, Any], str]:
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tidegate", "bench", "--json", str(report),
         "--logs-dir", str(tmp_path / "logs"), *args],
        capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "TIDEGATE_LOG_FORMAT": "text"},
    )
    data = json.loads(report.read_text()) if report.exists() else {}
    return proc.returncode, data, proc.stdout + proc.stderr


def test_ws_bench_with_a_broadcast(tmp_path: Path) -> None:
    n, k = 1000, 5
    code, r, output = _bench(
        tmp_path, "--protocol", "ws", "--connections", str(n), "--clients", "2", "--hold", "3",
        "--ping-interval", "1", "--broadcast-rate", "10", "--broadcast-count", str(k),
        "--broadcast-start", "1", "--no-progress")
    assert code == 0, output
    assert r["protocol"] == "ws" and r["ok"] is True and r["failures"] == []
    assert r["server_command"][3:6] == ["serve", "--app", "gateway"]
    assert r["connections_established"] == r["connections_held"] == n
    assert r["unexpected_closes"] == 0 and r["errors_total"] == 0 and r["protocol_errors"] == 0
    # The raw mode's keys are all there, and the heartbeats were the protocol's ping command.
    for key in (*REQUIRED_KEYS, *BROADCAST_KEYS):
        assert key in r, key
    assert r["heartbeat_missed"] == 0 and r["heartbeat_rtt_ms"]["count"] > 0
    assert r["heartbeat_rtt_ms_p99"] >= r["heartbeat_rtt_ms_p50"] > 0
    assert r["server_marginal_bytes_per_connection"] is not None
    # The broadcast: every subscriber got every publication, exactly once.
    assert r["broadcast_subscribed"] == n
    assert r["broadcast_published"] == k and r["broadcast_api_errors"] == {}
    assert r["broadcast_deliveries"] == r["broadcast_deliveries_expected"] == n * k
    assert r["deliveries_lost"] == 0 and r["deliveries_lost_by_seq"] == [0] * k
    assert r["deliveries_duplicated"] == r["deliveries_out_of_order"] == 0
    assert r["deliveries_unexpected"] == 0
    assert r["broadcast_latency_ms"]["count"] == n * k
    for key in ("broadcast_latency_ms_p50", "broadcast_latency_ms_p99",
                "broadcast_last_delivery_s", "broadcast_deliveries_per_s",
                "server_cpu_us_per_delivery"):
        assert r[key] is not None and r[key] >= 0, key
    assert r["broadcast_latency_ms_p99"] >= r["broadcast_latency_ms_p50"]
    assert len(r["broadcast_last_delivery_s_by_seq"]) == k
    assert None not in r["broadcast_last_delivery_s_by_seq"]
    assert "broadcast published / deliveries / lost" in output
    for pid in [r["server_supervisor_pid"], *r["server_worker_pids"], *r["client_pids"]]:
        assert not procstat.alive(pid), pid


def test_ws_bench_against_a_running_gateway(tmp_path: Path, gateway: Any) -> None:
    srv = gateway("--workers", "2")
    code, r, output = _bench(
        tmp_path, "--protocol", "ws", "--target", f"127.0.0.1:{srv.port}",
        "--server-status-file", str(srv.status_path), "--connections", "300", "--hold", "1",
        "--ping-interval", "1", "--broadcast-rate", "20", "--broadcast-count", "3",
        "--broadcast-start", "0.5", "--channel", "bench2", "--no-progress")
    assert code == 0, output
    assert r["connections_held"] == 300 and r["channel"] == "bench2"
    assert r["broadcast_deliveries"] == 900 and r["deliveries_lost"] == 0
    assert r["server_cpu_us_per_delivery"] is not None
    assert srv.proc.poll() is None  # not ours to stop


def test_broadcast_needs_ws(tmp_path: Path) -> None:
    code, _, output = _bench(tmp_path, "--connections", "10", "--broadcast-rate", "1",
                             timeout=60)
    assert code == 2 and "--protocol ws" in output


# ------------------------------------------------------------------------------ API publisher


def _api_server(behaviour: list[str]) -> Any:
    """A tiny HTTP/1.1 server on 127.0.0.1: one entry of ``behaviour`` per request received:
    "ok" (200, keep-alive), "ok_close" (200, then closes the connection without saying so),
    "slow" (answers after 2 s), "error" (200 with an API error)."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                body = await reader.readexactly(length)
                seen.append(body)
                what = behaviour[len(seen) - 1] if len(seen) <= len(behaviour) else "ok"
                if what == "slow":
                    await asyncio.sleep(2.0)
                reply = (b'{"error":{"code":102,"message":"unknown channel"}}' if what == "error"
                         else b'{"result":{}}')
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(reply), reply))
                await writer.drain()
                if what == "ok_close":
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return handle, seen


def test_api_publisher_acks_errors_and_never_resends_after_a_timeout() -> None:
    from tidegate.bench.runner import ApiPublisher

    async def main() -> None:
        handle, seen = _api_server(["ok", "ok_close", "ok", "error", "slow"])
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pub = ApiPublisher("127.0.0.1", port, "key", timeout=1.0)
        try:
            assert await pub.publish(b'{"n":1}') == ""
            assert await pub.publish(b'{"n":2}') == ""  # the server closes after this one
            await asyncio.sleep(0.1)
            # The kept-alive connection is gone: sent again on a new one, answered once.
            assert await pub.publish(b'{"n":3}') == ""
            assert await pub.publish(b'{"n":4}') == "api_error_102"
            # No answer within the timeout: an error, and the request is not sent again.
            assert await pub.publish(b'{"n":5}') == "api_timeout"
            assert [json.loads(b)["n"] for b in seen] == [1, 2, 3, 4, 5]
            assert pub.requests in (5, 6)  # 6 when the stale connection took request 3 first
        finally:
            await pub.close()
            server.close()
            await server.wait_closed()

    asyncio.run(main())
