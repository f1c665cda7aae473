"""Event loop choice: uvloop by default, stdlib asyncio as a fallback the user can pick."""

from __future__ import annotations

import asyncio

from tidegate import log

_log = log.get("loop")


def new_event_loop(kind: str = "uvloop") -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        try:
            import uvloop

            return uvloop.new_event_loop()
        except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
            _log.warning("uvloop is not installed; using stdlib asyncio")
    return asyncio.new_event_loop()
