"""Subscribing against a broker that is not inline (like cluster.IpcBroker).

Broker replies come later, and publications stored by other workers reach this worker's hub
through ``hub.handle_publication`` at any moment - also while a session is between "registered"
and "subscribe reply written". :class:`GatedBroker` holds a call at a gate the test opens:
before it reads its store and after, so a test can publish exactly before or after the position
the subscribe reply will carry.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from centrifuge import Client

from test_gateway_sdk_e2e import ClientEvents, gateway, make_node, tok
from test_gateway_session import SDKClient, make_config, token
from tidegate.gateway.broker import MemoryBroker
from tidegate.gateway.history import RecoveryResult
from tidegate.gateway.messages import ClientInfo, HistoryResult, Publication
from tidegate.gateway.node import Node

T = TypeVar("T")
FORMATS = ["json", "protobuf"]
pytestmark = pytest.mark.timeout(60)


class Gate:
    def __init__(self) -> None:
        self.arrived = asyncio.Event()  # the call waits before reading its store
        self.go_read = asyncio.Event()
        self.has_read = asyncio.Event()  # it read; it waits before returning
        self.go_return = asyncio.Event()

    def open(self) -> None:
        self.go_read.set()
        self.go_return.set()


class GatedBroker(MemoryBroker):
    """The in-memory stores behind a non-inline interface; chosen calls wait at a gate."""

    inline = False

    def __init__(self) -> None:
        super().__init__()
        self.gates: dict[tuple[str, str | None], Gate] = {}
        self.calls: list[tuple[str, str]] = []

    def hold(self, method: str, channel: str | None = None) -> Gate:
        """Gate the next ``method`` call (for ``channel``, or any)."""
        gate = self.gates[(method, channel)] = Gate()
        return gate

    async def _through(self, method: str, channel: str, read: Callable[[], Awaitable[T]]) -> T:
        self.calls.append((method, channel))
        gate = self.gates.pop((method, channel), None) or self.gates.pop((method, None), None)
        if gate is None:
            await asyncio.sleep(0)  # a real await, like a network round trip
            return await read()
        gate.arrived.set()
        await gate.go_read.wait()
        result = await read()
        gate.has_read.set()
        await gate.go_return.wait()
        return result

    async def subscribe(self, channel: str) -> None:
        await self._through("subscribe", channel, lambda: MemoryBroker.subscribe(self, channel))

    async def unsubscribe(self, channel: str) -> None:
        self.calls.append(("unsubscribe", channel))

    async def history(self, channel: str, **kw: Any) -> HistoryResult:
        return await self._through(
            "history", channel, lambda: MemoryBroker.history(self, channel, **kw)
        )

    async def recover(
        self, channel: str, since_offset: int, epoch: str, **kw: Any
    ) -> RecoveryResult:
        return await self._through(
            "recover",
            channel,
            lambda: MemoryBroker.recover(self, channel, since_offset, epoch, **kw),
        )

    async def add_presence(self, channel: str, info: ClientInfo) -> None:
        await self._through(
            "add_presence", channel, lambda: MemoryBroker.add_presence(self, channel, info)
        )


def remote_publish(node: Node, channel: str, value: Any, relay: bool = True) -> Publication:
    """A publication made on another worker: stored at the channel's owner (offsets), then
    relayed to this worker's hub."""
    broker = node.broker
    assert isinstance(broker, GatedBroker)
    opts = node.config.channel_options(channel)
    assert opts is not None
    data = json.dumps(value).encode()
    if opts.history_enabled:
        pub = broker.history_store.add(
            channel, data, data, size=opts.history_size, ttl_s=opts.history_ttl_s
        )
    else:
        pub = Publication(data, data)
    if relay:
        node.hub.handle_publication(channel, pub)
    return pub


async def settle(*clients: SDKClient) -> None:
    for _ in range(500):
        await asyncio.sleep(0)
        if not any(c.s.busy for c in clients):
            return
    raise AssertionError("session still busy")


async def a_connected(node: Node, fmt: str = "json", user: str = "42", **claims: Any) -> SDKClient:
    c = SDKClient(node, fmt)
    c.fire("connect", {"token": token(user, **claims)})
    await settle(c)
    (r,) = c.replies()
    assert "connect" in r, r
    return c


async def a_subscribe(c: SDKClient, channel: str, **params: Any) -> dict[str, Any]:
    c.fire("subscribe", {"channel": channel, **params})
    await settle(c)
    (r,) = c.replies()
    assert "subscribe" in r, r
    return dict(r["subscribe"])


