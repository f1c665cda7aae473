"""The heartbeat/echo app: tidegate's raw protocol (see protocol/heartbeat.py) on the engine.

It answers pings, echoes DATA frames, and lets the engine ping clients that fall silent. The
load generator's raw mode talks to it.

``on_traffic`` parses the worker's read buffer in place (one ``unpack_from`` per frame, one
copy per reply) instead of going through ``next_frame``: at 500k connections every heartbeat
runs it, and the generic path (a decode call, a payload copy and a rebuilt frame per ping)
cost 2.6 us of Python per ping against 2.1 us for this one (``bench/heartbeat_cost.py``, which
also compares the whole server's CPU per heartbeat with a bare uvloop Protocol's: 30 vs 24 us).
"""

from __future__ import annotations

import struct
import time

from tidegate.engine.conn import Conn
from tidegate.engine.handler import EventHandler
from tidegate.engine.worker import Worker
from tidegate.protocol.codec import FrameTooLarge
from tidegate.protocol.heartbeat import DATA, PING, PONG, frame

_HEAD = struct.Struct(">IB")  # the length prefix and the frame type byte
_LEN = struct.Struct(">I")


class EchoHandler(EventHandler):
    # The engine's length-prefixed limit (EngineOptions.max_frame_bytes); set by on_boot.
    max_frame_bytes = 65536

    def on_boot(self, worker: Worker) -> None:
        self.max_frame_bytes = worker.opts.max_frame_bytes

    def on_traffic(self, c: Conn) -> None:
        buf, start, end = c.inbound()
        max_bytes = self.max_frame_bytes
        pos = start
        valid = False
        while end - pos >= 4:
            if end - pos >= 5:
                size, kind = _HEAD.unpack_from(buf, pos)
            else:
                size, kind = _LEN.unpack_from(buf, pos)[0], -1
            if size > max_bytes:
                raise FrameTooLarge(size, max_bytes)
            stop = pos + 4 + size
            if stop > end:
                break
            if size == 0:  # an empty frame has no type byte: skip it
                pos = stop
                continue
            if kind == PING or kind == DATA:
                reply = buf[pos:stop]  # the same frame back, a PING's type byte turned to PONG
                if kind == PING:
                    reply[4] = PONG
                c.write(reply)
            elif kind != PONG:
                c.discard(stop - start)
                c.close("unknown_frame_type")
                return
            valid = True
            pos = stop
        c.discard(pos - start)
        if valid and not c.is_ready:  # the first valid frame is the raw protocol's handshake
            c.ready()

    def ping_frame(self, c: Conn) -> bytes:
        return frame(PING, time.monotonic_ns().to_bytes(8, "big"))

    # Work stealing: an echo connection has no state beyond what the engine carries (ready,
    # idle time), so any idle one may move to another worker.
    def export_state(self, c: Conn) -> bytes:
        return b""

    def import_state(self, c: Conn, state: bytes) -> None:
        pass

