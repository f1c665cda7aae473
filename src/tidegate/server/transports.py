"""What a client session writes through: one small adapter per connection and framing.

Each class frames a session's messages for its transport. Fan-out hands every subscriber the
same payload object, and ``frame`` keeps the last one it framed: a broadcast is framed once per
transport class, not once per subscriber.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tidegate.engine.conn import Conn
from tidegate.protocol import websocket as ws


class _Transport:
    __slots__ = ("conn",)
    kind = "?"
    close_on_disconnect = True

    frame: Callable[[bytes], bytes] = staticmethod(bytes)  # identity for bytes input

    def __init__(self, conn: Conn) -> None:
        self.conn: Conn | Any = conn

    def write(self, data: bytes) -> None:
        conn = self.conn
        if conn is not None:
            conn.write(self.frame(data))

    def close(self, code: int, reason: str) -> None:
        conn = self.conn
        if conn is not None:
            conn.close(f"disconnect_{code}")


def _framer(encode: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    """Frame with ``encode``, reusing the last result: fan-out hands the same payload object to
    every subscriber in a row, so a broadcast is framed once, not once per subscriber."""
    last: list[bytes] = [b"", encode(b"")]

    def frame(data: bytes) -> bytes:
        if data is not last[0]:
            last[0] = data
            last[1] = encode(data)
        return last[1]

    return frame


class WsTextTransport(_Transport):
    """JSON client protocol: each message a WebSocket text frame."""

    __slots__ = ()
    kind = "ws-json"
    frame = staticmethod(_framer(ws.encode_text))

    def close(self, code: int, reason: str) -> None:
        conn = self.conn
        if conn is not None:
            conn.write(ws.encode_close(code, reason))
            conn.close(f"disconnect_{code}")


class WsBinaryTransport(WsTextTransport):
    """Protobuf client protocol: each message a WebSocket binary frame."""

    __slots__ = ()
    kind = "ws-protobuf"
    frame = staticmethod(_framer(ws.encode_binary))


def _line(data: bytes) -> bytes:
    return data + b"\n"


class TcpJsonTransport(_Transport):
    """Raw TCP, newline-delimited JSON."""

    __slots__ = ()
    kind = "tcp-json"
    frame = staticmethod(_framer(_line))


class TcpProtobufTransport(_Transport):
    """Raw TCP, varint-length-delimited protobuf (the codec already delimits)."""

    __slots__ = ()
    kind = "tcp-protobuf"