def pub_values(c: SDKClient, replies: list[dict[str, Any]], channel: str) -> list[Any]:
    out = []
    for r in replies:
        push = r["push"]
        assert push["channel"] == channel and "pub" in push, r
        out.append(c.dec(push["pub"]["data"])["n"])
    return out


def pending_clean(node: Node) -> bool:
    return node.hub.num_pending() == 0 and not node.hub._pending


# ---- the race ----------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_recovery_gets_publications_relayed_during_the_subscribe_once_in_order(fmt: str) -> None:
    async def main() -> None:
        node = Node(make_config(), broker=GatedBroker())
        broker = node.broker
        assert isinstance(broker, GatedBroker)
        live = await a_connected(node, user="live")
        r = await a_subscribe(live, "chat:room", recoverable=True)
        epoch = r["epoch"]
        for n in (1, 2, 3):
            remote_publish(node, "chat:room", {"n": n})
        assert pub_values(live, live.replies(), "chat:room") == [1, 2, 3]

        back = await a_connected(node, fmt, user="back")
        gate = broker.hold("recover", "chat:room")
        back.fire(
            "subscribe",
            {
                "channel": "chat:room",
                "recoverable": True,
                "recover": True,
                "offset": 1,
                "epoch": epoch,
            },
        )
        sub_id = back._id
        await gate.arrived.wait()
        remote_publish(node, "chat:room", {"n": 4})  # before the read: recovered
        assert pub_values(live, live.replies(), "chat:room") == [4]  # normal ones: at once
        gate.go_read.set()
        await gate.has_read.wait()
        remote_publish(node, "chat:room", {"n": 5})  # after the read: buffered, written after
        remote_publish(node, "chat:room", {"n": 6})
        assert pub_values(live, live.replies(), "chat:room") == [5, 6]
        assert back.replies() == []  # nothing before the subscribe reply
        gate.go_return.set()
        await settle(back)

        replies = back.replies()
        assert replies[0]["id"] == sub_id
        res = replies[0]["subscribe"]
        assert res["recovered"] is True and int(res["offset"]) == 4 and res["epoch"] == epoch
        assert [back.dec(p["data"])["n"] for p in res["publications"]] == [2, 3, 4]
        assert pub_values(back, replies[1:], "chat:room") == [5, 6]
        assert [int(p["pub"]["offset"]) for p in (r["push"] for r in replies[1:])] == [5, 6]
        assert pending_clean(node)

        remote_publish(node, "chat:room", {"n": 7})  # and now a normal subscriber
        assert pub_values(back, back.replies(), "chat:room") == [7]
        assert node.hub.num_subscribers("chat:room") == 2

    asyncio.run(main())


@pytest.mark.parametrize("fmt", FORMATS)
def test_positioning_drops_what_the_position_covers_and_sorts_the_rest(fmt: str) -> None:
    async def main() -> None:
        node = Node(make_config(), broker=GatedBroker())
        broker = node.broker
        assert isinstance(broker, GatedBroker)
        c = await a_connected(node, fmt)
        gate = broker.hold("history", "chat:pos")
        c.fire("subscribe", {"channel": "chat:pos", "positioned": True})
        await gate.arrived.wait()
        remote_publish(node, "chat:pos", {"n": 1})  # the position will include it
        gate.go_read.set()
        await gate.has_read.wait()
        two = remote_publish(node, "chat:pos", {"n": 2}, relay=False)
        three = remote_publish(node, "chat:pos", {"n": 3}, relay=False)
        node.hub.handle_publication("chat:pos", three)  # relayed out of order
        node.hub.handle_publication("chat:pos", two)
        gate.go_return.set()
        await settle(c)
        replies = c.replies()
        res = replies[0]["subscribe"]
        assert res["positioned"] is True and int(res["offset"]) == 1
        assert "publications" not in res
        assert pub_values(c, replies[1:], "chat:pos") == [2, 3]  # no gap, no duplicate
        assert pending_clean(node)

    asyncio.run(main())


@pytest.mark.parametrize("fmt", FORMATS)
def test_channel_without_history_gets_every_buffered_publication(fmt: str) -> None:
    async def main() -> None:
        node = Node(make_config(), broker=GatedBroker())
        broker = node.broker
        assert isinstance(broker, GatedBroker)
        c = await a_connected(node, fmt)
        gate = broker.hold("subscribe", "nohist:x")  # the node's broker subscription
        c.fire("subscribe", {"channel": "nohist:x"})
        await gate.arrived.wait()
        for n in (1, 2, 3):
            remote_publish(node, "nohist:x", {"n": n})
        gate.open()
        await settle(c)
        replies = c.replies()
        assert "subscribe" in replies[0] and "offset" not in replies[0]["subscribe"]
        assert pub_values(c, replies[1:], "nohist:x") == [1, 2, 3]
        assert pending_clean(node)
        remote_publish(node, "nohist:x", {"n": 4})
        assert pub_values(c, c.replies(), "nohist:x") == [4]

    asyncio.run(main())


