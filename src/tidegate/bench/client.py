"""The bench's client worker process: one event loop holding thousands of connections.

The runner starts ``python -m tidegate.bench.client CONFIG_JSON`` once per client process. Each
process binds its own source addresses (127.0.0.2, 127.0.0.3, ...) so that the ~28k ephemeral
ports per (source, destination) pair never run out, and keeps its connections lean:

* one ``asyncio.Protocol`` with ``__slots__`` per connection, no task and no timer per connection;
* heartbeats come from one periodic callback (:class:`PingWheel`), a timing wheel whose buckets
  each hold an equal share of the connections: each tick pings one bucket, so every connection
  pings once per interval and the pings are spread evenly over it;
* connects are done by at most ``max_inflight`` coroutines at a time.

The runner talks to the process over pipes. Commands arrive on stdin, one word a line:
``go`` (start connecting), ``halt`` (stop connecting), ``hold`` (every client is connected: the
pings sent from now on are the hold phase's), ``subscribed`` (a broadcast is about to start:
answer with a ``subscribed`` line saying how many connections are up), ``close`` (end the hold:
close everything, report, exit). End of stdin means the runner is gone: close and exit. The process writes JSON
lines on stdout: ``ready``, then ``progress`` every ``progress_interval_s``, ``connected`` when
its connects are done, and ``final`` with its counters and histograms.

Protocols plug in through :class:`ClientDriver` (``PROTOCOLS``): a driver turns a connected socket
into a :class:`ClientConnection` (handshake included); the wheel and the runner only ever call
``ping``/``close`` and read the shared :class:`Stats`. ``raw`` speaks
:mod:`tidegate.protocol.heartbeat` frames; it sends a first ping (the "hello") as soon as the TCP
connect completes, and with ``established_on="pong"`` (the default) the connect counts only once
the server's app answered it. ``ws`` speaks the gateway's WebSocket JSON client protocol (v2):
HTTP upgrade, ``connect`` with a token, ``subscribe`` to one channel (established = the subscribe
reply arrived), then heartbeats with the protocol's own ``ping`` command, answering the server's
pings (``{}``) and counting the publications of a broadcast (:class:`Deliveries`).
"""

from __future__ import annotations

import asyncio
import base64
import errno
import gc
import hashlib
import json
import os
import resource
import select
import signal
import socket
import struct
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from tidegate.bench.guard import die_with_parent
from tidegate.bench.histogram import Histogram
from tidegate.protocol.heartbeat import DATA, PING, PONG

LINGER_ZERO = struct.pack("ii", 1, 0)
MAX_FRAME_BYTES = 1 << 20
HELLO_HEADER = b"\x00\x00\x00\x09\x01"  # a PING frame's length and type; the 8-byte token follows
WATCHDOG_INTERVAL_S = 0.5

# Connection states.
PENDING = 3  # connected, not yet counted as established (the connect may still time out)
OPEN = 0
CLOSING = 1  # closed by us: whatever follows is expected
CLOSED = 2


def close_transport(transport: asyncio.BaseTransport, rst: bool) -> None:
    """Close; with ``rst`` set SO_LINGER 0 first, so the close sends RST and leaves no TIME_WAIT
    (set at close rather than at connect: one syscall less on the connect path)."""
    if rst:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
            except OSError:
                pass
    transport.close()


@dataclass
class ClientConfig:
    index: int
    host: str
    port: int
    sources: list[str]
    connections: int
    parent_pid: int = 0
    protocol: str = "raw"
    max_inflight: int = 500
    ping_interval_s: float = 25.0
    pong_timeout_s: float = 10.0
    connect_timeout_s: float = 15.0
    # A connect that fails (times out, is refused...) is tried again this many times before it
    # counts as failed, as an SDK reconnects; each retry is counted by its reason.
    connect_retries: int = 0
    close_mode: str = "rst"  # "rst": SO_LINGER 0 (no TIME_WAIT); "fin": orderly shutdown
    # A first ping ("hello") sent as soon as the TCP connect completes: its PONG says the
    # server's app holds the connection (counted as confirmed), and the server sees the client
    # speak at once rather than a full ping interval later.
    hello: bool = True
    # When a connect counts as established: "pong": the hello was answered (the server's app
    # has it); "tcp": the TCP handshake completed (the kernel may still hold the connection in
    # the listener's accept queue).
    established_on: str = "pong"
    close_timeout_s: float = 30.0
    progress_interval_s: float = 0.25
    lifetime_s: float = 3600.0
    loop: str = "uvloop"  # "epoll" (raw only: tidegate.bench.epoll_client), "uvloop", "asyncio"
    # Heartbeats go out in bursts, one bucket every tick: at 500k connections a fine tick
    # (50 ms) wakes every server worker for one or two pings at a time, and the context
    # switches cost more than the pings. 0.5 s lets each wakeup answer a batch.
    tick_s: float = 0.5
    tick_phase: float = 0.0  # this process's offset into the tick, a share of it (index/count)
    # ws: the channel every connection subscribes to, the path of the WebSocket endpoint, and
    # how many publications of a broadcast to count (seq 0..broadcast_count-1). The connect
    # token comes in the environment (TOKEN_ENV), not on the command line.
    channel: str = "bench"
    ws_path: str = "/connection/websocket"
    broadcast_count: int = 0
    # Added to the process's nice value and its session's at start (runner --client-nice): the
    # clients then take the cores only when the server's workers leave them, as if they ran
    # on other machines.
    nice: int = 0
    # SCHED_BATCH (runner --client-sched batch): a client woken by the server's write does not
    # preempt the worker that wrote, as a client on another machine could not.
    sched_batch: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


TOKEN_ENV = "TIDEGATE_BENCH_TOKEN"


