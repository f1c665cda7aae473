"""Per-channel presence: which clients (and users) are subscribed, for channels that keep it.

Stats are O(1): a per-channel count of connections per user is kept beside the client map.
Costs one dict entry per (presence channel, subscriber); channels without ``presence`` cost
nothing.
"""

from __future__ import annotations

from tidegate.gateway.messages import ClientInfo

__all__ = ["PresenceStore"]


class PresenceStore:
    __slots__ = ("_clients", "_users")

    def __init__(self) -> None:
        self._clients: dict[str, dict[str, ClientInfo]] = {}
        self._users: dict[str, dict[str, int]] = {}

    def add(self, channel: str, info: ClientInfo) -> None:
        clients = self._clients.get(channel)
        if clients is None:
            clients = self._clients[channel] = {}
            self._users[channel] = {}
        users = self._users[channel]
        old = clients.get(info.client)
        if old is not None:
            self._drop_user(channel, users, old.user)
        clients[info.client] = info
        users[info.user] = users.get(info.user, 0) + 1

    def _drop_user(self, channel: str, users: dict[str, int], user: str) -> None:
        n = users.get(user, 0) - 1
        if n > 0:
            users[user] = n
        else:
            users.pop(user, None)

    def remove(self, channel: str, client: str) -> None:
        clients = self._clients.get(channel)
        if clients is None:
            return
        info = clients.pop(client, None)
        if info is None:
            return
        self._drop_user(channel, self._users[channel], info.user)
        if not clients:
            del self._clients[channel]
            del self._users[channel]

    def get(self, channel: str) -> dict[str, ClientInfo]:
        """client id -> info (a copy)."""
        return dict(self._clients.get(channel, ()))

    def stats(self, channel: str) -> tuple[int, int]:
        """(num_clients, num_users)."""
        clients = self._clients.get(channel)
        if clients is None:
            return 0, 0
        return len(clients), len(self._users[channel])

    def channels(self) -> int:
        return len(self._clients)

    def names(self) -> list[str]:
        """The channels that have presence entries here."""
        return list(self._clients)

    def drop(self, channel: str) -> None:
        """Forget a channel's presence (its owner moved to another worker)."""
        self._clients.pop(channel, None)
        self._users.pop(channel, None)
