"""Where a gateway connection stands when its worker sheds load (engine/eviction.py), sans-I/O.

Classes: priorities 0..9 (higher = kept longer) and *protected* (never evicted). A connection's
class is the highest of

* its connect token's ``tidegate_priority`` claim: an integer 0..9 or ``"protected"``;
* the ``eviction_priority`` (0..9) / ``eviction_protected`` options of the namespaces of its
  subscriptions.

Rank, least valuable (evicted) first: connections with no subscriptions before subscribed ones,
then the lower class, then the one idle (no input) longest. Sessions that have not sent their
connect yet rank lowest of all; connections that are not client sessions (the HTTP API) are
never evicted. A victim gets disconnect code 3011 (3000..3499: the SDK reconnects) with the
delay hint in the reason: ``evicted: reconnect_delay_s=10``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tidegate.gateway.codes import DISCONNECT_FORCE_RECONNECT, Disconnect

if TYPE_CHECKING:
    from tidegate.gateway.config import GatewayConfig
    from tidegate.gateway.session import ClientSession

__all__ = ["CLAIM", "MAX_PRIORITY", "PROTECTED", "EvictionPolicy", "claim_priority", "disconnect"]

CLAIM = "tidegate_priority"
MAX_PRIORITY = 9
PROTECTED = MAX_PRIORITY + 1  # above every priority: a connection's class is the max
CONNECTING = "connecting"  # the label of sessions that have not connected yet
MEMO_CHANNELS = 65_536
_LABELS = tuple(str(i) for i in range(PROTECTED)) + ("protected",)


def claim_priority(value: Any) -> int:
    """The class a ``tidegate_priority`` claim asks for; ValueError when it is not one."""
    if value is None:
        return 0
    if value == "protected":
        return PROTECTED
    if type(value) is int and 0 <= value <= MAX_PRIORITY:
        return value
    raise ValueError(f'{CLAIM} must be an integer 0..{MAX_PRIORITY} or "protected"')


def disconnect(delay_s: float) -> Disconnect:
    """The disconnect an evicted client gets: reconnect, in about ``delay_s`` seconds."""
    return Disconnect(DISCONNECT_FORCE_RECONNECT.code, f"evicted: reconnect_delay_s={delay_s:g}")


class EvictionPolicy:
    """One per worker (per app): ranks sessions with the config's namespace classes."""

    __slots__ = ("_config", "_by_namespace", "_memo")

    def __init__(self, config: GatewayConfig) -> None:
        self._config = config
        # Whether any namespace sets a class: if none does, subscriptions are never scanned.
        self._by_namespace = any(
            o.eviction_priority or o.eviction_protected
            for o in (config.channels, *config.namespaces.values())
        )
        # channel -> class: many sessions share a channel, and the config never changes.
        self._memo: dict[str, int] = {}

    def channel_class(self, channel: str) -> int:
        cls = self._memo.get(channel)
        if cls is None:
            opts = self._config.channel_options(channel)
            if opts is None:
                cls = 0
            else:
                cls = PROTECTED if opts.eviction_protected else opts.eviction_priority
            if len(self._memo) >= MEMO_CHANNELS:
                self._memo.clear()  # bounded: a worker with more channels recomputes
            self._memo[channel] = cls
        return cls

    def session_class(self, s: ClientSession) -> int:
        cls = s.eviction_priority
        if self._by_namespace and cls < PROTECTED:
            memo = self._memo
            for channel in s.channels():
                c = memo.get(channel)
                if c is None:
                    c = self.channel_class(channel)
                if c > cls:
                    cls = c
        return cls

    def rank(self, s: ClientSession, last_rx: int) -> tuple[int, int, int] | None:
        """(subscribed, class, last input tick): smallest first; None = protected."""
        if not s.connected:
            return (-1, 0, last_rx)
        cls = self.session_class(s)
        if cls >= PROTECTED:
            return None
        return (1 if s.subscribed else 0, cls, last_rx)

    def label(self, s: ClientSession) -> str:
        return _LABELS[self.session_class(s)] if s.connected else CONNECTING
