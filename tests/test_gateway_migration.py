"""Gateway sessions moved between workers by work stealing (gateway/migration.py).

Unit level (no sockets): a session's state round-trips through export -> detach -> restore
with nothing seen by other subscribers, presence untouched, a publication made while it was
between workers recovered; the binary state format under hypothesis. End to end: a real
2-worker node, WebSocket (``websockets``, JSON) and raw TCP clients subscribed, an imbalance
that makes the empty worker steal, and afterwards every client still open, still receiving,
listed once in presence, no join/leave anywhere, the moves in the workers' counters.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs
from websockets.asyncio.client import connect as ws_connect

from test_gateway_session import FORMATS, SDKClient, connected, make_config
from test_stealing import owners, settled
from tidegate.gateway import migration
from tidegate.gateway.auth import encode_hs256
from tidegate.gateway.hub import Hub
from tidegate.gateway.migration import GatewayMigration, SessionState, StateError, SubRecord
from tidegate.gateway.node import Node
from tidegate.gateway.session import (
    SUB_EMITS_JOIN_LEAVE,
    SUB_JOIN_LEAVE,
    SUB_PRESENCE,
    ClientSession,
)
from tidegate.gateway.testing import RecordingTransport

pytestmark = pytest.mark.timeout(120)


# ---- unit: export -> detach -> restore, no sockets ---------------------------------------
def _pushes(c: SDKClient) -> list[dict[str, Any]]:
    return [r["push"] for r in c.replies() if "push" in r]


@pytest.mark.parametrize("fmt", FORMATS)
def test_session_state_round_trips_silently(fmt: str) -> None:
    node = Node(make_config())
    hub, store = node.hub, node.broker.presence_store
    watcher = connected(node, "json", user="watcher")
    assert "subscribe" in watcher.subscribe("chat:room", join_leave=True)
    mover = connected(node, fmt, user="alice", info={"name": "a"})
    assert "subscribe" in mover.subscribe("news", recoverable=True)
    assert "subscribe" in mover.subscribe("chat:room", join_leave=True)
    assert [p for p in _pushes(watcher) if "join" in p]  # the real join, before the move
    mover.publish("news", {"n": 1})
    mover.replies()
    old, cid = mover.s, mover.s.client_id
    presence_before = store.get("chat:room")

    state = old.export_state(f"ws-{fmt}")
    assert state is not None
    old.detach()
    assert old.closed and not hub.user_sessions("alice")
    assert old not in hub.subscribers("news") and old not in hub.subscribers("chat:room")
    assert mover.t.take() == [] and mover.t.closed is None  # nothing written, no close
    watcher.publish("news", {"n": 2})  # while it is between workers: nobody here has it

    st = migration.decode(state)
    assert (st.kind, st.client, st.user, st.priority) == (f"ws-{fmt}", cid, "alice", 0)
    assert json.loads(st.conn_info or b"") == {"name": "a"}
    assert st.exp > time.time()
    subs = {r.channel: r for r in st.subs}
    assert subs["news"].positioned and subs["news"].offset == 1 and subs["news"].epoch
    assert subs["chat:room"].flags == SUB_JOIN_LEAVE | SUB_PRESENCE | SUB_EMITS_JOIN_LEAVE

    mover.t = RecordingTransport()
    mover.s = new = ClientSession.restore(mover.t, node, st)
    assert new.connected and new.client_id == cid and new.user == "alice"
    assert new.channels() == old_channels(st)
    assert hub.user_sessions("alice") == [new] and new in hub.subscribers("chat:room")
    got = _pushes(mover)  # the publication of the window, recovered from history
    assert [(p["channel"], mover.dec(p["pub"]["data"]), int(p["pub"]["offset"])) for p in got] \
        == [("news", {"n": 2}, 2)]
    assert store.get("chat:room") == presence_before  # presence neither left nor re-added
    assert not [p for p in _pushes(watcher) if "join" in p or "leave" in p]

    watcher.publish("chat:room", {"after": True})
    assert [mover.dec(p["pub"]["data"]) for p in _pushes(mover)] == [{"after": True}]
    assert [p["push"] for p in watcher.pushes if "pub" in p["push"]]  # (came with its reply)
    assert "publish" in mover.publish("chat:room", {"from": "moved"})  # commands work
    assert [p for p in _pushes(watcher) if "pub" in p]
    mover.s.disconnect()  # a real goodbye now: the leave is seen
    assert [p for p in _pushes(watcher) if "leave" in p]
    assert cid not in store.get("chat:room")


def old_channels(st: SessionState) -> list[str]:
    return [r.channel for r in st.subs]


def test_export_refuses_while_unsafe() -> None:
    node = Node(make_config())
    fresh = SDKClient(node)
    assert fresh.s.export_state("ws-json") is None  # before connect
    c = connected(node)
    assert c.s.export_state("ws-json") is not None  # (exporting alone changes nothing)
    node.hub.add_pending("news", c.s)  # a (server-side) subscribe in flight
    assert c.s.export_state("ws-json") is None
    node.hub.remove_subscriber("news", c.s)
    c.s._wbuf = []  # mid-frame
    assert c.s.export_state("ws-json") is None
    c.s._wbuf = None
    c.s.disconnect()
    assert c.s.export_state("ws-json") is None


def test_unrecoverable_position_disconnects_3010() -> None:
    node = Node(make_config())
    c = connected(node, user="bob")
    c.subscribe("chat:x")  # history_size 3
    c.publish("chat:x", 1)
    c.replies()
    state = c.s.export_state("tcp-json")
    assert state is not None
    c.s.detach()
    other = connected(node, user="eve")
    other.subscribe("chat:x")
    for i in range(5):  # more than the history keeps
        other.publish("chat:x", i)
    t = RecordingTransport()
    s = ClientSession.restore(t, node, migration.decode(state))
    assert t.closed == (3010, "insufficient state") and s.closed
    assert s not in node.hub.subscribers("chat:x")
    assert c.s.client_id not in node.broker.presence_store.get("chat:x")


class _TcpJson(RecordingTransport):
    __slots__ = ("conn",)
    kind = "tcp-json"


class _Handler(GatewayMigration):
    def __init__(self, node: Node) -> None:
        self.node = node
        self.live_sessions = 0
        self.made: list[_TcpJson] = []
        self.migration_transports = {"ws-json": self._make, "tcp-json": self._make}

    def _make(self, c: Any) -> _TcpJson:
        t = _TcpJson()
        t.conn = c
        self.made.append(t)
        return t


def _conn(context: Any = None) -> Any:
    transport = SimpleNamespace(get_extra_info=lambda name: None)
    closes: list[str] = []
    return SimpleNamespace(context=context, _transport=transport, closes=closes,
                           close=closes.append)


def test_handler_import_failure_is_a_clear_disconnect(monkeypatch: pytest.MonkeyPatch) -> None:
    node = Node(make_config())
    h = _Handler(node)
    watcher = connected(node, user="w")
    watcher.subscribe("chat:room", join_leave=True)
    c = connected(node, user="alice")
    c.subscribe("chat:room")
    _pushes(watcher)
    c.s.transport = _TcpJson()
    conn = _conn(c.s)
    state = h.export_state(conn)
    assert state is not None and conn.context is None and h.live_sessions == -1

    garbage = _conn()
    h.import_state(garbage, b"not a state")
    assert garbage.closes == ["migration_failed"] and garbage.context is None

    def broken(*args: Any) -> bool:
        raise RuntimeError("boom")

    monkeypatch.setattr(Hub, "add_subscriber", broken)
    arriving = _conn()
    h.import_state(arriving, state)
    t = h.made[-1]
    assert t.closed == (3004, "internal server error") and arriving.context is None
    assert json.loads(t.writes[-1])["push"]["disconnect"]["code"] == 3004  # raw TCP: a push first
    # not half-registered: out of the hub and the user index, a real leave for the others
    assert not node.hub.user_sessions("alice")
    assert c.s.client_id not in node.broker.presence_store.get("chat:room")
    assert [p for p in _pushes(watcher) if "leave" in p]


# ---- the binary state format --------------------------------------------------------------
_text = hs.text(max_size=40)
_blob = hs.none() | hs.binary(max_size=40)
_subs = hs.builds(SubRecord, _text, hs.integers(0, 0x7F), hs.integers(-(2**63), 2**63 - 1),
                  _blob, hs.integers(0, 2**64 - 1), _text, hs.booleans())
_states = hs.builds(SessionState, _text, hs.text(min_size=1, max_size=40), _text, _blob,
                    hs.integers(-(2**63), 2**63 - 1), hs.integers(0, 255),
                    hs.lists(_subs, max_size=5))


@settings(max_examples=300, deadline=None)
@given(_states)
def test_state_format_round_trips(st: SessionState) -> None:
    data = migration.encode(st)
    assert migration.decode(data) == st
    for cut in range(len(data)):  # every truncation is refused, never misread
        with pytest.raises(StateError):
            migration.decode(data[:cut])
    with pytest.raises(StateError):
        migration.decode(data + b"\x00")


@settings(max_examples=500, deadline=None)
@given(hs.binary(max_size=200), _states)
def test_state_decoder_refuses_garbage_cleanly(junk: bytes, st: SessionState) -> None:
    for data in (junk, migration.MAGIC + junk, migration.encode(st)[:4] + junk):
        try:
            migration.decode(data)
        except StateError:
            pass


# ---- end to end: a real node, clients moved by stealing ----------------------------------
SECRET = "dev-only-secret-change-me"
API_KEY = "dev-only-api-key-change-me"
STEAL = ["--workers", "2", "--tick-s", "0.1", "--steal-tick-s", "0.2",
         "--steal-min-idle-ms", "2500", "--ping-interval-s", "600"]
N_EACH = 16  # WebSocket and raw TCP clients each, before half of them are closed


def _token(user: str) -> str:
    return encode_hs256({"sub": user, "exp": int(time.time()) + 3600}, SECRET)


def _api(srv: Any, method: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{srv.port}/api/{method}",
                                 data=json.dumps(body).encode(), method="POST",
                                 headers={"X-API-Key": API_KEY})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


class _Client:
    """A JSON-protocol client (WebSocket or raw TCP): replies by id, pushes kept in order."""

    kind = "?"

    def __init__(self) -> None:
        self.replies: dict[int, dict[str, Any]] = {}
        self.pushes: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()
        self.next_id = 0
        self.client = ""
        self.local_port = 0
        self.reader: asyncio.Task[None] | None = None
        self.ended: str | None = None  # why the server side ended, if it did

    def _take(self, text: str) -> None:
        for line in text.splitlines():
            if line.strip():
                msg = json.loads(line)
                if msg.get("id"):
                    self.replies[msg["id"]] = msg
                elif "push" in msg:
                    self.pushes.append(msg["push"])
        self.arrived.set()

    async def open(self, srv: Any) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def _send(self, data: str) -> None:
        raise NotImplementedError

    async def call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self.next_id += 1
        cmd_id = self.next_id
        await self._send(json.dumps({"id": cmd_id, method: params}))
        deadline = time.monotonic() + 10
        while cmd_id not in self.replies:
            assert time.monotonic() < deadline and self.ended is None, (method, self.ended)
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), 0.5)
            except TimeoutError:
                pass
        return self.replies.pop(cmd_id)

    async def pub(self, channel: str, timeout: float = 10.0) -> dict[str, Any]:
        """The next publication pushed on ``channel`` (earlier pushes on it are consumed)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, p in enumerate(self.pushes):
                if p.get("channel") == channel and "pub" in p:
                    del self.pushes[i]
                    return dict(p["pub"])
            assert time.monotonic() < deadline and self.ended is None, (channel, self.ended)
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), 0.5)
            except TimeoutError:
                pass


