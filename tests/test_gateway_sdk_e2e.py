"""The official centrifuge-python SDK, unchanged, against ClientSession over a real WebSocket.

The WebSocket side here is a small test adapter on the ``websockets`` library (loopback only):
it stands in for the engine's transport and shows the wiring - one ClientSession per
connection, ``handle_commands`` per message, text frames for JSON and binary frames for
``centrifuge-protobuf``, ``close(code, reason)`` as the WebSocket close frame.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
from centrifuge import (
    Client,
    ClientEventHandler,
    DisconnectedContext,
    JoinContext,
    PublicationContext,
    ServerPublicationContext,
    ServerSubscribedContext,
    SubscriptionEventHandler,
)
from websockets.asyncio.server import ServerConnection, serve

from tidegate.gateway.auth import encode_hs256
from tidegate.gateway.codec_protobuf import PROTOBUF_SUBPROTOCOL
from tidegate.gateway.config import ChannelOptions, GatewayConfig
from tidegate.gateway.node import Node
from tidegate.gateway.session import ClientSession

SECRET = "e2e-secret"
pytestmark = pytest.mark.timeout(60)


class WSTransport:
    """Test transport: an ordered outbox drained by one writer task per connection."""

    def __init__(self, ws: ServerConnection, binary: bool) -> None:
        self.ws = ws
        self.binary = binary
        self.outbox: asyncio.Queue[bytes | tuple[int, str]] = asyncio.Queue()

    def write(self, data: bytes) -> None:
        self.outbox.put_nowait(data)

    def close(self, code: int, reason: str) -> None:
        self.outbox.put_nowait((code, reason))

    async def drain(self) -> None:
        while True:
            item = await self.outbox.get()
            if isinstance(item, tuple):
                await self.ws.close(item[0], item[1])
                return
            await self.ws.send(item if self.binary else item.decode())


@asynccontextmanager
async def gateway(node: Node) -> AsyncIterator[str]:
    async def handler(ws: ServerConnection) -> None:
        binary = ws.subprotocol == PROTOBUF_SUBPROTOCOL
        t = WSTransport(ws, binary)
        session = ClientSession(t, node, "protobuf" if binary else "json")
        writer = asyncio.create_task(t.drain())
        try:
            async for msg in ws:
                session.handle_commands(msg if isinstance(msg, bytes) else msg.encode())
        finally:
            session.on_transport_closed()
            await asyncio.sleep(0.05)
            writer.cancel()

    def select(ws: ServerConnection, offered: Sequence[str]) -> Any:
        # no subprotocol = JSON (websockets' default would refuse the handshake)
        return PROTOBUF_SUBPROTOCOL if PROTOBUF_SUBPROTOCOL in offered else None

    async with serve(handler, "127.0.0.1", 0, select_subprotocol=select) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/connection/websocket"


def make_node() -> Node:
    async def rpc(session: ClientSession, method: str, data: bytes) -> bytes:
        await asyncio.sleep(0)
        return data

    cfg = GatewayConfig(
        token_hmac_secret=SECRET,
        channels=ChannelOptions(allow_subscribe_for_client=True),
        namespaces={
            "chat": ChannelOptions(
                allow_subscribe_for_client=True,
                allow_publish_for_subscriber=True,
                allow_history_for_subscriber=True,
                allow_presence_for_subscriber=True,
                presence=True,
                join_leave=True,
                history_size=10,
                history_ttl_s=60,
                allow_recovery=True,
            )
        },
    )
    return Node(cfg, rpc_handler=rpc)


def tok(user: str, **claims: Any) -> str:
    return encode_hs256({"sub": user, "exp": int(time.time()) + 300, **claims}, SECRET)


class SubEvents(SubscriptionEventHandler):
    def __init__(self) -> None:
        self.pubs: asyncio.Queue[Any] = asyncio.Queue()
        self.joins: asyncio.Queue[Any] = asyncio.Queue()

    async def on_publication(self, ctx: PublicationContext) -> None:
        self.pubs.put_nowait(ctx.pub)

    async def on_join(self, ctx: JoinContext) -> None:
        self.joins.put_nowait(ctx.info)


class ClientEvents(ClientEventHandler):
    def __init__(self) -> None:
        self.disconnected: asyncio.Future[DisconnectedContext] = (
            asyncio.get_running_loop().create_future()
        )
        self.server_subs: asyncio.Queue[ServerSubscribedContext] = asyncio.Queue()
        self.server_pubs: asyncio.Queue[ServerPublicationContext] = asyncio.Queue()

    async def on_disconnected(self, ctx: DisconnectedContext) -> None:
        if not self.disconnected.done():
            self.disconnected.set_result(ctx)

    async def on_subscribed(self, ctx: ServerSubscribedContext) -> None:
        self.server_subs.put_nowait(ctx)

    async def on_publication(self, ctx: ServerPublicationContext) -> None:
        self.server_pubs.put_nowait(ctx)


@pytest.mark.parametrize("use_protobuf", [False, True], ids=["json", "protobuf"])
def test_official_sdk_end_to_end(use_protobuf: bool) -> None:
    def payload(v: Any) -> Any:
        return json.dumps(v).encode() if use_protobuf else v

    def unpayload(v: Any) -> Any:
        return json.loads(v) if use_protobuf else v

    async def main() -> None:
        node = make_node()
        async with gateway(node) as url:
            alice = Client(url, token=tok("alice"), use_protobuf=use_protobuf, proxy=None)
            bob = Client(url, token=tok("bob"), use_protobuf=use_protobuf, proxy=None)
            await alice.connect()
            await bob.connect()
            await alice.ready()
            await bob.ready()

            a_events = SubEvents()
            a_sub = alice.new_subscription("chat:room", a_events, join_leave=True, recoverable=True)
            await a_sub.subscribe()
            await a_sub.ready()
            b_sub = bob.new_subscription("chat:room", SubEvents())
            await b_sub.subscribe()
            await b_sub.ready()

            joined = await asyncio.wait_for(a_events.joins.get(), 5)
            while joined.user != "bob":
                joined = await asyncio.wait_for(a_events.joins.get(), 5)

            await b_sub.publish(payload({"text": "hello"}))
            pub = await asyncio.wait_for(a_events.pubs.get(), 5)
            assert unpayload(pub.data) == {"text": "hello"}
            assert pub.info.user == "bob" and pub.offset == 1

            hist = await a_sub.history(limit=10)
            assert [unpayload(p.data) for p in hist.publications] == [{"text": "hello"}]
            assert hist.offset == 1 and hist.epoch

            presence = await a_sub.presence()
            assert {c.user for c in presence.clients.values()} == {"alice", "bob"}
            stats = await a_sub.presence_stats()
            assert (stats.num_clients, stats.num_users) == (2, 2)

            rpc = await alice.rpc("echo", payload([1, 2, 3]))
            assert unpayload(rpc.data) == [1, 2, 3]

            await alice.disconnect()
            await bob.disconnect()

    asyncio.run(main())


@pytest.mark.parametrize("use_protobuf", [False, True], ids=["json", "protobuf"])
def test_sdk_server_side_subscription(use_protobuf: bool) -> None:
    async def main() -> None:
        node = make_node()
        async with gateway(node) as url:
            events = ClientEvents()
            c = Client(
                url,
                events=events,
                token=tok("carol", channels=["news"]),
                use_protobuf=use_protobuf,
                proxy=None,
            )
            await c.connect()
            await c.ready()
            sub = await asyncio.wait_for(events.server_subs.get(), 5)
            assert sub.channel == "news"
            data = b'{"n":1}'
            await node.hub.publish("news", data)  # what the server API will do
            got = await asyncio.wait_for(events.server_pubs.get(), 5)
            assert got.channel == "news"
            assert got.pub.data == (data if use_protobuf else {"n": 1})
            await c.disconnect()

    asyncio.run(main())


@pytest.mark.parametrize("use_protobuf", [False, True], ids=["json", "protobuf"])
def test_sdk_sees_invalid_token_as_terminal_disconnect(use_protobuf: bool) -> None:
    async def main() -> None:
        node = make_node()
        async with gateway(node) as url:
            events = ClientEvents()
            forged = encode_hs256({"sub": "mallory"}, "not-the-secret")
            c = Client(url, events=events, token=forged, use_protobuf=use_protobuf, proxy=None)
            await c.connect()
            ctx = await asyncio.wait_for(events.disconnected, 5)
            assert (ctx.code, ctx.reason) == (3500, "invalid token")
            assert c.state.value == "disconnected"  # 3500: the SDK does not reconnect

    asyncio.run(main())
