"""Length-prefixed framing: a 4-byte big-endian unsigned length, then that many bytes."""

from __future__ import annotations

from tidegate.protocol.codec import Buffer, FrameTooLarge

HEADER_BYTES = 4


class LengthPrefixedCodec:
    __slots__ = ("max_frame_bytes",)

    def __init__(self, max_frame_bytes: int = 65536) -> None:
        self.max_frame_bytes = max_frame_bytes

    def decode(self, buf: Buffer, pos: int, end: int) -> tuple[bytes | None, int]:
        if end - pos < HEADER_BYTES:
            return None, pos
        size = int.from_bytes(buf[pos : pos + HEADER_BYTES], "big")
        if size > self.max_frame_bytes:
            raise FrameTooLarge(size, self.max_frame_bytes)
        stop = pos + HEADER_BYTES + size
        if stop > end:
            return None, pos
        return bytes(buf[pos + HEADER_BYTES : stop]), stop

    def encode(self, payload: bytes) -> bytes:
        if len(payload) > self.max_frame_bytes:
            raise FrameTooLarge(len(payload), self.max_frame_bytes)
        return len(payload).to_bytes(HEADER_BYTES, "big") + payload
