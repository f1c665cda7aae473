"""Test helpers: a transport that records what a session writes (no sockets)."""

from __future__ import annotations

__all__ = ["RecordingTransport"]


class RecordingTransport:
    """A :class:`~tidegate.gateway.session.Transport` that keeps every write and the close."""

    __slots__ = ("writes", "closed")

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed: tuple[int, str] | None = None

    def write(self, data: bytes) -> None:
        if self.closed is None:
            self.writes.append(data)

    def close(self, code: int, reason: str) -> None:
        if self.closed is None:
            self.closed = (code, reason)

    def take(self) -> list[bytes]:
        """The writes since the last call."""
        out, self.writes = self.writes, []
        return out
