"""The heartbeat/echo app: tidegate's raw protocol (see protocol/heartbeat.py) on the engine.

It answers pings, echoes DATA frames, and lets the engine ping clients that fall silent. The
load generator's raw mode talks to it.
"""

from __future__ import annotations

import time

from tidegate.engine.conn import Conn
from tidegate.engine.handler import EventHandler
from tidegate.protocol.heartbeat import DATA, PING, PONG, frame


class EchoHandler(EventHandler):
    def on_traffic(self, c: Conn) -> None:
        valid = False
        while (payload := c.next_frame()) is not None:
            if not payload:
                continue
            kind = payload[0]
            if kind == PING:
                c.write(frame(PONG, payload[1:]))
            elif kind == DATA:
                c.write(frame(DATA, payload[1:]))
            elif kind != PONG:
                c.close("unknown_frame_type")
                return
            valid = True
        if valid and not c.is_ready:  # the first valid frame is the raw protocol's handshake
            c.ready()

    def ping_frame(self, c: Conn) -> bytes:
        return frame(PING, time.monotonic_ns().to_bytes(8, "big"))
