"""The gateway as deployed: `tidegate serve` processes driven by real third-party clients.

The official centrifuge-python SDK, the `cent` HTTP API client, and the `websockets` library
for raw-protocol and malformed-frame cases, over loopback, against two worker processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from cent import (
    ChannelsRequest,
    DisconnectRequest,
    HistoryRequest,
    InfoRequest,
    PresenceStatsRequest,
    PublishRequest,
)
from cent import Client as Cent
from centrifuge import Client, ClientEventHandler, DisconnectedContext, SubscriptionEventHandler
from centrifuge.protocol import client_pb2
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tidegate.gateway.auth import encode_hs256

SECRET = "dev-only-secret-change-me"
API_KEY = "dev-only-api-key-change-me"
pytestmark = pytest.mark.timeout(120)


def token(user: str, ttl: int = 3600, **claims: Any) -> str:
    return encode_hs256({"sub": user, "exp": int(time.time()) + ttl, **claims}, SECRET)


def cent(srv: Any) -> Cent:
    return Cent(f"http://127.0.0.1:{srv.port}/api", API_KEY)


def ws_url(srv: Any) -> str:
    return f"ws://127.0.0.1:{srv.port}/connection/websocket"


def api(srv: Any, method: str, body: bytes, key: str | None = API_KEY) -> tuple[int, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{srv.port}/api/{method}", data=body,
                                 method="POST", headers={"X-API-Key": key} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


class Pubs(SubscriptionEventHandler):
    def __init__(self) -> None:
        self.q: asyncio.Queue[Any] = asyncio.Queue()

    async def on_publication(self, ctx: Any) -> None:
        self.q.put_nowait(ctx.pub)


class Events(ClientEventHandler):
    def __init__(self) -> None:
        self.disconnected: asyncio.Queue[DisconnectedContext] = asyncio.Queue()

    async def on_disconnected(self, ctx: DisconnectedContext) -> None:
        self.disconnected.put_nowait(ctx)


class Raw:
    """A JSON-protocol client on the `websockets` library: explicit commands, explicit replies."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.next_id = 0

    async def call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """The reply to one command: ``{"id", "<method>": result}`` or ``{"id", "error"}``."""
        self.next_id += 1
        await self.ws.send(json.dumps({"id": self.next_id, method: params}))
        while True:
            for line in (await asyncio.wait_for(self.ws.recv(), 10)).splitlines():
                reply = json.loads(line)
                if reply.get("id") == self.next_id:
                    return dict(reply)

    async def push(self) -> dict[str, Any]:
        while True:
            for line in (await asyncio.wait_for(self.ws.recv(), 10)).splitlines():
                reply = json.loads(line)
                if "push" in reply:
                    return dict(reply["push"])


async def raw_client(srv: Any, user: str = "alice", **kw: Any) -> Raw:
    ws = await ws_connect(ws_url(srv), **kw)
    raw = Raw(ws)
    reply = await raw.call("connect", {"token": token(user)})
    assert "connect" in reply, reply
    return raw


