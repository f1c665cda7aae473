"""Port 8000: the WebSocket client endpoint and the server HTTP API share one listener.

A connection starts in HTTP mode (``conn.context is None``). ``GET /connection/websocket``
upgrades it: ``context`` becomes the client session and every later byte is WebSocket frames.
Other paths are plain HTTP (the API, ``/health``). Nothing is allocated per idle connection
beyond the session and its transport adapter; a fragmented message in flight is the only
extra state, kept in a dict on the handler for as long as it lasts.

Hot path (``on_traffic`` of a ready connection): whole masked text/binary frames are unmasked
straight out of the engine's read buffer (no Frame/event objects) and handed to
``ClientSession.handle_message``; a reply it returns is framed with a prebuilt header and
written. Everything else goes through the generic frame/message layers.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tidegate import log
from tidegate.engine.conn import CLOSING, READY, Conn
from tidegate.engine.handler import EventHandler
from tidegate.gateway import eviction
from tidegate.gateway.codes import DISCONNECT_SHUTDOWN
from tidegate.gateway.config import GatewayConfig
from tidegate.gateway.migration import GatewayMigration
from tidegate.gateway.node import Node
from tidegate.gateway.session import ClientSession
from tidegate.observe.tracing import TRACING
from tidegate.protocol import websocket as ws
from tidegate.protocol.codec import FrameError
from tidegate.protocol.http11 import HttpError, encode_response, error_response, parse_request_head
from tidegate.server.http_api import HttpApi
from tidegate.server.transports import WsBinaryTransport, WsTextTransport

_log = log.get("websocket")
WS_PATH = "/connection/websocket"
PROTOBUF_SUBPROTOCOL = "centrifuge-protobuf"
MAX_API_BODY_BYTES = 1 << 20

_JSON_PING = ws.encode_text(b"{}")
_TEXT_HEADERS = ws.TEXT_HEADERS
_REPEAT = ws.UNMASK_REPEAT
_LOW = ws.UNMASK_LOW


class _ApiBusy:
    """``conn.context`` while an API call awaits: further bytes wait in the engine's buffer."""

    __slots__ = ()


API_BUSY = _ApiBusy()


