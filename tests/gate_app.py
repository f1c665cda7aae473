"""An echo app whose clients can start long run-queue jobs, for the CPU gate's tests.

DATA ``pid``: answers DATA ``<pid>``. DATA ``job <steps> <step_ms> [hold_ms]``: queues a job of
``steps`` steps, each spinning ``step_ms`` (the first step the job takes while the worker holds a
gate token spins ``hold_ms`` instead, when given, after sending DATA ``holding <pid>``); at its end
it answers DATA with JSON: the pid and, per step, [start, end, token held] (CLOCK_MONOTONIC,
comparable between the node's processes).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

from tidegate.apps.echo import EchoHandler
from tidegate.engine.conn import Conn
from tidegate.protocol.heartbeat import DATA, frame


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


class GateHandler(EchoHandler):
    def on_traffic(self, c: Conn) -> None:
        buf, pos, end = c.inbound()
        body = bytes(buf[pos + 5 : end]) if end - pos >= 5 and buf[pos + 4] == DATA else b""
        if body and not c.is_ready:
            c.ready()  # a valid frame: the raw protocol's handshake
        if body == b"pid":
            c.discard(end - pos)
            c.write(frame(DATA, str(os.getpid()).encode()))
        elif body.startswith(b"job "):
            c.discard(end - pos)
            args = [float(x) for x in body.split()[1:]]
            steps, step_ms = int(args[0]), args[1]
            hold_ms = args[2] if len(args) > 2 else 0.0
            c._w.runqueue.submit(self._job(c, steps, step_ms, hold_ms), "test-job")
        else:
            super().on_traffic(c)

    def _job(self, c: Conn, steps: int, step_ms: float, hold_ms: float) -> Iterator[None]:
        rq = c._w.runqueue
        record: list[tuple[float, float, bool]] = []
        told = False
        for _ in range(steps):
            held = rq.gate is not None and rq.gate.held
            t0 = time.monotonic()
            if held and hold_ms and not told:
                told = True
                c.write(frame(DATA, f"holding {os.getpid()}".encode()))  # sent at once
                _spin(hold_ms / 1000.0)
            else:
                _spin(step_ms / 1000.0)
            record.append((t0, time.monotonic(), held))
            yield
        c.write(frame(DATA, json.dumps({"pid": os.getpid(), "steps": record}).encode()))
