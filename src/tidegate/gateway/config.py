"""Gateway options: one frozen dataclass, loaded from defaults < TOML file < environment.

Every option has a default, and the built-in defaults are the safe ones: no anonymous
connections, and a channel lets a client do nothing (subscribe, publish, presence, history all
off) until a namespace grants it. Options with a physical unit carry it in their name
(``_s`` seconds, ``_bytes``, ``_chars``...).

Channel names: ``[private prefix][namespace<boundary>]rest``. ``chat:room1`` is in namespace
``chat``; ``room1`` (no boundary) uses the default channel options; ``$chat:secret`` is a
private channel of namespace ``chat`` and needs a subscription token.

TOML layout (a ``[gateway]`` table, or the same keys at top level)::

    [gateway]
    token_hmac_secret = "..."
    [gateway.channels]            # options of channels without a namespace
    allow_subscribe_for_client = true
    [gateway.namespaces.chat]     # options of "chat:..." channels
    join_leave = true

Environment (wins over the file): TIDEGATE_PORT, TIDEGATE_TCP_PORT, TIDEGATE_METRICS_PORT,
TIDEGATE_TOKEN_HMAC_SECRET, TIDEGATE_API_KEY, TIDEGATE_ALLOW_ANONYMOUS.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from tidegate.gateway.eviction import MAX_PRIORITY

__all__ = [
    "ChannelOptions",
    "ConfigError",
    "GatewayConfig",
    "example_config",
    "load_config",
    "origin_allowed",
]

_NAMESPACE_NAME = re.compile(r"[A-Za-z0-9_-]+")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ChannelOptions:
    """What clients may do in the channels of one namespace. All off by default."""

    # subscribe: an authenticated client (non-empty user) / an anonymous one. Private ("$")
    # and protected channels ignore these and require a subscription token.
    allow_subscribe_for_client: bool = False
    allow_subscribe_for_anonymous: bool = False
    # publish from the client protocol (the server API can always publish)
    allow_publish_for_client: bool = False
    allow_publish_for_subscriber: bool = False
    allow_publish_for_anonymous: bool = False
    # presence / presence_stats queries (needs ``presence``)
    allow_presence_for_client: bool = False
    allow_presence_for_subscriber: bool = False
    allow_presence_for_anonymous: bool = False
    # history queries (needs history_size > 0 and history_ttl_s > 0)
    allow_history_for_client: bool = False
    allow_history_for_subscriber: bool = False
    allow_history_for_anonymous: bool = False
    # keep who is subscribed (costs one entry per subscriber)
    presence: bool = False
    # join/leave pushes: sent to subscribers that ask (SDK join_leave=True), or to all with force
    join_leave: bool = False
    force_push_join_leave: bool = False
    # history: last N publications kept for history_ttl_s seconds; enables offsets/epochs
    history_size: int = 0
    history_ttl_s: float = 0.0
    # recovery of missed publications on resubscribe/reconnect (needs history)
    allow_recovery: bool = False  # when the client asks (SDK recoverable=True)
    force_recovery: bool = False  # for every subscription
    force_positioning: bool = False
    # only subscription tokens (or server-side subscriptions) give access
    protected: bool = False
    # the class of subscribers when a worker sheds load (gateway/eviction.py): 0..9, higher =
    # kept longer (0 = first to go); protected subscribers are never evicted. A connection's
    # class is the highest of its subscriptions' and its token's ``tidegate_priority`` claim.
    eviction_priority: int = 0
    eviction_protected: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.eviction_priority <= MAX_PRIORITY:
            raise ConfigError(f"eviction_priority must be 0..{MAX_PRIORITY}")

    @property
    def history_enabled(self) -> bool:
        return self.history_size > 0 and self.history_ttl_s > 0

    @property
    def recovery_enabled(self) -> bool:
        return self.history_enabled and (self.allow_recovery or self.force_recovery)


def _frozen(m: Mapping[str, ChannelOptions]) -> Mapping[str, ChannelOptions]:
    return MappingProxyType(dict(m))


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    # listeners
    port: int = 8000  # WebSocket (client protocol) + HTTP API
    tcp_port: int = 8001
    metrics_port: int = 9100
    # auth
    token_hmac_secret: str = ""  # empty: every token is refused
    token_leeway_s: float = 0.0  # clock skew tolerated on exp/nbf
    allow_anonymous: bool = False  # connect without a token (user "")
    api_key: str = ""  # server HTTP API key; empty: API disabled
    allowed_origins: tuple[str, ...] = ()  # browser Origin patterns; "*" = any
    # channels
    channels: ChannelOptions = ChannelOptions()  # channels without a namespace
    namespaces: Mapping[str, ChannelOptions] = field(default_factory=lambda: _frozen({}))
    namespace_boundary: str = ":"
    private_channel_prefix: str = "$"
    channel_max_length_chars: int = 255
    client_channel_limit: int = 128  # subscriptions per connection
    server_side_channels: tuple[str, ...] = ()  # subscribed on connect for every client
    # backpressure (enforced by the transport's write path)
    client_queue_max_bytes: int = 262_144
    client_queue_max_messages: int = 4096
    # heartbeats (server pings, client pongs)
    ping_interval_s: float = 25.0
    pong_timeout_s: float = 8.0
    # an expired connection/subscription token gets this long to be refreshed before the
    # connection is closed (3005) / the subscription dropped (unsubscribe 2501)
    expired_close_delay_s: float = 25.0
    # history/recovery limits
    history_max_publications_per_request: int = 300
    recovery_max_publications: int = 300
    history_meta_ttl_s: float = 30 * 24 * 3600.0  # keep a stream's epoch/offset this long idle

    def __post_init__(self) -> None:
        if not isinstance(self.namespaces, MappingProxyType):
            object.__setattr__(self, "namespaces", _frozen(self.namespaces))
        for name in self.namespaces:
            if not _NAMESPACE_NAME.fullmatch(name):
                raise ConfigError(f"bad namespace name {name!r}")
        if len(self.namespace_boundary) != 1:
            raise ConfigError("namespace_boundary must be one character")
        if self.ping_interval_s <= 0 or self.pong_timeout_s <= 0:
            raise ConfigError("ping_interval_s and pong_timeout_s must be > 0")
        if self.pong_timeout_s >= self.ping_interval_s:
            raise ConfigError("pong_timeout_s must be shorter than ping_interval_s")
        for name in ("port", "tcp_port", "metrics_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ConfigError(f"{name} must be a TCP port, got {port}")
        for name in (
            "channel_max_length_chars",
            "client_channel_limit",
            "client_queue_max_bytes",
            "client_queue_max_messages",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0")

    # ---- channel name rules
    def channel_options(self, channel: str) -> ChannelOptions | None:
        """The options of ``channel``'s namespace, or None when the namespace is unknown."""
        name = channel
        prefix = self.private_channel_prefix
        if prefix and name.startswith(prefix):
            name = name[len(prefix) :]
        ns, sep, _ = name.partition(self.namespace_boundary)
        if not sep:
            return self.channels
        return self.namespaces.get(ns)

    def is_private(self, channel: str) -> bool:
        prefix = self.private_channel_prefix
        return bool(prefix) and channel.startswith(prefix)


