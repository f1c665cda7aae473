"""The codec interface every framing (length-prefixed, line, WebSocket) implements.

A codec is *stateless* and shared by every connection of a worker: the only per-connection
state is the leftover bytes of an incomplete frame, which the engine keeps. That is what lets an
idle connection own no buffer.
"""

from __future__ import annotations

from typing import Protocol

Buffer = bytes | bytearray


class FrameError(Exception):
    """Input that can never become a valid frame. The connection must be closed.

    ``reason`` is a short machine-readable label (used in close reasons and metrics),
    ``close_code`` is a WebSocket-style close code for transports that have one.
    """

    def __init__(self, reason: str, detail: str = "", close_code: int = 1002) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.close_code = close_code


class FrameTooLarge(FrameError):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__("frame_too_large", f"{size} bytes > limit {limit}", close_code=1009)
        self.size = size
        self.limit = limit


class Codec(Protocol):
    """Decode frames from ``buf[pos:end]`` and encode payloads into frames."""

    max_frame_bytes: int

    def decode(self, buf: Buffer, pos: int, end: int) -> tuple[bytes | None, int]:
        """Decode one frame starting at ``pos``.

        Returns ``(payload, new_pos)`` when a whole frame is present, ``(None, pos)`` when more
        bytes are needed. Raises :class:`FrameError` when the bytes can never form a valid frame
        (for example a declared length above ``max_frame_bytes``), as early as that is known:
        an oversized frame is refused from its header, before its body arrives.
        """
        ...

    def encode(self, payload: bytes) -> bytes:
        """Return the framed bytes for ``payload``."""
        ...
