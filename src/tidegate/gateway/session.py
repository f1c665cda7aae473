"""The per-connection client session: Centrifugo client protocol v2, sans-I/O.

Wiring (the transport side is the engine's)::

    node = Node(config)                              # once per worker
    s = ClientSession(transport, node, "json")       # on WebSocket open ("protobuf" for the
                                                     # "centrifuge-protobuf" subprotocol)
    s.handle_commands(message_bytes)                 # each complete WebSocket message
    reply = s.handle_message(message_bytes)          # the same, for a transport that frames the
                                                     # RPC fast path's reply itself (or None)
    ping = s.make_ping()                             # when the engine's wheel says "ping it"
    s.on_transport_closed()                          # when the connection is gone, whatever why

The session writes replies and pushes with ``transport.write(bytes)`` (one call may carry
several replies of one frame) and ends the connection with ``transport.close(code, reason)``
(the WebSocket close code: 3000..4999, see codes.py). JSON sessions must be sent as text frames,
protobuf ones as binary frames (``session.codec.binary``).

Hot path: a JSON frame holding one compact ``rpc`` command (``codec_json.match_rpc``) with a
synchronous handler runs as a plain function - no Command/request objects, no coroutine, no
second parse of ``data``, the reply built from byte templates - with the same outcome as the
generic command loop (which everything else takes).

Memory: ``__slots__``; an idle connected session holds its ids, its subscriptions dict and
nothing else - no task, no timer, no buffer. A task exists only while a command awaits a broker
that is not inline (or an async RPC/send handler), and only until that frame is done.

Backpressure: the session never queues output. ``transport.write`` must enforce the per-client
cap (``client_queue_max_bytes`` / ``client_queue_max_messages``) and close a slow consumer with
code 3008 "slow" (reconnect); it must not call back into the session synchronously. Fan-out
shares one bytes object between all subscribers of a format, so a transport that queues must
keep a reference, not copy.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from inspect import isawaitable, iscoroutine
from typing import Any, Protocol

from tidegate.gateway.auth import (
    InvalidToken,
    TokenExpired,
    verify_connect_token,
    verify_subscription_token,
)
from tidegate.gateway.codec_json import (
    JSON_CODEC,
    NotJSON,
    encode_rpc_reply,
    json_value,
    match_rpc,
)
from tidegate.gateway.codec_protobuf import PROTOBUF_CODEC
from tidegate.gateway.codes import (
    DISCONNECT_BAD_REQUEST,
    DISCONNECT_CONNECTION_CLOSED,
    DISCONNECT_EXPIRED,
    DISCONNECT_INAPPROPRIATE_PROTOCOL,
    DISCONNECT_INSUFFICIENT_STATE,
    DISCONNECT_INVALID_TOKEN,
    DISCONNECT_NOT_AVAILABLE,
    DISCONNECT_SERVER_ERROR,
    DISCONNECT_STALE,
    ERROR_ALREADY_SUBSCRIBED,
    ERROR_BAD_REQUEST,
    ERROR_INTERNAL,
    ERROR_LIMIT_EXCEEDED,
    ERROR_METHOD_NOT_FOUND,
    ERROR_NOT_AVAILABLE,
    ERROR_PERMISSION_DENIED,
    ERROR_TOKEN_EXPIRED,
    ERROR_UNAUTHORIZED,
    ERROR_UNKNOWN_CHANNEL,
    ERROR_UNRECOVERABLE_POSITION,
    UNSUBSCRIBE_EXPIRED,
    UNSUBSCRIBE_SERVER,
    Disconnect,
    DisconnectError,
    ProtocolError,
    ReplyError,
    error,
)
from tidegate.gateway.config import ChannelOptions
from tidegate.gateway.history import Unrecoverable
from tidegate.gateway.messages import (
    ChannelRequest,
    ClientInfo,
    Command,
    ConnectRequest,
    ConnectResult,
    HistoryRequest,
    Method,
    Publication,
    PublishRequest,
    RefreshRequest,
    RPCRequest,
    SendRequest,
    SubRefreshRequest,
    SubscribeRequest,
    SubscribeResult,
)
from tidegate.gateway.migration import SessionState, SubRecord
from tidegate.gateway.migration import encode as encode_state
from tidegate.gateway.node import Node, Resume, drive
from tidegate.gateway.relaylog import CMD, JOIN, PUB, Entry, RelayLog

__all__ = ["ClientSession", "SubState", "Transport", "codec_for"]

log = logging.getLogger("tidegate.gateway")

# SubscribeRequest.flag bits (client -> server)
FLAG_REJECT_UNRECOVERED = 2

# session _flags
_CONNECTED = 1
_CLOSED = 2
_STALE_MARK = 4  # one ping tick passed without a connect
_EXPIRING_SUBS = 8  # some subscription has an expiry: check_deadlines looks at them
_CONNECTING = 16  # connected, but the connect reply is not written yet
_LIVE_MASK = _CONNECTED | _CLOSED | _CONNECTING  # & _LIVE_MASK == _CONNECTED: fully connected

# per-subscription flags
SUB_JOIN_LEAVE = 1  # this client receives join/leave pushes
SUB_SERVER_SIDE = 2
SUB_PRESENCE = 4  # an entry was added to presence
SUB_EMITS_JOIN_LEAVE = 8  # the namespace publishes join/leave for this subscriber


class Transport(Protocol):
    """What a session needs from its connection."""

    def write(self, data: bytes) -> None:
        """Queue ``data`` as one message (WebSocket frame). Enforce the byte cap: a client over
        it is closed with 3008 "slow". Never re-enter the session synchronously."""

    def close(self, code: int, reason: str) -> None:
        """Flush what is queued, then close with this disconnect code and reason."""


def codec_for(fmt: str) -> Any:
    """The shared codec for "json" or "protobuf" (also accepts the WebSocket subprotocol)."""
    if fmt in ("json", "", None):
        return JSON_CODEC
    if fmt in ("protobuf", "centrifuge-protobuf"):
        return PROTOBUF_CODEC
    raise ValueError(f"unknown protocol format {fmt!r}")


class SubState:
    """A subscription's state when it needs more than flags (an expiry or channel info)."""

    __slots__ = ("flags", "exp", "chan_info")

    def __init__(self, flags: int, exp: int, chan_info: bytes | None) -> None:
        self.flags = flags
        self.exp = exp
        self.chan_info = chan_info


def _sub_flags(state: int | SubState) -> int:
    return state if isinstance(state, int) else state.flags


def _offset(pub: Publication) -> int:
    return pub.offset


async def _all(coros: list[Coroutine[Any, Any, None]]) -> None:
    for co in coros:
        await co