class WebSocketApp(GatewayMigration, EventHandler):
    # Sessions on these transports move between workers with their state (work stealing);
    # the HTTP API's connections and upgrades in progress stay where they are.
    migration_transports = {WsTextTransport.kind: WsTextTransport,
                            WsBinaryTransport.kind: WsBinaryTransport}

    def __init__(self, node: Node, api: HttpApi, max_message_bytes: int = 65536) -> None:
        self.node = node
        self.config: GatewayConfig = node.config
        self.api = api
        self.codec = ws.WebSocketFrameCodec(max_message_bytes)
        self.max_message_bytes = max_message_bytes
        self._max_short = min(125, max_message_bytes)  # the largest 7-bit length accepted
        self._fragments: dict[Conn, ws.Fragments] = {}
        # Only with tracing on: the open ws.connect span (and its client.connect child) of
        # each connection between upgrade and connect reply.
        self._connecting: dict[Conn, list[Any]] = {}
        self.upgrades = 0
        self.messages_in = 0
        self.live_sessions = 0
        self.rejected: dict[str, int] = {}
        self.eviction = eviction.EvictionPolicy(node.config)

    def sessions(self) -> int:
        return self.live_sessions

    def stats(self) -> dict[str, Any]:
        hub = self.node.hub
        return {
            "ws_sessions": self.live_sessions,
            "ws_upgrades_total": self.upgrades,
            "messages_in_total": self.messages_in,
            "connect_attempts_total": self.node.connect_attempts,
            "connect_failures_total:reason": dict(self.node.connect_failures),
            "delivery_latency_seconds": hub.delivery_latency.snapshot(),
            "ws_rejected_total": dict(self.rejected),
            "api_requests_total": dict(self.api.requests),
            "fanout_writes_total": hub.fanout_writes,
            "channels": hub.num_channels(),
            **(self.node.broker.stats() if hasattr(self.node.broker, "stats") else {}),
        }

    # ---- engine callbacks ----------------------------------------------------------------
    def on_traffic(self, c: Conn) -> None:
        ctx = c.context
        if type(ctx) is not ClientSession or not c._flags & READY or c in self._fragments:
            self._traffic(c, ctx)
            return
        # The hot path of a ready connection: whole masked text/binary frames (FIN, no RSV,
        # 7- or 16-bit length) go straight from the read buffer to the session - no Frame or
        # event object, one unmask, the same checks - and a reply the session hands back is
        # framed here. Anything else (control frames, fragments, an unmasked or oversized
        # frame) is left, from that frame on, to _frames.
        w = c._w
        buf = w.read_buf
        pos = w.in_pos
        end = w.in_end
        max7 = self._max_short
        while end - pos > 5:
            b0 = buf[pos]
            if b0 != 0x81 and b0 != 0x82:  # FIN text / binary, RSV clear
                break
            n = buf[pos + 1] ^ 0x80  # masked: the top bit is set
            if n <= max7:
                stop = pos + 6 + n
                if stop > end:
                    break
                # mask key and payload as one little-endian int: payload above, key below
                v = int.from_bytes(buf[pos + 2 : stop], "little")
                v = (v >> 32) ^ (v & 0xFFFFFFFF) * _REPEAT[n] & _LOW[n]
                payload = v.to_bytes(n, "little")
            elif n == 126 and end - pos > 7:
                n = (buf[pos + 2] << 8) | buf[pos + 3]
                stop = pos + 8 + n
                if stop > end or n > self.max_message_bytes:
                    break
                payload = ws.unmask_at(buf, pos + 8, stop)
            else:
                break  # unmasked, 64-bit length, too big, incomplete: the generic path decides
            if b0 == 0x81 and not payload.isascii():
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError:
                    self._fail(c, ws.CLOSE_INVALID_PAYLOAD, "invalid_utf8")
                    return
            w.in_pos = pos = stop
            self.messages_in += 1
            reply = ctx.handle_message(payload)
            if reply:  # a JSON reply: one text frame
                n = len(reply)
                c.write(_TEXT_HEADERS[n] + reply if n < 126 else ws.encode_text(reply))
            if c._flags & CLOSING:
                return
        if pos < end:
            self._frames(c, ctx)

    def _traffic(self, c: Conn, ctx: Any) -> None:
        if ctx is None:
            if not self._http(c):
                return
            ctx = c.context
        if isinstance(ctx, ClientSession):
            self._frames(c, ctx)

    def on_close(self, c: Conn, reason: str) -> None:
        ctx = c.context
        self._fragments.pop(c, None)
        if self._connecting:
            self._end_connect_spans(c, f"closed before connect: {reason}")
        if isinstance(ctx, ClientSession):
            self.live_sessions -= 1
            ctx.on_transport_closed()
            ctx.transport.conn = None  # type: ignore[attr-defined]  # break conn<->session
        c.context = None

    def on_drain(self, c: Conn) -> None:
        ctx = c.context
        if isinstance(ctx, ClientSession) and not ctx.closed:
            ctx.disconnect(DISCONNECT_SHUTDOWN)  # 3001: the SDK reconnects, elsewhere
        c.close("drain")

    # ---- load shedding (engine/eviction.py, gateway/eviction.py) --------------------------
    def eviction_rank(self, c: Conn) -> tuple[int, int, int] | None:
        ctx = c.context
        if type(ctx) is not ClientSession:
            return None  # the HTTP API (a publisher's connection), not a client
        return self.eviction.rank(ctx, c._last_rx)

    def eviction_class(self, c: Conn) -> str:
        ctx = c.context
        return self.eviction.label(ctx) if type(ctx) is ClientSession else "other"

    def evict(self, c: Conn, delay_s: float) -> None:
        ctx = c.context
        if isinstance(ctx, ClientSession) and not ctx.closed:
            ctx.disconnect(eviction.disconnect(delay_s))  # the close frame: 3011, with the hint
        c.close("evicted")

    def ping_frame(self, c: Conn) -> bytes | None:
        ctx = c.context
        if not isinstance(ctx, ClientSession):
            return None
        data = ctx.make_ping()
        if ctx.closed:
            return None
        return _JSON_PING if data == b"{}" else ctx.transport.frame(data)  # type: ignore[attr-defined]

    # ---- WebSocket ---------------------------------------------------------------------
    def _frames(self, c: Conn, session: ClientSession) -> None:
        frags = self._fragments.pop(c, None)
        try:
            while not c.closing:
                frame = c.next_frame()
                if frame is None:
                    break
                frags, event = ws.feed_frame(frags, frame, self.max_message_bytes)  # type: ignore[arg-type]
                if event is None:
                    continue
                kind = type(event)
                self.messages_in += 1
                if self._connecting:
                    self._trace_connect(c, session)
                if kind is ws.Text:
                    session.handle_commands(event.raw)  # type: ignore[union-attr]
                elif kind is ws.Binary:
                    session.handle_commands(event.data)  # type: ignore[union-attr]
                elif kind is ws.Ping:
                    c.write(ws.encode_pong(event.data))  # type: ignore[union-attr]
                elif kind is ws.Close:
                    code = event.code  # type: ignore[union-attr]
                    c.write(ws.encode_close(None if code == ws.CLOSE_NO_STATUS else code))
                    c.close("client_closed")
                    session.on_transport_closed()
                    return
                if not c.is_ready and session.connected:
                    c.ready()  # connected: heartbeats replace the handshake deadline
                    if self._connecting:
                        self._end_connect_spans(c, None)
        except FrameError as exc:
            self._fail(c, exc.close_code, exc.reason)
            return
        if frags is not None:
            self._fragments[c] = frags

    # ---- tracing (only when enabled) -------------------------------------------------------
    def _trace_connect(self, c: Conn, session: ClientSession) -> None:
        spans = self._connecting.get(c)
        if spans is not None and spans[1] is None:
            spans[1] = TRACING.start("client.connect", spans[0])

    def _end_connect_spans(self, c: Conn, error: str | None) -> None:
        spans = self._connecting.pop(c, None)
        if spans is None:
            return
        for span in reversed(spans):
            if span is not None:
                if error:
                    span.set_attribute("error", error)
                span.end()

    def _fail(self, c: Conn, code: int, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        c.write(ws.encode_close(code, reason))
        c.close(f"protocol_error:{reason}")

    # ---- HTTP ------------------------------------------------------------------------------
    def _http(self, c: Conn) -> bool:
        """Handle one request; True when the connection became a WebSocket."""
        buf, pos, end = c.inbound()
        try:
            parsed = parse_request_head(buf, pos, end, max_body_bytes=MAX_API_BODY_BYTES)
        except HttpError as exc:
            self._count(f"http_{exc.status}")
            c.write(error_response(exc))
            c.close("bad_http_request")
            return False
        if parsed is None:
            return False
        req, body_pos = parsed
        if req.path == WS_PATH:
            return self._upgrade(c, req, body_pos)
        if end - body_pos < req.content_length:
            return False  # the body is still arriving; the engine keeps the bytes
        body = bytes(buf[body_pos : body_pos + req.content_length])
        c.discard(body_pos + req.content_length - pos)
        c.ready()
        if req.path == "/health":
            c.write(encode_response(200, b'{"status":"ok"}', close=not req.keep_alive))
            if not req.keep_alive:
                c.close("http_done")
            return False
        c.context = API_BUSY
        asyncio.get_running_loop().create_task(self._api(c, req, body))
        return False

    async def _api(self, c: Conn, req: Any, body: bytes) -> None:
        status, payload = await self.api.handle(req.method, req.path, req.headers, body)
        if c.closing:
            return
        c.write(encode_response(status, payload, content_type="application/json",
                                close=not req.keep_alive))
        if req.keep_alive:
            c.context = None
        else:
            c.close("http_done")

    def _upgrade(self, c: Conn, req: Any, body_pos: int) -> bool:
        if not TRACING.sample_root():
            return self._do_upgrade(c, req, body_pos)
        root = TRACING.start("ws.connect", None, **{"tidegate.transport": "websocket"})
        with TRACING.span("ws.handshake", root):
            upgraded = self._do_upgrade(c, req, body_pos)
        if upgraded:
            self._connecting[c] = [root, None]
        else:
            root.set_attribute("error", "handshake refused")
            root.end()
        return upgraded

    def _do_upgrade(self, c: Conn, req: Any, body_pos: int) -> bool:
        try:
            ws.validate_upgrade(req)
        except HttpError as exc:
            self._count(f"http_{exc.status}")
            c.write(error_response(exc))
            c.close("bad_handshake")
            return False
        if not ws.check_origin(req.origin, self.config.allowed_origins):
            self._count("origin_forbidden")
            c.write(ws.reject_response(403, "origin not allowed"))
            c.close("origin_forbidden")
            return False
        sub = ws.select_subprotocol(req.subprotocols, (PROTOBUF_SUBPROTOCOL,))
        _, pos, _ = c.inbound()
        c.discard(body_pos - pos)
        c.write(ws.accept_response(req.key, sub))
        if sub == PROTOBUF_SUBPROTOCOL:
            c.context = ClientSession(WsBinaryTransport(c), self.node, "protobuf")
        else:
            c.context = ClientSession(WsTextTransport(c), self.node, "json")
        self.upgrades += 1
        self.live_sessions += 1
        return True

    def _count(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
