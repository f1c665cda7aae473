"""Line-delimited framing: payloads end with ``\\n`` (a preceding ``\\r`` is stripped)."""

from __future__ import annotations

from tidegate.protocol.codec import Buffer, FrameTooLarge


class LineCodec:
    __slots__ = ("max_frame_bytes",)

    def __init__(self, max_frame_bytes: int = 65536) -> None:
        self.max_frame_bytes = max_frame_bytes

    def decode(self, buf: Buffer, pos: int, end: int) -> tuple[bytes | None, int]:
        # Search no further than the limit: a flood without newlines is refused early.
        limit = min(end, pos + self.max_frame_bytes + 2)
        nl = buf.find(b"\n", pos, limit)
        if nl < 0:
            if limit - pos > self.max_frame_bytes + 1:
                raise FrameTooLarge(limit - pos, self.max_frame_bytes)
            return None, pos
        stop = nl
        if stop > pos and buf[stop - 1] == 13:  # b"\r"
            stop -= 1
        if stop - pos > self.max_frame_bytes:
            raise FrameTooLarge(stop - pos, self.max_frame_bytes)
        return bytes(buf[pos:stop]), nl + 1

    def encode(self, payload: bytes) -> bytes:
        if b"\n" in payload:
            raise ValueError("a line payload cannot contain a newline")
        if len(payload) > self.max_frame_bytes:
            raise FrameTooLarge(len(payload), self.max_frame_bytes)
        return payload + b"\n"