# ---- the SDK and cent, across workers ----------------------------------------------------
@pytest.mark.parametrize("use_protobuf", [False, True], ids=["json", "protobuf"])
def test_sdk_subscribers_on_every_worker_get_api_publications(gateway, use_protobuf):
    srv = gateway("--workers", "2", "--balance", "handoff")  # handoff: both workers get clients

    async def main() -> None:
        clients, handlers = [], []
        for i in range(6):
            c = Client(ws_url(srv), token=token(f"user{i}"), use_protobuf=use_protobuf, proxy=None)
            h = Pubs()
            sub = c.new_subscription("news", h)
            await c.connect()
            await sub.subscribe()
            await sub.ready()
            clients.append(c)
            handlers.append(h)
        st = srv.wait_stats(lambda st: srv.total("active") == 6)
        assert all(w["active"] == 3 for w in st["worker_stats"])
        c = cent(srv)
        offsets = []
        for n in range(5):
            r = await asyncio.to_thread(c.publish, PublishRequest(channel="news", data={"n": n}))
            offsets.append(r.offset)
        assert offsets == [1, 2, 3, 4, 5]
        for h in handlers:
            got = [await asyncio.wait_for(h.q.get(), 10) for _ in range(5)]
            data = [json.loads(p.data) if use_protobuf else p.data for p in got]
            assert data == [{"n": n} for n in range(5)]
            assert [p.offset for p in got] == offsets
        hist = await asyncio.to_thread(c.history, HistoryRequest(channel="news", limit=10))
        assert [p.data for p in hist.publications] == [{"n": n} for n in range(5)]
        stats = await asyncio.to_thread(c.presence_stats, PresenceStatsRequest(channel="news"))
        assert (stats.num_clients, stats.num_users) == (6, 6)
        chans = await asyncio.to_thread(c.channels, ChannelsRequest())
        assert chans.channels["news"].num_clients == 6
        info = await asyncio.to_thread(c.info, InfoRequest())
        assert info.nodes[0].num_clients == 6 and info.nodes[0].num_subs == 6
        for cl in clients:
            await cl.disconnect()

    asyncio.run(main())


def test_acknowledged_publications_all_arrive_in_order(gateway):
    srv = gateway("--workers", "2", "--balance", "handoff")

    async def main() -> None:
        subs = [await raw_client(srv, f"u{i}") for i in range(4)]
        for s in subs:
            assert "subscribe" in await s.call("subscribe", {"channel": "chat:room"})
        c = cent(srv)

        def publish_many() -> list[int]:
            return [c.publish(PublishRequest(channel="chat:room", data={"i": i})).offset
                    for i in range(200)]

        offsets = await asyncio.to_thread(publish_many)
        assert offsets == list(range(1, 201))
        for s in subs:
            seen = []
            while len(seen) < 200:
                push = await s.push()
                if "pub" in push:
                    seen.append(push["pub"]["data"]["i"])
            assert seen == list(range(200))

    asyncio.run(main())


def test_recovery_after_reconnect_and_unrecoverable_epoch(gateway):
    srv = gateway("--workers", "2")

    async def main() -> None:
        first = await raw_client(srv)
        sub = await first.call("subscribe", {"channel": "news", "recoverable": True})
        epoch, offset = sub["subscribe"]["epoch"], sub["subscribe"].get("offset", 0)
        await first.ws.close()
        c = cent(srv)
        for i in range(3):
            await asyncio.to_thread(c.publish, PublishRequest(channel="news", data={"missed": i}))
        again = await raw_client(srv)
        res = (await again.call("subscribe", {"channel": "news", "recoverable": True,
                                              "recover": True, "epoch": epoch,
                                              "offset": offset}))["subscribe"]
        assert res["recovered"] is True
        assert [p["data"] for p in res["publications"]] == [{"missed": i} for i in range(3)]
        other = await raw_client(srv, "bob")
        res2 = (await other.call("subscribe", {"channel": "news", "recoverable": True,
                                               "recover": True, "epoch": "not-the-epoch",
                                               "offset": 1}))["subscribe"]
        assert not res2.get("recovered")  # told it cannot recover: reload state

    asyncio.run(main())


# ---- bad input ---------------------------------------------------------------------------
def test_tokens_expired_forged_and_missing(gateway):
    srv = gateway("--workers", "1")

    async def main() -> None:
        async with ws_connect(ws_url(srv)) as ws:
            raw = Raw(ws)
            reply = await raw.call("connect", {"token": token("alice", ttl=-10)})
            assert reply["error"]["code"] == 109  # token expired: the SDK refreshes
        async with ws_connect(ws_url(srv)) as ws:
            reply = await Raw(ws).call("connect", {})  # no token, anonymous not allowed
            assert reply["error"]["code"] == 101
        for bad in (encode_hs256({"sub": "mallory"}, "wrong-secret"), "garbage"):
            async with ws_connect(ws_url(srv)) as ws:
                await ws.send(json.dumps({"id": 1, "connect": {"token": bad}}))
                with pytest.raises(ConnectionClosed) as exc:
                    while True:
                        await asyncio.wait_for(ws.recv(), 10)
                assert exc.value.rcvd is not None and exc.value.rcvd.code == 3500

    asyncio.run(main())


