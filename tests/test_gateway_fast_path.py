"""The RPC fast path: ``match_rpc`` (codec), ``ClientSession`` running a compact RPC command
without the generic machinery, and ``WebSocketApp`` taking whole frames straight from the
engine's read buffer. Each must give exactly what the generic path gives."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import time
from collections.abc import Coroutine
from typing import Any

import pytest

from tidegate.engine.conn import Conn
from tidegate.engine.options import EngineOptions
from tidegate.engine.worker import Worker
from tidegate.gateway.auth import encode_hs256
from tidegate.gateway.broker import MemoryBroker
from tidegate.gateway.codec_json import JSON_CODEC, match_rpc
from tidegate.gateway.codes import (
    DISCONNECT_BAD_REQUEST,
    DisconnectError,
    ProtocolError,
    ReplyError,
)
from tidegate.gateway.config import ChannelOptions, GatewayConfig
from tidegate.gateway.messages import Method, RPCRequest
from tidegate.gateway.node import Node
from tidegate.gateway.session import ClientSession
from tidegate.gateway.testing import RecordingTransport
from tidegate.protocol import websocket as ws
from tidegate.server import http_api
from tidegate.server.app import echo_rpc
from tidegate.server.websocket_app import WebSocketApp

SECRET = "test-secret"


def make_config(**kw: Any) -> GatewayConfig:
    return GatewayConfig(
        token_hmac_secret=SECRET, channels=ChannelOptions(allow_subscribe_for_client=True), **kw
    )


def token(ttl: float = 3600) -> str:
    return encode_hs256({"sub": "u1", "exp": int(time.time() + ttl)}, SECRET)


def generic(payload: bytes) -> tuple[int, str, bytes] | None:
    """What decode_commands makes of a frame, when it is one rpc command."""
    try:
        cmds = JSON_CODEC.decode_commands(payload)
    except ProtocolError:
        return None
    if len(cmds) != 1 or cmds[0].method is not Method.RPC:
        return None
    req = cmds[0].request
    assert isinstance(req, RPCRequest)
    return cmds[0].id, req.method, req.data


def fast(payload: bytes) -> tuple[int, str, bytes] | None:
    m = match_rpc(payload)
    return None if m is None else (int(m[0]), m[1], m[2])


# ---- match_rpc ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "payload, expected",
    [
        (b'{"id":2,"rpc":{"method":"echo","data":{"n":12345}}}', (2, "echo", b'{"n":12345}')),
        (b'{"rpc":{"method":"echo","data":[1,"a"]},"id":7}', (7, "echo", b'[1,"a"]')),  # js
        (b'{"id":3,"rpc":{"data":"x"}}', (3, "", b'"x"')),
        (b'{"id":3,"rpc":{"method":"m","data":null}}', (3, "m", b"")),
        (b'{"id":999999999,"rpc":{"data":0}}', (999999999, "", b"0")),
        (
            b'{"id":1,"rpc":{"data":{"a":{"b":true,"n":null},"c":[1,-5,"s"]}}}',
            (1, "", b'{"a":{"b":true,"n":null},"c":[1,-5,"s"]}'),
        ),
        (b'{"id":1,"rpc":{"data":{}}}', (1, "", b"{}")),
        (b'{"id":1,"rpc":{"data":[]}}', (1, "", b"[]")),
        (
            b'{"id":1,"rpc":{"data":{"a":{"x":1},"b":{"y":1}}}}',
            (1, "", b'{"a":{"x":1},"b":{"y":1}}'),
        ),
    ],
)
def test_match_rpc_accepts_compact_rpc_commands(payload: bytes, expected: Any) -> None:
    assert fast(payload) == expected
    assert generic(payload) == expected


@pytest.mark.parametrize(
    "payload",
    [
        b'{"id": 2, "rpc": {"method": "echo", "data": {"n": 1}}}',  # whitespace
        b'{"id":2,"rpc":{"data":{"n": 1}}}',
        b'{"id":2,"rpc":{"data":1.5}}',  # floats are re-encoded by the generic path
        b'{"id":2,"rpc":{"data":1e5}}',
        b'{"id":2,"rpc":{"data":-0}}',  # becomes 0
        b'{"id":2,"rpc":{"data":"a\\nb"}}',  # escapes
        b'{"id":2,"rpc":{"data":"\\u00e9"}}',
        '{"id":2,"rpc":{"data":"\u00e9"}}'.encode(),  # not ASCII
        b'{"id":2,"rpc":{"data":{"a":1,"a":2}}}',  # duplicate keys (the last one wins)
        b'{"id":2,"rpc":{"data":{"a":{"b":{"c":1}}}}}',  # deeper than two levels
        b'{"id":2,"rpc":{"data":12345678901234567890}}',  # long integer
        b'{"id":0,"rpc":{"data":1}}',
        b'{"id":02,"rpc":{"data":1}}',
        b'{"id":4294967296,"rpc":{"data":1}}',
        b'{"id":1000000000,"rpc":{"data":1}}',  # valid, but left to the generic path
        b'{"id":2,"rpc":{"method":"m"}}',  # no data
        b'{"id":2,"rpc":{"data":1,"method":"m"}}',  # other field order
        b'{"id":2,"rpc":{"data":1},"x":1}',  # other fields
        b'{"id":2,"rpc":{"data":1}}\n{"id":3,"rpc":{"data":1}}',  # a batch
        b'{"id":2,"rpc":{"data":1}} ',
        b'{"id":2,"ping":{}}',
        b'{"id":2,"rpc":{"data":01}}',
        b'{"id":2,"rpc":{"data":{"a":1,}}}',
        b'{"id":2,"rpc":{"data":"a"b"}}',
    ],
)
def test_match_rpc_leaves_everything_else_to_the_generic_path(payload: bytes) -> None:
    assert fast(payload) is None


def _value(rng: random.Random, depth: int) -> Any:
    kind = rng.randrange(10 if depth < 4 else 6)
    if kind == 0:
        return rng.choice([0, 1, -1, 7, -123456789, 10**17, 10**18, -(10**20)])
    if kind == 1:
        return rng.choice(["", "a", "hello world", 'q"uote', "tab\t", "é", "x:y", '":', "\x7f"])
    if kind == 2:
        return rng.choice([True, False, None])
    if kind == 3:
        return rng.choice([0.5, -2.0, 1e30, 3.25])
    if kind in (4, 5):
        return rng.randrange(-1000, 1000)
    if kind in (6, 7):
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["a", "b", "c", "id", "rpc", "data", ":"]
    return {rng.choice(keys): _value(rng, depth + 1) for _ in range(rng.randrange(4))}


def test_match_rpc_agrees_with_decode_commands_on_random_commands() -> None:
    rng = random.Random(1234)
    accepted = 0
    for i in range(6000):
        data = json.dumps(_value(rng, 1), separators=(",", ":"), ensure_ascii=rng.random() < 0.5)
        if rng.random() < 0.1:  # a duplicate key, spliced in
            data = data.replace('{"a":', '{"a":1,"a":', 1)
        method = rng.choice(['"method":"echo",', '"method":"",', "", '"method":"x y",'])
        cmd_id = rng.choice(["1", "42", "4294967295", "4294967296", "0", str(i + 1)])
        text = (
            f'{{"id":{cmd_id},"rpc":{{{method}"data":{data}}}}}'
            if rng.random() < 0.5
            else f'{{"rpc":{{{method}"data":{data}}},"id":{cmd_id}}}'
        )
        payload = text.encode()
        got = fast(payload)
        if got is not None:
            accepted += 1
            assert got == generic(payload), payload
    assert accepted > 1000  # the generator does exercise the fast path


# ---- ClientSession -----------------------------------------------------------------------
def session(node: Node) -> tuple[ClientSession, RecordingTransport]:
    t = RecordingTransport()
    s = ClientSession(t, node, "json")
    s.handle_commands(json.dumps({"id": 1, "connect": {"token": token()}}).encode())
    assert b'"connect"' in t.take()[0]
    return s, t


def both(node: Node, params: dict[str, Any], cmd_id: int = 5) -> list[Any]:
    """Run one rpc command compactly (fast path) and spaced (generic) on two sessions; the
    writes and the close of each."""
    out = []
    for compact in (True, False):
        s, t = session(node)
        cmd = {"id": cmd_id, "rpc": params}
        raw = json.dumps(cmd, separators=(",", ":") if compact else (", ", ": ")).encode()
        assert (match_rpc(raw) is not None) == compact
        s.handle_commands(raw)
        out.append((t.take(), t.closed))
    return out


class Handler:
    def __init__(self, result: Any) -> None:
        self.result = result
        self.calls: list[tuple[str, bytes]] = []

    def __call__(self, session: ClientSession, method: str, data: bytes) -> Any:
        self.calls.append((method, data))
        r = self.result
        if isinstance(r, Exception):
            raise r
        return r(session) if callable(r) else r


@pytest.mark.parametrize(
    "result",
    [
        b'{"ok":true}',
        b"",
        None,
        b'"x"\n',  # JSON, but not newline-free: internal error
        b"not json",
        ReplyError(4000, "custom", True),
        DisconnectError(DISCONNECT_BAD_REQUEST),
        RuntimeError("bug"),
    ],
    ids=["json", "empty", "none", "newline", "not-json", "reply-error", "disconnect", "bug"],
)
def test_session_fast_path_matches_the_generic_path(result: Any) -> None:
    h = Handler(result)
    node = Node(make_config(), rpc_handler=h)
    fast_out, generic_out = both(node, {"method": "m", "data": {"n": [1, 2]}})
    assert fast_out == generic_out
    assert h.calls == [("m", b'{"n":[1,2]}')] * 2


def test_session_fast_path_echo_reply() -> None:
    node = Node(make_config(), rpc_handler=echo_rpc)
    s, t = session(node)
    raw = b'{"id":9,"rpc":{"method":"echo","data":{"n":12345}}}'
    assert s.handle_message(raw) == b'{"id":9,"rpc":{"data":{"n":12345}}}'
    assert t.take() == []  # returned, not written
    s.handle_commands(raw)
    assert t.take() == [b'{"id":9,"rpc":{"data":{"n":12345}}}']
    assert both(node, {"data": None})[0] == both(node, {"data": None})[1]


def test_session_fast_path_handler_closing_the_session_writes_nothing() -> None:
    def rpc(s: ClientSession, method: str, data: bytes) -> bytes:
        s.disconnect()
        return data

    fast_out, generic_out = both(Node(make_config(), rpc_handler=rpc), {"data": 1})
    assert fast_out == generic_out
    writes, closed = fast_out
    assert closed is not None and not any(b'"rpc"' in w for w in writes)


def test_session_fast_path_sync_handler_returning_an_awaitable() -> None:
    async def later(data: bytes) -> bytes:
        await asyncio.sleep(0)
        return data

    def rpc(s: ClientSession, method: str, data: bytes) -> Coroutine[Any, Any, bytes]:
        return later(data)

    async def main() -> None:
        node = Node(make_config(), rpc_handler=rpc)
        s, t = session(node)
        s.handle_commands(b'{"id":3,"rpc":{"data":[1]}}')
        assert s.busy
        s.handle_commands(b'{"id":4,"rpc":{"data":[2]}}')  # waits behind it
        for _ in range(50):
            await asyncio.sleep(0)
            if not s.busy:
                break
        assert t.take() == [b'{"id":3,"rpc":{"data":[1]}}', b'{"id":4,"rpc":{"data":[2]}}']

    asyncio.run(main())


def test_session_fast_path_not_taken_when_expired_or_not_connected() -> None:
    now = [time.time()]
    node = Node(make_config(), rpc_handler=echo_rpc, clock=lambda: now[0])
    s, t = session(node)
    now[0] += 7200  # past the token's exp: the generic path disconnects (3005)
    assert s.handle_message(b'{"id":3,"rpc":{"data":1}}') is None
    assert t.closed is not None and t.closed[0] == 3005
    fresh = ClientSession(RecordingTransport(), node, "json")
    assert fresh.handle_message(b'{"id":3,"rpc":{"data":1}}') is None  # connect must come first
    assert fresh.closed


def test_session_fast_path_not_taken_with_a_broker_that_is_not_inline() -> None:
    class TaskBroker(MemoryBroker):
        inline = False  # the generic path runs every command in a task

    async def idle(s: ClientSession) -> None:
        for _ in range(50):
            await asyncio.sleep(0)
            if not s.busy:
                return

    async def main() -> None:
        node = Node(make_config(), broker=TaskBroker(), rpc_handler=echo_rpc)
        t = RecordingTransport()
        s = ClientSession(t, node, "json")
        s.handle_commands(json.dumps({"id": 1, "connect": {"token": token()}}).encode())
        await idle(s)
        assert b'"connect"' in t.take()[0]
        assert s.handle_message(b'{"id":3,"rpc":{"data":1}}') is None
        assert s.busy and t.take() == []
        await idle(s)
        assert t.take() == [b'{"id":3,"rpc":{"data":1}}']

    asyncio.run(main())


# ---- WebSocketApp ------------------------------------------------------------------------
class FakeTransport:
    """The asyncio transport under a Conn: collects what is written."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out += data

    def writelines(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.out += chunk

    def get_write_buffer_size(self) -> int:
        return 0

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


def feed(c: Conn, data: bytes) -> None:
    view = c.get_buffer(len(data))
    view[: len(data)] = data
    c.buffer_updated(len(data))


def server_frames(t: FakeTransport) -> list[tuple[int, bytes]]:
    """Take the (opcode, payload) of every whole server frame written so far."""
    out, buf, pos = [], bytes(t.out), 0
    codec = ws.WebSocketFrameCodec(1 << 20, require_mask=False)
    while True:
        frame, pos = codec.decode(buf, pos, len(buf))
        if frame is None:
            break
        out.append((frame.opcode, frame.payload))
    del t.out[:pos]
    return out


def text(payload: bytes, mask: bytes | None = None) -> bytes:
    return ws.encode_masked_frame(ws.OP_TEXT, payload, mask=mask)


@pytest.fixture
def ws_conn() -> Any:
    """``(app, conn, transport)``: a connected JSON WebSocket on a real worker's read path."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    node = Node(make_config(), rpc_handler=echo_rpc)
    app = WebSocketApp(node, http_api.HttpApi(node), max_message_bytes=4096)
    worker = Worker(EngineOptions(), [app])
    c = worker.conn_classes[0]()
    t = FakeTransport()
    c.connection_made(t)
    key = base64.b64encode(os.urandom(16)).decode()
    feed(
        c,
        f"GET /connection/websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode(),
    )
    assert t.out.startswith(b"HTTP/1.1 101")
    t.out.clear()
    feed(c, text(json.dumps({"id": 1, "connect": {"token": token()}}).encode()))
    ((op, reply),) = server_frames(t)
    assert b'"connect"' in reply and c.is_ready
    yield app, c, t
    loop.close()
    asyncio.set_event_loop(None)


def test_ws_frames_in_one_read_mixed_and_split(ws_conn: Any) -> None:
    app, c, t = ws_conn
    big = b'{"id":5,"rpc":{"data":"' + b"x" * 300 + b'"}}'  # a 16-bit length frame
    seen = app.messages_in
    data = (
        text(b'{"id":2,"rpc":{"method":"echo","data":{"n":1}}}')  # fast
        + text(b'{"id": 3, "rpc": {"data": [1, 2]}}')  # generic command, fast frame
        + ws.encode_masked_frame(ws.OP_PING, b"hi")  # control frame: the generic frame path
        + text(b'{"id":4,"rpc":{"data":true}}')
        + text(big)
        + ws.encode_masked_frame(ws.OP_BINARY, b'{"id":6,"rpc":{"data":6}}')
        + text(b"{}")  # a pong
    )
    tail = text(b'{"id":7,"rpc":{"data":7}}')
    feed(c, data + tail[:5])  # the last frame split inside its header
    feed(c, tail[5:20])
    feed(c, tail[20:])
    assert server_frames(t) == [
        (ws.OP_TEXT, b'{"id":2,"rpc":{"data":{"n":1}}}'),
        (ws.OP_TEXT, b'{"id":3,"rpc":{"data":[1,2]}}'),
        (ws.OP_PONG, b"hi"),
        (ws.OP_TEXT, b'{"id":4,"rpc":{"data":true}}'),
        (ws.OP_TEXT, b'{"id":5,"rpc":{"data":"' + b"x" * 300 + b'"}}'),
        (ws.OP_TEXT, b'{"id":6,"rpc":{"data":6}}'),
        (ws.OP_TEXT, b'{"id":7,"rpc":{"data":7}}'),
    ]
    assert app.messages_in - seen == 8  # the ping is a control frame, not a message
    assert not c.closing


def test_ws_fragmented_message_then_fast_frames(ws_conn: Any) -> None:
    app, c, t = ws_conn
    msg = b'{"id":2,"rpc":{"data":"abc"}}'
    feed(c, ws.encode_masked_frame(ws.OP_TEXT, msg[:10], fin=False))
    assert app._fragments  # in flight: the next read must not take the fast path
    feed(
        c, ws.encode_masked_frame(ws.OP_CONTINUATION, msg[10:]) + text(b'{"id":3,"rpc":{"data":3}}')
    )
    assert server_frames(t) == [
        (ws.OP_TEXT, b'{"id":2,"rpc":{"data":"abc"}}'),
        (ws.OP_TEXT, b'{"id":3,"rpc":{"data":3}}'),
    ]
    feed(c, ws.encode_masked_frame(ws.OP_TEXT, b'{"id":4,', fin=False))
    feed(c, text(b'{"id":5,"rpc":{"data":5}}'))  # a new message inside a fragmented one
    ((op, payload),) = server_frames(t)
    assert op == ws.OP_CLOSE and int.from_bytes(payload[:2], "big") == 1002
    assert c.closing


@pytest.mark.parametrize(
    "frame, code",
    [
        (text("é".encode()[:1] + b"x"), 1007),  # invalid UTF-8
        (ws.encode_frame(ws.OP_TEXT, b'{"id":2,"rpc":{"data":1}}'), 1002),  # unmasked
        (text(b'{"id":2,"rpc":{"data":"' + b"x" * 5000 + b'"}}'), 1009),  # too big
    ],
    ids=["utf8", "unmasked", "too-big"],
)
def test_ws_bad_frames_close_like_the_generic_path(ws_conn: Any, frame: bytes, code: int) -> None:
    app, c, t = ws_conn
    feed(c, text(b'{"id":2,"rpc":{"data":2}}') + frame + text(b'{"id":3,"rpc":{"data":3}}'))
    frames = server_frames(t)
    assert frames[0] == (ws.OP_TEXT, b'{"id":2,"rpc":{"data":2}}')
    assert frames[1][0] == ws.OP_CLOSE and int.from_bytes(frames[1][1][:2], "big") == code
    assert len(frames) == 2 and c.closing


def test_ws_utf8_text_frame_with_random_masks(ws_conn: Any, monkeypatch: Any) -> None:
    app, c, t = ws_conn
    monkeypatch.setattr(app, "_frames", None)  # all of them on the fast frame path
    for i in range(1, 200):
        data = json.dumps({"s": "é" * (i % 7), "n": i}, ensure_ascii=False)
        feed(c, text(f'{{"id":{i},"rpc":{{"data":{data}}}}}'.encode(), mask=os.urandom(4)))
    frames = server_frames(t)
    assert [json.loads(p)["id"] for _, p in frames] == list(range(1, 200))
    assert [json.loads(p)["rpc"]["data"]["n"] for _, p in frames] == list(range(1, 200))


def test_unmask_at_matches_unmask() -> None:
    rng = random.Random(7)
    for n in [*range(0, 140), 1000, 65535]:
        mask = bytes(rng.randrange(256) for _ in range(4))
        payload = bytes(rng.randrange(256) for _ in range(n))
        buf = bytearray(b"..") + mask + ws.unmask(mask, payload) + b"tail"
        assert ws.unmask_at(buf, 6, 6 + n) == payload
        assert ws.unmask_at(memoryview(buf), 6, 6 + n) == payload
