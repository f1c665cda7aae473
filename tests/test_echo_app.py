"""The echo app's in-place frame parser, fed arbitrary splits of arbitrary frame sequences.

The parser reads the worker's shared buffer directly (apps/echo.py), so it is driven here through
a real Worker and Conn with a transport that records writes: every PING must come back as a
PONG with its token, every DATA echoed, in order, whatever the read boundaries.
"""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from test_gateway_fast_path import FakeTransport  # the asyncio transport under a Conn
from tidegate.apps.echo import EchoHandler
from tidegate.engine.options import EngineOptions
from tidegate.engine.worker import Worker
from tidegate.protocol.heartbeat import DATA, PING, PONG, frame


def _feed(chunks: list[bytes]) -> tuple[bytes, Any]:
    async def run() -> tuple[bytes, Any]:
        worker = Worker(EngineOptions(), EchoHandler())
        worker.handler.on_boot(worker)
        conn = worker.conn_class()
        transport = FakeTransport()
        conn._transport = transport
        for chunk in chunks:
            view = conn.get_buffer(len(chunk))
            view[: len(chunk)] = chunk
            conn.buffer_updated(len(chunk))
        return bytes(transport.out), conn

    return asyncio.run(run())


frames = st.lists(
    st.tuples(st.sampled_from([PING, DATA, PONG]), st.binary(max_size=40)), max_size=12)


@settings(max_examples=150, deadline=None)
@given(frames, st.lists(st.integers(min_value=1, max_value=30), max_size=40))
def test_replies_do_not_depend_on_read_boundaries(
        items: list[tuple[int, bytes]], cuts: list[int]) -> None:
    wire = b"".join(frame(kind, body) for kind, body in items)
    chunks, pos = [], 0
    for cut in cuts:
        if pos >= len(wire):
            break
        chunks.append(wire[pos : pos + cut])
        pos += cut
    if pos < len(wire):
        chunks.append(wire[pos:])
    out, conn = _feed(chunks)
    expected = b"".join(
        frame(PONG if kind == PING else DATA, body) for kind, body in items if kind != PONG)
    assert out == expected
    assert conn.is_ready == bool(items)


def test_empty_frames_are_skipped_and_unknown_types_close() -> None:
    out, conn = _feed([b"\0\0\0\0" + frame(PING, b"t") + b"\0\0\0\0"])
    assert out == frame(PONG, b"t") and not conn.closing
    out, conn = _feed([frame(0x7F, b"x") + frame(PING, b"late")])
    assert out == b"" and conn.closing