class Stats:
    """The counters every connection of this process adds to (one instance per process)."""

    __slots__ = (
        "attempted",
        "established",
        "failed",
        "open",
        "unexpected_closes",
        "unexpected_close_reasons",
        "errors",
        "retried",
        "pings_sent",
        "pongs",
        "missed",
        "late_pongs",
        "outstanding",
        "server_pings",
        "data_frames",
        "protocol_errors",
        "hold_since_ns",
        "window_rtt_max_us",
        "rtt_connect_phase_us",
        "rtt_hold_us",
        "hello_sent",
        "confirmed",
        "last_confirmed_ns",
        "hello_rtt_us",
        "connect_us",
        "first_established_ns",
        "last_established_ns",
        "closes_expected",
        "server_closes",
        "progress_dropped",
    )

    def __init__(self) -> None:
        self.attempted = 0
        self.established = 0
        self.failed = 0
        self.open = 0
        self.unexpected_closes = 0
        self.unexpected_close_reasons: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.retried: dict[str, int] = {}  # connect attempts tried again, by why they failed
        self.pings_sent = 0
        self.pongs = 0
        self.missed = 0
        self.late_pongs = 0
        self.outstanding = 0
        self.server_pings = 0
        self.data_frames = 0
        self.protocol_errors = 0
        # RTT samples are filed by the phase their ping was sent in: before or after the
        # runner's ``hold`` command (every client connected), so the report can tell the
        # connect storm from the steady state.
        self.rtt_connect_phase_us = Histogram()
        self.rtt_hold_us = Histogram()
        self.hold_since_ns = 1 << 63
        self.hello_sent = 0
        self.confirmed = 0  # connections whose hello the server answered
        self.last_confirmed_ns = 0
        self.hello_rtt_us = Histogram()
        self.window_rtt_max_us = 0  # the largest hold-phase RTT since the last progress line
        self.connect_us = Histogram()
        self.first_established_ns = 0
        self.last_established_ns = 0
        # After the runner's "expect_close" (the server is draining): closes by the server are
        # its goodbyes, counted in server_closes, not failures.
        self.closes_expected = False
        self.server_closes = 0
        self.progress_dropped = 0  # progress lines not sent: the runner's pipe was full

    def error(self, reason: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1

    def connect_failed(self, reason: str, tries: int, retries: int) -> bool:
        """An attempt failed for ``reason`` after ``tries`` earlier ones: True if it is to be
        tried again (counted in ``retried``), else it counts as a failed connect."""
        if tries < retries:
            self.retried[reason] = self.retried.get(reason, 0) + 1
            return True
        self.failed += 1
        self.error(reason)
        return False

    def pong(self, sent_ns: int, now_ns: int = 0) -> None:
        """The answer to our ping sent at ``sent_ns`` (received at ``now_ns``, default now):
        one RTT sample, in its phase."""
        rtt_us = ((now_ns or time.monotonic_ns()) - sent_ns) // 1000
        if sent_ns >= self.hold_since_ns:
            self.rtt_hold_us.record(rtt_us)
            if rtt_us > self.window_rtt_max_us:
                self.window_rtt_max_us = rtt_us
        else:
            self.rtt_connect_phase_us.record(rtt_us)
        self.pongs += 1
        self.outstanding -= 1

    def gone(self, reason: str | None, ping_outstanding: bool) -> None:
        """An open connection ended; ``reason`` when the server (or the network) ended it,
        None when we closed it; ``ping_outstanding``: our ping on it was never answered."""
        self.open -= 1
        if ping_outstanding:
            self.outstanding -= 1
        if self.closes_expected:
            if reason is not None:
                self.server_closes += 1
            return
        if reason is not None:
            self.unexpected_close(reason)
        if ping_outstanding:
            self.missed += 1  # the connection went before answering: it never will

    def unexpected_close(self, reason: str) -> None:
        self.unexpected_closes += 1
        reasons = self.unexpected_close_reasons
        reasons[reason] = reasons.get(reason, 0) + 1

    def progress(self) -> dict[str, int]:
        return {
            "attempted": self.attempted,
            "established": self.established,
            "failed": self.failed,
            "open": self.open,
            "unexpected_closes": self.unexpected_closes,
            "pings_sent": self.pings_sent,
            "pongs": self.pongs,
            "missed": self.missed,
            "outstanding": self.outstanding,
            "server_pings": self.server_pings,
            "confirmed": self.confirmed,
            "server_closes": self.server_closes,
        }


class HandshakeError(OSError):
    """A connect refused above TCP (an HTTP status, an error reply, a close frame)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def error_reason(exc: BaseException) -> str:
    """A short label for a failed connect: ``timeout``, ``ECONNREFUSED``, ``EADDRNOTAVAIL``..."""
    if isinstance(exc, HandshakeError):
        return exc.reason
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, f"errno_{exc.errno}")
    return type(exc).__name__


def walk_frames(data: bytes) -> tuple[list[tuple[int, int, int]], int]:
    """The whole heartbeat frames at the start of ``data``: ``(type, body_start, body_end)``
    each, and how many bytes they take (the rest is an incomplete frame). ValueError on a length
    of 0 or above MAX_FRAME_BYTES."""
    frames = []
    pos = 0
    end_all = len(data)
    while end_all - pos >= 5:
        size = int.from_bytes(data[pos : pos + 4], "big")
        if size == 0 or size > MAX_FRAME_BYTES:
            raise ValueError(f"bad frame length {size}")
        end = pos + 4 + size
        if end > end_all:
            break
        frames.append((data[pos + 4], pos + 5, end))
        pos = end
    return frames, pos


class ClientConnection(typing.Protocol):
    """What the wheel and the process need from a connection, whatever its protocol.

    Implementations are ``asyncio.Protocol`` subclasses with ``__slots__`` holding at least
    ``ping_sent`` (the token of the unanswered ping, 0 when none) and ``state``. A connection
    starts PENDING; the client process makes it OPEN (and counts it in ``Stats.open``) once the
    driver's ``open`` returned it (``close`` on a PENDING connection just drops it, uncounted).
    From then on the connection reports its own end: it takes
    itself out of ``Stats.open`` and counts an unexpected close unless it was CLOSING. A
    connection lost while still PENDING is the connect's failure, counted there.
    """

    ping_sent: int
    state: int

    def ping(self, token_ns: int) -> bool:
        """Send a heartbeat carrying ``token_ns`` and set ``ping_sent`` to it; False when the
        connection cannot send (closing)."""

    def close(self) -> None:
        """Close on our side: set ``state`` to CLOSING first, so the close is expected."""


class ClientDriver:
    """A protocol's client side: how a connected socket becomes an established connection."""

    name: ClassVar[str] = ""

    def __init__(self, stats: Stats, config: ClientConfig) -> None:
        self.stats = stats
        self.config = config

    async def open(self, loop: asyncio.AbstractEventLoop, source: str) -> ClientConnection:
        """Connect from ``source`` (an address; the kernel picks the port) to the target; return
        once the connection is usable (handshakes included). Raise to count a failed connect.

        ``loop.create_connection`` with a numeric host and ``local_addr`` runs socket, bind and
        connect inside uvloop's C code: 89 us of client CPU per connect (first ping answered
        included) against 137 us for a socket made in Python and handed over with ``sock=``
        (``bench/heartbeat_cost.py``)."""
        raise NotImplementedError

    def progress_fields(self) -> dict[str, int]:
        """The protocol's own counters for the progress lines (small, changing numbers)."""
        return {}

    def final_fields(self) -> dict[str, Any]:
        """The protocol's own figures for the final report."""
        return {}


class RawConnection(asyncio.Protocol):
    """A connection speaking length-prefixed heartbeat frames (:mod:`tidegate.protocol.heartbeat`)."""

    __slots__ = ("transport", "rbuf", "ping_sent", "state", "hello", "waiter")
    stats: ClassVar[Stats]
    rst: ClassVar[bool] = True  # close with RST (ClientConfig.close_mode)
    send_hello: ClassVar[bool] = True

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.rbuf = b""
        self.ping_sent = 0
        self.state = PENDING
        self.hello = 0  # the token of the unanswered hello, 0 when none
        # With --established-on pong: the connect waits on it, resolved by the hello's PONG.
        self.waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = typing.cast(asyncio.Transport, transport)
        if self.send_hello:  # at once: no loop turn between the connect and the first ping
            self.hello = token = time.monotonic_ns()
            self.stats.hello_sent += 1
            t.write(HELLO_HEADER + token.to_bytes(8, "big"))

    def data_received(self, data: bytes) -> None:
        if self.rbuf:
            data = self.rbuf + data
            self.rbuf = b""
        stats = self.stats
        try:
            frames, consumed = walk_frames(data)
        except ValueError:
            stats.protocol_errors += 1
            stats.error("protocol_bad_frame_length")
            self.close()
            return
        for kind, start, end in frames:
            if kind == PONG:
                token = int.from_bytes(data[start:end], "big")
                if token and token == self.hello:  # the server's app has the connection
                    self.hello = 0
                    now = time.monotonic_ns()
                    stats.confirmed += 1
                    stats.last_confirmed_ns = now
                    stats.hello_rtt_us.record((now - token) // 1000)
                    waiter = self.waiter
                    if waiter is not None:
                        self.waiter = None
                        if not waiter.done():
                            waiter.set_result(None)
                elif token and token == self.ping_sent:
                    stats.pong(token)
                    self.ping_sent = 0
                else:
                    stats.late_pongs += 1
            elif kind == PING:
                body = data[start:end]
                transport = self.transport
                if transport is not None and self.state != CLOSING:
                    transport.write((1 + len(body)).to_bytes(4, "big") + b"\x02" + body)
                stats.server_pings += 1
            elif kind == DATA:
                stats.data_frames += 1
            else:
                stats.protocol_errors += 1
                stats.error("protocol_unknown_frame_type")
        if consumed < len(data):
            self.rbuf = data[consumed:]

    def eof_received(self) -> bool | None:
        return False  # close our side too; connection_lost tells whether it was expected

    def connection_lost(self, exc: Exception | None) -> None:
        stats = self.stats
        state = self.state
        self.state = CLOSED
        self.transport = None
        self.rbuf = b""
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_exception(exc or ConnectionResetError(
                    errno.ECONNRESET, "closed by the server before answering the first ping"))
        if state == PENDING or state == CLOSED:
            return
        stats.gone(("eof" if exc is None else error_reason(exc)) if state == OPEN else None,
                   self.ping_sent != 0)
        self.ping_sent = 0

    def ping(self, token_ns: int) -> bool:
        transport = self.transport
        if transport is None or self.state != OPEN:
            return False
        transport.write(HELLO_HEADER + token_ns.to_bytes(8, "big"))
        self.ping_sent = token_ns
        return True

    def close(self) -> None:
        if self.state == OPEN:
            self.state = CLOSING
        elif self.state == PENDING:
            self.state = CLOSED  # never counted as open: nothing to account for
        transport = self.transport
        if transport is not None:
            close_transport(transport, self.rst)


class RawDriver(ClientDriver):
    name = "raw"

    def __init__(self, stats: Stats, config: ClientConfig) -> None:
        super().__init__(stats, config)
        RawConnection.stats = stats
        RawConnection.rst = config.close_mode == "rst"
        RawConnection.send_hello = config.hello

    async def open(self, loop: asyncio.AbstractEventLoop, source: str) -> ClientConnection:
        cfg = self.config
        _, conn = await loop.create_connection(
            RawConnection, cfg.host, cfg.port, local_addr=(source, 0))
        if conn.hello and cfg.established_on == "pong":
            # Established once the server's app answers: a connection still waiting in the
            # listener's accept queue does not count, and the in-flight window then bounds
            # that queue (no overflow, no SYN retransmission stalls).
            waiter: asyncio.Future[None] = loop.create_future()
            conn.waiter = waiter
            try:
                await waiter
            except BaseException:
                conn.waiter = None
                conn.close()
                raise
        return conn


# --------------------------------------------------------------------------- ws (gateway JSON)

# Connection phases of a ws connection (``WsConnection.phase``), before it is READY.
WS_UPGRADE = 0  # the HTTP upgrade request is out, waiting for "101 Switching Protocols"
WS_CONNECTING = 1  # the connect command is out
WS_SUBSCRIBING = 2  # the subscribe command is out
WS_READY = 3  # the subscribe reply arrived: established

# Our own heartbeats are the protocol's ping command, ``{"id":N,"ping":{}}``, answered
# ``{"id":N,"ping":{}}``. N carries the ping's token (its send time, in ~µs, modulo 2^30) and is
# always >= 2^30, so it is never 1 or 2 (connect, subscribe) and always has 10 digits: the frame
# has one fixed size and a fixed header.
PING_ID_BASE = 1 << 30
_PING_HEADER = b"\x81" + bytes((0x80 | len(b'{"id":%d,"ping":{}}' % PING_ID_BASE),)) + b"\0\0\0\0"
# The answer to the server's ping ``{}``: a masked text frame with an all-zero mask key.
WS_PONG_FRAME = b"\x81\x82\0\0\0\0{}"
MAX_HANDSHAKE_BYTES = 16384


def ping_id(token_ns: int) -> int:
    return ((token_ns >> 10) & (PING_ID_BASE - 1)) | PING_ID_BASE


def ws_client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A final, masked client frame with the all-zero mask key (so the payload goes as is)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


class Deliveries:
    """A process's count of a broadcast: per publication (its ``seq``), how many of our
    connections got it and when the first and the last did; a histogram of latencies
    (receive time - the publication's ``t``, both this machine's wall clock).

    One instance per process, a few lists of ``count`` numbers: a delivery costs a dict lookup
    (the parsed payload is cached: every subscriber gets the same bytes), a few list stores and a
    histogram record, never anything per connection beyond the connection's ``last_seq``.
    """

    __slots__ = ("count", "channel", "received", "first_ns", "last_ns", "latency_us", "total",
                 "duplicates", "out_of_order", "other", "cache")

    def __init__(self, count: int, channel: str) -> None:
        self.count = count
        self.channel = channel
        self.received = [0] * count
        self.first_ns = [0] * count
        self.last_ns = [0] * count
        self.latency_us = Histogram()
        self.total = 0
        self.duplicates = 0  # a connection got the same seq twice (not counted in received)
        self.out_of_order = 0  # a connection got a seq lower than one it already had
        self.other = 0  # pushes that are not publications of the broadcast
        self.cache: dict[bytes, tuple[int, int]] = {}

    def parse(self, payload: bytes) -> tuple[int, int]:
        """(seq, publish time in ns) of a push, (-1, 0) when it is not one of ours."""
        result = (-1, 0)
        try:
            push = json.loads(payload)["push"]
            if push.get("channel") == self.channel and "pub" in push:
                data = push["pub"]["data"]
                seq, t = data["seq"], data["t"]
                if type(seq) is int and 0 <= seq < self.count:
                    result = (seq, int(float(t) * 1e9))
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
        cache = self.cache
        if len(cache) >= 256:
            cache.clear()
        cache[payload] = result
        return result

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "received": self.received,
            "first_ns": self.first_ns,
            "last_ns": self.last_ns,
            "latency_us": self.latency_us.to_dict(),
            "total": self.total,
            "duplicates": self.duplicates,
            "out_of_order": self.out_of_order,
            "other_pushes": self.other,
        }


class WsConnection(asyncio.Protocol):
    """A gateway client over WebSocket speaking the JSON protocol (v2), subscribed to one channel.

    Inbound frames are parsed in ``data_received`` (server frames are unmasked; several JSON
    objects in one frame are split on ``\\n``); outbound frames are masked with a zero key.
    """

    __slots__ = ("transport", "rbuf", "ping_sent", "state", "phase", "waiter", "close_code",
                 "last_seq")
    stats: ClassVar[Stats]
    deliveries: ClassVar[Deliveries]
    connect_frame: ClassVar[bytes] = b""
    subscribe_frame: ClassVar[bytes] = b""
    rst: ClassVar[bool] = True
    accept: ClassVar[bytes] = b""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.rbuf = b""
        self.ping_sent = 0
        self.state = PENDING
        self.phase = WS_UPGRADE
        self.waiter: asyncio.Future[None] | None = None
        self.close_code = 0  # the code of the server's close frame, 0 when none came
        self.last_seq = -1  # the highest broadcast seq this connection got

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)

    # ---- inbound
    def data_received(self, data: bytes) -> None:
        if self.rbuf:
            data = self.rbuf + data
            self.rbuf = b""
        if self.phase == WS_UPGRADE:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > MAX_HANDSHAKE_BYTES:
                    self._fail("handshake_too_long")
                else:
                    self.rbuf = data
                return
            head = data[:end]
            if not head.startswith(b"HTTP/1.1 101"):
                status = head[9:12].decode("ascii", "replace")
                self._fail(f"http_{status}" if status.isdigit() else "bad_http_response")
                return
            if self.accept not in head:
                self._fail("bad_sec_websocket_accept")
                return
            self.phase = WS_CONNECTING
            transport = self.transport
            if transport is not None:
                transport.write(self.connect_frame)
            data = data[end + 4 :]
        pos = 0
        end_all = len(data)
        while end_all - pos >= 2:
            b0 = data[pos]
            n = data[pos + 1]
            if n & 0x80:
                self._protocol_error("ws_masked_server_frame")
                return
            if n < 126:
                start = pos + 2
            elif n == 126:
                if end_all - pos < 4:
                    break
                n = (data[pos + 2] << 8) | data[pos + 3]
                start = pos + 4
            else:
                if end_all - pos < 10:
                    break
                n = int.from_bytes(data[pos + 2 : pos + 10], "big")
                start = pos + 10
                if n > MAX_FRAME_BYTES:
                    self._protocol_error("ws_frame_too_large")
                    return
            stop = start + n
            if stop > end_all:
                break
            pos = stop
            if b0 == 0x81 or b0 == 0x82:
                self._message(data[start:stop])
            elif b0 == 0x88:  # close
                self.close_code = (data[start] << 8) | data[start + 1] if n >= 2 else 1005
                if self.state == PENDING:
                    self._fail(f"ws_close_{self.close_code}")
                else:
                    self._close_transport()
                return
            elif b0 == 0x89:  # a WebSocket-level ping: pong with its payload
                transport = self.transport
                if transport is not None and self.state != CLOSING:
                    transport.write(ws_client_frame(data[start:stop], 0xA))
                self.stats.server_pings += 1
            elif b0 == 0x8A:  # an unsolicited pong: nothing to do
                pass
            else:
                self._protocol_error("ws_unexpected_frame")  # fragments, RSV bits, opcodes
                return
            if self.transport is None:
                return
        if pos < end_all:
            self.rbuf = data[pos:]

    def _message(self, payload: bytes) -> None:
        if payload == b"{}":  # the server's ping
            transport = self.transport
            if transport is not None and self.state != CLOSING:
                transport.write(WS_PONG_FRAME)
            self.stats.server_pings += 1
        elif b"\n" in payload:
            for part in payload.split(b"\n"):
                if part.strip():
                    self._message(part.strip())
        elif payload.startswith(b'{"push":'):
            self._push(payload)
        elif payload.startswith(b'{"id":'):
            self._reply(payload)
        else:
            self.stats.data_frames += 1

    def _push(self, payload: bytes) -> None:
        d = self.deliveries
        hit = d.cache.get(payload)
        if hit is None:
            hit = d.parse(payload)
        seq = hit[0]
        if seq < 0:
            d.other += 1
            return
        now = time.time_ns()
        last = self.last_seq
        if seq <= last:
            if seq == last:
                d.duplicates += 1
                return
            d.out_of_order += 1
        else:
            self.last_seq = seq
        d.received[seq] += 1
        d.total += 1
        if not d.first_ns[seq]:
            d.first_ns[seq] = now
        if now > d.last_ns[seq]:
            d.last_ns[seq] = now
        d.latency_us.record((now - hit[1]) // 1000)

    def _reply(self, payload: bytes) -> None:
        comma = payload.find(b",", 6)
        try:
            cid = int(payload[6:comma])
        except ValueError:
            self._protocol_error("bad_reply")
            return
        stats = self.stats
        if cid >= PING_ID_BASE:
            sent = self.ping_sent
            if sent and cid == ping_id(sent) and payload.startswith(b'"ping"', comma + 1):
                stats.pong(sent)
                self.ping_sent = 0
            else:
                stats.late_pongs += 1
            return
        phase = self.phase
        if cid == 1 and phase == WS_CONNECTING:
            if not payload.startswith(b'"connect"', comma + 1):
                self._fail(_reply_error("connect", payload))
                return
            self.phase = WS_SUBSCRIBING
            transport = self.transport
            if transport is not None:
                transport.write(self.subscribe_frame)
        elif cid == 2 and phase == WS_SUBSCRIBING:
            if not payload.startswith(b'"subscribe"', comma + 1):
                self._fail(_reply_error("subscribe", payload))
                return
            self.phase = WS_READY
            waiter = self.waiter
            if waiter is not None:
                self.waiter = None
                if not waiter.done():
                    waiter.set_result(None)
        else:
            self._protocol_error("unexpected_reply")

    # ---- failures and closes
    def _fail(self, reason: str) -> None:
        """The connect failed above TCP: the waiting connect raises ``reason`` (and counts it);
        on a connection past its connect, a protocol error."""
        waiter = self.waiter
        if waiter is None:
            self._protocol_error(reason)
            return
        self.waiter = None
        if not waiter.done():
            waiter.set_exception(HandshakeError(reason))
        self._close_transport()

    def _protocol_error(self, reason: str) -> None:
        stats = self.stats
        stats.protocol_errors += 1
        if self.waiter is not None:
            self._fail(f"protocol_{reason}")  # the failed connect counts the error
            return
        stats.error(f"protocol_{reason}")
        self.close()

    def _close_transport(self) -> None:
        transport = self.transport
        if transport is not None:
            close_transport(transport, self.rst)

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        stats = self.stats
        state = self.state
        self.state = CLOSED
        self.transport = None
        self.rbuf = b""
        code = self.close_code
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_exception(
                    HandshakeError(f"ws_close_{code}") if code else exc or ConnectionResetError(
                        errno.ECONNRESET, "closed by the server during the ws handshake"))
        if state == PENDING or state == CLOSED:
            return
        reason = f"ws_close_{code}" if code else "eof" if exc is None else error_reason(exc)
        stats.gone(reason if state == OPEN else None, self.ping_sent != 0)
        self.ping_sent = 0

    # ---- what the wheel and the process call
    def ping(self, token_ns: int) -> bool:
        transport = self.transport
        if transport is None or self.state != OPEN:
            return False
        transport.write(_PING_HEADER + b'{"id":%d,"ping":{}}' % ping_id(token_ns))
        self.ping_sent = token_ns
        return True

    def close(self) -> None:
        if self.state == OPEN:
            self.state = CLOSING
        elif self.state == PENDING:
            self.state = CLOSED
        self._close_transport()


def _reply_error(method: str, payload: bytes) -> str:
    """``connect_error_109``-style label of a refused command."""
    try:
        code = json.loads(payload)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return f"{method}_bad_reply"
    return f"{method}_error_{code}"


class WsDriver(ClientDriver):
    """The gateway's WebSocket endpoint, JSON protocol: upgrade, connect, subscribe."""

    name = "ws"

    def __init__(self, stats: Stats, config: ClientConfig) -> None:
        super().__init__(stats, config)
        token = os.environ.get(TOKEN_ENV, "")
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        accept = base64.b64encode(
            hashlib.sha1(key.encode("ascii") + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        self.upgrade = (
            f"GET {config.ws_path} HTTP/1.1\r\nHost: {config.host}:{config.port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n").encode("ascii")
        connect: dict[str, Any] = {"name": "tidegate-bench"}
        if token:
            connect = {"token": token, **connect}
        WsConnection.stats = stats
        WsConnection.rst = config.close_mode == "rst"
        WsConnection.deliveries = self.deliveries = Deliveries(
            config.broadcast_count, config.channel)
        WsConnection.accept = b"Sec-WebSocket-Accept: " + accept
        WsConnection.connect_frame = ws_client_frame(
            json.dumps({"id": 1, "connect": connect}, separators=(",", ":")).encode())
        WsConnection.subscribe_frame = ws_client_frame(json.dumps(
            {"id": 2, "subscribe": {"channel": config.channel}}, separators=(",", ":")).encode())

    async def open(self, loop: asyncio.AbstractEventLoop, source: str) -> ClientConnection:
        cfg = self.config
        transport, conn = await loop.create_connection(
            WsConnection, cfg.host, cfg.port, local_addr=(source, 0))
        waiter: asyncio.Future[None] = loop.create_future()
        conn.waiter = waiter
        transport.write(self.upgrade)
        try:
            await waiter
        except BaseException:
            conn.waiter = None
            conn.close()
            raise
        return conn

    def progress_fields(self) -> dict[str, int]:
        return {"deliveries": self.deliveries.total}

    def final_fields(self) -> dict[str, Any]:
        return {"broadcast": self.deliveries.to_dict()}


PROTOCOLS: dict[str, type[ClientDriver]] = {"raw": RawDriver, "ws": WsDriver}


class WheelClock:
    """The tick arithmetic of a ping wheel: ``interval / tick`` buckets, one pinged per tick, and
    a trailing bucket whose pongs are checked ``pong_timeout`` later (``lag`` ticks behind).

    :meth:`due_slots` returns the buckets whose turn has come (more than one when the process
    was late) and advances; ``next_ns`` is when the next one is due. Ticks keep to the schedule
    from ``start``: a late tick does not push the later ones back."""

    def __init__(self, interval_s: float, pong_timeout_s: float, tick_s: float) -> None:
        interval_ns = max(1, int(interval_s * 1e9))
        self.nbuckets = max(1, round(interval_s / tick_s))
        self.tick_ns = max(1, interval_ns // self.nbuckets)
        self.pong_timeout_ns = int(pong_timeout_s * 1e9)
        # Ticks after a bucket's pings at which their pong timeout is checked.
        lag = -(-self.pong_timeout_ns // self.tick_ns) + 1
        self.lag = lag if lag < self.nbuckets else 0  # 0: the next ping's check is earlier
        self.t0 = 0
        self.done = 0
        self.next_ns = 1 << 63

    def start(self, now_ns: int, phase: float = 0.0) -> None:
        """``phase`` (0..1) shifts the ticks by that share of a tick, so that the client
        processes, started together, do not all send their bursts at the same moment."""
        self.t0 = now_ns + int(phase * self.tick_ns)
        self.done = 0
        self.next_ns = self.t0

    def due_slots(self, now_ns: int) -> list[int]:
        due = (now_ns - self.t0) // self.tick_ns
        slots = []
        while self.done <= due:
            slots.append(self.done % self.nbuckets)
            self.done += 1
        self.next_ns = self.t0 + self.done * self.tick_ns
        return slots


class PingWheel:
    """One periodic callback that pings every connection once per ``interval``, spread evenly.

    Connections are dealt round-robin into ``interval / tick`` buckets; each tick pings the
    connections of one bucket. A connection still waiting for the PONG of its previous ping when
    its turn comes again, or ``pong_timeout`` after the ping (checked by a second pointer that
    trails the first), counts as a missed heartbeat.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        stats: Stats,
        interval_s: float,
        pong_timeout_s: float,
        tick_s: float = 0.05,
    ) -> None:
        self.loop = loop
        self.stats = stats
        self.clock = WheelClock(interval_s, pong_timeout_s, tick_s)
        self.buckets: list[list[ClientConnection]] = [[] for _ in range(self.clock.nbuckets)]
        self.dealt = 0
        self.handle: asyncio.Handle | None = None

    def add(self, conn: ClientConnection) -> None:
        self.buckets[self.dealt % self.clock.nbuckets].append(conn)
        self.dealt += 1

    def connections(self) -> list[ClientConnection]:
        return [conn for bucket in self.buckets for conn in bucket]

    def start(self, phase: float = 0.0) -> None:
        self.clock.start(time.monotonic_ns(), phase)
        self.handle = self.loop.call_at(
            self.loop.time() + phase * self.clock.tick_ns / 1e9, self._tick)

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _tick(self) -> None:
        now = time.monotonic_ns()
        clock = self.clock
        nb = clock.nbuckets
        for slot in clock.due_slots(now):
            self._ping_bucket(slot, now)
            if clock.lag:
                self._expire_bucket((slot - clock.lag) % nb, now)
        delay = (clock.next_ns - time.monotonic_ns()) / 1e9
        self.handle = self.loop.call_later(max(0.0, delay), self._tick)

    def _ping_bucket(self, slot: int, now: int) -> None:
        stats = self.stats
        bucket = self.buckets[slot]
        gone = 0
        for conn in bucket:
            if conn.state != OPEN:
                gone += 1
                continue
            if conn.ping_sent:
                stats.missed += 1  # no PONG before its next ping
                stats.outstanding -= 1
                conn.ping_sent = 0
            if conn.ping(now):
                stats.pings_sent += 1
                stats.outstanding += 1
        if gone:
            self.buckets[slot] = [conn for conn in bucket if conn.state == OPEN]

    def _expire_bucket(self, slot: int, now: int) -> None:
        stats = self.stats
        limit = self.clock.pong_timeout_ns
        for conn in self.buckets[slot]:
            sent = conn.ping_sent
            if sent and now - sent > limit:
                stats.missed += 1
                stats.outstanding -= 1
                conn.ping_sent = 0

    def expire_all(self) -> int:
        """Count every still-unanswered ping as missed (the end of the hold); return how many."""
        stats = self.stats
        n = 0
        for bucket in self.buckets:
            for conn in bucket:
                if conn.ping_sent:
                    conn.ping_sent = 0
                    n += 1
        stats.missed += n
        stats.outstanding -= n
        return n


class Control:
    """The runner's commands, read from stdin without blocking the loop: ``add_reader`` and
    ``remove_reader`` are the loop's (asyncio's, or the epoll client's own)."""

    def __init__(self, stats: Stats, add_reader: Callable[[int, Callable[[], None]], object],
                 remove_reader: Callable[[int], object]) -> None:
        self.remove_reader = remove_reader
        self.stats = stats
        self.go = asyncio.Event()
        self.halt = asyncio.Event()
        self.close = asyncio.Event()
        self.eof = False
        self.reason = ""
        self._buf = b""
        self._fd = -1
        try:
            self._fd = sys.stdin.fileno()
            os.set_blocking(self._fd, False)
            add_reader(self._fd, self._readable)
        except OSError as exc:  # not a pipe (a file, /dev/null): run on the lifetime alone
            print(f"bench client: no commands on stdin ({exc}); go", file=sys.stderr)
            self.go.set()

    def _readable(self) -> None:
        try:
            chunk = os.read(self._fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.remove_reader(self._fd)
            self.eof = True
            self.stop("runner_gone")
            return
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            command = line.strip().decode("ascii", "replace")
            if command == "go":
                self.go.set()
            elif command == "hold":
                self.stats.hold_since_ns = time.monotonic_ns()
            elif command == "halt":
                self.halt.set()
            elif command == "expect_close":  # the server drains: its closes are goodbyes
                self.stats.closes_expected = True
            elif command == "subscribed":
                # Before a broadcast: the connections that are up now are the ones expected
                # to get every publication.
                emit("subscribed", open=self.stats.open, established=self.stats.established)
            elif command == "close":
                self.stop("close")

    def stop(self, reason: str) -> None:
        if not self.reason:
            self.reason = reason
        self.go.set()
        self.halt.set()
        self.close.set()


def emit(kind: str, **fields: Any) -> None:
    line = json.dumps({"type": kind, **fields}, separators=(",", ":")) + "\n"
    out = sys.stdout.buffer
    out.write(line.encode())
    out.flush()


def offer(kind: str, **fields: Any) -> bool:
    """Like :func:`emit`, but only if the runner has room for the line in our stdout pipe:
    False (the line dropped) when the pipe is full. For progress lines, snapshots the next one
    repeats: a client blocked writing to a runner that is busy elsewhere (reading 500,000 fd
    entries, say) stops answering heartbeats, and the report would measure the runner."""
    data = (json.dumps({"type": kind, **fields}, separators=(",", ":")) + "\n").encode()
    if len(data) > select.PIPE_BUF:  # a free pipe slot may not take it whole: wait as emit does
        emit(kind, **fields)
        return True
    fd = sys.stdout.fileno()
    # A pipe polls writable while a page of it is free, which takes a line this short without
    # blocking. Not a pipe (a file, a terminal): always writable.
    if not select.select([], [fd], [], 0)[1]:
        return False
    sys.stdout.buffer.flush()
    os.write(fd, data)
    return True


class ClientProcess:
    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.stats = Stats()
        self.loop = asyncio.get_running_loop()
        driver_cls = PROTOCOLS.get(config.protocol)
        if driver_cls is None:
            raise SystemExit(f"unknown protocol {config.protocol!r}")
        self.driver = driver_cls(self.stats, config)
        self.wheel = PingWheel(
            self.loop, self.stats, config.ping_interval_s, config.pong_timeout_s, config.tick_s
        )
        self.control = Control(self.stats, self.loop.add_reader, self.loop.remove_reader)
        self.next_index = 0
        self.connect_started_ns = 0
        self.connect_done_ns = 0
        # Per connect worker (slot): when its current attempt started (0: none), its task, and
        # the slots the watchdog cancelled for taking longer than connect_timeout_s.
        self.attempt_started: list[int] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.timed_out: dict[int, bool] = {}
        self.watchdog: asyncio.TimerHandle | None = None

    async def _connect_one(self, index: int, slot: int, task: asyncio.Task[None]) -> None:
        cfg = self.config
        tries = 0
        while True:
            reason = await self._attempt(index, slot, task)
            if reason is None:
                return
            halted = self.control.halt.is_set()
            if not self.stats.connect_failed(reason, tries, 0 if halted else cfg.connect_retries):
                return
            tries += 1

    async def _attempt(self, index: int, slot: int, task: asyncio.Task[None]) -> str | None:
        """One connect attempt: None when it is established, else why it failed."""
        cfg = self.config
        stats = self.stats
        source = cfg.sources[index * len(cfg.sources) // cfg.connections]
        stats.attempted += 1
        started = time.monotonic_ns()
        self.attempt_started[slot] = started
        try:
            conn = await self.driver.open(self.loop, source)
        except asyncio.CancelledError:
            if not self.timed_out.pop(slot, False):
                raise
            task.uncancel()  # the watchdog's cancel: this attempt timed out, the worker goes on
            return "timeout"
        except OSError as exc:
            return error_reason(exc)
        finally:
            self.attempt_started[slot] = 0
        if conn.state != PENDING:  # lost between the driver's open and now
            return "closed_while_connecting"
        conn.state = OPEN
        stats.open += 1
        now = time.monotonic_ns()
        stats.connect_us.record((now - started) // 1000)
        stats.established += 1
        if not stats.first_established_ns:
            stats.first_established_ns = now
        stats.last_established_ns = now
        if self.control.close.is_set():
            conn.close()  # established after the end was called: do not keep it
        self.wheel.add(conn)
        return None

    async def _connect_worker(self, slot: int) -> None:
        n = self.config.connections
        halt = self.control.halt
        task = asyncio.current_task()
        assert task is not None
        self.tasks[slot] = task
        while not halt.is_set():
            index = self.next_index
            if index >= n:
                return
            self.next_index = index + 1
            await self._connect_one(index, slot, task)

    def _connect_watchdog(self) -> None:
        """Cancel the attempts older than ``connect_timeout_s``: one periodic check for all the
        in-flight connects instead of an ``asyncio.timeout`` per attempt (~11 us each here)."""
        limit = int(self.config.connect_timeout_s * 1e9)
        now = time.monotonic_ns()
        for slot, started in enumerate(self.attempt_started):
            if started and now - started > limit and slot not in self.timed_out:
                self.timed_out[slot] = True
                self.tasks[slot].cancel()
        self.watchdog = self.loop.call_later(WATCHDOG_INTERVAL_S, self._connect_watchdog)

    async def _progress_loop(self) -> None:
        interval = self.config.progress_interval_s
        last: dict[str, int] | None = None
        stats = self.stats
        extra = self.driver.progress_fields
        while True:
            snapshot = stats.progress()
            snapshot.update(extra())
            if (snapshot != last or stats.window_rtt_max_us) and offer(
                    "progress", **snapshot, rtt_max_us=stats.window_rtt_max_us):
                stats.window_rtt_max_us = 0
                last = snapshot
            elif snapshot != last:
                stats.progress_dropped += 1
            await asyncio.sleep(interval)

    async def run(self) -> None:
        cfg = self.config
        stats = self.stats
        control = self.control
        lifetime = self.loop.call_later(cfg.lifetime_s, control.stop, "lifetime_exceeded")
        emit("ready", pid=os.getpid(), nofile=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
             nice=os.nice(0), autogroup_nice=autogroup_nice(), sid=os.getsid(0),
             sched=sched_policy())
        await control.go.wait()
        progress = asyncio.create_task(self._progress_loop())
        self.wheel.start(cfg.tick_phase)
        self.connect_started_ns = time.monotonic_ns()
        slots = max(1, min(cfg.max_inflight, cfg.connections))
        self.attempt_started = [0] * slots
        self.tasks = [typing.cast("asyncio.Task[None]", None)] * slots
        self.watchdog = self.loop.call_later(WATCHDOG_INTERVAL_S, self._connect_watchdog)
        workers = [asyncio.create_task(self._connect_worker(slot)) for slot in range(slots)]
        await asyncio.gather(*workers)
        self.watchdog.cancel()
        self.connect_done_ns = time.monotonic_ns()
        emit("connected", **connected_fields(stats, self.connect_started_ns,
                                             self.connect_done_ns),
             **self.driver.progress_fields())

        await control.close.wait()
        held = stats.open
        held_ns = time.monotonic_ns()
        self.wheel.stop()
        # Give the pings already sent their chance to be answered, then count the rest missed.
        drain_deadline = time.monotonic() + min(cfg.pong_timeout_s, 10.0)
        while stats.outstanding > 0 and time.monotonic() < drain_deadline:
            await asyncio.sleep(0.01)
        unanswered_at_end = self.wheel.expire_all()
        unexpected_during_hold = stats.unexpected_closes
        conns = self.wheel.connections()
        for conn in conns:
            conn.close()
        close_deadline = time.monotonic() + cfg.close_timeout_s
        while stats.open > 0 and time.monotonic() < close_deadline:
            await asyncio.sleep(0.01)
        closed_ns = time.monotonic_ns()
        progress.cancel()
        lifetime.cancel()
        emit("final", **final_fields(
            stats, cfg, reason=control.reason, held=held, held_ns=held_ns, closed_ns=closed_ns,
            unanswered_at_end=unanswered_at_end, unexpected_during_hold=unexpected_during_hold,
            connect_started_ns=self.connect_started_ns, connect_done_ns=self.connect_done_ns),
            **self.driver.progress_fields(), **self.driver.final_fields())


def connected_fields(stats: Stats, connect_started_ns: int, connect_done_ns: int
                     ) -> dict[str, Any]:
    """The ``connected`` line: this process's connects are done."""
    return {
        **stats.progress(),
        "cpu_seconds": _cpu_seconds(),
        "connect_started_ns": connect_started_ns,
        "connect_done_ns": connect_done_ns,
        "first_established_ns": stats.first_established_ns,
        "last_established_ns": stats.last_established_ns,
    }


def final_fields(stats: Stats, cfg: ClientConfig, *, reason: str, held: int, held_ns: int,
                 closed_ns: int, unanswered_at_end: int, unexpected_during_hold: int,
                 connect_started_ns: int, connect_done_ns: int) -> dict[str, Any]:
    """The ``final`` line: this process's counters and histograms, for the runner to merge."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        **stats.progress(),
        "reason": reason,
        "held": held,
        "held_ns": held_ns,
        "closed_ns": closed_ns,
        "close_seconds": (closed_ns - held_ns) / 1e9,
        "still_open_after_close": stats.open,
        "unanswered_at_end": unanswered_at_end,
        "unexpected_during_hold": unexpected_during_hold,
        "unexpected_close_reasons": stats.unexpected_close_reasons,
        "errors": stats.errors,
        "connect_retried": stats.retried,
        "late_pongs": stats.late_pongs,
        "progress_dropped": stats.progress_dropped,
        "data_frames": stats.data_frames,
        "protocol_errors": stats.protocol_errors,
        "rtt_connect_phase_us": stats.rtt_connect_phase_us.to_dict(),
        "hello_rtt_us": stats.hello_rtt_us.to_dict(),
        "hello_sent": stats.hello_sent,
        "last_confirmed_ns": stats.last_confirmed_ns,
        "rtt_hold_us": stats.rtt_hold_us.to_dict(),
        "connect_us": stats.connect_us.to_dict(),
        "connect_started_ns": connect_started_ns,
        "connect_done_ns": connect_done_ns,
        "first_established_ns": stats.first_established_ns,
        "last_established_ns": stats.last_established_ns,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "max_rss_bytes": usage.ru_maxrss * 1024,
        "sources": cfg.sources,
    }


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
            return asyncio.new_event_loop
        return uvloop.new_event_loop
    return asyncio.new_event_loop


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m tidegate.bench.client CONFIG_JSON", file=sys.stderr)
        return 2
    config = ClientConfig(**json.loads(argv[0]))
    if config.parent_pid:
        die_with_parent(config.parent_pid)
    # Ctrl-C reaches the whole foreground group: the runner decides when to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from tidegate.engine.limits import raise_nofile

    if config.nice > 0:
        set_nice(config.nice)
    if config.sched_batch:
        set_sched_batch()
    limits = raise_nofile()
    if config.connections + 64 > limits.soft:
        emit("fatal", error=f"{config.connections} connections need more fds than {limits.soft}")
        return 3
    # Long-lived objects never become garbage until the end: keep the collector off their back.
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)

    if config.loop == "epoll":
        from tidegate.bench.epoll_client import EpollRawClient

        EpollRawClient(config).run()
        return 0

    async def amain() -> None:
        await ClientProcess(config).run()

    with asyncio.Runner(loop_factory=_loop_factory(config.loop)) as runner:
        runner.run(amain())
    return 0


def set_nice(nice: int) -> None:
    """Lower this process's priority by ``nice``, and its autogroup's.

    With a nice value the runner starts each client in a session of its own, and with the
    kernel's autogroup scheduling (``kernel.sched_autogroup_enabled``, on by default) a
    session is a scheduling group whose weight comes from the group's own nice value
    (``/proc/self/autogroup``), not its tasks': ``os.nice`` alone would leave each client the
    claim of the whole server (one session) to the CPU, so the group's nice is set too."""
    os.nice(nice)
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))
    except OSError:
        pass  # no autogroup scheduling here: the process's nice is what counts


def set_sched_batch() -> None:
    """Run this process (its threads to come included) under SCHED_BATCH: the scheduler does
    not let it preempt the running task when it wakes. On loopback every write of a server
    worker wakes a client, which then preempted the worker at once; 60,000 WebSocket connects
    over 27 workers: 36-43k preemptions of the workers instead of 119-149k, 662-768 us of
    server CPU per connection instead of 868-1,068, 1.3x the connects per second
    (``bench/results/2026-11-27-ws-60k-client-sched-batch.json``). Clients on other machines
    cannot preempt the server at all."""
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (OSError, AttributeError):
        pass  # not Linux: the policy is reported as observed


def sched_policy() -> str:
    """This process's scheduling policy: 'batch', 'normal' or another name."""
    try:
        policy = os.sched_getscheduler(0)
    except (OSError, AttributeError):
        return "unknown"
    return {os.SCHED_BATCH: "batch", os.SCHED_OTHER: "normal"}.get(policy, str(policy))


def autogroup_nice() -> int | None:
    """This process's autogroup nice value (None without autogroup scheduling)."""
    try:
        with open("/proc/self/autogroup") as f:
            return int(f.read().split("nice")[1])
    except (OSError, IndexError, ValueError):
        return None


def config_json(config: ClientConfig) -> str:
    return json.dumps(asdict(config), separators=(",", ":"))


if __name__ == "__main__":
    raise SystemExit(main())