def test_server_side_channels_of_connect_deliver_after_the_connect_reply() -> None:
    async def main() -> None:
        node = Node(make_config(), broker=GatedBroker())
        broker = node.broker
        assert isinstance(broker, GatedBroker)
        c = SDKClient(node)
        gate = broker.hold("history", "chat:a")  # "news" attaches first, then this waits
        c.fire("connect", {"token": token(channels=["news", "chat:a"])})
        await gate.arrived.wait()
        remote_publish(node, "news", {"n": 1})  # news is attached but the reply is not out
        remote_publish(node, "chat:a", {"n": 10})  # covered by chat:a's position
        gate.go_read.set()
        await gate.has_read.wait()
        remote_publish(node, "chat:a", {"n": 11})
        gate.go_return.set()
        await settle(c)
        replies = c.replies()
        subs = replies[0]["connect"]["subs"]
        assert int(subs["news"].get("offset", 0)) == 0 and int(subs["chat:a"]["offset"]) == 1
        assert [
            (r["push"]["channel"], c.dec(r["push"]["pub"]["data"])["n"]) for r in replies[1:]
        ] == [("news", 1), ("chat:a", 11)]
        assert pending_clean(node)

    asyncio.run(main())


# ---- failed subscribes leave nothing behind ------------------------------------------------
def test_connection_closing_mid_subscribe_drops_the_buffer() -> None:
    async def main() -> None:
        node = Node(make_config(), broker=GatedBroker())
        broker = node.broker
        assert isinstance(broker, GatedBroker)
        c = await a_connected(node)
        gate = broker.hold("recover", "chat:room")
        c.fire(
            "subscribe",
            {
                "channel": "chat:room",
                "recoverable": True,
                "recover": True,
                "offset": 0,
                "epoch": "x",
            },
        )
        await gate.arrived.wait()
        remote_publish(node, "chat:room", {"n": 1})
        assert node.hub.num_pending() == 1
        c.s.on_transport_closed()
        await settle(c)
        gate.open()
        remote_publish(node, "chat:room", {"n": 2})
        await asyncio.sleep(0.01)
        assert c.t.writes == []
        assert node.hub.num_subscribers("chat:room") == 0 and pending_clean(node)
        assert ("unsubscribe", "chat:room") in broker.calls
        assert broker.presence_store.channels() == 0

    asyncio.run(main())


def test_connection_closing_while_presence_is_added_removes_it() -> None:
    async def main() -> None:
        node = Node(make_config(), broker=GatedBroker())
        broker = node.broker
        assert isinstance(broker, GatedBroker)
        c = await a_connected(node)
        gate = broker.hold("add_presence", "chat:room")
        c.fire("subscribe", {"channel": "chat:room"})
        gate.go_read.set()
        await gate.has_read.wait()
        assert broker.presence_store.channels() == 1
        remote_publish(node, "chat:room", {"n": 1})
        c.s.on_transport_closed()
        await settle(c)
        gate.open()
        await asyncio.sleep(0.01)
        assert c.t.writes == []
        assert node.hub.num_subscribers("chat:room") == 0 and pending_clean(node)
        assert broker.presence_store.channels() == 0

    asyncio.run(main())


def test_unrecoverable_rejected_subscribe_drops_the_buffer() -> None:
    async def main() -> None:
        node = Node(make_config(), broker=GatedBroker())
        broker = node.broker
        assert isinstance(broker, GatedBroker)
        c = await a_connected(node)
        gate = broker.hold("recover", "chat:room")
        c.fire(
            "subscribe",
            {
                "channel": "chat:room",
                "recoverable": True,
                "recover": True,
                "offset": 7,
                "epoch": "gone",
                "flag": 3,
            },
        )
        await gate.arrived.wait()
        remote_publish(node, "chat:room", {"n": 1})
        gate.open()
        await settle(c)
        (r,) = c.replies()
        assert r["error"]["code"] == 112
        assert c.s.channels() == [] and node.hub.num_subscribers("chat:room") == 0
        assert pending_clean(node)
        remote_publish(node, "chat:room", {"n": 2})
        assert c.replies() == []

    asyncio.run(main())


