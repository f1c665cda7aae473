"""One worker process: one event loop, one read buffer, one timing wheel, many connections."""

from __future__ import annotations

import asyncio
import collections
import errno
import functools
import gc
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

from tidegate import log
from tidegate.engine import control, gc_control, stealing, tls
from tidegate.engine.blocking import BlockingPool
from tidegate.engine.conn import CLOSING, EVICTING, MIGRATING, PING_OUT, READY, Conn
from tidegate.engine.cpu_gate import GateClient, gate_tokens
from tidegate.engine.eviction import EvictionController
from tidegate.engine.handler import EventHandler
from tidegate.engine.limits import raise_nofile
from tidegate.engine.loop import new_event_loop
from tidegate.engine.netopt import accept_queue_length, listening_socket
from tidegate.engine.options import EngineOptions
from tidegate.engine.runqueue import RunQueue
from tidegate.engine.wheel import TimingWheel
from tidegate.observe import leaks, trace
from tidegate.observe.histogram import Histogram
from tidegate.observe.stall import StallDetector
from tidegate.protocol.codec import FrameError
from tidegate.protocol.length_prefixed import LengthPrefixedCodec

_log = log.get("worker")
# Where this process sits among the workers, for handler factories (set before they run).
_current: dict[str, Any] = {"index": 0, "workers_total": 1, "ctrl": None}


def current_worker_index() -> tuple[int, int]:
    """(index, workers_total) of the worker process calling it."""
    return int(_current["index"]), int(_current["workers_total"])
STATS_INTERVAL_S = 1.0
DRAIN_STEP = 8  # goodbyes per run-queue step (a gateway one costs tens of us)
ACCEPT_PAUSE_S = 0.1  # accepts stop this long after an accept error (out of fds or memory)
ADOPT_WAIT_S = 1.0  # at most, for sockets on their way in before a drain lists its connections
# How long a worker that got SIGTERM and asked the supervisor to drain the node waits for its
# DRAIN before it drains on its own (a supervisor that does not answer): the supervisor sends
# it within STEAL_SETTLE_S of the request, plus a turn of its select loop.
STOP_ASK_WAIT_S = 5.0