# ---- loading --------------------------------------------------------------------------------
_CHANNEL_FIELDS = {f.name: f for f in dataclasses.fields(ChannelOptions)}
_GATEWAY_FIELDS = {f.name: f for f in dataclasses.fields(GatewayConfig)}


def _coerce(name: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if type(value) is not bool:
            raise ConfigError(f"{name} must be true or false")
        return value
    if isinstance(default, int):
        if type(value) is not int:
            raise ConfigError(f"{name} must be an integer")
        return value
    if isinstance(default, float):
        if type(value) not in (int, float):
            raise ConfigError(f"{name} must be a number")
        return float(value)
    if isinstance(default, str):
        if type(value) is not str:
            raise ConfigError(f"{name} must be a string")
        return value
    if isinstance(default, tuple):
        if type(value) is not list or any(type(v) is not str for v in value):
            raise ConfigError(f"{name} must be a list of strings")
        return tuple(value)
    raise ConfigError(f"{name}: unsupported option type")


def _channel_options(where: str, table: Any) -> ChannelOptions:
    if type(table) is not dict:
        raise ConfigError(f"{where} must be a table")
    kwargs = {}
    for key, value in table.items():
        f = _CHANNEL_FIELDS.get(key)
        if f is None:
            raise ConfigError(f"unknown channel option {where}.{key}")
        kwargs[key] = _coerce(f"{where}.{key}", value, f.default)
    return ChannelOptions(**kwargs)


def config_from_mapping(
    data: Mapping[str, Any], base: GatewayConfig | None = None
) -> GatewayConfig:
    """A config from a parsed TOML document (``[gateway]`` table or top level) over ``base``."""
    table = data.get("gateway", data)
    if type(table) is not dict:
        raise ConfigError("[gateway] must be a table")
    base = base or GatewayConfig()
    changes: dict[str, Any] = {}
    for key, value in table.items():
        if key == "channels":
            changes["channels"] = _channel_options("channels", value)
        elif key == "namespaces":
            if type(value) is not dict:
                raise ConfigError("namespaces must be a table of tables")
            changes["namespaces"] = {
                name: _channel_options(f"namespaces.{name}", opts) for name, opts in value.items()
            }
        elif key in _GATEWAY_FIELDS:
            default = getattr(base, key)
            changes[key] = _coerce(key, value, default)
        elif table is data:
            continue  # top-level keys of other components are not ours to judge
        else:
            raise ConfigError(f"unknown gateway option {key}")
    return dataclasses.replace(base, **changes)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

ENV_VARS = {
    "TIDEGATE_PORT": "port",
    "TIDEGATE_TCP_PORT": "tcp_port",
    "TIDEGATE_METRICS_PORT": "metrics_port",
    "TIDEGATE_TOKEN_HMAC_SECRET": "token_hmac_secret",
    "TIDEGATE_API_KEY": "api_key",
    "TIDEGATE_ALLOW_ANONYMOUS": "allow_anonymous",
}


def config_from_env(env: Mapping[str, str], base: GatewayConfig | None = None) -> GatewayConfig:
    base = base or GatewayConfig()
    changes: dict[str, Any] = {}
    for var, name in ENV_VARS.items():
        raw = env.get(var)
        if raw is None:
            continue
        default = getattr(base, name)
        if isinstance(default, bool):
            low = raw.strip().lower()
            if low not in _TRUE | _FALSE:
                raise ConfigError(f"{var} must be true or false, got {raw!r}")
            changes[name] = low in _TRUE
        elif isinstance(default, int):
            try:
                changes[name] = int(raw)
            except ValueError:
                raise ConfigError(f"{var} must be an integer, got {raw!r}") from None
        else:
            changes[name] = raw
    return dataclasses.replace(base, **changes)


def load_config(
    path: str | Path | None = None, env: Mapping[str, str] | None = None
) -> GatewayConfig:
    """Defaults, then the TOML file at ``path`` (if any), then ``env`` (default: os.environ)."""
    cfg = GatewayConfig()
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        cfg = config_from_mapping(data, cfg)
    return config_from_env(os.environ if env is None else env, cfg)


def example_config() -> GatewayConfig:
    """The options of config/example.toml: a development setup, NOT for production."""
    return GatewayConfig(
        token_hmac_secret="dev-only-secret-change-me",
        api_key="dev-only-api-key-change-me",
        allow_anonymous=False,
        allowed_origins=("http://localhost:*", "http://127.0.0.1:*"),
        channels=ChannelOptions(
            allow_subscribe_for_client=True,
            allow_publish_for_client=True,
            allow_presence_for_client=True,
            allow_history_for_client=True,
            presence=True,
            history_size=100,
            history_ttl_s=300.0,
            allow_recovery=True,
        ),
        namespaces={
            "chat": ChannelOptions(
                allow_subscribe_for_client=True,
                allow_publish_for_subscriber=True,
                allow_presence_for_subscriber=True,
                allow_history_for_subscriber=True,
                presence=True,
                join_leave=True,
                history_size=100,
                history_ttl_s=300.0,
                allow_recovery=True,
            ),
        },
    )


def origin_allowed(origin: str | None, patterns: tuple[str, ...]) -> bool:
    """Whether a WebSocket handshake's Origin may connect.

    No Origin header (a non-browser client) is allowed. Patterns: ``*`` (any), an exact
    ``scheme://host[:port]``, ``scheme://*.example.com`` (subdomains), ``http://localhost:*``
    (any port). Comparison is case-insensitive.
    """
    if not origin:
        return True
    origin = origin.lower()
    for pattern in patterns:
        p = pattern.lower()
        if p == "*" or p == origin:
            return True
        if "*" in p:
            regex = re.escape(p).replace(r"\*", "[^/]*")
            if re.fullmatch(regex, origin):
                return True
    return False
