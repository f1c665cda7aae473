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

    def eviction_rank(self, c: Conn) -> tuple[Any, ...] | None:
        """Where ``c`` stands when its worker sheds load (engine/eviction.py): the smallest
        ranks go first; None = protected, never evicted. Called for every connection on a tick
        above a ceiling: keep it cheap. Default: the one idle (no input) longest first."""
        return (c._last_rx,)

    def eviction_class(self, c: Conn) -> str:
        """``c``'s class, a bounded label for the eviction counters (never per connection)."""
        return "default"

    def evict(self, c: Conn, delay_s: float) -> None:
        """Shed ``c``: tell the client to come back in about ``delay_s`` seconds (a
        protocol-level "reconnect later"), then close. The close counts as ``evicted``."""
        c.close("evicted")

    def stats(self) -> dict[str, Any]:
        """Counters for /metrics (sent to the supervisor every second); keep it cheap."""
        return {}

    def ping_frame(self, c: Conn) -> bytes | None:
        """Bytes of an application-level ping for ``c``; None disables engine heartbeats."""
        return None

    def export_state(self, c: Conn) -> bytes | None:
        """Work stealing (engine/stealing.py): what another worker needs to carry on with
        ``c``, or None to keep it here (the default: a handler that does not override this
        never has its connections moved). Called only for an idle ``c`` with nothing buffered
        either way. Bytes hand ``c`` over: forget it as if closed (``on_close`` is not called).
        If the hand-over fails before the socket leaves, ``import_state`` takes it back."""
        return None

    def import_state(self, c: Conn, state: bytes) -> None:
        """``c`` arrived from another worker with its ``export_state`` bytes (instead of
        ``on_open``); it is ready, its heartbeats carry on."""