class _WsClient(_Client):
    kind = "ws"

    async def open(self, srv: Any) -> None:
        self.ws = await ws_connect(f"ws://127.0.0.1:{srv.port}/connection/websocket",
                                   ping_interval=None)  # client pings would be traffic
        self.local_port = self.ws.transport.get_extra_info("sockname")[1]
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                self._take(msg if isinstance(msg, str) else msg.decode())
            self.ended = f"closed {self.ws.close_code}"
        except Exception as exc:
            self.ended = repr(exc)
        self.arrived.set()

    async def _send(self, data: str) -> None:
        await self.ws.send(data)

    async def close(self) -> None:
        await self.ws.close()


class _TcpClient(_Client):
    kind = "tcp"

    async def open(self, srv: Any) -> None:
        self.r, self.w = await asyncio.open_connection("127.0.0.1", srv.tcp_port)
        self.local_port = self.w.get_extra_info("sockname")[1]
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while line := await self.r.readline():
            self._take(line.decode())
        self.ended = "eof"
        self.arrived.set()

    async def _send(self, data: str) -> None:
        self.w.write(data.encode() + b"\n")
        await self.w.drain()

    async def close(self) -> None:
        self.w.close()


def _holders(srv: Any, clients: list[_Client]) -> list[tuple[_Client, set[int]]]:
    """Each client with the server processes holding its socket (ss; one table per server
    port: a local port may serve a WebSocket and a raw TCP client at once)."""
    tables = {"ws": owners(srv.port), "tcp": owners(srv.tcp_port)}
    return [(cl, tables[cl.kind].get(cl.local_port, set())) for cl in clients]


