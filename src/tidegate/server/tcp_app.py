"""Port 8001: the client protocol over raw TCP for non-browser clients (IoT, services).

The first byte picks the format: ``{`` (or whitespace) means newline-delimited JSON commands,
anything else varint-length-delimited protobuf commands, exactly as inside WebSocket frames.
"""

from __future__ import annotations

from tidegate.engine.conn import Conn
from tidegate.engine.handler import EventHandler
from tidegate.gateway import eviction
from tidegate.gateway.codes import DISCONNECT_SHUTDOWN, ProtocolError
from tidegate.gateway.migration import GatewayMigration
from tidegate.gateway.node import Node
from tidegate.gateway.session import ClientSession
from tidegate.protocol.codec import FrameError, FrameTooLarge
from tidegate.protocol.line import LineCodec
from tidegate.server.transports import TcpJsonTransport, TcpProtobufTransport

_JSON_START = frozenset(b"{ \t\r\n")


def _varint(buf: bytearray, pos: int, end: int) -> tuple[int, int] | None:
    """Decode a varint at ``pos``: ``(value, next_pos)``, None if incomplete."""
    shift = value = 0
    while pos < end:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise FrameError("bad_varint", "varint too long")
    return None


class TcpApp(GatewayMigration, EventHandler):
    # Sessions move between workers with their state (work stealing); see WebSocketApp.
    migration_transports = {TcpJsonTransport.kind: TcpJsonTransport,
                            TcpProtobufTransport.kind: TcpProtobufTransport}

    def __init__(self, node: Node, max_message_bytes: int = 65536) -> None:
        self.node = node
        self.max_message_bytes = max_message_bytes
        self.lines = LineCodec(max_message_bytes)
        self.eviction = eviction.EvictionPolicy(node.config)

    def on_traffic(self, c: Conn) -> None:
        session = c.context
        if session is None:
            buf, pos, end = c.inbound()
            if pos >= end:
                return
            if buf[pos] in _JSON_START:
                session = ClientSession(TcpJsonTransport(c), self.node, "json")
            else:
                session = ClientSession(TcpProtobufTransport(c), self.node, "protobuf")
            c.context = session
        if isinstance(session.transport, TcpJsonTransport):
            while not c.closing and (line := c.next_frame_with(self.lines)) is not None:
                if line.strip():
                    session.handle_commands(line)
        else:
            self._protobuf(c, session)
        if not c.is_ready and session.connected:
            c.ready()

    def _protobuf(self, c: Conn, session: ClientSession) -> None:
        buf, pos, end = c.inbound()
        start = stop = pos
        while stop < end:
            head = _varint(buf, stop, end)
            if head is None:
                break
            size, body = head
            if size > self.max_message_bytes:
                raise FrameTooLarge(size, self.max_message_bytes)
            if body + size > end:
                break
            stop = body + size
        if stop > start:
            c.discard(stop - start)
            try:
                session.handle_commands(bytes(buf[start:stop]))
            except ProtocolError:
                c.close("protocol_error")

    def on_close(self, c: Conn, reason: str) -> None:
        session = c.context
        if isinstance(session, ClientSession):
            session.on_transport_closed()
            session.transport.conn = None  # type: ignore[attr-defined]  # break the cycle
        c.context = None

    def on_drain(self, c: Conn) -> None:
        session = c.context
        if isinstance(session, ClientSession) and not session.closed:
            session.disconnect(DISCONNECT_SHUTDOWN)
        c.close("drain")

    # ---- load shedding (engine/eviction.py, gateway/eviction.py) --------------------------
    def eviction_rank(self, c: Conn) -> tuple[int, int, int] | None:
        session = c.context
        if type(session) is not ClientSession:
            return (-2, 0, c._last_rx)  # not a word yet: the cheapest to shed
        return self.eviction.rank(session, c._last_rx)

    def eviction_class(self, c: Conn) -> str:
        session = c.context
        return self.eviction.label(session) if type(session) is ClientSession else "connecting"

    def evict(self, c: Conn, delay_s: float) -> None:
        session = c.context
        if isinstance(session, ClientSession) and not session.closed:
            # No close frame on raw TCP: the disconnect push says "reconnect, later".
            d = eviction.disconnect(delay_s)
            session.transport.write(session.codec.encode_disconnect(d.code, d.reason, True))
            session.disconnect(d)
        c.close("evicted")

    def ping_frame(self, c: Conn) -> bytes | None:
        session = c.context
        if not isinstance(session, ClientSession):
            return None
        data = session.make_ping()
        return None if session.closed else session.transport.frame(data)  # type: ignore[attr-defined]
