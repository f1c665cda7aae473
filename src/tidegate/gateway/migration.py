"""Moving a client session to another worker (work stealing, engine/stealing.py), sans-I/O.

The engine moves an idle connection's socket between the workers of one node; the handler's
``export_state(c)`` says what the session needs to go on elsewhere and ``import_state(c,
state)`` rebuilds it there. The client notices nothing: same socket, same client id, same
subscriptions, no join/leave, no disconnect.

What moves (:class:`SessionState`, a small versioned binary record, :func:`encode` /
:func:`decode`): the transport kind (``ws-json``, ``ws-protobuf``, ``tcp-json``,
``tcp-protobuf``: the codec follows from it), the client id, user, connection info, connection
token expiry, eviction class, every subscription with its flags (join/leave, presence,
server-side), subscription token expiry and channel info, and the stream position the old
worker had written up to (offset, epoch) for channels with history; and the old worker's cut
(the last relay stamp it had handled from each worker, gateway/relaylog.py). Heartbeat state
(idle time, the wheel's schedule) is the engine's and moves with the socket.

What does not move, so the session stays where it is (``export_state`` returns None): a
connection that is not a connected client session (mid-handshake, before connect, the HTTP
API), one with a command in progress (an RPC, a history or presence call, a subscribe: any
task), a subscribe in flight (server-side ones included), a chunked fan-out still writing to
one of its channels, a fragmented WebSocket message half received, a connect still being
traced, TLS; and any session while its worker has not yet heard from every other one since
it started (its relay cut would not cover them, gateway/relaylog.py), or while it is itself
still catching up after a move. There is no per-message compression to carry: the WebSocket
handshake declines permessage-deflate (protocol/websocket.py), so every WebSocket frame
boundary is a clean cut.

The old worker forgets the session without a close (``ClientSession.detach``): out of its hub
(subscriber sets, join/leave sets, the user index), ``broker.unsubscribe`` for channels it was
the last local subscriber of, and nothing else - no leave push, no presence removal. The new
worker registers it (``ClientSession.restore``) without a join push or a presence add, and
``broker.subscribe`` for channels that are new there. Presence needs neither side: entries
live with the channel's owner worker (cluster/ipc_broker.py), keyed by client id, and the
client id does not change.

The window between export and import: what is relayed to every worker (publications,
join/leave pushes, the HTTP API's subscribe/unsubscribe/disconnect of a user) and handled by
the old worker after the export and by the new one before the import would reach neither.
For channels with history the stream position closes it: the new worker registers the
subscription as *pending* first (publications from then on are buffered), asks the channel's
owner for what came after the position (``broker.recover``), writes it, then the buffer minus
what that covered, in offset order - exactly a subscribe's recovery. If the position cannot be
continued (trimmed, a new epoch), the client gets disconnect 3010 "insufficient state" and
recovers on its reconnect. Everything else - publications of channels without history (or
without a known position), join/leave pushes, the API's commands - the cut closes
(gateway/relaylog.py): the new worker keeps the session pending (out of the user index, its
own commands waiting) until it has handled everything the old one had, then writes what its
relay log holds after the cut, in the order it handled it, and goes live in the same loop
callback: exactly once, in each publisher's order. If its log no longer reaches back to the
cut (a window longer than the log keeps), the client gets 3010 too. A hand-over that comes
back to the old worker is imported the same way, from its own log. Only with one worker (no
relay log) is a state without a cut imported the old way: at most once on such channels.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from tidegate.gateway.codes import DISCONNECT_SERVER_ERROR

if TYPE_CHECKING:
    from tidegate.engine.conn import Conn
    from tidegate.gateway.node import Node
    from tidegate.gateway.session import Transport

__all__ = ["GatewayMigration", "StateError", "SessionState", "SubRecord", "decode", "encode"]

log = logging.getLogger("tidegate.gateway")

MAGIC = b"TGs"
VERSION = 2  # 2: the relay cut
_NONE = 0xFFFFFFFF  # an absent bytes field
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_HEAD = struct.Struct(">qBH")  # connection expiry, eviction class, subscriptions
_SUB = struct.Struct(">BqQ")  # flags, subscription expiry, stream offset
_CUT = struct.Struct(">HQ")  # origin worker, its last stamp handled


class StateError(ValueError):
    """Bytes that are not a session state this version can read."""


@dataclass(slots=True)
class SubRecord:
    """One subscription: ``flags`` are session.SUB_* bits; ``offset``/``epoch`` the stream
    position written up to on the old worker (0 / "" when unknown or no history)."""

    channel: str
    flags: int = 0
    exp: int = 0
    chan_info: bytes | None = None
    offset: int = 0
    epoch: str = ""
    positioned: bool = False  # a position is known (offset 0 is a valid one)


@dataclass(slots=True)
class SessionState:
    kind: str  # the transport: "ws-json", "ws-protobuf", "tcp-json", "tcp-protobuf"
    client: str
    user: str = ""
    conn_info: bytes | None = None
    exp: int = 0
    priority: int = 0
    subs: list[SubRecord] = field(default_factory=list)
    # The old worker's relay cut: origin worker -> last stamp it handled (None: no relay log).
    cut: dict[int, int] | None = None


# ---- the binary record ------------------------------------------------------------------
def _str(out: bytearray, s: str) -> None:
    b = s.encode("utf-8")
    if len(b) > 0xFFFF:
        raise StateError("string too long")
    out += _U16.pack(len(b))
    out += b


def _blob(out: bytearray, b: bytes | None) -> None:
    if b is None:
        out += _U32.pack(_NONE)
        return
    if len(b) >= _NONE:
        raise StateError("bytes too long")
    out += _U32.pack(len(b))
    out += b


def encode(st: SessionState) -> bytes:
    """``st`` as bytes: ``MAGIC``, version, then the fields (big-endian, length-prefixed)."""
    out = bytearray(MAGIC)
    out += _U8.pack(VERSION)
    _str(out, st.kind)
    _str(out, st.client)
    _str(out, st.user)
    _blob(out, st.conn_info)
    if len(st.subs) > 0xFFFF or not 0 <= st.priority <= 0xFF:
        raise StateError("too many subscriptions or bad priority")
    out += _HEAD.pack(st.exp, st.priority, len(st.subs))
    for sub in st.subs:
        _str(out, sub.channel)
        flags = sub.flags & 0x7F
        if sub.positioned:
            flags |= 0x80
        out += _SUB.pack(flags, sub.exp, sub.offset)
        _str(out, sub.epoch)
        _blob(out, sub.chan_info)
    if st.cut is None:
        out += _U16.pack(0xFFFF)
    else:
        if len(st.cut) >= 0xFFFF:
            raise StateError("cut too long")
        out += _U16.pack(len(st.cut))
        for origin, stamp in sorted(st.cut.items()):
            if not 0 <= origin <= 0xFFFF or not 0 <= stamp < 1 << 64:
                raise StateError("bad cut")
            out += _CUT.pack(origin, stamp)
    return bytes(out)


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.buf):
            raise StateError("truncated")
        b = self.buf[self.pos : end]
        self.pos = end
        return b

    def unpack(self, s: struct.Struct) -> tuple[Any, ...]:
        return s.unpack(self.take(s.size))

    def str(self) -> str:
        (n,) = self.unpack(_U16)
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise StateError("bad utf-8") from None

    def blob(self) -> bytes | None:
        (n,) = self.unpack(_U32)
        return None if n == _NONE else self.take(n)


def decode(data: bytes) -> SessionState:
    """The state :func:`encode` wrote; :class:`StateError` for anything else."""
    r = _Reader(bytes(data))
    if r.take(len(MAGIC)) != MAGIC:
        raise StateError("not a session state")
    (version,) = r.unpack(_U8)
    if version != VERSION:
        raise StateError(f"state version {version}, expected {VERSION}")
    kind, client, user = r.str(), r.str(), r.str()
    conn_info = r.blob()
    exp, priority, n = r.unpack(_HEAD)
    subs = []
    for _ in range(n):
        channel = r.str()
        flags, sub_exp, offset = r.unpack(_SUB)
        epoch = r.str()
        chan_info = r.blob()
        subs.append(SubRecord(channel, flags & 0x7F, sub_exp, chan_info, offset, epoch,
                              bool(flags & 0x80)))
    (n,) = r.unpack(_U16)
    cut: dict[int, int] | None = None
    if n != 0xFFFF:
        cut = {}
        for _ in range(n):
            origin, stamp = r.unpack(_CUT)
            if origin in cut:
                raise StateError("origin twice in the cut")
            cut[origin] = stamp
    if r.pos != len(r.buf):
        raise StateError("trailing bytes")
    if not client:
        raise StateError("no client id")
    return SessionState(kind, client, user, conn_info, exp, priority, subs, cut)


# ---- the handler side -------------------------------------------------------------------
class GatewayMigration:
    """Mixin for the gateway's engine handlers (WebSocket, raw TCP): ``export_state`` /
    ``import_state`` for client sessions held in ``c.context``.

    The handler sets ``migration_transports``: transport kind -> what builds that transport
    for a connection (the transport classes, whose ``kind`` names them); kinds not in it never
    move. Optional handler attributes it honours: ``_fragments`` and ``_connecting`` (dicts
    keyed by connection: a message half received, a connect being traced - they stay) and
    ``live_sessions`` (a count it keeps right).
    """

    node: Node
    migration_transports: ClassVar[Mapping[str, Callable[[Any], Transport]]] = {}

    def export_state(self, c: Conn) -> bytes | None:
        from tidegate.gateway.session import ClientSession

        session = c.context
        if type(session) is not ClientSession:
            return None  # mid-handshake, the HTTP API, a raw TCP client that said nothing
        if c in getattr(self, "_fragments", ()) or c in getattr(self, "_connecting", ()):
            return None
        t = c._transport
        if t is None or t.get_extra_info("sslcontext") is not None:
            return None  # the TLS session lives in this process's OpenSSL state
        kind = getattr(type(session.transport), "kind", "")
        if kind not in self.migration_transports:
            return None
        state = session.export_state(kind)
        if state is None:
            return None
        session.detach()
        session.transport.conn = None  # type: ignore[attr-defined]  # break conn<->session
        c.context = None
        if hasattr(self, "live_sessions"):
            self.live_sessions -= 1
        return state

    def import_state(self, c: Conn, state: bytes) -> None:
        from tidegate.gateway.session import ClientSession, codec_for

        try:
            st = decode(state)
            make = self.migration_transports[st.kind]
        except (StateError, KeyError) as exc:
            log.error("migrated connection with an unusable state (%s): closing it", exc)
            c.close("migration_failed")
            return
        transport = make(c)
        try:
            session = ClientSession.restore(transport, self.node, st)
        except Exception:  # restore undid what it registered (a real leave: the client goes)
            log.exception("import of a migrated session failed: disconnecting it")
            d = DISCONNECT_SERVER_ERROR  # 3004: the SDKs reconnect (and recover)
            if not st.kind.startswith("ws"):  # no close frame on raw TCP: a disconnect push
                codec = codec_for("protobuf" if st.kind.endswith("protobuf") else "json")
                transport.write(codec.encode_disconnect(d.code, d.reason, True))
            transport.close(d.code, d.reason)
            return
        c.context = session
        if hasattr(self, "live_sessions"):
            self.live_sessions += 1
