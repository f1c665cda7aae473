"""The internal representation of client-protocol v2 messages, shared by both codecs.

Commands are decoded into one small object per command (transient: they live for one frame).
``bytes`` payload fields (``data``, ``conn_info``, ``chan_info``) always hold the payload as the
wire carries it for protobuf; for JSON clients that is the compact JSON text of the embedded
value, so a JSON client's publication reaches a protobuf client as JSON bytes unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum


class Method(IntEnum):
    """The Command field numbers of each request (also the Reply field number of its result)."""

    CONNECT = 4
    SUBSCRIBE = 5
    UNSUBSCRIBE = 6
    PUBLISH = 7
    PRESENCE = 8
    PRESENCE_STATS = 9
    HISTORY = 10
    PING = 11
    SEND = 12
    RPC = 13
    REFRESH = 14
    SUB_REFRESH = 15


METHOD_NAMES: dict[Method, str] = {
    Method.CONNECT: "connect",
    Method.SUBSCRIBE: "subscribe",
    Method.UNSUBSCRIBE: "unsubscribe",
    Method.PUBLISH: "publish",
    Method.PRESENCE: "presence",
    Method.PRESENCE_STATS: "presence_stats",
    Method.HISTORY: "history",
    Method.PING: "ping",
    Method.SEND: "send",
    Method.RPC: "rpc",
    Method.REFRESH: "refresh",
    Method.SUB_REFRESH: "sub_refresh",
}
METHOD_BY_NAME: dict[str, Method] = {v: k for k, v in METHOD_NAMES.items()}


# ---- requests ----------------------------------------------------------------------------
@dataclass(slots=True)
class SubscribeRequest:
    channel: str = ""
    token: str = ""
    recover: bool = False
    epoch: str = ""
    offset: int = 0
    data: bytes = b""
    positioned: bool = False
    recoverable: bool = False
    join_leave: bool = False
    delta: str = ""
    flag: int = 0


@dataclass(slots=True)
class ConnectRequest:
    token: str = ""
    data: bytes = b""
    subs: dict[str, SubscribeRequest] = field(default_factory=dict)
    name: str = ""
    version: str = ""


@dataclass(slots=True)
class ChannelRequest:
    """unsubscribe / presence / presence_stats: just a channel."""

    channel: str = ""


@dataclass(slots=True)
class PublishRequest:
    channel: str = ""
    data: bytes = b""


@dataclass(slots=True)
class StreamPosition:
    offset: int = 0
    epoch: str = ""


@dataclass(slots=True)
class HistoryRequest:
    channel: str = ""
    limit: int = 0
    since: StreamPosition | None = None
    reverse: bool = False


@dataclass(slots=True)
class RPCRequest:
    method: str = ""
    data: bytes = b""


@dataclass(slots=True)
class SendRequest:
    data: bytes = b""


@dataclass(slots=True)
class RefreshRequest:
    token: str = ""


@dataclass(slots=True)
class SubRefreshRequest:
    channel: str = ""
    token: str = ""


@dataclass(slots=True)
class PingRequest:
    pass


Request = (
    ConnectRequest
    | SubscribeRequest
    | ChannelRequest
    | PublishRequest
    | HistoryRequest
    | RPCRequest
    | SendRequest
    | RefreshRequest
    | SubRefreshRequest
    | PingRequest
)


@dataclass(slots=True)
class Command:
    """One decoded command. ``method`` None with ``id`` 0 is the empty command: a pong."""

    id: int = 0
    method: Method | None = None
    request: Request | None = None


# ---- data the server sends ---------------------------------------------------------------
class ClientInfo:
    """Who a publication / join / leave / presence entry is about."""

    __slots__ = ("user", "client", "conn_info", "chan_info")

    def __init__(
        self, user: str, client: str, conn_info: bytes | None = None, chan_info: bytes | None = None
    ) -> None:
        self.user = user
        self.client = client
        self.conn_info = conn_info
        self.chan_info = chan_info

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ClientInfo):
            return NotImplemented
        return (self.user, self.client, self.conn_info, self.chan_info) == (
            other.user,
            other.client,
            other.conn_info,
            other.chan_info,
        )

    def __hash__(self) -> int:
        return hash((self.user, self.client))

    def __repr__(self) -> str:
        return f"ClientInfo(user={self.user!r}, client={self.client!r})"


class Publication:
    """One message in a channel.

    ``data`` is the payload as protobuf clients receive it. ``json_data`` is the same payload as
    an embeddable JSON value for JSON clients (usually the very same object), or None when the
    payload is not JSON (binary published by a protobuf client or the API): a JSON client cannot
    receive it. ``offset`` is 0 for channels without history.
    """

    __slots__ = ("offset", "data", "json_data", "info", "tags", "time_ms")

    def __init__(
        self,
        data: bytes,
        json_data: bytes | None,
        offset: int = 0,
        info: ClientInfo | None = None,
        tags: dict[str, str] | None = None,
        time_ms: int = 0,
    ) -> None:
        self.data = data
        self.json_data = json_data
        self.offset = offset
        self.info = info
        self.tags = tags
        self.time_ms = time_ms

    def __repr__(self) -> str:
        return f"Publication(offset={self.offset}, data={self.data!r})"


@dataclass(slots=True)
class SubscribeResult:
    expires: bool = False
    ttl: int = 0
    recoverable: bool = False
    epoch: str = ""
    publications: list[Publication] = field(default_factory=list)
    recovered: bool = False
    offset: int = 0
    positioned: bool = False
    data: bytes = b""
    was_recovering: bool = False


@dataclass(slots=True)
class ConnectResult:
    client: str = ""
    version: str = ""
    expires: bool = False
    ttl: int = 0
    data: bytes = b""
    subs: dict[str, SubscribeResult] = field(default_factory=dict)
    ping: int = 0
    pong: bool = False
    session: str = ""
    node: str = ""


@dataclass(slots=True)
class HistoryResult:
    publications: list[Publication]
    epoch: str
    offset: int
