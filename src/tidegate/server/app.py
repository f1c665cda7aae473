"""One worker's gateway: the node (hub, broker), the WebSocket/API listener, the TCP listener."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

from tidegate.cluster.ipc_broker import IpcBroker
from tidegate.engine.handler import EventHandler
from tidegate.engine.options import EngineOptions
from tidegate.engine.worker import Worker, current_worker_index
from tidegate.gateway.config import GatewayConfig
from tidegate.gateway.node import Node
from tidegate.observe import trace
from tidegate.server import http_api
from tidegate.server.tcp_app import TcpApp
from tidegate.server.websocket_app import WebSocketApp

HISTORY_PRUNE_INTERVAL_S = 30.0


def echo_rpc(session: Any, method: str, data: bytes) -> bytes:
    """An RPC handler that answers with what it got (examples and the echo benchmark)."""
    return data


def build(
    config: GatewayConfig, rpc_handler: str = "", max_message_bytes: int = 65536
) -> list[EventHandler]:
    """The handlers of one worker: ``[websocket+api (port), tcp (tcp_port)]``.

    ``rpc_handler``: ``module:function`` called for client RPCs (``session, method, data``).
    """
    index, total = current_worker_index()
    broker = IpcBroker(index, total, config.history_meta_ttl_s)
    rpc = None
    if rpc_handler:
        module, _, name = rpc_handler.partition(":")
        rpc = getattr(importlib.import_module(module), name)
    node = Node(config, broker=broker, rpc_handler=rpc, name=f"worker-{index}")
    api = http_api.HttpApi(node, call_all=broker.call_all)
    ws_app = WebSocketApp(node, api, max_message_bytes)
    tcp_app = TcpApp(node, max_message_bytes)
    for name, fn in http_api.LOCAL_SERVICES.items():
        broker.register_service(name, functools.partial(fn, node))
    for name, fn in http_api.SESSION_COMMANDS.items():
        broker.register_session_command(name, fn)
    broker.register_service("api_info", lambda: http_api.api_info(node, ws_app.sessions()))

    last_prune = [0.0]

    def on_boot(worker: Worker) -> None:
        broker.attach(worker)
        # big channels' fan-out in run-queue slices (--slice-ms 0: inline, in one go)
        node.hub.use_runqueue(worker.runqueue, worker.opts.fanout_chunk_subscribers)
        broker.register_service("debug_leaks", worker.leak_report)
        broker.register_service(
            "debug_trace",
            lambda since_us, limit: {
                "worker": worker.index,
                "now_us": trace.now_us(),
                "events": worker.trace.snapshot(since_us, limit=limit),
            },
        )

    def on_tick(worker: Worker) -> float | None:
        now = worker.loop.time()
        if now - last_prune[0] >= HISTORY_PRUNE_INTERVAL_S:
            last_prune[0] = now
            broker.local.history_store.prune()
        return None

    ws_app.on_boot = on_boot  # type: ignore[method-assign]
    ws_app.on_tick = on_tick  # type: ignore[method-assign]
    return [ws_app, tcp_app]


def engine_options_for(config: GatewayConfig, base: EngineOptions) -> EngineOptions:
    """Engine settings the gateway config decides (flags given on the command line win)."""
    base.port = config.port
    base.extra_ports = (config.tcp_port,)
    base.ping_interval_s = config.ping_interval_s
    base.pong_timeout_s = config.pong_timeout_s
    base.max_write_buffer_bytes = config.client_queue_max_bytes
    base.max_write_buffer_messages = config.client_queue_max_messages
    base.metrics_port = config.metrics_port
    return base


def factory(config: GatewayConfig, rpc_handler: str = "") -> Callable[[], Any]:
    return functools.partial(build, config, rpc_handler)
