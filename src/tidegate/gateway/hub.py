"""The hub: which sessions of this worker are subscribed to which channel, and fan-out.

Fan-out encodes each push **once per format** - one JSON ``bytes`` and one protobuf ``bytes``,
each made lazily on the first subscriber of that format - and hands the same object to every
subscriber's ``transport.write``. Nothing is encoded per subscriber. The writes of one
publication are consecutive calls with the same object, and server-to-client WebSocket frames
are unmasked, so a transport can frame once too: remember the last payload object and its
framed bytes and reuse them while ``data is last_payload``.

The hub is the broker's :class:`~tidegate.gateway.broker.BrokerEventHandler`: publishing goes
through the broker (history, cross-node delivery) and comes back here to be delivered.

Subscribing is not atomic with a broker that is not inline: between reading the stream position
(recovery or positioning) and the subscribe reply, publications keep arriving. A subscribing
session is therefore registered first as *pending* (:meth:`Hub.add_pending`): it counts as a
subscriber, but publications for it are appended to a buffer of its own instead of being
written, until the session writes its reply and calls :meth:`Hub.activate`, which hands the
buffer over (the session drops what its reply already covers and writes the rest). Buffers
exist only while a subscribe is in flight; an idle hub keeps ``_pending`` empty, and fan-out
pays one truth test of it per publication.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from tidegate.gateway.broker import Broker
from tidegate.gateway.codec_json import JSON_CODEC, NotJSON, json_value
from tidegate.gateway.codec_protobuf import PROTOBUF_CODEC
from tidegate.gateway.codes import (
    DISCONNECT_FORCE_NO_RECONNECT,
    DISCONNECT_INAPPROPRIATE_PROTOCOL,
    Disconnect,
)
from tidegate.gateway.config import GatewayConfig
from tidegate.gateway.messages import ClientInfo, Publication
from tidegate.observe.histogram import Histogram

if TYPE_CHECKING:
    from tidegate.gateway.session import ClientSession

__all__ = ["Hub"]

_UNSET: bytes = b"\x00unset"


class Hub:
    __slots__ = (
        "config", "broker", "_subs", "_jl", "_users", "_pending", "fanout_writes",
        "delivery_latency",
    )

    def __init__(self, config: GatewayConfig, broker: Broker) -> None:
        self.config = config
        self.broker = broker
        self._subs: dict[str, set[ClientSession]] = {}
        # subscribers that receive join/leave pushes, only for channels that have some
        self._jl: dict[str, set[ClientSession]] = {}
        # user -> its session, or a set when it has several (anonymous users are not indexed)
        self._users: dict[str, ClientSession | set[ClientSession]] = {}
        # channel -> {subscribing session: publications buffered for it}; empty when idle.
        # A buffer grows to client_queue_max_messages + 1 at most (the +1 says "overflowed").
        self._pending: dict[str, dict[ClientSession, list[Publication]]] = {}
        self.fanout_writes = 0
        self.delivery_latency = Histogram()
        broker.register(self)

    # ---- registry ---------------------------------------------------------------------
    def add_subscriber(self, channel: str, session: ClientSession, join_leave: bool) -> bool:
        """Add; returns True when this is the channel's first local subscriber."""
        subs = self._subs.get(channel)
        first = subs is None
        if subs is None:
            subs = self._subs[channel] = set()
        subs.add(session)
        if join_leave:
            jl = self._jl.get(channel)
            if jl is None:
                jl = self._jl[channel] = set()
            jl.add(session)
        return first

    def add_pending(self, channel: str, session: ClientSession) -> bool:
        """Register a session that is still subscribing: it counts as a subscriber, but
        publications for it are buffered until :meth:`activate` (or dropped by
        :meth:`remove_subscriber`). Returns True when it is the channel's first local one."""
        pend = self._pending.get(channel)
        if pend is None:
            pend = self._pending[channel] = {}
        pend[session] = []
        return self.add_subscriber(channel, session, False)

    def activate(
        self, channel: str, session: ClientSession, join_leave: bool
    ) -> list[Publication] | None:
        """End the pending state: from now on publications are written to the session. Returns
        what was buffered meanwhile, in arrival order (None: the session was not pending)."""
        pend = self._pending.get(channel)
        if pend is None:
            return None
        buf = pend.pop(session, None)
        if buf is None:
            return None
        if not pend:
            del self._pending[channel]
        if join_leave:
            jl = self._jl.get(channel)
            if jl is None:
                jl = self._jl[channel] = set()
            jl.add(session)
        return buf

    def subscribing(self, channel: str, session: ClientSession) -> bool:
        """``session`` is pending on ``channel`` (its subscribe is in flight)."""
        if not self._pending:
            return False
        pend = self._pending.get(channel)
        return pend is not None and session in pend

    def num_pending(self) -> int:
        """Subscribes in flight (pending subscribers, all channels)."""
        return sum(len(p) for p in self._pending.values())

    def remove_subscriber(self, channel: str, session: ClientSession) -> bool:
        """Remove (pending or not: a pending one's buffer is dropped); returns True when the
        channel has no local subscriber left."""
        if self._pending:
            pend = self._pending.get(channel)
            if pend is not None:
                pend.pop(session, None)
                if not pend:
                    del self._pending[channel]
        jl = self._jl.get(channel)
        if jl is not None:
            jl.discard(session)
            if not jl:
                del self._jl[channel]
        subs = self._subs.get(channel)
        if subs is None:
            return False
        subs.discard(session)
        if subs:
            return False
        del self._subs[channel]
        return True

    def subscribers(self, channel: str) -> frozenset[ClientSession]:
        return frozenset(self._subs.get(channel, ()))

    def num_subscribers(self, channel: str) -> int:
        subs = self._subs.get(channel)
        return len(subs) if subs else 0

    def num_channels(self) -> int:
        return len(self._subs)

    def add_session(self, session: ClientSession) -> None:
        user = session.user
        if not user:
            return
        cur = self._users.get(user)
        if cur is None:
            self._users[user] = session
        elif isinstance(cur, set):
            cur.add(session)
        elif cur is not session:
            self._users[user] = {cur, session}

    def remove_session(self, session: ClientSession) -> None:
        user = session.user
        if not user:
            return
        cur = self._users.get(user)
        if cur is session:
            del self._users[user]
        elif isinstance(cur, set):
            cur.discard(session)
            if len(cur) == 1:
                self._users[user] = next(iter(cur))

    def user_sessions(self, user: str) -> list[ClientSession]:
        cur = self._users.get(user)
        if cur is None:
            return []
        return list(cur) if isinstance(cur, set) else [cur]

    def num_users(self) -> int:
        return len(self._users)

    # ---- server API helpers -----------------------------------------------------------
    def disconnect_user(self, user: str, d: Disconnect = DISCONNECT_FORCE_NO_RECONNECT) -> int:
        """Disconnect every session of ``user`` in this worker; returns how many."""
        sessions = self.user_sessions(user)
        for s in sessions:
            s.disconnect(d)
        return len(sessions)

    def unsubscribe_user(self, user: str, channel: str) -> int:
        """Server-side unsubscribe of ``user``'s sessions from ``channel`` (push code 2000)."""
        return sum(1 for s in self.user_sessions(user) if s.unsubscribe(channel))

    # ---- publishing -------------------------------------------------------------------
    async def publish(
        self,
        channel: str,
        data: bytes,
        *,
        info: ClientInfo | None = None,
        tags: dict[str, str] | None = None,
        json_data: bytes | None = _UNSET,
    ) -> Publication:
        """Publish to ``channel`` (history per its namespace options) and fan out everywhere.

        ``json_data``: the payload as a JSON value when the caller already knows it (a JSON
        client's publish); by default it is derived from ``data`` once here (None if binary).
        """
        if json_data is _UNSET:
            json_data = json_value(data)
        opts = self.config.channel_options(channel)
        size, ttl = (opts.history_size, opts.history_ttl_s) if opts is not None else (0, 0.0)
        return await self.broker.publish(
            channel, data, json_data, info=info, tags=tags, history_size=size, history_ttl_s=ttl
        )

    # ---- BrokerEventHandler -----------------------------------------------------------
    def handle_publication(self, channel: str, pub: Publication) -> None:
        subs = self._subs.get(channel)
        if not subs:
            return
        if self._pending:  # some subscribe is in flight (rare): buffer for its session
            subs = self._buffer_pending(channel, pub, subs)
            if not subs:
                return
        jbytes: bytes | None = None
        pbytes: bytes | None = None
        not_json = False
        for s in tuple(subs):  # a write may close a session, which leaves the set
            if s.codec is JSON_CODEC:
                if jbytes is None and not not_json:
                    try:
                        jbytes = JSON_CODEC.encode_publication(channel, pub)
                    except NotJSON:
                        not_json = True
                if jbytes is None:
                    s.disconnect(DISCONNECT_INAPPROPRIATE_PROTOCOL)
                    continue
                s.transport.write(jbytes)
            else:
                if pbytes is None:
                    pbytes = PROTOBUF_CODEC.encode_publication(channel, pub)
                s.transport.write(pbytes)
        self.fanout_writes += len(subs)
        if pub.time_ms:  # publish accepted -> written to every local subscriber's socket
            self.delivery_latency.observe_n(time.time() - pub.time_ms / 1000, len(subs))

    def _buffer_pending(
        self, channel: str, pub: Publication, subs: set[ClientSession]
    ) -> set[ClientSession]:
        """Append ``pub`` to the buffers of the channel's pending subscribers; returns the
        subscribers to write it to."""
        pend = self._pending.get(channel)
        if pend is None:
            return subs
        cap = self.config.client_queue_max_messages
        for buf in pend.values():
            if len(buf) <= cap:
                buf.append(pub)
        return subs.difference(pend)

    def _push_info(self, channel: str, info: ClientInfo, leave: bool) -> None:
        subs = self._jl.get(channel)
        if not subs:
            return
        jbytes: bytes | None = None
        pbytes: bytes | None = None
        for s in tuple(subs):
            if s.codec is JSON_CODEC:
                if jbytes is None:
                    enc = JSON_CODEC.encode_leave if leave else JSON_CODEC.encode_join
                    jbytes = enc(channel, info)
                s.transport.write(jbytes)
            else:
                if pbytes is None:
                    penc = PROTOBUF_CODEC.encode_leave if leave else PROTOBUF_CODEC.encode_join
                    pbytes = penc(channel, info)
                s.transport.write(pbytes)

    def handle_join(self, channel: str, info: ClientInfo) -> None:
        self._push_info(channel, info, leave=False)

    def handle_leave(self, channel: str, info: ClientInfo) -> None:
        self._push_info(channel, info, leave=True)
