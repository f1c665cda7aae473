"""The supervisor <-> worker control channel: a SOCK_SEQPACKET pair, one message per packet.

Worker -> supervisor: ``R`` ready, ``S`` stats (JSON), ``Q`` "I was told to stop". Supervisor ->
worker: ``F`` with file descriptors attached (SCM_RIGHTS): accepted sockets handed to this
worker; ``D`` drain. The other kinds are below.
"""

from __future__ import annotations

import json
import socket
from typing import Any

READY = b"R"
STATS = b"S"
FDS = b"F"  # body: one byte, the index of the listener the sockets were accepted on
RELAY = b"B"  # worker -> supervisor -> every other worker, body passed through untouched
TO = b"T"  # worker -> supervisor -> one worker: body = 2-byte target index + payload
# supervisor -> every worker: the indices of the workers that are up (ready), "0,2,3"
MEMBERS = b"M"
# Work stealing (engine/stealing.py). worker -> supervisor: 2-byte target index + payload, maybe
# with fds; supervisor -> worker: 2-byte sender index + payload, the fds passed on.
STEAL = b"W"
LOADS = b"w"  # supervisor -> every worker: JSON list of connections per worker (-1: not up)
# The node drains (Supervisor._shutdown): supervisor -> worker "stop stealing", worker ->
# supervisor the same kind back once it has stopped; then supervisor -> worker "drain now".
STEAL_OFF = b"x"
DRAIN = b"D"
# worker -> supervisor: this worker got SIGTERM/SIGINT itself (body: the signal's name). It does
# not drain on its own: the supervisor drains the node as on its own SIGTERM, DRAIN included.
STOP_REQUEST = b"Q"
# The node's CPU gate (engine/cpu_gate.py): worker -> supervisor "+" ask for a token, "-" give
# it back; supervisor -> worker "+" granted.
GATE = b"G"
_JSON_KINDS = (READY, STATS)
MAX_FDS_PER_MESSAGE = 64
_MAX_MSG = 8 << 20  # relayed history replies can hold many publications
_SOCK_BUF = 8 << 20


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        for opt, force in ((socket.SO_SNDBUF, 32), (socket.SO_RCVBUF, 33)):  # *BUFFORCE
            try:
                s.setsockopt(socket.SOL_SOCKET, force, _SOCK_BUF)
            except OSError:  # not root: as much as net.core.[rw]mem_max allows
                s.setsockopt(socket.SOL_SOCKET, opt, _SOCK_BUF)
    return a, b


def send_json(sock: socket.socket, kind: bytes, body: dict[str, Any]) -> None:
    sock.send(kind + json.dumps(body, separators=(",", ":")).encode())


def send_fds(sock: socket.socket, fds: list[int], listener: int = 0) -> None:
    socket.send_fds(sock, [FDS + bytes((listener,))], fds)


def recv(sock: socket.socket) -> tuple[bytes, Any, list[int]] | None:
    """One message: (kind, body, fds); the body is parsed JSON for READY/STATS, else bytes.

    None on EOF. Raises BlockingIOError when nothing is waiting.
    """
    data, fds, _flags, _addr = socket.recv_fds(sock, _MAX_MSG, MAX_FDS_PER_MESSAGE)
    if not data:
        return None
    kind = data[:1]
    body: Any = json.loads(data[1:]) if kind in _JSON_KINDS else data[1:]
    return kind, body, list(fds)
