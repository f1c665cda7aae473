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

Chunked fan-out: with a run queue (:meth:`Hub.use_runqueue`, the worker's), a publication to
a channel with more than ``chunk_min`` local subscribers is not written in one go - at 18k
subscribers that is ~0.4 s in which the loop does not turn - but by a run-queue job, 16 writes
a step, the loop turning every ``slice_ms``. What a subscriber sees is what the inline path
would give it, only later:

- the subscribers are a snapshot taken when the publication arrives (pending ones have it
  buffered then, as inline), so a session that subscribes while the job runs neither misses
  it (it was buffered, or it came before the session's position) nor gets it twice; a
  backlog of publications shares one snapshot while nobody joins or leaves;
- one job per channel delivers that channel's publications (and join/leave pushes) in
  arrival order: a publication arriving while an earlier one is still being written queues
  behind it, even if the channel has shrunk below ``chunk_min`` meanwhile;
- a session that unsubscribes or closes meanwhile gets no more writes from the publications
  queued before (``remove_subscriber`` marks it gone in each of them; closed sessions are
  skipped at write time), also if it subscribes again before the job reaches it.

Channels up to ``chunk_min`` subscribers (every chat room) keep the inline loop: no snapshot,
no job, one dict truth test more per publication.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

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
    from tidegate.engine.runqueue import JobHandle, RunQueue
    from tidegate.gateway.session import ClientSession

__all__ = ["CHUNK_MIN_SUBSCRIBERS", "FANOUT_STEP", "Hub"]

_UNSET: bytes = b"\x00unset"
# A publication to more local subscribers than this goes through the run queue.
CHUNK_MIN_SUBSCRIBERS = 256
# Writes per step of a chunked fan-out (~0.4 ms here): the run queue's unit of work.
FANOUT_STEP = 16
_PUB, _JOIN, _LEAVE = 0, 1, 2


class _Push:
    """One publication (or join/leave) queued for a chunked fan-out."""

    __slots__ = ("kind", "obj", "subs", "gone")

    def __init__(self, kind: int, obj: Publication | ClientInfo, subs: tuple[ClientSession, ...]):
        self.kind = kind
        self.obj = obj
        self.subs = subs  # who gets it: the subscribers when it arrived
        self.gone: set[ClientSession] = set()  # of those, who left the channel since


class _Fanout:
    """A channel's chunked fan-out in progress: its queue of pushes, delivered by one job."""

    __slots__ = ("queue", "job", "snap")

    def __init__(self) -> None:
        self.queue: collections.deque[_Push] = collections.deque()
        self.job: JobHandle | None = None
        # The last publication's subscribers while nobody joined or left since: the next one
        # shares the tuple (a backlog of publications costs one snapshot, not one each).
        self.snap: tuple[ClientSession, ...] | None = None


class _Frames:
    """One push's bytes, encoded at most once per codec, on the first subscriber that needs
    them, then the same bytes written to every subscriber of that codec."""

    __slots__ = ("kind", "channel", "obj", "json", "proto", "not_json")

    def __init__(self, kind: int, channel: str, obj: Publication | ClientInfo) -> None:
        self.kind = kind
        self.channel = channel
        self.obj = obj
        self.json: bytes | None = None
        self.proto: bytes | None = None
        self.not_json = False  # a binary publication: JSON subscribers cannot take it

    def write(self, s: ClientSession) -> bool:
        """Write to ``s``; False when it could not take the push (and was disconnected)."""
        if s.codec is JSON_CODEC:
            data = self.json
            if data is None:
                if not self.not_json:
                    try:
                        data = self.json = self._encode(JSON_CODEC)
                    except NotJSON:
                        self.not_json = True
                if data is None:
                    s.disconnect(DISCONNECT_INAPPROPRIATE_PROTOCOL)
                    return False
        else:
            data = self.proto
            if data is None:
                data = self.proto = self._encode(PROTOBUF_CODEC)
        s.transport.write(data)
        return True

    def _encode(self, codec: Any) -> bytes:
        out: bytes
        if self.kind == _PUB:
            out = codec.encode_publication(self.channel, self.obj)
        elif self.kind == _JOIN:
            out = codec.encode_join(self.channel, self.obj)
        else:
            out = codec.encode_leave(self.channel, self.obj)
        return out


class Hub:
    __slots__ = (
        "config", "broker", "_subs", "_jl", "_users", "_pending", "fanout_writes",
        "delivery_latency", "runqueue", "chunk_min", "_fanouts", "chunked_fanouts",
        "_tops", "_epochs",
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
        # Chunked fan-out (use_runqueue): off until a worker hands its run queue over.
        self.runqueue: RunQueue | None = None
        self.chunk_min = CHUNK_MIN_SUBSCRIBERS
        self._fanouts: dict[str, _Fanout] = {}  # channels with a chunked fan-out in progress
        self.chunked_fanouts = 0  # publications delivered by a run-queue job
        # Stream positions this worker's subscribers are at (work stealing: a session that
        # moves to another worker resumes from here, gateway/migration.py). Per channel, not
        # per subscriber: the newest offset written here, and the stream's epoch when a
        # positioned subscribe told us. Dropped with the channel's last local subscriber.
        self._tops: dict[str, int] = {}
        self._epochs: dict[str, str] = {}
        broker.register(self)

    def use_runqueue(self, rq: RunQueue | None, chunk_min: int = CHUNK_MIN_SUBSCRIBERS) -> None:
        """Deliver publications to more than ``chunk_min`` local subscribers through ``rq``
        (None, or a queue with slicing off: always inline)."""
        self.runqueue = rq if rq is not None and rq.enabled else None
        self.chunk_min = max(0, chunk_min)

    # ---- registry ---------------------------------------------------------------------
    def add_subscriber(self, channel: str, session: ClientSession, join_leave: bool) -> bool:
        """Add; returns True when this is the channel's first local subscriber."""
        if self._fanouts:
            fan = self._fanouts.get(channel)
            if fan is not None:
                fan.snap = None
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
        """Register a session that is still subscribing (or arriving from another worker:
        gateway/session.py, ``restore``): it counts as a subscriber, but publications for it
        are buffered until :meth:`activate` (or dropped by :meth:`remove_subscriber`).
        Returns True when it is the channel's first local one."""
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

    def add_join_leave(self, channel: str, session: ClientSession) -> None:
        """Send ``session`` join/leave pushes of ``channel`` from now on, while its
        publications may still be pending (a session that moved: gateway/session.py)."""
        jl = self._jl.get(channel)
        if jl is None:
            jl = self._jl[channel] = set()
        jl.add(session)

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
        if self._fanouts:
            fan = self._fanouts.get(channel)
            if fan is not None:  # no writes from what was published before it left
                fan.snap = None
                for push in fan.queue:
                    push.gone.add(session)
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
        if self._tops:
            self._tops.pop(channel, None)
        if self._epochs:
            self._epochs.pop(channel, None)
        return True

    # ---- stream positions (work stealing, gateway/migration.py) ---------------------------
    def note_position(self, channel: str, epoch: str, offset: int) -> None:
        """A positioned subscribe (or a resync) learned the stream's ``(offset, epoch)``. The
        offset is kept only when none is known yet (or the epoch changed): publications still
        on their way here must not be skipped by a session that moves."""
        if not epoch:
            return
        if self._epochs.get(channel) != epoch:
            self._epochs[channel] = epoch
            self._tops[channel] = offset
        elif channel not in self._tops:
            self._tops[channel] = offset

    def position(self, channel: str) -> tuple[int, str] | None:
        """``(offset, epoch)`` of the newest publication written to the channel's subscribers
        here (epoch "" when no positioned subscribe told it); None: no position known."""
        top = self._tops.get(channel)
        if top is None:
            return None
        return top, self._epochs.get(channel, "")

    def migration_blocked(self, session: ClientSession, channels: list[str]) -> bool:
        """``session`` cannot move now: it is subscribing somewhere (a reply or a buffer is on
        its way), or one of its channels has a chunked fan-out in progress (queued writes)."""
        if self._pending:
            for pend in self._pending.values():
                if session in pend:
                    return True
        if self._fanouts:
            for channel in channels:
                if channel in self._fanouts:
                    return True
        return False

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
        if pub.offset:
            self._tops[channel] = pub.offset
        if self._pending:  # some subscribe is in flight (rare): buffer for its session
            subs = self._buffer_pending(channel, pub, subs)
            if not subs:
                return
        if self._chunked(channel, len(subs)):
            self._enqueue_publication(channel, pub, subs)
            return
        frames = _Frames(_PUB, channel, pub)
        for s in tuple(subs):  # a write may close a session, which leaves the set
            frames.write(s)
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
        if self._chunked(channel, len(subs)):
            self._enqueue(channel, _Push(_LEAVE if leave else _JOIN, info, tuple(subs)))
            return
        frames = _Frames(_LEAVE if leave else _JOIN, channel, info)
        for s in tuple(subs):
            frames.write(s)

    # ---- chunked fan-out (see the module doc) -------------------------------------------
    def _chunked(self, channel: str, n: int) -> bool:
        """Deliver through the run queue: a big channel, or one whose earlier pushes are
        still queued there (they go first)."""
        if self._fanouts and channel in self._fanouts:
            return True
        return n > self.chunk_min and self.runqueue is not None

    def _enqueue_publication(
        self, channel: str, pub: Publication, subs: set[ClientSession]
    ) -> None:
        live = subs is self._subs.get(channel)  # (not: the subscribers minus pending ones)
        fan = self._fanouts.get(channel)
        snap = fan.snap if live and fan is not None else None
        if snap is None:
            snap = tuple(subs)
        self._enqueue(channel, _Push(_PUB, pub, snap))
        if live:
            self._fanouts[channel].snap = snap

    def _enqueue(self, channel: str, push: _Push) -> None:
        fan = self._fanouts.get(channel)
        if fan is None:
            rq = self.runqueue
            assert rq is not None  # (_chunked: no fan-out in progress needs a run queue)
            fan = self._fanouts[channel] = _Fanout()
            fan.queue.append(push)
            fan.job = rq.submit(self._fanout_job(channel, fan), "fanout")
            return
        fan.queue.append(push)

    def _fanout_job(self, channel: str, fan: _Fanout) -> Iterator[None]:
        """The run-queue job of one channel: its queued pushes in order, FANOUT_STEP writes a
        step. Ends when the queue is empty (a later push starts a new job)."""
        queue = fan.queue
        try:
            while queue:
                yield from self._deliver(channel, queue[0])
                queue.popleft()
        finally:
            if self._fanouts.get(channel) is fan:
                del self._fanouts[channel]

    def _deliver(self, channel: str, push: _Push) -> Iterator[None]:
        subs, gone = push.subs, push.gone
        pub = push.obj if isinstance(push.obj, Publication) else None
        if pub is not None:
            self.chunked_fanouts += 1
        frames = _Frames(push.kind, channel, push.obj)
        for i in range(0, len(subs), FANOUT_STEP):
            written = 0
            for s in subs[i : i + FANOUT_STEP]:
                if s.closed or s in gone:  # left (or closed) since this was published
                    continue
                written += frames.write(s)
            if pub is not None:
                self.fanout_writes += written
                if pub.time_ms and written:
                    self.delivery_latency.observe_n(time.time() - pub.time_ms / 1000, written)
            yield

    def handle_join(self, channel: str, info: ClientInfo) -> None:
        self._push_info(channel, info, leave=False)

    def handle_leave(self, channel: str, info: ClientInfo) -> None:
        self._push_info(channel, info, leave=True)
