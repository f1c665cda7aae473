"""An echo app with two misbehaviours on command, for the diagnostics tests."""

from __future__ import annotations

import asyncio
import time

from tidegate.apps.echo import EchoHandler
from tidegate.engine.conn import Conn
from tidegate.protocol.heartbeat import DATA

_leaked: list[asyncio.Task[None]] = []


def block_the_loop_for_tests() -> None:
    time.sleep(0.5)  # the blocking call a stall report must name


async def leaky_task_for_tests() -> None:
    await asyncio.sleep(3600)


class DiagHandler(EchoHandler):
    def on_traffic(self, c: Conn) -> None:
        buf, pos, end = c.inbound()
        if bytes(buf[pos + 4 : end]) == bytes([DATA]) + b"block":
            block_the_loop_for_tests()
        elif bytes(buf[pos + 4 : end]) == bytes([DATA]) + b"leak":
            _leaked.append(asyncio.get_running_loop().create_task(leaky_task_for_tests()))
        super().on_traffic(c)
