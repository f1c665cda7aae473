"""A connection: the protocol object the loop calls, and the handle the handler uses.

Memory discipline (500k of these): ``__slots__`` only, no buffer of its own (reads land in the
worker's shared buffer; only an incomplete frame's bytes are kept), no task, no timer (it sits
in the worker's timing wheel). Engine-wide state lives on the worker, reached through a class
attribute so it costs nothing per connection.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from tidegate.protocol.codec import Codec, FrameError

if TYPE_CHECKING:
    from tidegate.engine.handler import EventHandler
    from tidegate.engine.worker import Worker

# _flags bits
READY = 1  # handshake done: liveness switches from the handshake deadline to heartbeats
PING_OUT = 2  # a ping was sent and nothing has arrived since (any input counts as the pong)
PAUSED = 4  # the transport's write buffer is above its high-water mark
CLOSING = 8
# Moving between workers (engine/stealing.py): leaving is no close, arriving no accept.
MIGRATING = 16
# Chosen by the eviction controller, its turn in the run queue not come yet (engine/eviction.py):
# no later tick picks it again, and it does not move to another worker meanwhile.
EVICTING = 32


class Conn(asyncio.BufferedProtocol):
    __slots__ = ("_transport", "_pending", "_last_rx", "_ping_ms", "_wslot", "_flags", "context")

    # Set on the per-worker, per-listener subclass (see Worker.__init__): shared, 0 bytes/conn.
    _w: Worker
    _h: EventHandler
    _codec: Codec

    def __init__(self) -> None:
        self._transport: Any = None
        self._pending: bytes | None = None
        self._last_rx = 0
        self._ping_ms = 0  # when the outstanding ping was sent (ms on the worker's clock)
        self._wslot = -1
        self._flags = 0
        self.context: Any = None

    # ---- loop callbacks -------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self._transport = transport
        self._w.conn_opened(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        w = self._w
        pending = self._pending
        if pending is None:
            w.in_base = 0
            return w.read_view
        # Put the incomplete frame in front of the new bytes so frames stay contiguous.
        n = len(pending)
        w.read_buf[:n] = pending
        w.in_base = n
        return w.read_view[n:]

    def buffer_updated(self, nbytes: int) -> None:
        w = self._w
        flags = self._flags
        if flags & (CLOSING | PING_OUT):
            if flags & CLOSING:
                return  # lingering after our close: what the peer still sends is dropped
            self._flags = flags & ~PING_OUT
            w.pong_seen(self)
        w.bytes_in += nbytes
        end = w.in_base + nbytes
        w.in_pos = 0
        w.in_end = end
        self._pending = None
        self._last_rx = w.wheel.now
        try:
            self._h.on_traffic(self)
        except FrameError as exc:
            w.protocol_error(self, exc)
            return
        except Exception:
            w.handler_error(self)
            return
        pos = w.in_pos
        if pos < end and not self._flags & CLOSING:
            if end - pos > w.max_pending_bytes:
                w.protocol_error(self, FrameError("frame_too_large", f"{end - pos} bytes buffered"))
                return
            self._pending = bytes(w.read_buf[pos:end])

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._w.conn_lost(self, exc)

    def pause_writing(self) -> None:
        self._flags |= PAUSED
        self._w.paused[self] = 0

    def resume_writing(self) -> None:
        self._flags &= ~PAUSED
        self._w.writable(self)

    # ---- reading (valid inside on_traffic) ------------------------------------------
    def inbound_buffered(self) -> int:
        w = self._w
        return w.in_end - w.in_pos

    def inbound(self) -> tuple[bytearray, int, int]:
        """``(buf, pos, end)``: the unread bytes for sans-I/O parsers; valid in on_traffic.

        Parse from ``buf[pos:end]`` and ``discard`` what you consumed.
        """
        w = self._w
        return w.read_buf, w.in_pos, w.in_end

    def peek(self, n: int = -1) -> memoryview:
        """Up to ``n`` unread bytes (all when -1) without consuming them; valid in on_traffic."""
        w = self._w
        stop = w.in_end if n < 0 else min(w.in_end, w.in_pos + n)
        return w.read_view[w.in_pos : stop]

    def discard(self, n: int = -1) -> int:
        w = self._w
        stop = w.in_end if n < 0 else min(w.in_end, w.in_pos + n)
        done = stop - w.in_pos
        w.in_pos = stop
        return done

    def next(self, n: int = -1) -> bytes:
        """Consume and return up to ``n`` unread bytes (all when -1) as a copy."""
        w = self._w
        stop = w.in_end if n < 0 else min(w.in_end, w.in_pos + n)
        data = bytes(w.read_buf[w.in_pos : stop])
        w.in_pos = stop
        return data

    def next_frame(self) -> bytes | None:
        """Decode the next whole frame with the listener's codec, or None if incomplete."""
        w = self._w
        frame, w.in_pos = self._codec.decode(w.read_buf, w.in_pos, w.in_end)
        return frame

    def next_frame_with(self, codec: Codec) -> Any:
        """Like :meth:`next_frame` with another codec (a listener that speaks several)."""
        w = self._w
        frame, w.in_pos = codec.decode(w.read_buf, w.in_pos, w.in_end)
        return frame

    # ---- writing --------------------------------------------------------------------
    def write(self, data: bytes | bytearray) -> None:
        t = self._transport
        if self._flags & (CLOSING | PAUSED):
            if self._flags & CLOSING:
                return
            if (t.get_write_buffer_size() + len(data) > self._w.max_write_buffer_bytes
                    or self._w.queued_while_paused(self)):
                self.abort("slow_consumer")
                return
        w = self._w
        w.bytes_out += len(data)
        w.writes += 1
        t.write(data)

    def writev(self, chunks: list[bytes]) -> None:
        if self._flags & (CLOSING | PAUSED):
            if self._flags & CLOSING:
                return
            if (self._transport.get_write_buffer_size() > self._w.max_write_buffer_bytes
                    or self._w.queued_while_paused(self)):
                self.abort("slow_consumer")
                return
        self._transport.writelines(chunks)

    async def async_write(self, data: bytes) -> None:
        """Write, then wait until the kernel has taken the output down to the low-water mark."""
        self.write(data)
        if self._flags & PAUSED and not self._flags & CLOSING:
            await self._w.wait_writable(self)

    def close(self, reason: str = "server_closed") -> None:
        """Flush what is queued, then close. ``reason`` reaches on_close and the counters.

        A lingering close: our side shuts down writing once the output is flushed and drops
        whatever the peer still sends until it closes too (or ``linger_s`` passes). Closing a
        socket with unread input makes the kernel send RST, which can destroy our last words
        (an error reply, a WebSocket close frame) before the peer reads them.
        """
        if self._flags & CLOSING:
            return
        self._flags |= CLOSING
        w = self._w
        w.close_reasons.setdefault(self, reason)  # a reason set first (drain) wins
        t = self._transport
        if t.can_write_eof():
            t.write_eof()
            w.linger(self)
        else:
            t.close()

    def abort(self, reason: str) -> None:
        """Close now, dropping queued output (slow consumers, protocol violations)."""
        if not self._flags & CLOSING:
            self._flags |= CLOSING
            self._w.close_reasons.setdefault(self, reason)
        self._transport.abort()

    # ---- state ----------------------------------------------------------------------
    def ready(self) -> None:
        """Mark the handshake done: heartbeats replace the handshake deadline."""
        if not self._flags & READY:
            self._flags |= READY
            self._w.heartbeat_from_now(self)

    @property
    def is_ready(self) -> bool:
        return bool(self._flags & READY)

    @property
    def closing(self) -> bool:
        return bool(self._flags & CLOSING)

    @property
    def remote_addr(self) -> Any:
        return self._transport.get_extra_info("peername") if self._transport else None

    @property
    def write_buffer_bytes(self) -> int:
        return int(self._transport.get_write_buffer_size()) if self._transport else 0
