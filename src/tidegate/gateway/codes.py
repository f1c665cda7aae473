"""Centrifugo client-protocol v2 error, unsubscribe and disconnect codes.

* Errors (100..112) travel inside a Reply to one command; the connection stays open.
* Unsubscribe codes travel in an ``unsubscribe`` push: < 2500 the SDK gives the subscription up,
  >= 2500 it resubscribes.
* Disconnect codes are the WebSocket close code (plus a ``disconnect`` push where a transport has
  no close frame). 3000..3499 and 4000..4499 tell the SDK to reconnect; 3500..3999 and
  4500..4999 tell it not to.
"""

from __future__ import annotations

from typing import NamedTuple


class ReplyError(Exception):
    """An error answered to one command (the connection goes on)."""

    def __init__(self, code: int, message: str, temporary: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.temporary = temporary


# code -> (message, temporary)
ERROR_INTERNAL = 100
ERROR_UNAUTHORIZED = 101
ERROR_UNKNOWN_CHANNEL = 102
ERROR_PERMISSION_DENIED = 103
ERROR_METHOD_NOT_FOUND = 104
ERROR_ALREADY_SUBSCRIBED = 105
ERROR_LIMIT_EXCEEDED = 106
ERROR_BAD_REQUEST = 107
ERROR_NOT_AVAILABLE = 108
ERROR_TOKEN_EXPIRED = 109
ERROR_EXPIRED = 110
ERROR_TOO_MANY_REQUESTS = 111
ERROR_UNRECOVERABLE_POSITION = 112

ERROR_MESSAGES: dict[int, tuple[str, bool]] = {
    ERROR_INTERNAL: ("internal server error", True),
    ERROR_UNAUTHORIZED: ("unauthorized", False),
    ERROR_UNKNOWN_CHANNEL: ("unknown channel", False),
    ERROR_PERMISSION_DENIED: ("permission denied", False),
    ERROR_METHOD_NOT_FOUND: ("method not found", False),
    ERROR_ALREADY_SUBSCRIBED: ("already subscribed", False),
    ERROR_LIMIT_EXCEEDED: ("limit exceeded", False),
    ERROR_BAD_REQUEST: ("bad request", False),
    ERROR_NOT_AVAILABLE: ("not available", False),
    ERROR_TOKEN_EXPIRED: ("token expired", False),
    ERROR_EXPIRED: ("expired", False),
    ERROR_TOO_MANY_REQUESTS: ("too many requests", True),
    ERROR_UNRECOVERABLE_POSITION: ("unrecoverable position", False),
}


def error(code: int) -> ReplyError:
    """The built-in :class:`ReplyError` for ``code`` with Centrifugo's message."""
    message, temporary = ERROR_MESSAGES[code]
    return ReplyError(code, message, temporary)


# ---- unsubscribe push codes --------------------------------------------------------------
UNSUBSCRIBE_SERVER = 2000  # "server unsubscribe": the SDK does not resubscribe
UNSUBSCRIBE_INSUFFICIENT_STATE = 2500  # resubscribe (and recover)
UNSUBSCRIBE_EXPIRED = 2501  # "subscription expired": resubscribe (with a fresh token)


# ---- disconnects -------------------------------------------------------------------------
class Disconnect(NamedTuple):
    code: int
    reason: str

    @property
    def reconnect(self) -> bool:
        return should_reconnect(self.code)


def should_reconnect(code: int) -> bool:
    """The SDKs' rule: 3500..3999 and 4500..4999 are terminal, everything else reconnects."""
    return not (3500 <= code < 4000 or 4500 <= code < 5000)


DISCONNECT_CONNECTION_CLOSED = Disconnect(3000, "connection closed")
# reconnect
DISCONNECT_SHUTDOWN = Disconnect(3001, "shutdown")
DISCONNECT_SERVER_ERROR = Disconnect(3004, "internal server error")
DISCONNECT_EXPIRED = Disconnect(3005, "connection expired")
DISCONNECT_SUB_EXPIRED = Disconnect(3006, "subscription expired")
DISCONNECT_SLOW = Disconnect(3008, "slow")
DISCONNECT_WRITE_ERROR = Disconnect(3009, "write error")
DISCONNECT_INSUFFICIENT_STATE = Disconnect(3010, "insufficient state")
DISCONNECT_FORCE_RECONNECT = Disconnect(3011, "force reconnect")
DISCONNECT_NO_PONG = Disconnect(3012, "no pong")
DISCONNECT_TOO_MANY_REQUESTS = Disconnect(3013, "too many requests")
# terminal: the SDK does not reconnect
DISCONNECT_INVALID_TOKEN = Disconnect(3500, "invalid token")
DISCONNECT_BAD_REQUEST = Disconnect(3501, "bad request")
DISCONNECT_STALE = Disconnect(3502, "stale")
DISCONNECT_FORCE_NO_RECONNECT = Disconnect(3503, "force disconnect")
DISCONNECT_CONNECTION_LIMIT = Disconnect(3504, "connection limit")
DISCONNECT_CHANNEL_LIMIT = Disconnect(3505, "channel limit")
DISCONNECT_INAPPROPRIATE_PROTOCOL = Disconnect(3506, "inappropriate protocol")
DISCONNECT_PERMISSION_DENIED = Disconnect(3507, "permission denied")
DISCONNECT_NOT_AVAILABLE = Disconnect(3508, "not available")
DISCONNECT_TOO_MANY_ERRORS = Disconnect(3509, "too many errors")


class DisconnectError(Exception):
    """Raised inside command handling (or by an RPC/send handler) to close the connection."""

    def __init__(self, disconnect: Disconnect) -> None:
        super().__init__(f"{disconnect.code}: {disconnect.reason}")
        self.disconnect = disconnect


class ProtocolError(Exception):
    """Bytes that are not a valid command stream; the session answers with 3501 bad request."""
