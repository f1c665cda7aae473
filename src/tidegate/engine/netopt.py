"""Socket options: listening sockets and the L1 liveness tier (kernel TCP keepalive)."""

from __future__ import annotations

import math
import socket
import struct
from dataclasses import dataclass

from tidegate.engine.options import EngineOptions

# Linux values, for Pythons built without the constants.
TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


@dataclass(frozen=True)
class Keepalive:
    """The L1 settings a socket gets (see :func:`keepalive_for`)."""

    idle_s: int
    interval_s: int
    count: int
    user_timeout_ms: int
    raised: bool  # idle or user timeout raised above the configured values


def keepalive_for(opts: EngineOptions) -> Keepalive:
    """L1 as configured, except that the kernel never probes a connection that answers L2.

    A client that answers the heartbeat is never silent for longer than ``ping_interval_s +
    pong_timeout_s`` (plus two wheel ticks), so keepalive probes add nothing for it - and they
    can kill it: the kernel fires the keepalive timers of connections opened close together in
    one timer-wheel batch (60 s timers in ~4 s buckets), their probes queue at once in the
    per-CPU input backlog that loopback and veth (container) traffic goes through, and past
    ``net.core.netdev_max_backlog`` (1,000 by default) they are dropped. Unanswered, the
    connection is aborted (TCPAbortOnTimeout) although its peer is alive: 2,719 of 18,000
    healthy connections with a 300 s ping interval in 200 s, on this machine. So the idle time
    starts past the heartbeat's window, and TCP_USER_TIMEOUT - which, once set, replaces the
    probe count in the kernel's keepalive check - is kept at least idle + interval * count,
    or a single lost probe would abort.
    """
    window = opts.ping_interval_s + opts.pong_timeout_s + 2 * opts.tick_s
    idle = max(opts.tcp_keepalive_idle_s, math.ceil(window) + opts.tcp_keepalive_interval_s)
    probes_ms = (idle + opts.tcp_keepalive_interval_s * opts.tcp_keepalive_count) * 1000
    user_timeout = max(opts.tcp_user_timeout_ms, probes_ms) if opts.tcp_user_timeout_ms else 0
    raised = idle != opts.tcp_keepalive_idle_s or user_timeout != opts.tcp_user_timeout_ms
    return Keepalive(idle, opts.tcp_keepalive_interval_s, opts.tcp_keepalive_count,
                     user_timeout, raised)


def apply_keepalive(sock: socket.socket, opts: EngineOptions) -> None:
    """Set keepalive on a socket; accepted sockets inherit it from their listener on Linux."""
    ka = keepalive_for(opts)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, ka.idle_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, ka.interval_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, ka.count)
    sock.setsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT, ka.user_timeout_ms)


def listening_socket(opts: EngineOptions, port: int, *, reuseport: bool, listen: bool = True) -> socket.socket:
    family = socket.AF_INET6 if ":" in opts.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        apply_keepalive(sock, opts)
        sock.bind((opts.host, port))
        if listen:
            sock.listen(opts.backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


_TCP_INFO_HEAD = struct.Struct("=8B5I")  # struct tcp_info up to tcpi_unacked


def accept_queue_length(sock: socket.socket) -> int:
    """Connections the kernel has established on listening ``sock`` that nobody accepted yet
    (a listener's ``tcpi_unacked`` is its accept queue: what ``ss -lnt`` shows as Recv-Q);
    0 when the kernel will not say."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_HEAD.size)
    except OSError:
        return 0
    if len(info) < _TCP_INFO_HEAD.size:
        return 0
    return int(_TCP_INFO_HEAD.unpack_from(info)[12])