class _Busy:
    """Exists only while a command awaits: the task, and frames that arrived meanwhile."""

    __slots__ = ("task", "pending")

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.pending: list[bytes] = []


class ClientSession:
    __slots__ = (
        "transport",
        "codec",
        "_node",
        "_flags",
        "_client",
        "_user",
        "_conn_info",
        "_exp",
        "_subs",
        "_wbuf",
        "_busy",
        "_priority",
    )

    def __init__(self, transport: Transport, node: Node, fmt: str = "json") -> None:
        self.transport = transport
        self.codec = codec_for(fmt)
        self._node = node
        self._flags = 0
        self._client: str | None = None
        self._user = ""
        self._conn_info: bytes | None = None
        self._exp = 0  # connection expiry, unix seconds; 0 = never
        # subscriptions as a flat [channel, state, channel, state...] list: a list of two
        # costs 72 bytes where a one-entry dict costs 184 (500k connections...). A state is an
        # int of SUB_* flags, or a SubState when the subscription has an expiry / chan_info.
        self._subs: list[Any] | None = None
        self._wbuf: list[bytes] | None = None  # replies of the frame being processed
        self._busy: _Busy | None = None
        self._priority = 0  # eviction class from the token (gateway/eviction.py)

    # ---- properties ---------------------------------------------------------------------
    @property
    def client_id(self) -> str | None:
        return self._client

    @property
    def user(self) -> str:
        return self._user

    @property
    def connected(self) -> bool:
        return bool(self._flags & _CONNECTED) and not self._flags & _CLOSED

    @property
    def closed(self) -> bool:
        return bool(self._flags & _CLOSED)

    @property
    def subscribed(self) -> bool:
        """Subscribed to at least one channel (cheaper than ``channels()``)."""
        return self._subs is not None

    @property
    def eviction_priority(self) -> int:
        """The eviction class the connect token asked for (0 without one)."""
        return self._priority

    @property
    def busy(self) -> bool:
        """A command is awaiting (a task exists)."""
        return self._busy is not None

    def channels(self) -> list[str]:
        return self._subs[::2] if self._subs else []

    def client_info(self, channel: str | None = None) -> ClientInfo:
        chan_info = None
        if channel is not None:
            state = self._sub_state(channel)
            if isinstance(state, SubState):
                chan_info = state.chan_info
        return ClientInfo(self._user, self._client or "", self._conn_info, chan_info)

    # ---- the flat subscription list
    def _sub_state(self, channel: str) -> int | SubState | None:
        subs = self._subs
        if not subs:
            return None
        try:
            i = subs.index(channel)  # states are ints/SubStates: never equal to a str
        except ValueError:
            return None
        state: int | SubState = subs[i + 1]
        return state

    def _sub_put(self, channel: str, state: int | SubState) -> None:
        subs = self._subs
        if subs is None:
            self._subs = [channel, state]
            return
        try:
            subs[subs.index(channel) + 1] = state
        except ValueError:
            subs += (channel, state)

    def _sub_pop(self, channel: str) -> int | SubState | None:
        subs = self._subs
        if not subs:
            return None
        try:
            i = subs.index(channel)
        except ValueError:
            return None
        state: int | SubState = subs[i + 1]
        del subs[i : i + 2]
        if not subs:
            self._subs = None
        return state

    def _sub_items(self) -> list[tuple[str, int | SubState]]:
        subs = self._subs
        return list(zip(subs[::2], subs[1::2], strict=True)) if subs else []

    # ---- engine entry points ----------------------------------------------------------
    def handle_commands(self, data: bytes) -> None:
        """Process one complete message from the client (one or more commands)."""
        reply = self.handle_message(data)
        if reply:
            self.transport.write(reply)

    def handle_message(self, data: bytes) -> bytes | None:
        """:meth:`handle_commands` for a transport that frames replies itself: the reply of a
        message handled on the RPC fast path (a JSON client's) is returned, for the caller to
        write as one message, instead of written; everything else is written as usual."""
        flags = self._flags
        if flags & _LIVE_MASK == _CONNECTED and self._busy is None:
            codec = self.codec
            if data == codec.pong:
                return None  # a pong: liveness is the engine's (any inbound message counts)
            if codec is JSON_CODEC:
                node = self._node
                handler = node.rpc_handler
                if handler is not None and node.rpc_inline and node.broker.inline:
                    m = match_rpc(data)
                    if m is not None and (
                        not self._exp
                        or node.clock() < self._exp + node.config.expired_close_delay_s
                    ):  # (once expired, the generic path disconnects)
                        # The RPC fast path: see _rpc_result.
                        id_digits, method, req_data = m
                        try:
                            res = handler(self, method, req_data)
                        except Exception as exc:
                            self._command_failed(int(id_digits), _RPC, exc)
                            return b""
                        if res is req_data and res and not self._flags & _CLOSED:
                            return b'{"id":%s,"rpc":{"data":%s}}' % (id_digits, res)  # an echo
                        return self._rpc_result(id_digits, req_data, res)
        if flags & _CLOSED:
            return None
        busy = self._busy
        if busy is not None:
            busy.pending.append(data)  # the running task processes it, in order
            return None
        if self._exp and flags & _CONNECTED and self._conn_expired(self._node.clock()):
            return None
        try:
            cmds = self.codec.decode_commands(data)
        except ProtocolError:
            self.disconnect(DISCONNECT_BAD_REQUEST)
            return None
        if len(cmds) == 1 and cmds[0].method is None and cmds[0].id == 0:
            if not flags & _CONNECTED:  # the first command must be connect
                self.disconnect(DISCONNECT_BAD_REQUEST)
                return None
            self.on_pong()
            return None
        self._run(cmds, 0)
        return None

    def make_ping(self) -> bytes:
        """The server ping to write (``{}`` / ``\\x00``). Also checks deadlines (stale,
        connection and subscription expiry): call it every ping_interval_s of client silence."""
        self.check_deadlines()
        return self.codec.ping

    def on_pong(self) -> None:
        """A pong arrived. Liveness is the engine's: any inbound message counts, so the
        session keeps no pong state."""

    def check_deadlines(self, now: float | None = None) -> bool:
        """Enforce deadlines without timers; False when the session closed itself.

        Not connected at the second check after open: 3502 stale. Connection token expired
        (plus ``expired_close_delay_s``) without a refresh: 3005. Expired subscription tokens:
        an ``unsubscribe`` push 2501 (the SDK resubscribes with a fresh token).
        """
        flags = self._flags
        if flags & _CLOSED:
            return False
        if not flags & _CONNECTED:
            if flags & _STALE_MARK:
                self.disconnect(DISCONNECT_STALE)
                return False
            self._flags = flags | _STALE_MARK
            return True
        if not self._exp and not flags & _EXPIRING_SUBS:
            return True
        if now is None:
            now = self._node.clock()
        if self._exp and self._conn_expired(now):
            return False
        if flags & _EXPIRING_SUBS and self._subs:
            grace = self._node.config.expired_close_delay_s
            expired = [
                ch
                for ch, st in self._sub_items()
                if isinstance(st, SubState) and st.exp and now >= st.exp + grace
            ]
            for ch in expired:
                self.unsubscribe(ch, UNSUBSCRIBE_EXPIRED, "subscription expired")
        return True

    def on_transport_closed(self) -> None:
        """The connection is gone (client closed, network, slow consumer...). Idempotent."""
        if self._flags & _CLOSED:
            return
        self._flags |= _CLOSED
        self._teardown()

    # ---- server-initiated actions -----------------------------------------------------
    def disconnect(self, d: Disconnect = DISCONNECT_CONNECTION_CLOSED) -> None:
        """Write what this frame already produced, leave every channel, close the transport."""
        if self._flags & _CLOSED:
            return
        self._flush()
        self._flags |= _CLOSED
        self._teardown()
        self.transport.close(d.code, d.reason)

    def send_message(self, data: bytes) -> None:
        """An asynchronous ``message`` push (server -> client). JSON clients need JSON data."""
        if self._flags & _CLOSED:
            return
        self.transport.write(self.codec.encode_message(data))

    def unsubscribe(
        self, channel: str, code: int = UNSUBSCRIBE_SERVER, reason: str = "server unsubscribe"
    ) -> bool:
        """Server-side unsubscribe with an ``unsubscribe`` push (codes >= 2500: resubscribe)."""
        if self._flags & _CLOSED:
            return False
        state = self._sub_pop(channel)
        if state is None:
            return False
        self.transport.write(self.codec.encode_unsubscribe(channel, code, reason))
        co = self._leave(channel, state)
        if co is not None:
            drive(co, self._node.inline)
        return True

    async def server_subscribe(self, channel: str, *, data: bytes | None = None) -> bool:
        """Server-side subscription (the server API's ``subscribe``): attach ``channel`` like a
        connect token's ``channels`` claim does and write a ``subscribe`` push carrying the
        position (and ``data``, a JSON value for JSON clients), so the SDK's server-side
        ``on_subscribed`` fires; then the join announce. Returns True when it subscribed.

        False, with nothing written: not connected (or its connect reply is not out yet),
        already subscribed or subscribing, at ``client_channel_limit``, ``data`` not JSON for
        a JSON client, or the connection closed meanwhile. Raises ReplyError for a channel no
        namespace accepts (the API validates it first) and whatever the broker raises.
        """
        if self._flags & (_CONNECTED | _CLOSED | _CONNECTING) != _CONNECTED:
            return False
        opts = self._options(channel)
        subs = self._subs
        if subs is not None and (
            channel in subs or len(subs) >= 2 * self._node.config.client_channel_limit
        ):
            return False
        if self._node.hub.subscribing(channel, self):
            return False
        if data and self.codec is JSON_CODEC:
            jdata = json_value(data)
            if jdata is None:
                log.warning("server subscribe data for %r is not JSON: a JSON client", channel)
                return False
            data = jdata
        try:
            result = await self._attach(channel, opts, None, True, 0, None)
        except DisconnectError:  # closed while attaching; _attach undid its part
            return False
        if data:
            result.data = data
        self._reply(self.codec.encode_subscribe_push(channel, result))
        self._activate(channel, result)
        await self._announce(channel)
        return True

    # ---- work stealing: moving to another worker (gateway/migration.py) --------------------
    def export_state(self, kind: str) -> bytes | None:
        """What another worker needs to carry on with this session (``kind``: its transport),
        or None while it must stay: not fully connected, closed, a command or a subscribe in
        progress, a chunked fan-out writing to one of its channels. Changes nothing: call
        :meth:`detach` once the bytes are on their way."""
        if (
            self._flags & _LIVE_MASK != _CONNECTED
            or self._busy is not None
            or self._wbuf is not None
        ):
            return None
        hub = self._node.hub
        channels = self.channels()
        if hub.migration_blocked(self, channels):
            return None
        relay = self._node.broker.relay_log
        if relay is not None and not relay.ready:
            return None  # its hellos are out: its cut would not cover every worker yet
        subs = []
        for channel, state in self._sub_items():
            rec = SubRecord(channel, _sub_flags(state))
            if isinstance(state, SubState):
                rec.exp, rec.chan_info = state.exp, state.chan_info
            pos = hub.position(channel)
            if pos is not None:
                rec.offset, rec.epoch = pos
                rec.positioned = True
            subs.append(rec)
        st = SessionState(kind, self._client or "", self._user, self._conn_info, self._exp,
                          self._priority, subs, relay.cut() if relay is not None else None)
        return encode_state(st)

    def detach(self) -> None:
        """Forget this session here without a goodbye: it goes on in another worker. Out of
        the hub (and ``broker.unsubscribe`` where it was the channel's last local
        subscriber); no leave push, no presence removal, nothing written. Closed from here on
        (a fan-out snapshot that still holds it skips it)."""
        if self._flags & _CLOSED:
            return
        self._flags |= _CLOSED
        node = self._node
        hub = node.hub
        subs, self._subs = self._subs, None
        hub.remove_session(self)
        for channel in subs[::2] if subs else ():
            if hub.remove_subscriber(channel, self):
                drive(node.broker.unsubscribe(channel), node.inline)

    @classmethod
    def restore(cls, transport: Transport, node: Node, st: SessionState) -> ClientSession:
        """The session :meth:`export_state` described, registered in this worker: hub (and
        ``broker.subscribe`` for channels new here), no join push, no presence add (both
        happened when it subscribed; presence lives with the channel's owner). Channels with
        a stream position catch up on what the move may have skipped (:meth:`_resync`); the
        others, join/leave pushes and the API's commands, from the broker's relay log when
        it keeps one and the state carries the old worker's cut (:meth:`_caught_up`).
        On failure it undoes itself (a real leave: the caller disconnects) and raises."""
        fmt = "protobuf" if st.kind.endswith("protobuf") else "json"
        s = cls(transport, node, fmt)
        s._client = st.client
        s._user = st.user
        s._conn_info = st.conn_info
        s._exp = st.exp
        s._priority = st.priority
        s._flags = _CONNECTED
        hub = node.hub
        relay = node.broker.relay_log if st.cut is not None else None
        todo: list[tuple[str, int, str]] = []
        moved: list[str] = []  # resumed from the relay log
        try:
            if relay is None:
                hub.add_session(s)  # (else once caught up: API commands meanwhile are replayed)
            for rec in st.subs:
                channel = sys.intern(rec.channel)
                state: int | SubState = rec.flags
                if rec.exp or rec.chan_info is not None:
                    state = SubState(rec.flags, rec.exp, rec.chan_info)
                    if rec.exp:
                        s._flags |= _EXPIRING_SUBS
                s._sub_put(channel, state)
                opts = node.config.channel_options(channel)
                if rec.positioned and opts is not None and opts.history_enabled:
                    first = hub.add_pending(channel, s)  # buffered until _resync caught up
                    todo.append((channel, rec.offset, rec.epoch))
                elif relay is not None:
                    first = hub.add_pending(channel, s)  # until _caught_up
                    moved.append(channel)
                else:
                    first = hub.add_subscriber(channel, s, bool(rec.flags & SUB_JOIN_LEAVE))
                if first:
                    drive(node.broker.subscribe(channel), node.inline)
            if relay is not None:
                assert st.cut is not None
                had = frozenset(s._subs[::2]) if s._subs else frozenset()
                if relay.behind(st.cut):  # the client's commands wait with it (as behind
                    s._busy = _Busy()  # a running command), and so does the user index
                relay.resume(st.cut, functools.partial(s._caught_up, relay, moved, had, todo))
            elif todo:
                s._start_resync(todo)
        except BaseException:
            s._flags |= _CLOSED
            s._teardown()
            raise
        return s

    def _caught_up(
        self,
        relay: RelayLog,
        moved: list[str],
        had: frozenset[str],
        todo: list[tuple[str, int, str]],
        entries: list[Entry] | None,
    ) -> None:
        """This worker has handled everything the old one had: write what the move skipped,
        in the order this worker handled it - publications of the channels in ``moved``,
        join/leave pushes of its join/leave subscriptions, the API's commands for this
        session - then go live: hub entries active, user index, :meth:`_resync` of the
        channels with a position, frames the client sent meanwhile. ``entries`` None: the
        relay log cannot tell what was skipped (3010: the SDK reconnects and resubscribes)."""
        busy, self._busy = self._busy, None
        frames = busy.pending if busy is not None else []
        if self._flags & _CLOSED:
            return
        if entries is None:
            self.disconnect(DISCONNECT_INSUFFICIENT_STATE)
            return
        try:
            self._go_live(relay, moved, had, todo, entries, frames)
        except Exception:  # (called from the relay log too: never into its other sessions)
            log.exception("resuming a moved session failed: disconnecting it")
            self.disconnect(DISCONNECT_SERVER_ERROR)

    def _go_live(
        self,
        relay: RelayLog,
        moved: list[str],
        had: frozenset[str],
        todo: list[tuple[str, int, str]],
        entries: list[Entry],
        frames: list[bytes],
    ) -> None:
        if entries:
            self._replay(relay, entries, moved, had)
            if self._flags & _CLOSED:
                return
        hub = self._node.hub
        for channel in had:
            state = self._sub_state(channel)
            if state is None:
                continue  # an API unsubscribe of the window
            jl = bool(_sub_flags(state) & SUB_JOIN_LEAVE)
            if channel in moved:
                hub.activate(channel, self, jl)  # (what it buffered meanwhile was replayed)
            elif jl:
                hub.add_join_leave(channel, self)  # _resync's activation does the rest
        hub.add_session(self)
        todo = [t for t in todo if self._sub_state(t[0]) is not None]
        if todo:
            self._start_resync(todo)
        for data in frames:  # in order: behind _resync's task if it started one
            self.handle_commands(data)

    def _replay(self, relay: RelayLog, entries: list[Entry], moved: list[str],
                had: frozenset[str]) -> None:
        codec = self.codec
        node = self._node
        n = 0
        try:
            for _origin, _stamp, kind, key, obj, _t, _size in entries:
                if kind == CMD:  # obj: (user, client, *args)
                    fn = relay.commands.get(key)
                    if fn is None or obj[0] != self._user or obj[1] not in ("", self._client):
                        continue
                    n += 1
                    try:
                        res = fn(self, *obj[2:])
                        if iscoroutine(res):
                            drive(res, node.inline)
                    except Exception:
                        log.exception("API command %s on a session that moved failed", key)
                    if self._flags & _CLOSED:
                        break
                    continue
                if key not in had:
                    continue
                state = self._sub_state(key)
                if state is None:
                    continue
                if kind == PUB:
                    if key in moved:
                        self.transport.write(codec.encode_publication(key, obj))
                        n += 1
                elif _sub_flags(state) & SUB_JOIN_LEAVE:
                    enc = codec.encode_join if kind == JOIN else codec.encode_leave
                    self.transport.write(enc(key, obj))
                    n += 1
        except NotJSON:
            self.disconnect(DISCONNECT_INAPPROPRIATE_PROTOCOL)
        finally:
            relay.replayed += n

    def _start_resync(self, todo: list[tuple[str, int, str]]) -> None:
        """Run :meth:`_resync` synchronously while the broker answers inline, in the session's
        task (commands arriving meanwhile wait behind it, as during any command) from its
        first real wait on."""
        coro = self._resync(todo)
        if self._node.inline:
            try:
                first = coro.send(None)
            except StopIteration:
                return
            self._start_task(Resume(coro, first), [], 0)
        else:
            self._start_task(coro, [], 0)

    async def _resync(self, todo: list[tuple[str, int, str]]) -> None:
        """After a move: for each ``(channel, offset, epoch)`` the old worker had written up
        to, write what the stream has after it (the publications the move may have skipped),
        then switch the pending hub entry to normal delivery with the buffered publications
        past that. A position the stream cannot continue: 3010 (the SDK reconnects and
        recovers)."""
        node = self._node
        broker = node.broker
        cfg = node.config
        for channel, offset, epoch in todo:
            if self._flags & _CLOSED:
                return
            if self._sub_state(channel) is None:
                continue  # unsubscribed meanwhile (the server API): nothing to catch up
            opts = cfg.channel_options(channel)
            if opts is None:
                self.disconnect(DISCONNECT_INSUFFICIENT_STATE)
                return
            try:
                if not epoch:  # no positioned subscribe told the old worker: today's epoch
                    top = await broker.history(
                        channel,
                        history_size=opts.history_size,
                        history_ttl_s=opts.history_ttl_s,
                        limit=0,
                    )
                    epoch = top.epoch
                rr = await broker.recover(
                    channel,
                    offset,
                    epoch,
                    history_size=opts.history_size,
                    history_ttl_s=opts.history_ttl_s,
                    max_publications=cfg.recovery_max_publications,
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("resync of %r after a move failed: %s", channel, exc)
                self.disconnect(DISCONNECT_INSUFFICIENT_STATE)
                return
            if self._flags & _CLOSED:
                return
            if self._sub_state(channel) is None:
                continue
            if not rr.recovered:
                self.disconnect(DISCONNECT_INSUFFICIENT_STATE)
                return
            encode = self.codec.encode_publication
            try:
                for pub in rr.publications:
                    if pub.offset > offset:
                        self._reply(encode(channel, pub))
            except NotJSON:
                self.disconnect(DISCONNECT_INAPPROPRIATE_PROTOCOL)
                return
            node.hub.note_position(channel, rr.epoch, rr.offset)
            self._activate(channel, SubscribeResult(positioned=True, offset=max(rr.offset, offset)))

    # ---- the RPC fast path (entered from handle_message) ----------------------------------
    def _rpc_result(self, id_digits: bytes, req_data: bytes, res: Any) -> bytes:
        """The reply to write for a JSON message holding one compact ``rpc`` command
        (``match_rpc``) whose inline handler returned ``res`` - or ``b""`` when there is none
        to write (an error reply already written, closed, handed to a task).

        :meth:`handle_message` runs such a message without the generic machinery: no
        Command/request objects, no coroutine, no second parse of ``data`` (an echo of it
        needs no check at all: those are our own bytes). Same outcome as the generic path:
        ``match_rpc`` only accepts messages whose ``data`` bytes are what ``decode_commands``
        produces, and only where the generic path would run the command synchronously too (a
        connected session, connect reply written, no task running, connection not expired,
        an inline broker, a handler that is not a coroutine function).
        """
        try:
            if res is not req_data and type(res) is not bytes and isawaitable(res):
                self._start_task(self._rpc_later(int(id_digits), req_data, res), [], 0)
                return b""
            if self._flags & _CLOSED:
                return b""
            data = self._rpc_data(res, req_data)
        except Exception as exc:
            self._command_failed(int(id_digits), _RPC, exc)
            return b""
        return encode_rpc_reply(id_digits, data)

    async def _rpc_later(self, cmd_id: int, req_data: bytes, aw: Awaitable[Any]) -> None:
        """The rest of a fast-path RPC whose (non-coroutine) handler returned an awaitable."""
        try:
            res = await aw
            if self._flags & _CLOSED:
                return
            self._reply(self._encode_rpc(cmd_id, self._rpc_data(res, req_data)))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._command_failed(cmd_id, _RPC, exc)

    def _rpc_data(self, res: Any, req_data: bytes) -> bytes:
        """A handler's result as reply data; a JSON client gets JSON or an internal error."""
        data: bytes = res or b""
        if (
            data
            and data is not req_data
            and self.codec is JSON_CODEC
            and json_value(data) is not data
        ):
            log.error("rpc handler returned non-JSON data for a JSON client")
            raise error(ERROR_INTERNAL)
        return data

    def _encode_rpc(self, cmd_id: int, data: bytes) -> bytes:
        if self.codec is JSON_CODEC:  # _rpc_data checked it: no second parse
            return encode_rpc_reply(b"%d" % cmd_id, data)
        reply: bytes = self.codec.encode_rpc(cmd_id, data)
        return reply

    # ---- command loop -------------------------------------------------------------------
    def _run(self, cmds: list[Command], i: int) -> None:
        """Process ``cmds[i:]`` synchronously; hand over to a task at the first real await."""
        inline = self._node.inline
        self._wbuf = []
        try:
            n = len(cmds)
            while i < n:
                cmd = cmds[i]
                i += 1
                coro = self._execute(cmd)
                if (
                    inline
                    and (cmd.method is not _RPC or self._node.rpc_inline)
                    and (cmd.method is not _SEND or self._node.send_inline)
                ):
                    try:
                        first = coro.send(None)
                    except StopIteration:
                        if self._flags & _CLOSED:
                            return
                        continue
                    self._flush()
                    self._start_task(Resume(coro, first), cmds, i)
                    return
                self._flush()
                self._start_task(coro, cmds, i)
                return
        finally:
            self._flush()
            self._wbuf = None

    def _start_task(self, first: Awaitable[None], cmds: list[Command], i: int) -> None:
        busy = self._busy = _Busy()
        busy.task = asyncio.get_running_loop().create_task(self._finish(first, cmds, i))

    async def _finish(self, first: Awaitable[None], cmds: list[Command], i: int) -> None:
        try:
            await first
            while not self._flags & _CLOSED:
                while i < len(cmds) and not self._flags & _CLOSED:
                    await self._execute(cmds[i])
                    i += 1
                busy = self._busy
                if busy is None or not busy.pending or self._flags & _CLOSED:
                    break
                data = busy.pending.pop(0)
                try:
                    cmds, i = self.codec.decode_commands(data), 0
                except ProtocolError:
                    self.disconnect(DISCONNECT_BAD_REQUEST)
                    break
        finally:
            self._busy = None

    def _reply(self, data: bytes) -> None:
        buf = self._wbuf
        if buf is not None:
            buf.append(data)
        else:
            self.transport.write(data)

    def _flush(self) -> None:
        buf = self._wbuf
        if buf and not self._flags & _CLOSED:
            data = self.codec.join(buf)
            buf.clear()
            self.transport.write(data)

    async def _execute(self, cmd: Command) -> None:
        try:
            await self._dispatch(cmd)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._command_failed(cmd.id, cmd.method, exc)

    def _command_failed(self, cmd_id: int, method: Method | None, exc: Exception) -> None:
        """A command raised: an error reply, a disconnect, or (a bug) an internal error.
        Called from the ``except`` block, so ``log.exception`` sees the traceback."""
        if method == Method.CONNECT:
            self._node.connect_failed(exc)
        if isinstance(exc, ReplyError):
            if cmd_id and not self._flags & _CLOSED:
                self._reply(self.codec.encode_error(cmd_id, exc.code, exc.message, exc.temporary))
        elif isinstance(exc, DisconnectError):
            self.disconnect(exc.disconnect)
        elif isinstance(exc, NotJSON):
            self.disconnect(DISCONNECT_INAPPROPRIATE_PROTOCOL)
        else:
            log.exception("error handling %s command", method)
            if cmd_id and not self._flags & _CLOSED:
                err = error(ERROR_INTERNAL)
                self._reply(self.codec.encode_error(cmd_id, err.code, err.message, err.temporary))

    def _dispatch(self, cmd: Command) -> Coroutine[Any, Any, None]:
        method = cmd.method
        if not self._flags & _CONNECTED:
            if method is not _CONNECT:  # the first command must be connect
                return self._raise(DisconnectError(DISCONNECT_BAD_REQUEST))
        elif method is None:
            if cmd.id == 0:
                return self._noop()  # a pong batched with other commands
            return self._raise(error(ERROR_METHOD_NOT_FOUND))
        elif method is _CONNECT:
            return self._raise(DisconnectError(DISCONNECT_BAD_REQUEST))
        if cmd.id == 0 and method is not _SEND:
            return self._raise(DisconnectError(DISCONNECT_BAD_REQUEST))
        assert method is not None
        return _HANDLERS[method](self, cmd.id, cmd.request)

    async def _noop(self) -> None:
        return None

    async def _raise(self, exc: Exception) -> None:
        raise exc

    # ---- helpers ------------------------------------------------------------------------
    def _conn_expired(self, now: float) -> bool:
        if now >= self._exp + self._node.config.expired_close_delay_s:
            self.disconnect(DISCONNECT_EXPIRED)
            return True
        return False

    def _verify_sub_token(self, token: str, channel: str) -> tuple[int, bytes | None]:
        cfg = self._node.config
        try:
            tok = verify_subscription_token(
                token, cfg.token_hmac_secret, self._node.clock(), cfg.token_leeway_s
            )
        except TokenExpired:
            raise error(ERROR_TOKEN_EXPIRED) from None
        except InvalidToken:
            raise DisconnectError(DISCONNECT_INVALID_TOKEN) from None
        if tok.channel != channel or tok.user != self._user:
            raise error(ERROR_PERMISSION_DENIED)
        return tok.exp, tok.info

    def _options(self, channel: str) -> ChannelOptions:
        if not channel:
            raise error(ERROR_BAD_REQUEST)
        cfg = self._node.config
        if len(channel) > cfg.channel_max_length_chars:
            raise error(ERROR_LIMIT_EXCEEDED)
        opts = cfg.channel_options(channel)
        if opts is None:
            raise error(ERROR_UNKNOWN_CHANNEL)
        return opts

    def _allowed(
        self,
        channel: str,
        opts: ChannelOptions,
        for_client: bool,
        for_subscriber: bool,
        for_anon: bool,
    ) -> bool:
        if not self._user and not for_anon:
            return False
        subscribed = self._subs is not None and channel in self._subs
        if not subscribed and (opts.protected or self._node.config.is_private(channel)):
            return False  # token-gated channels: only their subscribers
        return for_client or (for_subscriber and subscribed)

    def _ttl(self, exp: int) -> int:
        return max(1, exp - int(self._node.clock()))

    async def _attach(
        self,
        channel: str,
        opts: ChannelOptions,
        req: SubscribeRequest | None,
        server_side: bool,
        exp: int,
        chan_info: bytes | None,
    ) -> SubscribeResult:
        """Subscribe: hub (pending), node subscription, recovery or position, presence. The
        caller writes the reply, then calls :meth:`_activate` (buffered publications, normal
        delivery) and :meth:`_announce` (join push) - or :meth:`_drop` if it cannot reply.
        On any failure (closed, cancelled, broker error, rejected recovery) it undoes itself."""
        node = self._node
        broker = node.broker
        result = SubscribeResult()
        recoverable = opts.recovery_enabled and (
            opts.force_recovery or server_side or (req is not None and req.recoverable)
        )
        positioned = opts.history_enabled and (
            recoverable or opts.force_positioning or (req is not None and req.positioned)
        )
        flags = SUB_SERVER_SIDE if server_side else 0
        if opts.join_leave:
            flags |= SUB_EMITS_JOIN_LEAVE
            if opts.force_push_join_leave or (
                req is not None and req.join_leave and not server_side
            ):
                flags |= SUB_JOIN_LEAVE
        if opts.presence:
            flags |= SUB_PRESENCE
        hub = node.hub
        channel = sys.intern(channel)  # one str object per channel, shared by all subscribers
        # Registered (pending) before anything is awaited: what is published from now on is
        # buffered for us, and _activate writes what the reply does not cover.
        first = hub.add_pending(channel, self)
        presence = False
        try:
            if first:
                await broker.subscribe(channel)
            if recoverable and req is not None and req.recover:
                rr = await broker.recover(
                    channel,
                    req.offset,
                    req.epoch,
                    history_size=opts.history_size,
                    history_ttl_s=opts.history_ttl_s,
                    max_publications=node.config.recovery_max_publications,
                )
                if not rr.recovered and req.flag & FLAG_REJECT_UNRECOVERED:
                    raise error(ERROR_UNRECOVERABLE_POSITION)
                result.was_recovering = True
                result.recovered = rr.recovered
                result.publications = rr.publications
                result.epoch, result.offset = rr.epoch, rr.offset
                if self.codec is JSON_CODEC:
                    for p in rr.publications:
                        if p.json_data is None:
                            raise NotJSON("recovered publication is binary")
            elif positioned:
                top = await broker.history(
                    channel,
                    history_size=opts.history_size,
                    history_ttl_s=opts.history_ttl_s,
                    limit=0,
                )
                result.epoch, result.offset = top.epoch, top.offset
            if self._flags & _CLOSED:
                raise DisconnectError(DISCONNECT_CONNECTION_CLOSED)
            if flags & SUB_PRESENCE:
                presence = True  # from here on undo it: the add may land even if we are cancelled
                info = ClientInfo(self._user, self._client or "", self._conn_info, chan_info)
                await broker.add_presence(channel, info)
                if self._flags & _CLOSED:
                    raise DisconnectError(DISCONNECT_CONNECTION_CLOSED)
        except BaseException:  # failed, closed or cancelled: leave the hub, drop the buffer
            last = hub.remove_subscriber(channel, self)
            if last or presence:
                undo = self._leave_broker(channel, SUB_PRESENCE if presence else 0, last)
                drive(undo, node.inline)
            raise
        result.recoverable = recoverable
        result.positioned = positioned
        if result.epoch:  # where this worker's subscribers are: a session that moves resumes there
            hub.note_position(channel, result.epoch, result.offset)
        if exp:
            result.expires, result.ttl = True, self._ttl(exp)
        # still pending in the hub: the caller writes the reply, then calls _activate
        self._sub_put(channel, SubState(flags, exp, chan_info) if exp or chan_info else flags)
        if exp:
            self._flags |= _EXPIRING_SUBS
        return result

    def _activate(self, channel: str, result: SubscribeResult) -> None:
        """The reply carrying ``result`` (subscribe reply, connect reply, subscribe push) is
        written: switch the hub entry to normal delivery and write the publications buffered
        meanwhile - for a positioned subscription only those past the position the reply gave
        (recovered publications included), in offset order; otherwise all, as they came."""
        state = self._sub_state(channel)
        if state is None:
            return  # unsubscribed by the server or closed before the reply went out
        buf = self._node.hub.activate(channel, self, bool(_sub_flags(state) & SUB_JOIN_LEAVE))
        if not buf:
            return
        if len(buf) > self._node.config.client_queue_max_messages:
            self.disconnect(DISCONNECT_INSUFFICIENT_STATE)  # the hub stopped buffering: gap
            return
        if result.positioned:
            top = result.offset
            buf = sorted([p for p in buf if p.offset > top], key=_offset)
        encode = self.codec.encode_publication
        try:
            for pub in buf:
                self._reply(encode(channel, pub))
        except NotJSON:
            self.disconnect(DISCONNECT_INAPPROPRIATE_PROTOCOL)

    def _drop(self, channels: Iterable[str]) -> None:
        """Undo attached subscriptions whose reply was never written (no join was announced,
        so no leave either)."""
        for channel in channels:
            state = self._sub_pop(channel)
            if state is not None:
                co = self._leave(channel, _sub_flags(state) & ~SUB_EMITS_JOIN_LEAVE)
                if co is not None:
                    drive(co, self._node.inline)

    async def _announce(self, channel: str) -> None:
        state = self._sub_state(channel)
        if state is None:
            return
        if _sub_flags(state) & SUB_EMITS_JOIN_LEAVE:
            self._flush()
            await self._node.broker.publish_join(channel, self.client_info(channel))

    def _leave(self, channel: str, state: int | SubState) -> Coroutine[Any, Any, None] | None:
        """Undo a subscription already removed from ``_subs``: leave the hub now; returns the
        broker part (presence, leave push, node unsubscribe) to await, if any."""
        last = self._node.hub.remove_subscriber(channel, self)
        flags = _sub_flags(state)
        if not last and not flags & (SUB_PRESENCE | SUB_EMITS_JOIN_LEAVE):
            return None
        return self._leave_broker(channel, state, last)

    async def _leave_broker(self, channel: str, state: int | SubState, last: bool) -> None:
        broker = self._node.broker
        flags = _sub_flags(state)
        client = self._client or ""
        if flags & SUB_PRESENCE:
            await broker.remove_presence(channel, client)
        if flags & SUB_EMITS_JOIN_LEAVE:
            chan_info = state.chan_info if isinstance(state, SubState) else None
            await broker.publish_leave(
                channel, ClientInfo(self._user, client, self._conn_info, chan_info)
            )
        if last:
            await broker.unsubscribe(channel)

    def _teardown(self) -> None:
        node = self._node
        busy = self._busy
        if busy is not None and busy.task is not None:
            try:
                current = asyncio.current_task()
            except RuntimeError:
                current = None
            if busy.task is not current:
                busy.task.cancel()
        subs, self._subs = self._subs, None
        if self._flags & _CONNECTED:
            node.hub.remove_session(self)
        if subs:
            pending = [
                co
                for ch, st in zip(subs[::2], subs[1::2], strict=True)
                if (co := self._leave(ch, st)) is not None
            ]
            if pending:
                drive(_all(pending), node.inline)

    # ---- commands -----------------------------------------------------------------------
    async def _connect(self, cmd_id: int, req: ConnectRequest) -> None:
        node = self._node
        node.connect_attempts += 1
        cfg = node.config
        now = node.clock()
        user, exp, info = "", 0, None
        channels: tuple[str, ...] = ()
        if req.token:
            try:
                tok = verify_connect_token(
                    req.token, cfg.token_hmac_secret, now, cfg.token_leeway_s
                )
            except TokenExpired:
                raise error(ERROR_TOKEN_EXPIRED) from None
            except InvalidToken:
                raise DisconnectError(DISCONNECT_INVALID_TOKEN) from None
            user, exp, info, channels = tok.user, tok.exp, tok.info, tok.channels
            self._priority = tok.priority
        elif not cfg.allow_anonymous:
            raise error(ERROR_UNAUTHORIZED)
        self._client = node.new_client_id()
        self._user = user
        self._conn_info = info
        self._exp = exp
        self._flags = (self._flags | _CONNECTED | _CONNECTING) & ~_STALE_MARK
        node.hub.add_session(self)
        result = ConnectResult(
            client=self._client,
            version=node.version,
            ping=max(1, round(cfg.ping_interval_s)),
            pong=True,
            node=node.name,
        )
        if exp:
            result.expires, result.ttl = True, self._ttl(exp)
        server_side = list(dict.fromkeys((*cfg.server_side_channels, *channels)))
        try:
            for channel in server_side:
                opts = cfg.channel_options(channel)
                if opts is None or len(channel) > cfg.channel_max_length_chars:
                    log.warning("skipping server-side subscription to bad channel %r", channel)
                    continue
                if len(result.subs) >= cfg.client_channel_limit:
                    break
                result.subs[channel] = await self._attach(
                    channel, opts, req.subs.get(channel), True, 0, None
                )
            self._reply(self.codec.encode_connect(cmd_id, result))
        except BaseException:
            self._drop(result.subs)
            raise
        finally:
            self._flags &= ~_CONNECTING
        for channel, sub in result.subs.items():
            self._activate(channel, sub)
        for channel in result.subs:
            await self._announce(channel)

    async def _subscribe(self, cmd_id: int, req: SubscribeRequest) -> None:
        channel = req.channel
        if not channel:
            raise DisconnectError(DISCONNECT_BAD_REQUEST)
        opts = self._options(channel)
        cfg = self._node.config
        subs = self._subs
        if subs is not None:
            if channel in subs:
                raise error(ERROR_ALREADY_SUBSCRIBED)
            if len(subs) >= 2 * cfg.client_channel_limit:
                raise error(ERROR_LIMIT_EXCEEDED)
        if self._node.hub.subscribing(channel, self):  # a server_subscribe is in flight
            raise error(ERROR_ALREADY_SUBSCRIBED)
        exp, chan_info = 0, None
        if req.token:
            exp, chan_info = self._verify_sub_token(req.token, channel)
        elif cfg.is_private(channel) or opts.protected:
            raise error(ERROR_PERMISSION_DENIED)
        elif not (
            opts.allow_subscribe_for_client if self._user else opts.allow_subscribe_for_anonymous
        ):
            raise error(ERROR_PERMISSION_DENIED)
        result = await self._attach(channel, opts, req, False, exp, chan_info)
        try:
            reply = self.codec.encode_subscribe(cmd_id, result)
        except BaseException:
            self._drop((channel,))
            raise
        self._reply(reply)
        self._activate(channel, result)
        await self._announce(channel)

    async def _unsubscribe(self, cmd_id: int, req: ChannelRequest) -> None:
        state = self._sub_pop(req.channel)
        co = self._leave(req.channel, state) if state is not None else None
        self._reply(self.codec.encode_empty_result(cmd_id, Method.UNSUBSCRIBE))
        if co is not None:
            self._flush()
            await co

    async def _publish(self, cmd_id: int, req: PublishRequest) -> None:
        channel = req.channel
        opts = self._options(channel)
        if not self._allowed(
            channel,
            opts,
            opts.allow_publish_for_client,
            opts.allow_publish_for_subscriber,
            opts.allow_publish_for_anonymous,
        ):
            raise error(ERROR_PERMISSION_DENIED)
        if not req.data:
            raise error(ERROR_BAD_REQUEST)
        json_data = req.data if self.codec is JSON_CODEC else json_value(req.data)
        self._flush()  # our earlier replies go before the publication reaches us
        await self._node.hub.publish(
            channel, req.data, json_data=json_data, info=self.client_info(channel)
        )
        self._reply(self.codec.encode_empty_result(cmd_id, Method.PUBLISH))

    def _presence_options(self, channel: str) -> ChannelOptions:
        opts = self._options(channel)
        if not opts.presence:
            raise error(ERROR_NOT_AVAILABLE)
        if not self._allowed(
            channel,
            opts,
            opts.allow_presence_for_client,
            opts.allow_presence_for_subscriber,
            opts.allow_presence_for_anonymous,
        ):
            raise error(ERROR_PERMISSION_DENIED)
        return opts

    async def _presence(self, cmd_id: int, req: ChannelRequest) -> None:
        self._presence_options(req.channel)
        presence = await self._node.broker.presence(req.channel)
        self._reply(self.codec.encode_presence(cmd_id, presence))

    async def _presence_stats(self, cmd_id: int, req: ChannelRequest) -> None:
        self._presence_options(req.channel)
        clients, users = await self._node.broker.presence_stats(req.channel)
        self._reply(self.codec.encode_presence_stats(cmd_id, clients, users))

    async def _history(self, cmd_id: int, req: HistoryRequest) -> None:
        channel = req.channel
        opts = self._options(channel)
        if not opts.history_enabled:
            raise error(ERROR_NOT_AVAILABLE)
        if not self._allowed(
            channel,
            opts,
            opts.allow_history_for_client,
            opts.allow_history_for_subscriber,
            opts.allow_history_for_anonymous,
        ):
            raise error(ERROR_PERMISSION_DENIED)
        cap = self._node.config.history_max_publications_per_request
        limit = req.limit
        if limit < 0 or limit > cap:
            limit = cap
        since = (req.since.offset, req.since.epoch) if req.since is not None else None
        try:
            res = await self._node.broker.history(
                channel,
                history_size=opts.history_size,
                history_ttl_s=opts.history_ttl_s,
                limit=limit,
                since=since,
                reverse=req.reverse,
            )
        except Unrecoverable:
            raise error(ERROR_UNRECOVERABLE_POSITION) from None
        self._reply(self.codec.encode_history(cmd_id, res.publications, res.epoch, res.offset))

    async def _rpc(self, cmd_id: int, req: RPCRequest) -> None:
        handler = self._node.rpc_handler
        if handler is None:
            raise error(ERROR_NOT_AVAILABLE)
        res = handler(self, req.method, req.data)
        if res is not req.data and isawaitable(res):
            res = await res
        if self._flags & _CLOSED:
            return
        self._reply(self._encode_rpc(cmd_id, self._rpc_data(res, req.data)))

    async def _send(self, cmd_id: int, req: SendRequest) -> None:
        handler = self._node.send_handler
        if handler is None:
            raise DisconnectError(DISCONNECT_NOT_AVAILABLE)
        res = handler(self, req.data)
        if isawaitable(res):
            await res

    async def _refresh(self, cmd_id: int, req: RefreshRequest) -> None:
        if not req.token:
            raise DisconnectError(DISCONNECT_BAD_REQUEST)
        cfg = self._node.config
        try:
            tok = verify_connect_token(
                req.token, cfg.token_hmac_secret, self._node.clock(), cfg.token_leeway_s
            )
        except TokenExpired:
            raise error(ERROR_TOKEN_EXPIRED) from None
        except InvalidToken:
            raise DisconnectError(DISCONNECT_INVALID_TOKEN) from None
        if tok.user != self._user:
            raise DisconnectError(DISCONNECT_INVALID_TOKEN)
        self._exp = tok.exp
        if tok.info is not None:
            self._conn_info = tok.info
        expires = bool(tok.exp)
        ttl = self._ttl(tok.exp) if expires else 0
        self._reply(
            self.codec.encode_refresh(cmd_id, self._client or "", self._node.version, expires, ttl)
        )

    async def _sub_refresh(self, cmd_id: int, req: SubRefreshRequest) -> None:
        if not req.channel or not req.token:
            raise DisconnectError(DISCONNECT_BAD_REQUEST)
        state = self._sub_state(req.channel)
        if state is None:
            raise error(ERROR_PERMISSION_DENIED)
        exp, chan_info = self._verify_sub_token(req.token, req.channel)
        if chan_info is None and isinstance(state, SubState):
            chan_info = state.chan_info
        flags = _sub_flags(state)
        self._sub_put(req.channel, SubState(flags, exp, chan_info) if exp or chan_info else flags)
        if exp:
            self._flags |= _EXPIRING_SUBS
        expires = bool(exp)
        self._reply(
            self.codec.encode_sub_refresh(cmd_id, expires, self._ttl(exp) if expires else 0)
        )

    async def _ping(self, cmd_id: int, req: Any) -> None:
        self._reply(self.codec.encode_empty_result(cmd_id, Method.PING))


# Enum attribute access is slow on the hot path: module-level aliases and a dispatch table.
_CONNECT = Method.CONNECT
_RPC = Method.RPC
_SEND = Method.SEND
_HANDLERS: dict[Method, Callable[[ClientSession, int, Any], Coroutine[Any, Any, None]]] = {
    Method.CONNECT: ClientSession._connect,
    Method.SUBSCRIBE: ClientSession._subscribe,
    Method.UNSUBSCRIBE: ClientSession._unsubscribe,
    Method.PUBLISH: ClientSession._publish,
    Method.PRESENCE: ClientSession._presence,
    Method.PRESENCE_STATS: ClientSession._presence_stats,
    Method.HISTORY: ClientSession._history,
    Method.PING: ClientSession._ping,
    Method.SEND: ClientSession._send,
    Method.RPC: ClientSession._rpc,
    Method.REFRESH: ClientSession._refresh,
    Method.SUB_REFRESH: ClientSession._sub_refresh,
}
