"""The per-worker gateway context every session shares: config, hub, broker, handlers, clock.

    node = Node(load_config("config/example.toml"), rpc_handler=my_rpc)
    session = ClientSession(transport, node, "json")   # per connection

One Node per worker process; sessions hold a reference to it instead of carrying any of this.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any

from tidegate import __version__
from tidegate.gateway.broker import Broker, BrokerError, MemoryBroker
from tidegate.gateway.config import GatewayConfig
from tidegate.gateway.hub import Hub

if TYPE_CHECKING:
    from tidegate.gateway.session import ClientSession

__all__ = ["Node", "RPCHandler", "SendHandler", "drive"]

log = logging.getLogger("tidegate.gateway")

# rpc(session, method, data) -> reply data (JSON text for JSON clients). Sync or async.
# Raise codes.ReplyError for an error reply, codes.DisconnectError to disconnect.
RPCHandler = Callable[["ClientSession", str, bytes], "bytes | Awaitable[bytes]"]
# send(session, data): an async message from the client; no reply. Sync or async.
SendHandler = Callable[["ClientSession", bytes], "None | Awaitable[None]"]


class Resume:
    """Await the rest of a coroutine that already ran up to its first suspension.

    ``first`` is what the coroutine yielded (an asyncio future). Awaiting this in a task
    behaves exactly like ``await coro`` would have from the start.
    """

    __slots__ = ("coro", "first")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self.coro = coro
        self.first = first

    def __await__(self) -> Generator[Any, Any, Any]:
        coro = self.coro
        value = self.first
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


_detached: set[asyncio.Task[Any]] = set()


def _log_task(task: asyncio.Task[Any]) -> None:
    _detached.discard(task)
    if not task.cancelled() and task.exception() is not None:
        _log_failure(task.exception())


def _log_failure(exc: BaseException | None) -> None:
    # A broker that cannot be reached fails every session's clean-up at once (a mass
    # disconnect): one line each, not a traceback each.
    if isinstance(exc, BrokerError):
        log.warning("gateway background work failed: %s", exc)
    else:
        log.error("gateway background work failed", exc_info=exc)


async def _await(aw: Awaitable[Any]) -> Any:
    return await aw


def drive(coro: Coroutine[Any, Any, Any], inline: bool) -> None:
    """Run ``coro`` for its effects: synchronously when ``inline`` and it never suspends,
    otherwise (or from its first suspension on) in a task kept alive until done."""
    if inline:
        try:
            first = coro.send(None)
        except StopIteration:
            return
        except Exception as exc:
            _log_failure(exc)
            return
        aw: Awaitable[Any] = Resume(coro, first)
        task = asyncio.get_running_loop().create_task(_await(aw))
    else:
        task = asyncio.get_running_loop().create_task(coro)
    _detached.add(task)
    task.add_done_callback(_log_task)


class Node:
    __slots__ = (
        "config",
        "broker",
        "hub",
        "rpc_handler",
        "send_handler",
        "rpc_inline",
        "send_inline",
        "clock",
        "version",
        "name",
        "_id_prefix",
        "_ids",
        "connect_attempts",
        "connect_failures",
    )

    def __init__(
        self,
        config: GatewayConfig,
        *,
        broker: Broker | None = None,
        rpc_handler: RPCHandler | None = None,
        send_handler: SendHandler | None = None,
        clock: Callable[[], float] = time.time,
        name: str = "",
    ) -> None:
        self.config = config
        self.clock = clock
        self.broker = broker or MemoryBroker(config.history_meta_ttl_s, clock)
        self.hub = Hub(config, self.broker)
        self.rpc_handler = rpc_handler
        self.send_handler = send_handler
        # a coroutine function handler needs a real task (it may use asyncio.timeout etc.)
        self.rpc_inline = not inspect.iscoroutinefunction(rpc_handler)
        self.send_inline = not inspect.iscoroutinefunction(send_handler)
        self.version = f"tidegate {__version__}"
        self.name = name
        self._id_prefix = secrets.token_hex(4) + "-"
        self._ids = itertools.count(1)
        # For the connect-availability SLO: client-side failures (tokens) are told apart from
        # server-side ones ("internal", "unavailable"), which spend the error budget.
        self.connect_attempts = 0
        self.connect_failures: dict[str, int] = {}

    def connect_failed(self, exc: BaseException) -> None:
        code = getattr(exc, "code", None)
        disconnect = getattr(exc, "disconnect", None)
        if code == 109:
            reason = "token_expired"
        elif code == 101:
            reason = "unauthorized"
        elif disconnect is not None and disconnect.code == 3500:
            reason = "token_invalid"
        elif disconnect is not None or code is not None:
            reason = "client_error"
        elif isinstance(exc, BrokerError):
            reason = "unavailable"
        else:
            reason = "internal"
        self.connect_failures[reason] = self.connect_failures.get(reason, 0) + 1

    @property
    def inline(self) -> bool:
        """Broker calls complete synchronously (the embedded broker)."""
        return self.broker.inline

    def new_client_id(self) -> str:
        """Unique per process run: a random per-process prefix plus a counter (short: it is
        kept per connection)."""
        return f"{self._id_prefix}{next(self._ids):x}"
