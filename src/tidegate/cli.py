"""``python -m tidegate``: serve, doctor, bench."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
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


def _load_factory(spec: str) -> Callable[[], EventHandler | list[EventHandler]]:
    module, _, name = APPS.get(spec, spec).partition(":")
    factory: Callable[[], EventHandler | list[EventHandler]] = getattr(
        importlib.import_module(module), name
    )
    return factory


def _add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file; its [engine] table sets engine options")
    p.add_argument("--app", default="echo", help="built-in app (echo) or module:Handler")
    for f in dataclasses.fields(EngineOptions):
        flag = "--" + f.name.replace("_", "-")
        kind = {"int": int, "float": float, "str": str}.get(str(f.type))
        if kind is None:
            continue
        p.add_argument(flag, dest=f.name, type=kind, default=None, help=f"(default {f.default})")
    p.add_argument("--connections", dest="connections_target", type=int, default=None,
                   help="alias of --connections-target: the load workers are sized for")


def engine_options(args: argparse.Namespace) -> EngineOptions:
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        with open(args.config, "rb") as fh:
            values.update(tomllib.load(fh).get("engine", {}))
    for f in dataclasses.fields(EngineOptions):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    opts = EngineOptions(**values)
    opts.validate()
    return opts


def _serve(args: argparse.Namespace) -> int:
    from tidegate.engine import run

    return run(_load_factory(args.app), engine_options(args))


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