def test_buffer_overflow_disconnects_with_insufficient_state() -> None:
    async def main() -> None:
        node = Node(make_config(client_queue_max_messages=2), broker=GatedBroker())
        broker = node.broker
        assert isinstance(broker, GatedBroker)
        c = await a_connected(node)
        gate = broker.hold("subscribe", "nohist:x")
        c.fire("subscribe", {"channel": "nohist:x"})
        await gate.arrived.wait()
        for n in range(10):
            remote_publish(node, "nohist:x", {"n": n})
        assert len(node.hub._pending["nohist:x"][c.s]) == 3  # capped
        gate.open()
        await settle(c)
        assert "subscribe" in c.replies()[0]
        assert c.t.closed == (3010, "insufficient state")
        assert node.hub.num_subscribers("nohist:x") == 0 and pending_clean(node)

    asyncio.run(main())


# ---- server-side subscribe (server API) ----------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_server_subscribe_push_then_buffered_publications(fmt: str) -> None:
    async def main() -> None:
        node = Node(make_config(), broker=GatedBroker())
        broker = node.broker
        assert isinstance(broker, GatedBroker)
        c = await a_connected(node, fmt)
        gate = broker.hold("history", "news")
        task = asyncio.create_task(c.s.server_subscribe("news", data=b'{"why":"api"}'))
        await gate.arrived.wait()
        remote_publish(node, "news", {"n": 1})  # covered by the position
        # the client cannot subscribe to what the server is subscribing it to
        c.fire("subscribe", {"channel": "news"})
        await settle(c)
        assert c.replies()[0]["error"]["code"] == 105
        assert await c.s.server_subscribe("news") is False
        gate.go_read.set()
        await gate.has_read.wait()
        remote_publish(node, "news", {"n": 2})
        gate.go_return.set()
        assert await task is True
        replies = c.replies()
        push = replies[0]["push"]
        assert push["channel"] == "news"
        sub = push["subscribe"]
        assert sub["recoverable"] is True and sub["positioned"] is True
        assert int(sub["offset"]) == 1 and sub["epoch"]
        assert c.dec(sub["data"]) == {"why": "api"}
        assert pub_values(c, replies[1:], "news") == [2]
        assert pending_clean(node) and c.s.channels() == ["news"]

    asyncio.run(main())


def test_server_subscribe_on_a_connection_closing_meanwhile() -> None:
    async def main() -> None:
        node = Node(make_config(), broker=GatedBroker())
        broker = node.broker
        assert isinstance(broker, GatedBroker)
        c = await a_connected(node)
        gate = broker.hold("history", "chat:room")
        task = asyncio.create_task(c.s.server_subscribe("chat:room"))
        await gate.arrived.wait()
        remote_publish(node, "chat:room", {"n": 1})
        c.s.on_transport_closed()
        gate.open()
        assert await task is False
        assert c.t.writes == []
        assert node.hub.num_subscribers("chat:room") == 0 and pending_clean(node)
        assert broker.presence_store.channels() == 0

    asyncio.run(main())


def test_server_subscribe_waits_for_the_connect_reply() -> None:
    async def main() -> None:
        node = Node(make_config(), broker=GatedBroker())
        broker = node.broker
        assert isinstance(broker, GatedBroker)
        c = SDKClient(node)
        gate = broker.hold("history", "news")
        c.fire("connect", {"token": token(channels=["news"])})
        await gate.arrived.wait()
        assert c.s.connected
        assert await c.s.server_subscribe("chat:room") is False  # the connect reply is not out
        gate.open()
        await settle(c)
        assert "connect" in c.replies()[0]
        assert await c.s.server_subscribe("chat:room") is True

    asyncio.run(main())


@pytest.mark.parametrize("use_protobuf", [False, True], ids=["json", "protobuf"])
def test_sdk_on_subscribed_fires_for_server_subscribe(use_protobuf: bool) -> None:
    """The official SDK over a real WebSocket: the push makes a server-side subscription."""

    async def main() -> None:
        node = make_node()
        async with gateway(node) as url:
            events = ClientEvents()
            c = Client(url, events=events, token=tok("dave"), use_protobuf=use_protobuf, proxy=None)
            await c.connect()
            await c.ready()
            (s,) = node.hub.user_sessions("dave")
            assert await s.server_subscribe("chat:news", data=b'{"k":1}') is True
            ctx = await asyncio.wait_for(events.server_subs.get(), 5)
            assert ctx.channel == "chat:news"
            assert ctx.recoverable and ctx.positioned and ctx.stream_position is not None
            assert ctx.data == (b'{"k":1}' if use_protobuf else {"k": 1})
            await node.hub.publish("chat:news", b'{"n":1}')
            got = await asyncio.wait_for(events.server_pubs.get(), 5)
            assert got.channel == "chat:news" and got.pub.offset == 1
            await c.disconnect()

    asyncio.run(main())
