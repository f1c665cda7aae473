"""L3 liveness: the eviction controller (engine/eviction.py) and the gateway's ranking of
connections (gateway/eviction.py).

Sans-I/O first (the plan each tick makes, victim selection, the gateway's classes on real
sessions), then real `tidegate serve` processes on loopback pushed past their ceilings by real
clients: the raw echo protocol over sockets and the Centrifugo protocol over the `websockets`
library and raw TCP. Ticks are 1 s there; deadlines are generous and the assertions are about
behaviour (who was evicted, in how many controller ticks), not wall-clock time.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.protocol import State

from conftest import free_port
from test_engine import connect, echo_ok, recv_frame
from test_metrics import scrape, value
from tidegate.engine.eviction import (
    Ceilings,
    CpuMeter,
    LagMeter,
    Measurements,
    plan,
    pressure,
    rss_bytes,
    select,
)
from tidegate.engine.options import EngineOptions
from tidegate.gateway import eviction
from tidegate.gateway.auth import encode_hs256
from tidegate.gateway.codes import should_reconnect
from tidegate.gateway.config import ChannelOptions, ConfigError, GatewayConfig, config_from_mapping
from tidegate.gateway.node import Node
from tidegate.gateway.session import ClientSession
from tidegate.gateway.testing import RecordingTransport
from tidegate.observe.histogram import Histogram
from tidegate.observe.stall import LAG_BOUNDS
from tidegate.protocol.heartbeat import PING, PONG, frame

pytestmark = pytest.mark.timeout(120)
SECRET = "eviction-test-secret"


# ---- the plan of one tick (sans-I/O) --------------------------------------------------------
def M(**kw: Any) -> Measurements:
    return Measurements(**kw)


def test_plan_starts_above_a_ceiling_and_sheds_just_the_connection_excess() -> None:
    c = Ceilings(connections=100)
    assert not plan(M(connections=100), c, False, 0.9, 0.5).shedding  # at it is not above it
    p = plan(M(connections=130), c, False, 0.9, 0.5)
    assert p.shedding and p.over == ("connections",)
    assert p.shed == 40  # down to the resume level, 90: no more


def test_plan_sheds_at_most_the_fraction_per_tick() -> None:
    p = plan(M(connections=1000), Ceilings(connections=100), False, 0.9, 0.05)
    assert p.shed == 50


def test_plan_hysteresis_keeps_shedding_until_under_the_resume_level() -> None:
    c = Ceilings(connections=100)
    assert not plan(M(connections=95), c, False, 0.9, 0.5).shedding  # not started: stays off
    p = plan(M(connections=95), c, True, 0.9, 0.5)  # started: goes on below the ceiling
    assert p.shedding and p.shed == 5 and p.over == ()
    assert not plan(M(connections=90), c, True, 0.9, 0.5).shedding  # back under: stops


def test_plan_for_other_resources_sheds_the_fraction_and_at_least_one() -> None:
    c = Ceilings(connections=1000, cpu_percent=80.0)
    p = plan(M(connections=200, cpu_percent=95.0), c, False, 0.9, 0.05)
    assert p.shedding and p.shed == 10 and p.over == ("cpu_percent",)
    gib = 1 << 30
    p = plan(M(connections=3, rss_bytes=2 * gib), Ceilings(rss_bytes=gib), False, 0.9, 0.05)
    assert p.shedding and p.shed == 1
    assert pressure(M(loop_lag_ms=50.0), Ceilings(loop_lag_ms=100.0)) == {"loop_lag_ms": 0.5}
    # unwatched resources (ceiling 0) never trigger anything
    assert not plan(M(connections=10**6, cpu_percent=400.0), Ceilings(), False, 0.9, 0.5).shedding


def test_plan_gets_an_overloaded_worker_under_within_three_ticks() -> None:
    """The bound behind the target: shedding a fraction f per tick, a worker up to 1/(1-f)^3
    times its ceiling is under the ceiling after three ticks (every evicted connection
    leaves), then goes on to the resume level and stops."""
    for fraction in (0.05, 0.1, 0.25, 0.5):
        c = Ceilings(connections=10_000)
        # (- 3: each tick's share is rounded down, never above the fraction)
        n, shedding, over_ticks, ticks = int(10_000 / (1 - fraction) ** 3) - 3, False, 0, 0
        while True:
            p = plan(M(connections=n), c, shedding, 0.9, fraction)
            over_ticks += bool(p.over)
            shedding = p.shedding
            if not shedding:
                break
            n -= p.shed
            ticks += 1
            assert ticks < 100
        assert over_ticks <= 3 and n == 9_000, (fraction, over_ticks, n)


def test_ceilings_split_node_wide_limits_over_the_workers() -> None:
    opts = EngineOptions(eviction_max_connections=1001, eviction_max_rss_bytes=4000,
                         eviction_max_cpu_percent=90.0, eviction_max_loop_lag_ms=250.0)
    c = Ceilings.for_worker(opts, 2)
    assert (c.connections, c.rss_bytes, c.cpu_percent, c.loop_lag_ms) == (501, 2000, 90.0, 250.0)
    assert c.enabled and not Ceilings.for_worker(EngineOptions(), 4).enabled


@pytest.mark.parametrize("bad", [{"eviction_tick_s": 0}, {"eviction_max_fraction_per_tick": 0},
                                 {"eviction_max_fraction_per_tick": 1.5},
                                 {"eviction_resume_fraction": 0}])
def test_bad_eviction_options_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        EngineOptions(**bad).validate()  # type: ignore[arg-type]


class Item:
    """Not orderable: selection must never compare the items themselves."""

    __slots__ = ("name", "key")

    def __init__(self, name: str, key: tuple[int, ...] | None) -> None:
        self.name, self.key = name, key


def test_select_takes_the_smallest_ranks_and_never_the_protected() -> None:
    items = [Item("a", (1, 5)), Item("p", None), Item("b", (0, 9)), Item("c", (1, 5)),
             Item("d", (0, 1)), Item("q", None)]
    picked = select(items, lambda i: i.key, 3)
    assert [i.name for i in picked] == ["d", "b", "a"]  # ties keep their order
    assert {i.name for i in select(items, lambda i: i.key, 100)} == {"a", "b", "c", "d"}
    assert select(items, lambda i: i.key, 0) == []


def test_measurements_of_this_process() -> None:
    assert rss_bytes() > 1 << 20
    meter = CpuMeter()
    t0 = os.times()
    while os.times().user + os.times().system - t0.user - t0.system < 0.05:
        pass  # burn CPU until the clock shows some
    assert meter.percent() > 0
    hist = Histogram(LAG_BOUNDS)
    hist.observe_n(2.0, 1000)  # before the meter: not in its window
    lag = LagMeter(hist)
    hist.observe_n(0.0005, 1000)
    assert lag.p99_ms() == 1.0  # the window's p99: the 1 ms bucket, not the old 2 s lags
    hist.observe_n(30.0, 100)  # past the last bound
    assert lag.p99_ms() == 10_000.0
    assert lag.p99_ms() == 0.0  # an empty window
    assert LagMeter(None).p99_ms() == 0.0


# ---- the gateway's classes and ranks (sans-I/O, real sessions) --------------------------------
def gw_config() -> GatewayConfig:
    sub = {"allow_subscribe_for_client": True}
    return GatewayConfig(
        token_hmac_secret=SECRET,
        channels=ChannelOptions(**sub),
        namespaces={
            "mid": ChannelOptions(**sub, eviction_priority=5),
            "vip": ChannelOptions(**sub, eviction_protected=True),
        },
    )


def tok(user: str = "u", **claims: Any) -> str:
    return encode_hs256({"sub": user, "exp": int(time.time()) + 3600, **claims}, SECRET)


def session(node: Node, *channels: str, **claims: Any) -> ClientSession:
    s = ClientSession(RecordingTransport(), node, "json")
    s.handle_commands(json.dumps({"id": 1, "connect": {"token": tok(**claims)}}).encode())
    for i, ch in enumerate(channels, 2):
        s.handle_commands(json.dumps({"id": i, "subscribe": {"channel": ch}}).encode())
    assert s.connected and set(s.channels()) == set(channels)
    return s


def test_gateway_ranks_unsubscribed_then_lower_class_then_idle_longest() -> None:
    node = Node(gw_config())
    policy = eviction.EvictionPolicy(node.config)
    pending = ClientSession(RecordingTransport(), node, "json")  # no connect yet
    conns = {
        "pending": (pending, 50),
        "unsub-old": (session(node), 10),
        "unsub-new": (session(node), 40),
        "unsub-claim7": (session(node, tidegate_priority=7), 5),
        "news": (session(node, "news"), 1),
        "mid": (session(node, "news", "mid:a"), 0),
        "claim3+news": (session(node, "news", tidegate_priority=3), 0),
        "claim-protected": (session(node, tidegate_priority="protected"), 0),
        "vip": (session(node, "news", "vip:room"), 0),
    }
    order = select(conns, lambda name: policy.rank(*conns[name]), len(conns))
    assert order == ["pending", "unsub-old", "unsub-new", "unsub-claim7", "news", "claim3+news",
                     "mid"]
    labels = {name: policy.label(s) for name, (s, _) in conns.items()}
    assert labels == {"pending": "connecting", "unsub-old": "0", "unsub-new": "0",
                      "unsub-claim7": "7", "news": "0", "mid": "5", "claim3+news": "3",
                      "claim-protected": "protected", "vip": "protected"}


def test_gateway_without_namespace_classes_never_scans_subscriptions() -> None:
    node = Node(GatewayConfig(token_hmac_secret=SECRET,
                              channels=ChannelOptions(allow_subscribe_for_client=True)))
    policy = eviction.EvictionPolicy(node.config)
    assert policy.rank(session(node, "a", "b", tidegate_priority=2), 7) == (1, 2, 7)


@pytest.mark.parametrize("claim", ["high", 10, -1, True, 2.5, ["protected"]])
def test_a_bad_priority_claim_is_an_invalid_token(claim: Any) -> None:
    node = Node(gw_config())
    t = RecordingTransport()
    s = ClientSession(t, node, "json")
    s.handle_commands(json.dumps({"id": 1, "connect": {
        "token": tok(tidegate_priority=claim)}}).encode())
    assert t.closed == (3500, "invalid token")


def test_namespace_eviction_priority_is_checked() -> None:
    with pytest.raises(ConfigError):
        ChannelOptions(eviction_priority=10)
    with pytest.raises(ConfigError):
        config_from_mapping({"gateway": {"namespaces": {"x": {"eviction_priority": -1}}}})
    cfg = config_from_mapping({"gateway": {"namespaces": {"x": {"eviction_protected": True}}}})
    assert cfg.namespaces["x"].eviction_protected


def test_the_eviction_disconnect_says_reconnect_later() -> None:
    d = eviction.disconnect(7.0)
    assert should_reconnect(d.code) and 3000 <= d.code < 3500
    assert d.reason == "evicted: reconnect_delay_s=7"


# ---- the engine with the raw echo app: the default rank (idle longest first) ---------------------
def _alive(socks: list[socket.socket]) -> list[bool]:
    return [echo_ok(s, b"still-here") for s in socks]


def test_echo_sheds_the_idle_connections_first_and_counts_them(serve: Any) -> None:
    metrics_port = free_port()
    srv = serve("--workers", "1", "--metrics-port", str(metrics_port), "--eviction-tick-s", "1",
                "--eviction-max-connections", "10", "--eviction-max-fraction-per-tick", "0.5")
    idle = [connect(srv.port) for _ in range(8)]
    for s in idle:
        s.sendall(frame(PING, b"hello"))  # one valid frame (the handshake), then silence
        assert recv_frame(s) == bytes([PONG]) + b"hello"
    time.sleep(1.5)  # three wheel ticks: the busy ones below are all more recent
    busy = [connect(srv.port) for _ in range(8)]
    st: dict[str, Any] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the busy ones keep talking throughout
        assert all(_alive(busy))
        st = _eviction(srv)
        if st.get("evictions") and _active(srv) <= 10 and not st.get("shedding"):
            break
        time.sleep(0.2)
    evicted = sum(st["evictions"].values())
    assert st["evictions"] == {"default": evicted} and 6 <= evicted <= 8
    assert st["longest_over_ticks"] <= 3
    assert all(_alive(busy)), "a busy connection was evicted before an idle one"
    assert _alive(idle).count(False) == evicted
    srv.wait_stats(lambda _: srv.closes().get("evicted") == evicted)
    m = scrape(metrics_port)
    assert value(m["tidegate_evictions"], **{"class": "default"}) == evicted
    assert value(m["tidegate_closes"], reason="evicted") == evicted
    assert value(m["tidegate_eviction_pressure_ratio"], resource="connections") <= 1.0
    assert "evicting" in srv.log()


def test_dry_run_closes_nothing_but_reports(serve: Any) -> None:
    metrics_port = free_port()
    srv = serve("--workers", "1", "--metrics-port", str(metrics_port), "--eviction-tick-s", "1",
                "--eviction-max-connections", "3", "--eviction-max-fraction-per-tick", "0.5",
                "--eviction-dry-run", "true")
    socks = [connect(srv.port) for _ in range(6)]
    assert all(_alive(socks))
    st = srv.wait_stats(lambda _: _eviction(srv).get("ticks", 0) >= 3
                        and _eviction(srv).get("would_evict"))
    ev = _eviction(srv)
    assert ev["dry_run"] and ev["shedding"] and ev["over"] == ["connections"]
    assert sum(ev["would_evict"].values()) >= 3 and not ev["evictions"]
    assert all(_alive(socks)) and _active(srv) == 6
    assert "evicted" not in srv.closes(), st
    log = srv.log()
    assert "eviction dry run: would evict" in log and "selected=3" in log
    m = scrape(metrics_port)
    assert value(m["tidegate_evictions_dry_run"], **{"class": "default"}) >= 3
    assert value(m["tidegate_evictions"]) == 0
    assert value(m["tidegate_eviction_shedding"], worker="0") == 1


# ---- the gateway pushed past its ceiling ------------------------------------------------------
GATEWAY_TOML = """
[gateway]
token_hmac_secret = "{secret}"
api_key = "eviction-test-key"
[gateway.channels]
allow_subscribe_for_client = true
[gateway.namespaces.mid]
allow_subscribe_for_client = true
eviction_priority = 5
[gateway.namespaces.vip]
allow_subscribe_for_client = true
eviction_protected = true
[engine]
eviction_tick_s = 1.0
eviction_max_connections = 20
eviction_max_fraction_per_tick = 0.5
eviction_resume_fraction = 0.9
eviction_reconnect_delay_s = 7.0
"""


class Client:
    """A JSON-protocol client on the `websockets` library."""

    def __init__(self, kind: str, ws: ClientConnection) -> None:
        self.kind, self.ws, self.next_id = kind, ws, 0

    @classmethod
    async def open(cls, port: int, kind: str, *channels: str, **claims: Any) -> Client:
        c = cls(kind, await ws_connect(f"ws://127.0.0.1:{port}/connection/websocket"))
        assert "connect" in await c.call("connect", {"token": tok(kind, **claims)})
        for ch in channels:
            assert "subscribe" in await c.call("subscribe", {"channel": ch})
        return c

    async def call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self.next_id += 1
        await self.ws.send(json.dumps({"id": self.next_id, method: params}))
        while True:
            for line in (await asyncio.wait_for(self.ws.recv(), 10)).splitlines():
                reply = json.loads(line)
                if reply.get("id") == self.next_id:
                    return dict(reply)

    @property
    def evicted(self) -> bool:
        return self.ws.state is State.CLOSED


async def tcp_client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(json.dumps({"id": 1, "connect": {"token": tok("tcp")}}).encode() + b"\n")
    assert b'"connect"' in await asyncio.wait_for(reader.readline(), 10)
    return reader, writer


def test_overloaded_gateway_is_back_under_in_three_ticks_and_spares_the_protected(
    gateway: Any, tmp_path: Path
) -> None:
    """31 clients against a ceiling of 20: the controller sheds only unprotected ones (the
    tcp client first: unsubscribed and idle longest), never a subscriber of class 5 (enough
    lower ones exist whenever it ticks), and the protected ones - by token claim and by
    namespace - see no disconnect at all."""
    conf = tmp_path / "gateway.toml"
    conf.write_text(GATEWAY_TOML.format(secret=SECRET))
    srv = gateway("--config", str(conf), "--workers", "1")

    async def main() -> None:
        port = srv.port
        protected = [await Client.open(port, "claim", "news", tidegate_priority="protected")
                     for _ in range(6)]
        protected += [await Client.open(port, "vip", "vip:room") for _ in range(4)]
        mid = [await Client.open(port, "mid", "news", "mid:a") for _ in range(6)]
        reader, writer = await tcp_client(srv.tcp_port)
        await asyncio.sleep(1.2)  # wheel ticks: the tcp client is the oldest of the low ones
        low = [await Client.open(port, "news", "news") for _ in range(6)]
        low += [await Client.open(port, "unsub") for _ in range(8)]

        await asyncio.to_thread(srv.wait_stats, lambda _: _settled(srv, 20, 31))
        ev = _eviction(srv)
        evicted = sum(ev["evictions"].values())
        assert ev["longest_over_ticks"] <= 3, ev
        assert 11 <= evicted <= 13 and set(ev["evictions"]) == {"0"}, ev

        # the tcp client: a disconnect push (reconnect, with the hint), then the close
        line = await asyncio.wait_for(reader.readline(), 10)
        assert json.loads(line) == {"push": {"disconnect": {
            "code": 3011, "reason": "evicted: reconnect_delay_s=7", "reconnect": True}}}
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()

        async def closed_ws() -> list[Client]:
            for _ in range(100):  # the close handshakes finish on the clients' side
                gone = [c for c in low if c.evicted]
                if len(gone) == evicted - 1:
                    return gone
                await asyncio.sleep(0.1)
            raise AssertionError(f"{len([c for c in low if c.evicted])} of {evicted - 1} closed")

        for c in await closed_ws():
            assert (c.ws.close_code, c.ws.close_reason) == (3011, "evicted: reconnect_delay_s=7")
        for c in protected + mid + [c for c in low if not c.evicted]:
            assert c.ws.state is State.OPEN, c.kind
            assert "subscribe" in await c.call("subscribe", {"channel": "after"}), c.kind
        await asyncio.to_thread(srv.wait_stats, lambda _: srv.closes().get("evicted") == evicted)
        for c in protected + mid + low:
            await c.ws.close()

    asyncio.run(main())
    m = scrape(srv.metrics_port)
    assert value(m["tidegate_evictions"], **{"class": "protected"}) == 0
    assert value(m["tidegate_evictions"]) == value(m["tidegate_closes"], reason="evicted") > 0


# ---- helpers ---------------------------------------------------------------------------------
def _eviction(srv: Any) -> dict[str, Any]:
    workers = srv.status().get("worker_stats") or [{}]
    return dict((workers[0] or {}).get("eviction", {}))


def _active(srv: Any) -> int:
    return srv.total("active")


def _settled(srv: Any, ceiling: int, accepted: int) -> bool:
    """Every client is in the stats, evictions happened, the worker is under its ceiling and
    no longer shedding."""
    ev = _eviction(srv)
    return (srv.total("accepted") >= accepted and bool(ev.get("evictions"))
            and _active(srv) <= ceiling and not ev.get("shedding"))


# ---- a big batch goes through the worker's run queue -------------------------------------------
@pytest.mark.parametrize("loop_name", ["uvloop", "asyncio"])
def test_a_big_eviction_is_run_queue_chunks_and_never_evicts_twice(loop_name: str) -> None:
    """An in-process worker with 1,800 real loopback connections and a ceiling of 200. Four
    ticks back to back (the later ones while the earlier ones' evictions are still queued) pick
    1,620 victims between them, none twice: a tick does not count the victims still queued as
    connections, nor picks them again. The evictions run as run-queue jobs in slices of
    ``slice_ms``: a timer due meanwhile and a new client's accept and ping/pong run before
    they are done. Afterwards exactly the victims' clients got the server's close, and the
    counters agree with them."""
    import uvloop

    from tidegate.apps.echo import EchoHandler
    from tidegate.engine.eviction import EvictionController
    from tidegate.engine.netopt import listening_socket
    from tidegate.engine.worker import Worker

    n, ceiling, resume = 1800, 200, 180
    opts = EngineOptions(host="127.0.0.1", slice_ms=1.0, eviction_max_connections=ceiling,
                         eviction_max_fraction_per_tick=0.5, eviction_resume_fraction=0.9,
                         eviction_tick_s=3600.0)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        w = Worker(opts, EchoHandler())
        w.loop, w._t0 = loop, loop.time()
        server = await loop.create_server(w.conn_class, sock=listening_socket(opts, 0, reuseport=False))
        port = server.sockets[0].getsockname()[1]
        clients: list[socket.socket] = []
        for _ in range(n):
            s = socket.socket()
            s.setblocking(False)
            await loop.sock_connect(s, ("127.0.0.1", port))
            clients.append(s)
        while w.active < n:
            await asyncio.sleep(0.01)
        w.eviction = ctrl = EvictionController(w)
        rq = w.runqueue
        slices0 = rq.slices

        # Four ticks before any eviction ran, each half of what is left (the fraction), the
        # last the 45 down to the resume level; the fifth finds it there.
        picked = [ctrl.run() for _ in range(5)]
        assert picked == [900, 450, 225, 45, 0]
        assert ctrl.pending == 1620 and not ctrl.evictions and not ctrl.shedding
        assert rq.depth == 4 and ctrl.last.connections == resume

        during: list[int] = []
        loop.call_soon(lambda: during.append(ctrl.pending))  # a timer due while they run

        async def ping_pong() -> int:
            """A client that comes now: accepted, its ping answered - while evictions wait."""
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(frame(PING, b"beat"))
            assert await reader.readexactly(9) == frame(PONG, b"beat")
            pending = ctrl.pending
            writer.close()
            return pending

        pending_at_pong = await ping_pong()
        await asyncio.gather(*(h.wait() for h in list(rq._jobs)))
        assert 0 < during[0] < 1620, "the timer waited for every eviction"
        assert pending_at_pong > 0, "the ping/pong waited for every eviction"
        assert rq.slices - slices0 > 4 and rq.jobs_done == 4
        assert ctrl.pending == 0 and sum(ctrl.evictions.values()) == 1620

        # The clients' side: exactly 1,620 closes (EOF), and the server counts each once.
        await asyncio.sleep(0.2)
        evicted = []
        for s in clients:
            try:
                if s.recv(1) == b"":
                    evicted.append(s)
            except BlockingIOError:
                pass
        assert len(evicted) == 1620
        for s in evicted:
            s.close()
        deadline = loop.time() + 10
        while w.closes.get("evicted", 0) < 1620 and loop.time() < deadline:
            await asyncio.sleep(0.02)
        assert w.closes["evicted"] == 1620 and w.active == resume  # (the pinger left too)
        assert ctrl.run() == 0 and ctrl.last.connections == resume
        for s in clients:
            s.close()
        server.close()

    new_loop = uvloop.new_event_loop if loop_name == "uvloop" else asyncio.new_event_loop
    loop = new_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
