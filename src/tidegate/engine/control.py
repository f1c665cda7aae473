"""The supervisor <-> worker control channel: a SOCK_SEQPACKET pair, one message per packet.

Worker -> supervisor: ``R`` ready, ``S`` stats (JSON). Supervisor -> worker: ``F`` with file
descriptors attached (SCM_RIGHTS): accepted sockets handed to this worker.
"""

from __future__ import annotations

import json
import socket
from typing import Any

READY = b"R"
STATS = b"S"
FDS = b"F"
MAX_FDS_PER_MESSAGE = 64
_MAX_MSG = 65536


def pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send_json(sock: socket.socket, kind: bytes, body: dict[str, Any]) -> None:
    sock.send(kind + json.dumps(body, separators=(",", ":")).encode())


def send_fds(sock: socket.socket, fds: list[int]) -> None:
    socket.send_fds(sock, [FDS], fds)


def recv(sock: socket.socket) -> tuple[bytes, dict[str, Any] | None, list[int]] | None:
    """One message: (kind, json body or None, fds). None on EOF. Raises BlockingIOError."""
    data, fds, _flags, _addr = socket.recv_fds(sock, _MAX_MSG, MAX_FDS_PER_MESSAGE)
    if not data:
        return None
    kind = data[:1]
    body = json.loads(data[1:]) if kind != FDS and len(data) > 1 else None
    return kind, body, list(fds)