def _publish_while_moving(srv: Any, moves: int) -> int:
    """Publish ``{"seq": i}`` to "news" back to back until ``moves`` connections moved;
    returns how many were published."""
    seq = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        res = _api(srv, "publish", {"channel": "news", "data": {"seq": seq}})
        assert "error" not in res, res
        seq += 1
        if seq % 10 == 0 and srv.total("migrated_in") >= moves:
            return seq
    raise AssertionError("no stealing while publishing")


async def _drain(cl: _Client, channel: str, n: int) -> list[dict[str, Any]]:
    """The first ``n`` pushes on ``channel``, after waiting for them (and a moment more for
    any extra one)."""
    deadline = time.monotonic() + 10
    while sum(p.get("channel") == channel for p in cl.pushes) < n:
        assert time.monotonic() < deadline, (cl.kind, len(cl.pushes), n)
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    mine = [p for p in cl.pushes if p.get("channel") == channel]
    cl.pushes = [p for p in cl.pushes if p.get("channel") != channel]
    return mine


def _metric(text: str, name: str) -> dict[str, float]:
    """``name``'s samples by their worker label, from a Prometheus text page."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1:].split("} ")
            worker = dict(kv.split("=", 1) for kv in labels.split(",")).get("worker", '""')
            out[worker.strip('"')] = float(value)
    return out


def test_ws_and_tcp_clients_move_between_workers_unnoticed(gateway: Any) -> None:
    srv = gateway(*STEAL)
    st = srv.wait_stats(lambda st: all(w and "steal" in w for w in st["worker_stats"]))
    assert all(w["steal"]["enabled"] for w in st["worker_stats"]), "gateway handlers do not migrate"
    pids = [w["pid"] for w in st["worker_stats"]]
    asyncio.run(_scenario(srv, pids))


async def _scenario(srv: Any, pids: list[int]) -> None:
    # Interleaved: the victim picks from neighbouring slots of its timing wheel (by idle
    # time), so both kinds must be idle since about the same time to be picked alike.
    clients: list[_Client] = [k() for _ in range(N_EACH) for k in (_WsClient, _TcpClient)]
    for i, cl in enumerate(clients):
        await cl.open(srv)
        reply = await cl.call("connect", {"token": _token(f"user{i}")})
        cl.client = reply["connect"]["client"]

    # The imbalance: every client of the worker that has fewer goes (they never subscribed:
    # no leave), so the other holds them all and the empty one steals half.
    where = {id(cl): next(iter(pids_of)) for cl, pids_of in _holders(srv, clients)}
    full = max(pids, key=lambda p: sum(where[id(cl)] == p for cl in clients))
    empty = next(p for p in pids if p != full)
    kept = [cl for cl in clients if where[id(cl)] == full]
    for cl in clients:
        if where[id(cl)] != full:
            await cl.close()
    assert {cl.kind for cl in kept} == {"ws", "tcp"}

    for cl in kept:
        assert "subscribe" in await cl.call("subscribe", {"channel": "news", "recoverable": True})
        assert "subscribe" in await cl.call("subscribe", {"channel": "chat:room",
                                                          "join_leave": True})
    await asyncio.sleep(0.5)  # the joins of those who subscribed after each client
    for cl in kept:
        cl.pushes.clear()
    ids = {cl.client for cl in kept}

    # Stealing: the empty worker takes idle connections until both hold as many, while
    # publications keep coming (server -> client traffic: they stay idle, so they move).
    sent = await asyncio.to_thread(_publish_while_moving, srv, len(kept) // 2 - 1)
    st = await asyncio.to_thread(settled, srv, len(kept))
    by_pid = {w["pid"]: w for w in st["worker_stats"]}
    thief, victim = by_pid[empty], by_pid[full]
    moved = [cl for cl, pids_of in _holders(srv, kept) if pids_of == {empty}]
    assert len(moved) >= len(kept) // 2 - 1, (len(moved), len(kept))
    assert {cl.kind for cl in moved} == {"ws", "tcp"}, [cl.kind for cl in moved]
    assert thief["migrated_in"] == victim["migrated_out"] >= len(moved), (
        len(moved), len(kept), thief["active"], victim["active"], thief["steal"],
        victim["steal"], srv.status()["worker_stats"][0]["migrated_in"],
        srv.status()["worker_stats"][1]["migrated_in"])
    assert thief["active"] == len(moved) and victim["active"] == len(kept) - len(moved)
    # Not one client closed by a move: the closes are the pruned clients' and the API's.
    closes = srv.closes()
    assert closes.pop("http_done", 0) >= sent
    assert closes == {"client_closed": len(clients) - len(kept)}, closes
    ws_moved = sum(cl.kind == "ws" for cl in moved)
    assert thief["apps"][0]["ws_sessions"] == ws_moved  # sessions counted where they are
    assert victim["apps"][0]["ws_sessions"] == sum(cl.kind == "ws" for cl in kept) - ws_moved
    metrics = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics",
                                       timeout=10).read().decode())
    assert sum(_metric(metrics, "tidegate_migrated_in_total").values()) >= len(moved)
    assert sum(_metric(metrics, "tidegate_migrated_out_total").values()) >= len(moved)

    # Every publication of the moves reached every client once, in order: none fell into
    # the gap between the workers (or it was recovered from history on arrival).
    for cl in kept:
        seqs = [p["pub"]["data"]["seq"] for p in await _drain(cl, "news", sent)]
        assert seqs == list(range(sent)), (cl.kind, seqs)

    # Still open, still receiving on both channels, published through the HTTP API.
    assert all(cl.ended is None for cl in kept), [cl.ended for cl in kept]
    for n, channel in enumerate(("news", "chat:room")):
        res = await asyncio.to_thread(_api, srv, "publish", {"channel": channel,
                                                             "data": {"n": n}})
        assert "error" not in res, res
        for cl in kept:
            assert (await cl.pub(channel))["data"] == {"n": n}, cl.kind
    # Listed once each in presence; nobody saw a join or a leave.
    for channel in ("news", "chat:room"):
        pres = (await asyncio.to_thread(_api, srv, "presence", {"channel": channel}))["result"]
        assert set(pres["presence"]) == ids and len(pres["presence"]) == len(kept)
        stats = (await asyncio.to_thread(_api, srv, "presence_stats",
                                         {"channel": channel}))["result"]
        assert stats == {"num_clients": len(kept), "num_users": len(kept)}
    for cl in kept:
        assert not [p for p in cl.pushes if "join" in p or "leave" in p], cl.pushes
        # and commands go on working on the new worker
        assert "publish" in await cl.call("publish", {"channel": "news", "data": {"c": 1}})
    assert all(cl.ended is None for cl in kept), [cl.ended for cl in kept]
    for cl in kept:
        await cl.close()
