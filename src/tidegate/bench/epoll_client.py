"""The raw protocol's bench client on a bare ``select.epoll``: a connection is a slot, not an object.

Why a second client for ``raw``: in the 500k run with the uvloop client
(``bench/results/2026-11-27-raw-500k-run2.json``) the 27 client processes spent ~58 us of CPU per
heartbeat round trip against the server's ~42, so the load generator, not the server, saturated
the two cores and the round trips queued up. This client keeps the kernel's part (one ``send``,
one ``recv`` per round trip) and drops the rest:

* a connection is the same index (its fd) in a few preallocated lists: its socket, state, the
  token of its unanswered ping and of its hello, when its connect started. No Protocol, no
  transport, no future, no task;
* a connect is ``socket``, ``bind``, ``connect`` (loopback completes the handshake before the
  call returns, though it says EINPROGRESS), the hello's ``send`` and one ``epoll.register``;
  only a connect whose SYN the server's full backlog dropped waits for EPOLLOUT;
* heartbeats: bucket ``k`` of the ping wheel is the fds with ``fd % nbuckets == k``, so no
  bucket lists to keep in step with closes, and a reused fd can never sit in two buckets;
* a PONG read whole (13 bytes, the common case) is matched inline; anything else goes through
  :func:`tidegate.bench.client.walk_frames`, the parse the asyncio client uses too.

It speaks to the runner exactly as :class:`tidegate.bench.client.ClientProcess` does (same
commands, same JSON lines, same :class:`~tidegate.bench.client.Stats`), so the runner does not
know which one it started. ``tidegate bench --client-loop uvloop`` runs the asyncio client: the
baseline this one is measured against (``bench/client_cost.py``).
"""

from __future__ import annotations

import errno
import os
import resource
import select
import socket
import time
from collections.abc import Callable

from tidegate.bench.client import (
    HELLO_HEADER,
    LINGER_ZERO,
    WATCHDOG_INTERVAL_S,
    ClientConfig,
    Control,
    Stats,
    WheelClock,
    autogroup_nice,
    connected_fields,
    emit,
    error_reason,
    final_fields,
    offer,
    sched_policy,
    walk_frames,
)
from tidegate.protocol.heartbeat import DATA, PING, PONG

# Slot states. FREE: no connection of ours on this fd.
FREE = 0
CONNECTING = 1  # SYN sent, the handshake not done (the server's backlog was full)
HELLO = 2  # connected, hello sent, not yet established (waiting for its PONG)
OPEN = 3  # established: counted in Stats.open, pinged by the wheel
CONTROL = 4  # the runner's command pipe

_IN = select.EPOLLIN | select.EPOLLRDHUP
_IN_OUT = _IN | select.EPOLLOUT
PONG_FRAME_BYTES = 13  # 4 length + 1 type + 8 token
READ_BYTES = 4096


