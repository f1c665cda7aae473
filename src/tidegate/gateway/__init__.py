"""Centrifugo-compatible gateway core (client protocol v2), sans-I/O.

Everything between "a complete message arrived from client X" and "bytes to write to client X":
codecs (JSON, protobuf), JWT auth, config, history, presence, the hub (fan-out), the broker
interface and the per-connection :class:`ClientSession`. See session.py for the wiring.
"""

from tidegate.gateway.broker import Broker, MemoryBroker
from tidegate.gateway.config import ChannelOptions, GatewayConfig, load_config
from tidegate.gateway.hub import Hub
from tidegate.gateway.node import Node
from tidegate.gateway.session import ClientSession, Transport

__all__ = [
    "Broker",
    "ChannelOptions",
    "ClientSession",
    "GatewayConfig",
    "Hub",
    "MemoryBroker",
    "Node",
    "Transport",
    "load_config",
]
