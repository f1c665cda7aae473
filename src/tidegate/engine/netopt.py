"""Socket options: listening sockets and the L1 liveness tier (kernel TCP keepalive)."""

from __future__ import annotations

import socket
import struct

from tidegate.engine.options import EngineOptions

# Linux values, for Pythons built without the constants.
TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def apply_keepalive(sock: socket.socket, opts: EngineOptions) -> None:
    """Set keepalive on a socket; accepted sockets inherit it from their listener on Linux."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, opts.tcp_keepalive_idle_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, opts.tcp_keepalive_interval_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, opts.tcp_keepalive_count)
    sock.setsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT, opts.tcp_user_timeout_ms)


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