class Worker:
    """Owns the loop's listening socket (or the handoff channel) and every connection on it."""

    def __init__(
        self,
        opts: EngineOptions,
        handlers: EventHandler | list[EventHandler],
        index: int = 0,
        ctrl: socket.socket | None = None,
        workers_total: int = 1,
    ) -> None:
        self.opts = opts
        self.workers_total = workers_total
        # One handler per listening port (opts.port, then opts.extra_ports).
        self.handlers = handlers if isinstance(handlers, list) else [handlers]
        self.handler = self.handlers[0]
        self.index = index
        self.ctrl = ctrl
        self.loop: asyncio.AbstractEventLoop = asyncio.get_event_loop()
        # A Conn subclass per listener: worker, handler and codec reached through class
        # attributes, so they cost nothing per connection.
        self.conn_classes: list[type[Conn]] = [
            type(
                "Conn",
                (Conn,),
                {
                    "__slots__": (),
                    "_w": self,
                    "_h": h,
                    "_codec": getattr(h, "codec", None) or LengthPrefixedCodec(opts.max_frame_bytes),
                },
            )
            for h in self.handlers
        ]
        self.conn_class = self.conn_classes[0]
        self._ctrl_handlers: dict[bytes, Callable[[bytes], None]] = {}
        self.read_buf = bytearray(opts.read_buffer_bytes)
        self.read_view = memoryview(self.read_buf)
        self.in_base = 0
        self.in_pos = 0
        self.in_end = 0
        self.max_pending_bytes = opts.read_buffer_bytes - 4096
        self.max_write_buffer_bytes = opts.max_write_buffer_bytes
        horizon = max(opts.ping_interval_s + opts.pong_timeout_s, opts.handshake_timeout_s)
        self.wheel = TimingWheel(opts.tick_s, horizon, self._check)
        self._ping_ticks = self.wheel.ticks(opts.ping_interval_s)
        self._pong_ticks = self.wheel.ticks(opts.pong_timeout_s)
        self._handshake_ticks = self.wheel.ticks(opts.handshake_timeout_s)
        self._linger_ticks = self.wheel.ticks(opts.linger_s)
        self.capacity = raise_nofile().soft - opts.reserve_fds
        if opts.max_connections_per_worker > 0:
            self.capacity = min(self.capacity, opts.max_connections_per_worker)
        self.active = 0
        self.accepted_total = 0
        self.accept_turns = 0  # loop turns that accepted (accept_batch > 0)
        # uvloop: accepted fds go to connect_accepted_socket in this one stand-in (see
        # AcceptedFd); the stdlib loop gets a socket object each.
        self._accepted_fd: AcceptedFd | None = None
        self.refused_total = 0
        self.refusals: collections.Counter[str] = collections.Counter()
        self._tokens = 0.0
        self._tokens_at = 0.0
        # Only with max_connections_per_ip: the count per address, and each connection's address.
        self._per_ip: dict[str, int] = {}
        self._conn_ip: dict[Conn, str] = {}
        self.handoff_received = 0
        self.ctrl_yields = 0  # turns on which the control channel's reader used up its slice
        self.pings_sent = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.writes = 0
        self.heartbeat_rtt = Histogram()
        self.closes: collections.Counter[str] = collections.Counter()
        self.close_reasons: dict[Conn, str] = {}
        # Connections whose transport paused writing, each with the writes it queued since:
        # the message cap (max_write_buffer_messages) counts these; a connection below the
        # high-water mark holds under 64 KiB whatever its message count.
        self.paused: dict[Conn, int] = {}
        self.max_write_buffer_messages = opts.max_write_buffer_messages
        self._write_waiters: dict[Conn, asyncio.Future[None]] = {}
        self._refused: set[Conn] = set()
        self.gc_stats: gc_control.GcStats | None = None
        self.trace = trace.TraceRing(max(1, opts.trace_ring_events))
        self.tasks = leaks.TaskTracker()
        self.stall: StallDetector | None = None
        self.eviction: EvictionController | None = None  # L3: only when a ceiling is set
        self._leak_dump_off: Callable[[], None] | None = None
        self.blocking = BlockingPool(opts.blocking_threads, opts.blocking_max_waiting)
        # Long jobs in slices of opts.slice_ms (big fan-outs, the drain): engine/runqueue.py.
        self.runqueue = RunQueue(opts.slice_ms)
        self.stopping = False
        self._stopped = asyncio.Event()
        self.stop_asked = False  # signalled; the supervisor was asked to drain the node
        self.stop_ask_wait_s = STOP_ASK_WAIT_S
        self._servers: list[asyncio.AbstractServer] = []
        self._listen_socks: list[socket.socket] = []  # this worker's SO_REUSEPORT listeners
        self.ssl_context = tls.server_context(opts)
        self._t0 = 0.0
        self._real_tick = 0
        self._last_stats = 0.0
        self.stats_cpu_s = 0.0
        self._snapshot_taken = False  # the drain's list of connections is made
        self.drain_late = 0  # connections that arrived after it (see arrived_after_snapshot)
        self.drain_goodbyes = 0  # connections the drain said goodbye to (on_drain)
        self.stealer = stealing.Stealer(self)  # connections moved between workers

    # ---- connection lifecycle (called by Conn) --------------------------------------
    def conn_opened(self, c: Conn) -> None:
        if c._flags & MIGRATING:  # stolen from another worker: admitted there already
            self.stealer.arrived(c)
            return
        reason = self._admit(c)
        if reason:
            # Refused cleanly (past the fd budget the worker would hit EMFILE), and counted.
            self.refused_total += 1
            self.refusals[reason] += 1
            self._refused.add(c)
            c._flags |= CLOSING
            c._transport.abort()
            return
        self.active += 1
        self.accepted_total += 1
        self.trace.record_instant(trace.ACCEPT, id(c))
        c._last_rx = self.wheel.now
        self.wheel.schedule(c, self.wheel.now + self._handshake_ticks)
        first = c._h.on_open(c)
        if first:
            c.write(first)

    def _admit(self, c: Conn) -> str:
        """'' to accept, else the refusal reason."""
        if self.active >= self.capacity:
            return "capacity"
        if self.stopping:
            return "draining"
        opts = self.opts
        if opts.accept_rate_per_s > 0:
            now = self.loop.time()
            rate = opts.accept_rate_per_s / self.workers_total
            # A burst of at least one, or a slow node rate split over many workers admits none.
            self._tokens = min(max(rate, 1.0), self._tokens + (now - self._tokens_at) * rate)
            self._tokens_at = now
            if self._tokens < 1:
                return "rate_limit"
            self._tokens -= 1
        if opts.max_connections_per_ip > 0:
            peer = c._transport.get_extra_info("peername")
            ip = peer[0] if peer else ""
            if self._per_ip.get(ip, 0) >= opts.max_connections_per_ip:
                return "per_ip_limit"
            self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
            self._conn_ip[c] = ip
        return ""

    def conn_lost(self, c: Conn, exc: Exception | None) -> None:
        if c._flags & MIGRATING:  # moved to another worker: forgotten in stealing.py
            return
        if c in self._refused:
            self._refused.discard(c)
            return
        if self._conn_ip:
            self.uncount_ip(c)
        if c._flags & EVICTING and self.eviction is not None:
            self.eviction.unmark(c)  # left before its eviction's turn came
        self.wheel.cancel(c)
        self.paused.pop(c, None)
        self.active -= 1
        reason = self.close_reasons.pop(c, None)
        if reason is None:
            reason = "client_closed" if exc is None else "client_error"
        self.closes[reason] += 1
        self.trace.record_instant(trace.CLOSE, id(c), reason=reason)
        waiter = self._write_waiters.pop(c, None)
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError(reason))
        try:
            c._h.on_close(c, reason)
        except Exception:
            _log.exception("on_close failed")

    def protocol_error(self, c: Conn, exc: FrameError) -> None:
        _log.debug("protocol error", extra={"reason": exc.reason, "detail": exc.detail})
        c.abort(exc.reason)

    def handler_error(self, c: Conn) -> None:
        _log.exception("handler raised; closing the connection")
        c.abort("handler_error")

    def pong_seen(self, c: Conn) -> None:
        """Input after our ping: the heartbeat round trip, measured on the server."""
        rtt_ms = (self.loop.time() - self._t0) * 1000 - c._ping_ms
        self.heartbeat_rtt.observe(rtt_ms / 1000)

    def uncount_ip(self, c: Conn) -> None:
        """``c`` (closed, or moved to another worker) no longer counts against its IP's
        connection limit."""
        ip = self._conn_ip.pop(c, None)
        if ip is not None:
            left = self._per_ip[ip] - 1
            if left:
                self._per_ip[ip] = left
            else:
                del self._per_ip[ip]

    def arrived_after_snapshot(self, c: Conn) -> None:
        """A connection adopted (work stealing) after the drain listed this worker's.

        A safety net, idle when the supervisor drains the node: it stops stealing node-wide
        and waits for every worker to confirm before any drain begins (stealing.Router), and
        the drain adopts the sockets already on their way in before it lists its connections.
        That is every drain of a supervised worker, one signalled directly included (systemd's
        default KillMode=control-group, an operator's kill): it asks the supervisor to drain
        the node rather than draining on its own (:meth:`on_stop_signal`). A worker whose
        supervisor is gone drains alone, but nothing can move then: the channel is closed and
        the drain reads what was left on it before it lists its connections.

        Two races remain, both with a supervisor that does not keep to its schedule: a worker
        that did not confirm the freeze within STEAL_SETTLE_S gets its DRAIN anyway, and a
        hand-over it sent before it read STEAL_OFF comes back (``RETURNED``) behind that DRAIN;
        a signalled worker whose DRAIN did not come within STOP_ASK_WAIT_S drains alone while
        the others may still steal, and a hand-over it made just before can come back the same
        way. Such a connection gets its goodbye now rather than the abort at the end of the
        drain, and counts in ``drain_late``.
        """
        if self._snapshot_taken and not c.closing:
            self.drain_late += 1
            for _ in self._drain_batch([c]):
                pass

    def heartbeat_from_now(self, c: Conn) -> None:
        """A connection just became ready: its next check is its first heartbeat's, not the
        handshake deadline (which comes later than a short ping interval: with
        ``ping_interval_s`` 2 and ``handshake_timeout_s`` 10, a client that died right after
        its handshake was found after ~12 s instead of ~4)."""
        if c._wslot >= 0 and not c._flags & CLOSING:
            self.wheel.cancel(c)
            self.wheel.schedule(c, c._last_rx + self._ping_ticks + 2)

    def linger(self, c: Conn) -> None:
        """Give a closing connection ``linger_s`` to close its side before we abort it."""
        self.wheel.cancel(c)
        self.wheel.schedule(c, self.wheel.now + self._linger_ticks)

    def queued_while_paused(self, c: Conn) -> bool:
        """Count one more write from paused ``c``; True once it is past the message cap."""
        n = self.paused[c] = self.paused.get(c, 0) + 1
        return 0 < self.max_write_buffer_messages < n

    def writable(self, c: Conn) -> None:
        self.paused.pop(c, None)
        waiter = self._write_waiters.pop(c, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait_writable(self, c: Conn) -> None:
        fut = self._write_waiters.get(c)
        if fut is None:
            fut = self._write_waiters[c] = self.loop.create_future()
        await fut

    # ---- liveness: the timing wheel's check ------------------------------------------
    def _check(self, c: Conn, now: int) -> int | None:
        """Decide a due connection's fate; return its next due tick or None (closed).

        ``now`` is the slot's tick. When it is behind the real tick the worker stalled, and
        input that arrived meanwhile is still unread in the socket: nobody is timed out on a
        late slot, they are looked at again next tick, after the loop has read its input.
        New deadlines count from the real tick.
        """
        flags = c._flags
        real = self._real_tick
        if flags & CLOSING:  # a lingering close ran out of patience
            c._transport.abort()
            return None
        if not flags & READY:
            if now < real:
                return real + 1
            c.abort("handshake_timeout")
            return None
        if flags & PING_OUT:  # nothing arrived since our ping (input clears the flag)
            if now < real:
                return real + 1
            c.abort("ping_timeout")
            return None
        # Two ticks of slack: _last_rx is rounded down to a tick, and a client that pings every
        # ping_interval_s on its own must not be pinged back.
        due = c._last_rx + self._ping_ticks + 2
        if due > real:
            return due
        # Silent for a whole interval: ping it. Clients that ping us are never pinged back.
        frame = c._h.ping_frame(c)
        if frame is None:
            return real + self._ping_ticks
        c._flags |= PING_OUT
        c._ping_ms = int((self.loop.time() - self._t0) * 1000)
        c.write(frame)
        self.pings_sent += 1
        return real + self._pong_ticks

    def connections(self) -> list[Conn]:
        """Every open connection (each sits in exactly one wheel slot)."""
        out: list[Conn] = []
        for slot in self.wheel._slots:
            out.extend(slot)
        return out

    # ---- ticking, stats -------------------------------------------------------------
    def _tick(self) -> None:
        now = self.loop.time()
        # After a stall the wheel catches up on every missed tick at once; _check judges
        # those late slots against the real tick (see there).
        self._real_tick = int((now - self._t0) / self.opts.tick_s)
        self.wheel.advance(self._real_tick)
        for h in self.handlers:
            try:
                h.on_tick(self)
            except Exception:
                _log.exception("on_tick failed")
        if self.eviction is not None:
            self.eviction.maybe_run(now)
        if now - self._last_stats >= STATS_INTERVAL_S:
            self._last_stats = now
            self._send_stats()
        # Keeps ticking while stopping: lingering closes are aborted by the wheel.
        nxt = self._t0 + (self.wheel.now + 1) * self.opts.tick_s
        self.loop.call_at(nxt, self._tick)

    def accept_queue(self) -> int:
        """Connections waiting in this worker's SO_REUSEPORT accept queues: the kernel chose
        this worker for them, they are its load as much as the accepted ones. A worker slow
        to accept (starved of CPU) looks light by ``active`` alone, steals, then accepts its
        backlog on top and runs into its capacity: the 485k run's 181 capacity refusals all
        came from one worker that had stolen 5,858 connections while no other one held more
        than 18,054 of its 19,744."""
        return sum(accept_queue_length(s) for s in self._listen_socks)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": self.index,
            "pid": os.getpid(),
            "active": self.active,
            "accept_queue": self.accept_queue(),
            "stats_cpu_seconds": round(self.stats_cpu_s, 6),
            "accepted": self.accepted_total,
            "accept_turns": self.accept_turns,
            "refused": self.refused_total,
            "refusals": dict(self.refusals),
            "handoff_received": self.handoff_received,
            "ctrl_yields": self.ctrl_yields,
            "drain_late": self.drain_late,
            "pings_sent": self.pings_sent,
            "closes": dict(self.closes),
            "capacity": self.capacity,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "writes": self.writes,
            "write_buffer_bytes": self._write_buffer_bytes(),
            "heartbeat_rtt": self.heartbeat_rtt.snapshot(),
            "apps": [h.stats() for h in self.handlers],
            "blocking": self.blocking.stats(),
            "runqueue": self.runqueue.stats(),
        }
        out.update(self.stealer.stats())
        if self.stall is not None:
            out["stall"] = self.stall.stats()
        if self.eviction is not None:
            out["eviction"] = self.eviction.stats()
        if self.gc_stats is not None:
            out["gc_collections"] = self.gc_stats.collections
            out["gc_pause_s_max"] = round(self.gc_stats.pause_s_max, 6)
            out["gc_pause"] = self.gc_stats.pauses.snapshot()
        return out

    def _write_buffer_bytes(self) -> int:
        """Output queued in user space by connections above the high-water mark (the ones
        that matter: the rest hold under 64 KiB each)."""
        return sum(c.write_buffer_bytes for c in self.paused)

    def _send_stats(self) -> None:
        if self.ctrl is None:
            return
        # What the metrics cost this worker: building and sending these stats, once a second,
        # is all a worker does for /metrics (the supervisor answers scrapes from its copy).
        t = time.thread_time()
        try:
            control.send_json(self.ctrl, control.STATS, self.stats())
        except OSError:
            pass
        self.stats_cpu_s += time.thread_time() - t

    # ---- the handoff channel ---------------------------------------------------------
    def _on_ctrl(self, budget_s: float | None = -1.0) -> None:
        """Handle what the supervisor sent. As the loop's reader, at most one ``slice_ms`` of
        it per turn: a burst (every worker's presence calls to a hot channel's owner, a relay
        storm) must not stall this worker's heartbeats and accepts; the reader is level-
        triggered, so the rest is read on the next turn. ``budget_s=None`` (or ``slice_ms``
        0, the run queue off): read everything. At least one message per call, whatever the
        budget."""
        assert self.ctrl is not None
        if budget_s is not None and budget_s < 0:
            budget_s = self.opts.slice_ms / 1000.0 or None
        deadline = time.monotonic() + budget_s if budget_s is not None else None
        first = True
        while True:
            if not first and deadline is not None and time.monotonic() > deadline:
                self.ctrl_yields += 1
                return
            first = False
            try:
                msg = control.recv(self.ctrl)
            except BlockingIOError:
                return
            except OSError:
                msg = None
            if msg is None:  # the supervisor is gone: do not outlive it
                self.loop.remove_reader(self.ctrl.fileno())
                self.stop()
                return
            kind, body, fds = msg
            if kind == control.DRAIN:  # from the supervisor, once stealing stopped node-wide
                self.stop()
                continue
            if kind == control.FDS:
                listener = body[0] if body else 0
                for fd in fds:
                    self.handoff_received += 1
                    sock = socket.socket(fileno=fd)
                    self.loop.create_task(self._adopt(sock, self.conn_classes[listener]))
                continue
            if kind in stealing.KINDS:  # may carry migrating sockets: not closed here
                try:
                    self.stealer.on_control(kind, body, fds)
                except Exception:
                    _log.exception("work-stealing message failed")
                continue
            for fd in fds:
                os.close(fd)
            handler = self._ctrl_handlers.get(kind)
            if handler is not None:
                try:
                    handler(body)
                except Exception:
                    _log.exception("control message handler failed", extra={"kind": kind.decode()})

    def _accept_ready(self, sock: socket.socket, conn_class: type[Conn]) -> None:
        """Accept up to ``accept_batch`` of the connections waiting, in this turn."""
        self.accept_turns += 1
        fd_only = self._accepted_fd
        if fd_only is not None:
            fd_only.family = sock.family  # the listeners may differ (IPv4, IPv6)
        for _ in range(self.opts.accept_batch):
            try:
                if fd_only is not None:
                    fd_only.fd, _addr = sock._accept()  # type: ignore[attr-defined]
                    new: Any = fd_only
                else:
                    new, _addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue  # the client gave up while queued
                self._accept_failed(sock, conn_class, exc)
                return
            # connect_accepted_socket's coroutine, stepped by hand: a task per accept cost
            # ~15 us more of the worker's CPU per connection than uvloop's own server.
            _step(self.loop.connect_accepted_socket(conn_class, new, ssl=self.ssl_context), new)

    async def _open_stream_reserve(self) -> None:
        """libuv opens a spare fd (/dev/null, for its EMFILE trick) with a loop's first stream.
        uvloop's server is a stream made at start; without it the first client would open it,
        and a worker would hold one fd more with clients than without, beyond the clients.
        One throwaway stream opens it now."""
        a, b = socket.socketpair()
        try:
            transport, _ = await self.loop.connect_accepted_socket(asyncio.Protocol, a)
            transport.close()
        except (OSError, AttributeError, NotImplementedError):
            a.close()
        b.close()

    def _accept_failed(self, sock: socket.socket, conn_class: type[Conn], exc: OSError) -> None:
        """Out of fds or memory: stop accepting for a moment rather than spin on the error
        (the connections wait in the kernel's queue meanwhile)."""
        self.refusals[f"accept_{errno.errorcode.get(exc.errno or 0, 'error').lower()}"] += 1
        _log.warning("accept failed; pausing accepts", extra={"error": str(exc)})
        fd = sock.fileno()
        self.loop.remove_reader(fd)

        def resume() -> None:
            if not self.stopping and sock.fileno() == fd:
                self.loop.add_reader(fd, self._accept_ready, sock, conn_class)

        self.loop.call_later(ACCEPT_PAUSE_S, resume)

    async def _adopt(self, sock: socket.socket, conn_class: type[Conn]) -> None:
        try:
            await self.loop.connect_accepted_socket(conn_class, sock, ssl=self.ssl_context)
        except OSError:
            sock.close()

    # ---- messages between workers (relayed by the supervisor) -------------------------
    def on_control(self, kind: bytes, fn: Callable[[bytes], None]) -> None:
        """Call ``fn(body)`` for every control message of ``kind`` (a byte not used by the engine)."""
        self._ctrl_handlers[kind] = fn

    def send_control(self, kind: bytes, body: bytes) -> bool:
        """Send a message to the supervisor; ``control.RELAY`` messages reach every other worker."""
        if self.ctrl is None:
            return False
        try:
            self.ctrl.send(kind + body)
            return True
        except OSError:
            return False

    # ---- run / stop ----------------------------------------------------------------
    async def serve(self, listen_ports: list[int] | None) -> None:
        """Listen (reuseport) or take handed-off sockets, then run until stopped."""
        self.loop = asyncio.get_running_loop()
        self._t0 = self.loop.time()
        for port, conn_class in zip(listen_ports or [], self.conn_classes, strict=False):
            sock = listening_socket(self.opts, port, reuseport=True)
            self._listen_socks.append(sock)
            if self.opts.accept_batch > 0:
                if not self._listen_socks[:-1]:
                    await self._open_stream_reserve()
                    if type(self.loop).__module__.startswith("uvloop"):
                        self._accepted_fd = AcceptedFd(sock.family)
                self.loop.add_reader(sock.fileno(), self._accept_ready, sock, conn_class)
                continue
            self._servers.append(
                await self.loop.create_server(
                    conn_class, sock=sock, backlog=self.opts.backlog, ssl=self.ssl_context
                )
            )
        if self.ctrl is not None:
            self.ctrl.setblocking(False)
            self.loop.add_reader(self.ctrl.fileno(), self._on_ctrl)
            if self.runqueue.enabled and gate_tokens(self.opts.long_job_workers,
                                                     self.workers_total):
                gate = GateClient(lambda body: self.send_control(control.GATE, body))
                self.on_control(control.GATE, gate.on_message)
                self.runqueue.use_gate(gate)
        self.tasks.install(self.loop)
        self._leak_dump_off = leaks.install_sigusr1(self.loop, self.leak_report)
        if self.opts.stall_threshold_ms > 0:
            self.stall = StallDetector(self.loop, threshold_ms=self.opts.stall_threshold_ms)
            self.stall.start()
        self.eviction = EvictionController.create(self)  # after the stall detector: its lag
        for h in self.handlers:
            h.on_boot(self)
        self.gc_stats = gc_control.configure(self.opts.gc_gen0_threshold)
        gc.callbacks.append(trace.gc_tracer(self.trace))
        self.trace.record_instant(trace.RESTART, self.index, pid=os.getpid())
        if self.ctrl is not None:
            control.send_json(self.ctrl, control.READY, {"pid": os.getpid(), "index": self.index})
        self.loop.call_at(self._t0 + self.opts.tick_s, self._tick)
        await self._stopped.wait()
        await self._shutdown()

    def reload_tls(self) -> None:
        """Load the certificate and key again: new handshakes use them, open connections stay."""
        if self.ssl_context is not None:
            try:
                tls.reload(self.ssl_context, self.opts)
                _log.info("tls certificate reloaded")
            except (OSError, ValueError) as exc:
                _log.error("tls reload failed; keeping the old certificate", extra={"error": str(exc)})

    def leak_report(self) -> dict[str, Any]:
        """Tasks alive too long (with where they were created) and connections silent past
        their heartbeat deadline. Walks every connection: on demand only."""
        o = self.opts
        return {
            "worker": self.index,
            "pid": os.getpid(),
            "tasks": self.tasks.leak_report(min_age_s=o.leak_task_age_s),
            "stale_connections": leaks.stale_items(
                self.connections(), self.wheel.now,
                lambda c, now: ((now - c._last_rx) * o.tick_s, c),
                max_age_s=o.ping_interval_s + o.pong_timeout_s + 2 * o.tick_s + 2,
                describe=lambda c: str(c.remote_addr),
            ),
        }

    def stop(self) -> None:
        """Drain now (``_shutdown``): on the supervisor's DRAIN, or on our own when there is
        no supervisor to wait for."""
        if not self.stopping:
            self.stopping = True
            self._stopped.set()
            # The drain is spread over drain_s already; the others drain too and would wait
            # for each other's tokens.
            self.runqueue.use_gate(None)

    def on_stop_signal(self, signum: int) -> None:
        """SIGTERM or SIGINT sent to this worker itself (systemd's KillMode=control-group
        signals every process of the unit at once; an operator may kill one worker).

        A supervised worker does not drain on its own, which would let stealing hand it
        connections after its drain listed them: it asks the supervisor
        (``control.STOP_REQUEST``), which drains the node as on its own SIGTERM (stealing
        stopped everywhere, then DRAIN to every worker, this one included). The supervisor's
        own signal and every worker's request make one shutdown. With no supervisor to ask
        (none, or its channel is gone: it died) the worker drains on its own at once; if the
        DRAIN has not come within ``stop_ask_wait_s``, it drains on its own then. A second
        signal while waiting changes nothing, as a second one to the supervisor does not.
        """
        if self.stopping or self.stop_asked:
            return
        name = signal.Signals(signum).name
        if self.send_control(control.STOP_REQUEST, name.encode()):
            self.stop_asked = True
            _log.info("asked the supervisor to drain the node",
                      extra={"signal": name, "worker": self.index})
            self.loop.call_later(self.stop_ask_wait_s, self._no_drain_came)
            return
        _log.info("draining on its own: no supervisor to ask",
                  extra={"signal": name, "worker": self.index})
        self.stop()

    def _no_drain_came(self) -> None:
        if not self.stopping:
            _log.warning("no drain from the supervisor; draining on its own",
                         extra={"waited_s": self.stop_ask_wait_s, "worker": self.index})
            self.stop()

    def _drain_batch(self, conns: list[Conn]) -> Iterator[None]:
        """The drain of ``conns``, DRAIN_STEP connections per run-queue step."""
        for n, c in enumerate(conns, 1):
            if not c.closing:
                self.drain_goodbyes += 1
                self.close_reasons.setdefault(c, "drain")
                try:
                    c._h.on_drain(c)
                except Exception:
                    _log.exception("on_drain failed")
                    c.close("drain")
            if n % DRAIN_STEP == 0:
                yield

    async def _shutdown(self) -> None:
        """Drain: stop accepting, say goodbye to the connections a slice at a time over
        ``drain_s`` (flushing their output), then give stragglers ``shutdown_grace_s``."""
        for server in self._servers:
            server.close()
        if self.opts.accept_batch > 0:
            for sock in self._listen_socks:  # as server.close(): what waits is reset
                self.loop.remove_reader(sock.fileno())
                sock.close()
        for h in self.handlers:
            try:
                h.on_shutdown(self)
            except Exception:
                _log.exception("on_shutdown failed")
        # Nothing moves in or out once the list below is made: stealing stops here (the supervisor
        # stopped it node-wide before it sent DRAIN), and the sockets on their way in - sent back
        # to us before the DRAIN, or handed to us before stealing stopped - are adopted first.
        # What waits on the channel is read now, not after the list: hand-overs that reached us
        # before the supervisor died, when we drain without it.
        self.stealer.freeze()
        if self.ctrl is not None:
            self._on_ctrl(budget_s=None)
        settle_by = self.loop.time() + ADOPT_WAIT_S
        while self.stealer.adopting and self.loop.time() < settle_by:
            await asyncio.sleep(0.005)
        conns = self.connections()
        self._snapshot_taken = True
        _log.info("draining", extra={"connections": len(conns), "drain_s": self.opts.drain_s})
        steps = max(1, int(self.opts.drain_s / self.opts.tick_s))
        per_step = max(1, -(-len(conns) // steps))
        for i in range(0, len(conns), per_step):
            # A batch is thousands of goodbyes at 100k connections: a run-queue job, so the
            # connections still open keep getting their heartbeats and pushes meanwhile.
            job = self.runqueue.submit(self._drain_batch(conns[i : i + per_step]), "drain")
            try:
                await job.wait()
            except Exception:
                pass  # logged by the run queue; the next batch goes on
            if i + per_step < len(conns):
                await asyncio.sleep(self.opts.tick_s)
        deadline = time.monotonic() + self.opts.shutdown_grace_s
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = self.connections()
        no_goodbye = sum(not c.closing for c in left)
        for c in left:
            c.abort("shutdown")
        _log.info("drained", extra={"goodbyes": self.drain_goodbyes, "late": self.drain_late,
                                    "aborted": len(left), "no_goodbye": no_goodbye,
                                    "worker": self.index})
        await asyncio.sleep(0)
        if self.stall is not None:
            self.stall.stop()
        if self._leak_dump_off is not None:
            self._leak_dump_off()
        self.tasks.uninstall()


class AcceptedFd:
    """What uvloop's ``connect_accepted_socket`` is given for an fd the worker accepted.

    uvloop reads a socket's type, family and fd once, before the coroutine's first wait, and
    then keeps the object only to detach or close it when the transport closes (libuv closes
    the fd itself). A ``socket.socket`` kept that way cost every connection ~170 B (18,000
    connections on one worker: 1,651 B each against 1,483 with uvloop's own server); this one
    object serves every accept of the worker, refilled before each call."""

    __slots__ = ("fd", "family")
    type = socket.SOCK_STREAM

    def __init__(self, family: int) -> None:
        self.fd = -1
        self.family = family

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        """The transport's fd is libuv's to close."""


def _step(coro: Any, sock: Any, _done: Any = None) -> None:
    """Run ``connect_accepted_socket``'s coroutine to its next wait (for connection_made, or
    a TLS handshake) and resume it when that is done: a task without the task's cost."""
    try:
        fut = coro.send(None)
    except StopIteration:
        return
    except Exception as exc:  # noqa: BLE001 - a client's failure must not reach the loop
        sock.close()
        if not isinstance(exc, OSError):
            _log.warning("accepted socket not adopted", extra={"error": repr(exc)})
        return
    if fut is None:  # a bare yield: come back on the next turn
        asyncio.get_running_loop().call_soon(_step, coro, sock)
    else:
        fut.add_done_callback(functools.partial(_step, coro, sock))


def run_worker(
    opts: EngineOptions,
    handler_factory: Callable[[], EventHandler | list[EventHandler]],
    index: int,
    workers_total: int,
    ctrl: socket.socket | None,
    listen_ports: list[int] | None,
) -> int:
    """Entry point of a worker process (after fork)."""
    loop = new_event_loop(opts.loop)
    asyncio.set_event_loop(loop)
    _current.update(index=index, workers_total=workers_total, ctrl=ctrl)
    if opts.tracing_exporter != "none":
        from tidegate.observe.tracing import TRACING

        TRACING.setup(opts.tracing_exporter, opts.tracing_sample_ratio, worker=index)
    worker = Worker(opts, handler_factory(), index, ctrl, workers_total)
    # Told to stop: the supervisor decides (Worker.on_stop_signal). A Ctrl-C in a terminal
    # reaches the whole process group, the supervisor included: one shutdown all the same.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.on_stop_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, worker.reload_tls)
    try:
        loop.run_until_complete(worker.serve(listen_ports))
    finally:
        loop.close()
    return 0
