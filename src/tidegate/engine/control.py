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
FDS = b"F"  # body: one byte, the index of the listener the sockets were accepted on
RELAY = b"B"  # worker -> supervisor -> every other worker, body passed through untouched
_JSON_KINDS = (READY, STATS)
MAX_FDS_PER_MESSAGE = 64
_MAX_MSG = 1 << 20  # relayed publications can be up to the max frame size


def pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


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
