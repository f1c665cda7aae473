"""The engine: sockets, event loops, worker processes, timers. Knows nothing of channels.

    from tidegate.engine import EngineOptions, EventHandler, run

    class Echo(EventHandler):
        def on_traffic(self, c):
            c.write(c.next())

    run(Echo, EngineOptions(port=9000))
"""

from __future__ import annotations

from collections.abc import Callable

from tidegate.engine.conn import Conn
from tidegate.engine.handler import EventHandler
from tidegate.engine.options import EngineOptions

__all__ = ["Conn", "EngineOptions", "EventHandler", "run"]


def run(
    handler_factory: Callable[[], EventHandler | list[EventHandler]], opts: EngineOptions
) -> int:
    """Start the supervisor and its workers; blocks until SIGTERM/SIGINT. Returns an exit code.

    ``handler_factory`` runs once in each worker; it returns one handler, or one per listening
    port (``opts.port`` then ``opts.extra_ports``).
    """
    from tidegate import log
    from tidegate.engine.supervisor import Supervisor

    log.setup()
    return Supervisor(opts, handler_factory).run()
