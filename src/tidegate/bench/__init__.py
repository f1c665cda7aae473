"""``tidegate bench``: the load generator.

``add_arguments(parser)`` adds its options to an ``argparse`` parser and ``run(args)`` runs it and
returns the exit status. The client processes live in :mod:`tidegate.bench.client`, the
orchestration and the report in :mod:`tidegate.bench.runner`.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``tidegate bench``'s options to ``parser``."""
    from tidegate.bench.runner import add_arguments as _add_arguments

    _add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Run a bench with the parsed ``args``; return the process exit status."""
    from tidegate.bench.runner import run as _run

    return _run(args)


__all__ = ["add_arguments", "run"]