def test_sdk_invalid_token_is_terminal(gateway):
    srv = gateway("--workers", "1")

    async def main() -> None:
        ev = Events()
        c = Client(ws_url(srv), events=ev, token=encode_hs256({"sub": "x"}, "nope"), proxy=None)
        await c.connect()
        ctx = await asyncio.wait_for(ev.disconnected.get(), 10)
        assert ctx.code == 3500

    asyncio.run(main())


def test_channel_permissions(gateway):
    srv = gateway("--workers", "1")

    async def main() -> None:
        raw = await raw_client(srv)
        assert (await raw.call("subscribe", {"channel": "nosuchns:x"}))["error"]["code"] == 102
        # chat: only subscribers may publish
        assert (await raw.call("publish", {"channel": "chat:x", "data": {}}))["error"]["code"] == 103
        assert "error" not in await raw.call("subscribe", {"channel": "chat:x"})
        assert "error" not in await raw.call("publish", {"channel": "chat:x", "data": {"ok": 1}})
        assert (await raw.call("subscribe", {"channel": "chat:x"}))["error"]["code"] == 105
        # a private channel without a subscription token
        assert (await raw.call("subscribe", {"channel": "$secret"}))["error"]["code"] == 103

    asyncio.run(main())


def test_api_auth_and_malformed_requests(gateway):
    srv = gateway("--workers", "1")
    status, body = api(srv, "publish", b'{"channel":"news","data":{}}', key=None)
    assert status == 401
    status, body = api(srv, "publish", b'{"channel":"news","data":{}}', key="wrong")
    assert status == 401
    status, body = api(srv, "publish", b"{not json")
    assert status == 400 and body["error"]["code"] == 107
    status, body = api(srv, "nosuchmethod", b"{}")
    assert status == 200 and body["error"]["code"] == 104
    status, body = api(srv, "publish", b'{"channel":"nosuchns:a","data":1}')
    assert body["error"]["code"] == 102
    req = urllib.request.Request(f"http://127.0.0.1:{srv.port}/api/info", data=b"{}",
                                 method="POST", headers={"Authorization": f"apikey {API_KEY}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert json.loads(resp.read())["result"]["nodes"]


def _http(port: int, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(raw)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_bad_handshakes_and_origin(gateway):
    srv = gateway("--workers", "1")
    resp = _http(srv.port, b"GET /connection/websocket HTTP/1.1\r\nHost: x\r\n\r\n")
    assert resp.startswith((b"HTTP/1.1 400", b"HTTP/1.1 426"))
    resp = _http(srv.port, b"\x16\x03\x01garbage-not-http\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 400")

    async def main() -> None:
        with pytest.raises(InvalidStatus) as exc:
            async with ws_connect(ws_url(srv), origin="https://evil.example"):  # type: ignore[arg-type]
                pass
        assert exc.value.response.status_code == 403
        async with ws_connect(ws_url(srv), origin="http://localhost:3000") as ws:  # type: ignore[arg-type]
            await ws.send(json.dumps({"id": 1, "connect": {"token": token("a")}}))
            assert "connect" in json.loads(await ws.recv())

    asyncio.run(main())


def _masked(opcode: int, payload: bytes, mask: bool = True) -> bytes:
    head = bytes([0x80 | opcode])
    n = len(payload)
    ln = bytes([n]) if n < 126 else bytes([126]) + n.to_bytes(2, "big") if n < 65536 else \
        bytes([127]) + n.to_bytes(8, "big")
    if not mask:
        return head + ln + payload
    key = os.urandom(4)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + bytes([ln[0] | 0x80]) + ln[1:] + key + body


def _ws_raw(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET /connection/websocket HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
              b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
              b"Sec-WebSocket-Version: 13\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 101")
    return s


def _close_code(s: socket.socket) -> int:
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    i = data.find(b"\x88")  # a close frame from the server (unmasked)
    assert i >= 0, data
    return int.from_bytes(data[i + 2 : i + 4], "big")


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (_masked(1, b'{"id":1,"connect":{}}', mask=False), 1002),  # unmasked client frame
        (_masked(2, b"x" * 70_000), 1009),  # larger than max_frame_bytes
        (_masked(1, b"\xff\xfe not utf-8"), 1007),
        (bytes([0x83, 0x80]) + b"\0\0\0\0", 1002),  # unknown opcode 3
    ],
    ids=["unmasked", "oversized", "bad-utf8", "bad-opcode"],
)
def test_malformed_frames_get_close_codes(gateway, frame, code):
    srv = gateway("--workers", "1")
    s = _ws_raw(srv.port)
    s.sendall(frame)
    assert _close_code(s) == code
    s2 = _ws_raw(srv.port)  # the server keeps serving
    s2.sendall(_masked(1, json.dumps({"id": 1, "connect": {"token": token("a")}}).encode()))
    assert b'"connect"' in s2.recv(65536)


def test_ping_flood_is_answered_and_others_unaffected(gateway):
    srv = gateway("--workers", "1")
    s = _ws_raw(srv.port)
    s.sendall(_masked(1, json.dumps({"id": 1, "connect": {"token": token("a")}}).encode()))
    s.recv(65536)
    s.sendall(_masked(9, b"p") * 20_000)

    async def main() -> None:
        other = await raw_client(srv, "bob")
        assert "error" not in await other.call("subscribe", {"channel": "news"})

    asyncio.run(main())
    got = b""
    s.settimeout(10)
    while got.count(b"\x8a\x01p") < 20_000:
        chunk = s.recv(1 << 20)
        assert chunk
        got += chunk


def test_slow_consumer_is_disconnected_others_get_everything(gateway, tmp_path: Path):
    cfg = (Path(__file__).parent.parent / "config" / "example.toml").read_text()
    cfg = cfg.replace("client_queue_max_bytes = 262144", "client_queue_max_bytes = 65536")
    path = tmp_path / "small-queue.toml"
    path.write_text(cfg)
    srv = gateway("--workers", "1", "--config", str(path))
    slow = socket.create_connection(("127.0.0.1", srv.port))
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.close()
    s = _ws_raw(srv.port)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(_masked(1, json.dumps({"id": 1, "connect": {"token": token("slow")}}).encode()))
    s.sendall(_masked(1, json.dumps({"id": 2, "subscribe": {"channel": "news"}}).encode()))

    async def main() -> None:
        fast = await raw_client(srv, "fast")
        await fast.call("subscribe", {"channel": "news"})
        await asyncio.sleep(0.5)
        big = "x" * 30_000

        async def consume() -> list[int]:
            got = []
            while len(got) < 300:
                got.append((await fast.push())["pub"]["data"]["i"])
            return got

        reader = asyncio.create_task(consume())  # a fast reader keeps up as we publish
        for i in range(300):
            body = json.dumps({"channel": "news", "data": {"i": i, "b": big}}).encode()
            status, reply = await asyncio.to_thread(api, srv, "publish", body)
            assert "result" in reply
        assert await asyncio.wait_for(reader, 60) == list(range(300))

    asyncio.run(main())
    srv.wait_stats(lambda st: srv.closes().get("slow_consumer") == 1)


def test_api_disconnect_reaches_users_on_any_worker(gateway):
    srv = gateway("--workers", "2", "--balance", "handoff")

    async def main() -> None:
        evs = []
        for _ in range(2):
            ev = Events()
            c = Client(ws_url(srv), events=ev, token=token("target"), proxy=None)
            await c.connect()
            await c.ready()
            evs.append(ev)
        await asyncio.to_thread(cent(srv).disconnect, DisconnectRequest(user="target"))
        for ev in evs:
            ctx = await asyncio.wait_for(ev.disconnected.get(), 10)
            assert ctx.code == 3503

    asyncio.run(main())


# ---- raw TCP ------------------------------------------------------------------------------
def test_raw_tcp_json_and_protobuf_clients(gateway):
    srv = gateway("--workers", "1")
    j = socket.create_connection(("127.0.0.1", srv.tcp_port), timeout=10)
    jf = j.makefile("rb")
    j.sendall(json.dumps({"id": 1, "connect": {"token": token("iot")}}).encode() + b"\n")
    assert "connect" in json.loads(jf.readline())
    j.sendall(b'{"id":2,"subscribe":{"channel":"news"}}\n')
    assert json.loads(jf.readline())["id"] == 2

    p = socket.create_connection(("127.0.0.1", srv.tcp_port), timeout=10)
    cmd = client_pb2.Command(id=1, connect=client_pb2.ConnectRequest(token=token("iot2")))
    sub = client_pb2.Command(id=2, subscribe=client_pb2.SubscribeRequest(channel="news"))

    def delimited(msg: Any) -> bytes:
        data = msg.SerializeToString()
        n, out = len(data), b""
        while True:
            b = n & 0x7F
            n >>= 7
            out += bytes([b | (0x80 if n else 0)])
            if not n:
                return out + data

    p.sendall(delimited(cmd) + delimited(sub))
    api(srv, "publish", b'{"channel":"news","data":{"hello":"tcp"}}')
    push = json.loads(jf.readline())
    assert push["push"]["pub"]["data"] == {"hello": "tcp"}
    buf = b""
    replies: list[Any] = []
    while len(replies) < 3:
        buf += p.recv(65536)
        pos = 0
        while True:
            n = shift = 0
            start = pos
            while pos < len(buf):
                byte = buf[pos]
                pos += 1
                n |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            else:
                pos = start
                break
            if pos + n > len(buf):
                pos = start
                break
            r = client_pb2.Reply()
            r.ParseFromString(buf[pos : pos + n])
            replies.append(r)
            pos += n
        buf = buf[pos:]
    assert replies[0].connect.client and replies[1].id == 2
    assert json.loads(replies[2].push.pub.data) == {"hello": "tcp"}


def test_bench_ws_probe_sees_publications_and_its_pings_answered(gateway):
    """The probe the bench scripts share (tidegate.bench.wsprobe): subscribed through a real
    gateway, it gets each API publication (data as a JSON object) and replies to its pings."""
    from tidegate.bench.wsprobe import WsProbe

    srv = gateway("--workers", "1")

    class Probe(WsProbe):
        def __init__(self) -> None:
            super().__init__(ws_url(srv), token("probe"), "news")
            self.seqs: list[int] = []
            self.pong = False

        async def while_open(self, ws: Any, stop: asyncio.Event) -> None:
            await ws.send(json.dumps({"id": 7, "ping": {}}))
            await stop.wait()

        def on_message(self, message: dict[str, Any], frame: bytes, now: float) -> None:
            self.pong = self.pong or message.get("id") == 7
            data = self.publication(message)
            if data is not None:
                self.seqs.append(int(data["seq"]))

    async def main() -> Probe:
        probe, stop = Probe(), asyncio.Event()
        task = asyncio.create_task(probe.run(stop))
        deadline = time.monotonic() + 10
        while not probe.pong and time.monotonic() < deadline:  # connected and subscribed
            await asyncio.sleep(0.05)
        for seq in range(3):
            body = json.dumps({"channel": "news", "data": {"seq": seq}}).encode()
            assert (await asyncio.to_thread(api, srv, "publish", body))[0] == 200
        while len(probe.seqs) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stop.set()
        await task
        return probe

    probe = asyncio.run(main())
    assert probe.error == "" and probe.pong and probe.seqs == [0, 1, 2]