class EpollRawClient:
    """One client process of ``tidegate bench --protocol raw``: connect, hold, ping, close."""

    def __init__(self, config: ClientConfig) -> None:
        if config.protocol != "raw":
            raise SystemExit(f"the epoll client speaks raw only, not {config.protocol!r}")
        self.cfg = config
        self.stats = Stats()
        size = resource.getrlimit(resource.RLIMIT_NOFILE)[0] + 1
        self.socks: list[socket.socket | None] = [None] * size
        self.state = bytearray(size)
        self.sent = [0] * size  # token (send time, ns) of the unanswered ping; 0: none
        self.hello = [0] * size  # token of the unanswered hello; 0: none
        self.started = [0] * size  # when the connect started (ns)
        self.index_of = [0] * size  # which of this process's connections the fd is for
        self.tries = bytearray(size)  # earlier failed attempts of that connection
        self.retry: list[tuple[int, int]] = []  # (index, tries) to connect again
        self.rbuf: dict[int, bytes] = {}  # the bytes of an incomplete frame, by fd
        self.pending: set[int] = set()  # fds in CONNECTING or HELLO: the connect window
        self.top = 0  # one past the highest fd ever used: the wheel scans below it
        self.ep = select.epoll()
        self.control_cb: dict[int, Callable[[], None]] = {}
        self.control = Control(self.stats, self._add_reader, self._remove_reader)
        self.wheel = WheelClock(config.ping_interval_s, config.pong_timeout_s, config.tick_s)
        self.addr = (config.host, config.port)
        self.next_index = 0
        self.connect_started_ns = 0
        self.connect_done_ns = 0
        self.connect_done = False
        self.rst = config.close_mode == "rst"
        self.wait_for_pong = config.hello and config.established_on == "pong"

    # ---- the runner's pipe, through the same epoll
    def _add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self.ep.register(fd, select.EPOLLIN)  # first: a file or /dev/null raises here
        self.state[fd] = CONTROL
        self.control_cb[fd] = callback

    def _remove_reader(self, fd: int) -> None:
        self.state[fd] = FREE
        self.control_cb.pop(fd, None)
        self.ep.unregister(fd)

    # ---- connects
    def _connect(self) -> None:
        cfg = self.cfg
        stats = self.stats
        if self.retry:
            index, tries = self.retry.pop()
        else:
            index, tries = self.next_index, 0
            self.next_index = index + 1
        stats.attempted += 1
        source = cfg.sources[index * len(cfg.sources) // cfg.connections]
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as exc:
            self._failed(index, tries, error_reason(exc))
            return
        fd = s.fileno()
        try:
            s.bind((source, 0))
            err = s.connect_ex(self.addr)
            if err and err != errno.EINPROGRESS:
                raise OSError(err, os.strerror(err))
        except OSError as exc:
            s.close()
            self._failed(index, tries, error_reason(exc))
            return
        self.index_of[fd] = index
        self.tries[fd] = min(tries, 255)
        self.socks[fd] = s
        self.started[fd] = now = time.monotonic_ns()
        if fd >= self.top:
            self.top = fd + 1
        if cfg.hello:
            try:
                os.write(fd, HELLO_HEADER + now.to_bytes(8, "big"))
            except BlockingIOError:  # the handshake is not done: the SYN waits for the backlog
                self.state[fd] = CONNECTING
                self.pending.add(fd)
                self.ep.register(fd, _IN_OUT)
                return
            except OSError as exc:
                self._fail(fd, error_reason(exc))
                return
            self._hello_sent(fd, now)
            self.ep.register(fd, _IN)
        else:
            self.state[fd] = CONNECTING
            self.pending.add(fd)
            self.ep.register(fd, _IN_OUT)

    def _hello_sent(self, fd: int, now: int) -> None:
        self.stats.hello_sent += 1
        self.hello[fd] = now
        if self.wait_for_pong:
            self.state[fd] = HELLO
            self.pending.add(fd)
        else:
            self._established(fd, now)

    def _handshake_done(self, fd: int, now: int) -> None:
        """EPOLLOUT (or an error) on a CONNECTING socket."""
        s = self.socks[fd]
        assert s is not None
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(fd, errno.errorcode.get(err, f"errno_{err}"))
            return
        self.pending.discard(fd)
        self.ep.modify(fd, _IN)
        if self.cfg.hello:
            try:
                os.write(fd, HELLO_HEADER + now.to_bytes(8, "big"))
            except OSError as exc:
                self._fail(fd, error_reason(exc))
                return
            self._hello_sent(fd, now)
        else:
            self._established(fd, now)

    def _established(self, fd: int, now: int) -> None:
        stats = self.stats
        self.pending.discard(fd)
        self.state[fd] = OPEN
        stats.open += 1
        stats.established += 1
        stats.connect_us.record((now - self.started[fd]) // 1000)
        if not stats.first_established_ns:
            stats.first_established_ns = now
        stats.last_established_ns = now
        if self.control.close.is_set():
            self._close(fd)  # established after the end was called: do not keep it

    def _fail(self, fd: int, reason: str) -> None:
        """A connect that did not make it (tried again or counted as failed, never as open)."""
        self._failed(self.index_of[fd], self.tries[fd], reason)
        self.pending.discard(fd)
        self._release(fd, rst=True)

    def _failed(self, index: int, tries: int, reason: str) -> None:
        retries = 0 if self.control.halt.is_set() else self.cfg.connect_retries
        if self.stats.connect_failed(reason, tries, retries):
            self.retry.append((index, tries + 1))

    def _release(self, fd: int, rst: bool) -> None:
        s = self.socks[fd]
        self.socks[fd] = None
        self.state[fd] = FREE
        self.sent[fd] = 0
        self.hello[fd] = 0
        self.rbuf.pop(fd, None)
        if s is not None:
            if rst:
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
                except OSError:
                    pass
            s.close()  # closing the fd takes it out of the epoll set too

    def _lost(self, fd: int, reason: str) -> None:
        """The server (or the network) ended the connection on ``fd``."""
        if self.state[fd] == OPEN:
            self.stats.gone(reason, self.sent[fd] != 0)
            self._release(fd, rst=False)
        else:  # still connecting: the connect failed (a refusal at capacity, say)
            self._fail(fd, "ECONNRESET" if reason == "eof" else reason)

    def _close(self, fd: int) -> None:
        """Close on our side: an expected close."""
        if self.state[fd] == OPEN:
            self.stats.gone(None, self.sent[fd] != 0)
            self._release(fd, rst=self.rst)
        elif self.state[fd] in (CONNECTING, HELLO):
            self.pending.discard(fd)
            self._release(fd, rst=True)

    def _watchdog(self, now: int) -> None:
        limit = int(self.cfg.connect_timeout_s * 1e9)
        started = self.started
        for fd in [fd for fd in self.pending if now - started[fd] > limit]:
            self._fail(fd, "timeout")

    # ---- inbound
    def _frames(self, fd: int, data: bytes, now: int) -> None:
        """Whatever is not exactly one whole PONG: split into frames and handle each."""
        stats = self.stats
        kept = self.rbuf.pop(fd, None)
        if kept:
            data = kept + data
        try:
            frames, consumed = walk_frames(data)
        except ValueError:
            stats.protocol_errors += 1
            stats.error("protocol_bad_frame_length")
            self._close(fd)
            return
        for kind, start, end in frames:
            if kind == PONG:
                self._pong(fd, int.from_bytes(data[start:end], "big"), now)
            elif kind == PING:
                body = data[start:end]
                stats.server_pings += 1
                try:
                    os.write(fd, (1 + len(body)).to_bytes(4, "big") + b"\x02" + body)
                except OSError:
                    pass  # the read that follows tells how it ended
            elif kind == DATA:
                stats.data_frames += 1
            else:
                stats.protocol_errors += 1
                stats.error("protocol_unknown_frame_type")
            if self.state[fd] == FREE:
                return
        if consumed < len(data):
            self.rbuf[fd] = data[consumed:]

    def _pong(self, fd: int, token: int, now: int) -> None:
        stats = self.stats
        if token and token == self.sent[fd]:
            self.sent[fd] = 0
            stats.pong(token, now)
        elif token and token == self.hello[fd]:
            self.hello[fd] = 0
            stats.confirmed += 1
            stats.last_confirmed_ns = now
            stats.hello_rtt_us.record((now - token) // 1000)
            if self.state[fd] == HELLO:
                self._established(fd, now)
        else:
            stats.late_pongs += 1

    def _poll_once(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` and handle what came; return how many fds had events."""
        try:
            events = self.ep.poll(timeout_s, 1024)
        except InterruptedError:
            return 0
        now = time.monotonic_ns()
        state = self.state
        sent = self.sent
        rbuf = self.rbuf
        stats = self.stats
        read = os.read
        for fd, _ in events:
            st = state[fd]
            if st == OPEN or st == HELLO:
                try:
                    data = read(fd, READ_BYTES)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    self._lost(fd, error_reason(exc))
                    continue
                if len(data) == PONG_FRAME_BYTES and data[4] == PONG and fd not in rbuf:
                    token = int.from_bytes(data[5:], "big")
                    if token and token == sent[fd]:  # the common case, inline
                        sent[fd] = 0
                        stats.pong(token, now)
                    else:
                        self._pong(fd, token, now)
                elif data:
                    self._frames(fd, data, now)
                else:
                    self._lost(fd, "eof")
            elif st == CONNECTING:
                self._handshake_done(fd, now)
            elif st == CONTROL:
                self.control_cb[fd]()
        return len(events)

    # ---- heartbeats
    def _ping_bucket(self, slot: int, nbuckets: int) -> None:
        stats = self.stats
        state = self.state
        sent = self.sent
        write = os.write
        clock = time.monotonic_ns
        for fd in range(slot, self.top, nbuckets):
            if state[fd] != OPEN:
                continue
            if sent[fd]:
                stats.missed += 1  # no PONG before its next ping
                stats.outstanding -= 1
                sent[fd] = 0
            token = clock()
            try:
                write(fd, HELLO_HEADER + token.to_bytes(8, "big"))
            except BlockingIOError:
                stats.error("ping_would_block")  # the server has not read our last ones
                continue
            except OSError:
                continue  # the read that follows tells how it ended
            sent[fd] = token
            stats.pings_sent += 1
            stats.outstanding += 1

    def _expire_bucket(self, slot: int, nbuckets: int, now: int) -> None:
        stats = self.stats
        sent = self.sent
        limit = self.wheel.pong_timeout_ns
        for fd in range(slot, self.top, nbuckets):
            token = sent[fd]
            if token and now - token > limit:
                stats.missed += 1
                stats.outstanding -= 1
                sent[fd] = 0

    def _tick(self, now: int) -> None:
        wheel = self.wheel
        nb = wheel.nbuckets
        for slot in wheel.due_slots(now):
            self._ping_bucket(slot, nb)
            if wheel.lag:
                self._expire_bucket((slot - wheel.lag) % nb, nb, now)

    def _expire_all(self) -> int:
        n = 0
        sent = self.sent
        for fd in range(self.top):
            if sent[fd]:
                sent[fd] = 0
                n += 1
        self.stats.missed += n
        self.stats.outstanding -= n
        return n

    # ---- the run
    def run(self) -> None:
        cfg = self.cfg
        stats = self.stats
        control = self.control
        start = time.monotonic_ns()
        lifetime_end = start + int(cfg.lifetime_s * 1e9)
        emit("ready", pid=os.getpid(), nofile=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
             nice=os.nice(0), autogroup_nice=autogroup_nice(), sid=os.getsid(0),
             sched=sched_policy())
        while not control.go.is_set():
            self._poll_once(1.0)
            if time.monotonic_ns() > lifetime_end:
                control.stop("lifetime_exceeded")
        self.connect_started_ns = now = time.monotonic_ns()
        self.wheel.start(now, cfg.tick_phase)
        progress_ns = int(cfg.progress_interval_s * 1e9)
        next_progress = now
        next_watchdog = now + int(WATCHDOG_INTERVAL_S * 1e9)
        last: dict[str, int] | None = None
        n = cfg.connections
        window = max(1, min(cfg.max_inflight, n))
        while not control.close.is_set():
            now = time.monotonic_ns()
            if not self.connect_done:
                # At most a window's worth per turn, so that replies are read in between even
                # when connects do not wait for them (--established-on tcp).
                launch = 0 if control.halt.is_set() else min(
                    n - self.next_index + len(self.retry), window - len(self.pending))
                for _ in range(launch):
                    self._connect()
                if (control.halt.is_set() or (self.next_index >= n and not self.retry)) \
                        and not self.pending:
                    self._connected_now()
            if now >= self.wheel.next_ns:
                self._tick(now)
            if now >= next_watchdog:
                self._watchdog(now)
                next_watchdog = now + int(WATCHDOG_INTERVAL_S * 1e9)
            if now >= next_progress:
                snapshot = stats.progress()
                if (snapshot != last or stats.window_rtt_max_us) and offer(
                        "progress", **snapshot, rtt_max_us=stats.window_rtt_max_us):
                    stats.window_rtt_max_us = 0
                    last = snapshot
                elif snapshot != last:
                    stats.progress_dropped += 1
                next_progress = now + progress_ns
            if now >= lifetime_end:
                control.stop("lifetime_exceeded")
                break
            wake = min(self.wheel.next_ns, next_progress, lifetime_end)
            if self.pending:
                wake = min(wake, next_watchdog)
            self._poll_once(max(0.0, (wake - time.monotonic_ns()) / 1e9))
        if not self.connect_done:
            self._connected_now()
        self._finish()

    def _connected_now(self) -> None:
        self.connect_done = True
        self.connect_done_ns = time.monotonic_ns()
        emit("connected", **connected_fields(
            self.stats, self.connect_started_ns, self.connect_done_ns))

    def _finish(self) -> None:
        cfg = self.cfg
        stats = self.stats
        # Read what already came before closing anything: a server's close that arrived with
        # the runner's "close" (a frozen client thawed just before it) is still the server's,
        # and a read that returned data may have left the EOF behind it.
        for _ in range(1000):
            if not self._poll_once(0):
                break
        held = stats.open
        held_ns = time.monotonic_ns()
        # Give the pings already sent their chance to be answered, then count the rest missed.
        deadline = time.monotonic() + min(cfg.pong_timeout_s, 10.0)
        while stats.outstanding > 0 and time.monotonic() < deadline:
            self._poll_once(0.01)
        unanswered_at_end = self._expire_all()
        unexpected_during_hold = stats.unexpected_closes
        for fd in range(self.top):
            if self.state[fd] in (OPEN, CONNECTING, HELLO):
                self._close(fd)
        closed_ns = time.monotonic_ns()
        emit("final", **final_fields(
            stats, cfg, reason=self.control.reason, held=held, held_ns=held_ns,
            closed_ns=closed_ns, unanswered_at_end=unanswered_at_end,
            unexpected_during_hold=unexpected_during_hold,
            connect_started_ns=self.connect_started_ns, connect_done_ns=self.connect_done_ns))
