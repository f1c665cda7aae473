"""tidegate's raw heartbeat protocol, carried in length-prefixed frames.

Each frame's payload starts with one type byte:

* ``PING`` (0x01) + opaque token: the receiver answers ``PONG`` with the same token.
  The load generator's token is its send time (8-byte big-endian ns), so it measures RTT.
* ``PONG`` (0x02) + the token of the ping it answers.
* ``DATA`` (0x03) + bytes: application data (the built-in echo app sends it back).

Either side may ping. The server pings only a connection that has been silent for a whole
``ping_interval_s``: a client that pings on its own is never pinged back, halving heartbeat
traffic at 500k connections.
"""

from __future__ import annotations

PING = 0x01
PONG = 0x02
DATA = 0x03


def frame(kind: int, body: bytes = b"") -> bytes:
    """The length-prefixed bytes of one heartbeat-protocol frame."""
    payload_len = 1 + len(body)
    return payload_len.to_bytes(4, "big") + bytes((kind,)) + body
