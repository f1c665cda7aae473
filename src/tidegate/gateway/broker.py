"""The broker: where publications, join/leave events, history and presence live.

:class:`Broker` is the interface; :class:`MemoryBroker` the embedded default (one process, no
network). A cross-worker or Redis broker drops in behind the same interface: it delivers what
any node publishes to every node's registered :class:`BrokerEventHandler` (the hub), which fans
it out to local sessions.

All methods are coroutines because a remote broker awaits the network. A broker whose
coroutines never suspend and need no running task sets ``inline = True``; sessions then drive
them synchronously (no task, no event-loop round trip) - the in-memory fast path.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from tidegate.gateway.history import HistoryStore, RecoveryResult
from tidegate.gateway.messages import ClientInfo, HistoryResult, Publication
from tidegate.gateway.presence import PresenceStore

if TYPE_CHECKING:
    from tidegate.gateway.relaylog import RelayLog

__all__ = ["Broker", "BrokerError", "BrokerEventHandler", "MemoryBroker"]


class BrokerError(Exception):
    """The broker could not do what was asked (unreachable, timed out)."""


class BrokerEventHandler(Protocol):
    """What a broker calls when a message for a channel this node subscribed to arrives."""

    def handle_publication(self, channel: str, pub: Publication) -> None: ...

    def handle_join(self, channel: str, info: ClientInfo) -> None: ...

    def handle_leave(self, channel: str, info: ClientInfo) -> None: ...


class Broker(ABC):
    inline: bool = False
    # A broker that relays between workers keeps one (gateway/relaylog.py): sessions that move
    # between workers then miss nothing relayed while they were in flight. None: at most once.
    relay_log: RelayLog | None = None

    @abstractmethod
    def register(self, handler: BrokerEventHandler) -> None:
        """Set the receiver of this node's channel messages (called once, by the hub)."""

    # ---- pub/sub
    @abstractmethod
    async def publish(
        self,
        channel: str,
        data: bytes,
        json_data: bytes | None,
        *,
        info: ClientInfo | None = None,
        tags: dict[str, str] | None = None,
        history_size: int = 0,
        history_ttl_s: float = 0.0,
    ) -> Publication:
        """Append to the channel's history when ``history_size`` and ``history_ttl_s`` are set
        (the returned publication then has its offset) and deliver to every node."""

    @abstractmethod
    async def publish_join(self, channel: str, info: ClientInfo) -> None: ...

    @abstractmethod
    async def publish_leave(self, channel: str, info: ClientInfo) -> None: ...

    @abstractmethod
    async def subscribe(self, channel: str) -> None:
        """This node wants the channel's messages (its first local subscriber arrived)."""

    @abstractmethod
    async def unsubscribe(self, channel: str) -> None:
        """This node no longer has local subscribers of the channel."""

    # ---- history
    @abstractmethod
    async def history(
        self,
        channel: str,
        *,
        history_size: int,
        history_ttl_s: float,
        limit: int = -1,
        since: tuple[int, str] | None = None,
        reverse: bool = False,
    ) -> HistoryResult:
        """Publications and the stream top. Raises history.Unrecoverable for a bad ``since``."""

    @abstractmethod
    async def recover(
        self,
        channel: str,
        since_offset: int,
        epoch: str,
        *,
        history_size: int,
        history_ttl_s: float,
        max_publications: int,
    ) -> RecoveryResult: ...

    @abstractmethod
    async def remove_history(self, channel: str) -> None: ...

    # ---- presence
    @abstractmethod
    async def add_presence(self, channel: str, info: ClientInfo) -> None: ...

    @abstractmethod
    async def remove_presence(self, channel: str, client: str) -> None: ...

    @abstractmethod
    async def presence(self, channel: str) -> dict[str, ClientInfo]: ...

    @abstractmethod
    async def presence_stats(self, channel: str) -> tuple[int, int]:
        """(num_clients, num_users)"""

    async def close(self) -> None:
        return None


class MemoryBroker(Broker):
    """Everything in this process: history rings, presence maps, direct delivery to the hub."""

    inline = True

    def __init__(
        self, history_meta_ttl_s: float = 30 * 24 * 3600.0, clock: Callable[[], float] = time.time
    ) -> None:
        self._handler: BrokerEventHandler | None = None
        self.history_store = HistoryStore(history_meta_ttl_s, clock)
        self.presence_store = PresenceStore()

    def register(self, handler: BrokerEventHandler) -> None:
        self._handler = handler

    async def publish(
        self,
        channel: str,
        data: bytes,
        json_data: bytes | None,
        *,
        info: ClientInfo | None = None,
        tags: dict[str, str] | None = None,
        history_size: int = 0,
        history_ttl_s: float = 0.0,
    ) -> Publication:
        if history_size > 0 and history_ttl_s > 0:
            pub = self.history_store.add(
                channel,
                data,
                json_data,
                size=history_size,
                ttl_s=history_ttl_s,
                info=info,
                tags=tags,
            )
        else:
            pub = Publication(data, json_data, 0, info, tags, int(time.time() * 1000))
        if self._handler is not None:
            self._handler.handle_publication(channel, pub)
        return pub

    async def publish_join(self, channel: str, info: ClientInfo) -> None:
        if self._handler is not None:
            self._handler.handle_join(channel, info)

    async def publish_leave(self, channel: str, info: ClientInfo) -> None:
        if self._handler is not None:
            self._handler.handle_leave(channel, info)

    async def subscribe(self, channel: str) -> None:
        return None

    async def unsubscribe(self, channel: str) -> None:
        return None

    async def history(
        self,
        channel: str,
        *,
        history_size: int,
        history_ttl_s: float,
        limit: int = -1,
        since: tuple[int, str] | None = None,
        reverse: bool = False,
    ) -> HistoryResult:
        return self.history_store.history(
            channel,
            size=history_size,
            ttl_s=history_ttl_s,
            limit=limit,
            since=since,
            reverse=reverse,
        )

    async def recover(
        self,
        channel: str,
        since_offset: int,
        epoch: str,
        *,
        history_size: int,
        history_ttl_s: float,
        max_publications: int,
    ) -> RecoveryResult:
        return self.history_store.recover(
            channel,
            since_offset,
            epoch,
            size=history_size,
            ttl_s=history_ttl_s,
            max_pubs=max_publications,
        )

    async def remove_history(self, channel: str) -> None:
        self.history_store.remove(channel)

    async def add_presence(self, channel: str, info: ClientInfo) -> None:
        self.presence_store.add(channel, info)

    async def remove_presence(self, channel: str, client: str) -> None:
        self.presence_store.remove(channel, client)

    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        return self.presence_store.get(channel)

    async def presence_stats(self, channel: str) -> tuple[int, int]:
        return self.presence_store.stats(channel)
