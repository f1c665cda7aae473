"""The gnet-style handler API: subclass :class:`EventHandler` and override what you need."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tidegate.engine.conn import Conn
    from tidegate.engine.worker import Worker


class EventHandler:
    """Callbacks run on the worker's loop; none may block it.

    One handler instance lives in each worker process.
    """

    def on_boot(self, worker: Worker) -> None:
        """The worker's loop is running and listening."""

    def on_open(self, c: Conn) -> bytes | None:
        """A connection was accepted. Return bytes to send first, or None."""
        return None

    def on_traffic(self, c: Conn) -> None:
        """Bytes arrived. Read them with ``c.next_frame()`` / ``c.next()`` / ``c.peek()``.

        Bytes left unread are kept for the next call (an incomplete frame); views from
        ``peek`` are valid only until this call returns.
        """

    def on_close(self, c: Conn, reason: str) -> None:
        """The connection is gone; ``reason`` says why (``client_closed``, ``ping_timeout``...)."""

    def on_tick(self, worker: Worker) -> float | None:
        """Called every ``tick_s``; return a number of seconds to change the interval."""
        return None

    def on_shutdown(self, worker: Worker) -> None:
        """The worker is stopping; connections are still open."""

    def on_drain(self, c: Conn) -> None:
        """Say goodbye to ``c`` during a drain (a protocol-level "reconnect elsewhere")."""
        c.close("drain")

    def stats(self) -> dict[str, Any]:
        """Counters for /metrics (sent to the supervisor every second); keep it cheap."""
        return {}

    def ping_frame(self, c: Conn) -> bytes | None:
        """Bytes of an application-level ping for ``c``; None disables engine heartbeats."""
        return None
