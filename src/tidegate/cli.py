"""``python -m tidegate``: serve, doctor, bench."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import tomllib
from collections.abc import Callable
from typing import Any

from tidegate import __version__
from tidegate.engine.handler import EventHandler
from tidegate.engine.options import EngineOptions

APPS = {
    "echo": "tidegate.apps.echo:EchoHandler",
}
GATEWAY = "gateway"


def _load_factory(spec: str) -> Callable[[], EventHandler | list[EventHandler]]:
    module, _, name = APPS.get(spec, spec).partition(":")
    factory: Callable[[], EventHandler | list[EventHandler]] = getattr(
        importlib.import_module(module), name
    )
    return factory


def _bool(text: str) -> bool:
    """A boolean option's flag value: ``--eviction-dry-run true``."""
    low = text.strip().lower()
    if low not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return low in ("1", "true", "yes", "on")


_FLAG_TYPES: dict[str, Callable[[str], Any]] = {
    "int": int, "float": float, "str": str, "bool": _bool,
}


def _add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file; its [engine] table sets engine options")
    p.add_argument("--app", default=GATEWAY,
                   help="gateway (default), echo (the raw heartbeat protocol), or module:Handler")
    for f in dataclasses.fields(EngineOptions):
        flag = "--" + f.name.replace("_", "-")
        kind = _FLAG_TYPES.get(str(f.type))
        if kind is None:
            continue
        p.add_argument(flag, dest=f.name, type=kind, default=None, help=f"(default {f.default})")
    p.add_argument("--connections", dest="connections_target", type=int, default=None,
                   help="alias of --connections-target: the load workers are sized for")
    p.add_argument("--tcp-port", dest="tcp_port", type=int, default=None,
                   help="gateway: raw TCP client port (default 8001, TIDEGATE_TCP_PORT)")
    p.add_argument("--rpc-handler", default="",
                   help="gateway: module:function answering client RPCs "
                        "(tidegate.server.app:echo_rpc echoes)")


def engine_options(args: argparse.Namespace, gateway: Any = None) -> EngineOptions:
    """File ([engine] table), then what the gateway config decides, then flags."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        with open(args.config, "rb") as fh:
            values.update(tomllib.load(fh).get("engine", {}))
    opts = EngineOptions(**values)
    if gateway is not None:
        from tidegate.server.app import engine_options_for

        opts = engine_options_for(gateway, opts)
    for f in dataclasses.fields(EngineOptions):
        v = getattr(args, f.name, None)
        if v is not None:
            setattr(opts, f.name, v)
    opts.validate()
    return opts


def _serve(args: argparse.Namespace) -> int:
    from tidegate.engine import run

    if args.app != GATEWAY:
        return run(_load_factory(args.app), engine_options(args))
    from tidegate.gateway.config import load_config
    from tidegate.server.app import factory

    config = load_config(args.config, os.environ)
    if args.tcp_port is not None:
        config = dataclasses.replace(config, tcp_port=args.tcp_port)
    opts = engine_options(args, config)
    if opts.port != config.port:  # --port given: the gateway follows the engine
        config = dataclasses.replace(config, port=opts.port)
    return run(factory(config, args.rpc_handler), opts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tidegate", description=__doc__)
    parser.add_argument("--version", action="version", version=f"tidegate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server (supervisor + workers)")
    _add_serve_arguments(serve)
    serve.set_defaults(func=_serve)

    from tidegate import doctor

    d = sub.add_parser("doctor", help="the limits that cap connections on this host, and fixes")
    doctor.add_arguments(d)
    d.set_defaults(func=doctor.run)

    from tidegate import bench

    b = sub.add_parser("bench", help="load generator: open N connections, hold, report")
    bench.add_arguments(b)
    b.set_defaults(func=bench.run)
    from tidegate import trace_cli

    t = sub.add_parser("trace", help="record a running node's lifecycle events (Perfetto JSON)")
    trace_cli.add_arguments(t)
    t.set_defaults(func=trace_cli.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
