"""A probe for the bench scripts: one WebSocket client of the gateway (the ``websockets``
library, not the load generator's own client), connected and subscribed to one channel, that
hands every JSON message it receives to :meth:`WsProbe.on_message` until told to stop.

The scripts in ``bench/`` subclass it: ``fanout_floor.py`` learns each publication's send time
and push frame size from it, ``fanout_slicing.py`` also sends the protocol's ``ping`` command on
a timer (:meth:`WsProbe.while_open`) to measure a worker's heartbeat during a broadcast.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

__all__ = ["WsProbe"]


class WsProbe:
    def __init__(self, url: str, token: str, channel: str) -> None:
        self.url, self.token, self.channel = url, token, channel
        self.error = ""  # why it ended early, if it did: reported, the run goes on

    async def run(self, stop: asyncio.Event) -> None:
        from websockets.asyncio.client import connect as ws_connect
        from websockets.exceptions import ConnectionClosed

        try:
            async with ws_connect(self.url, max_queue=None, open_timeout=60) as ws:
                await ws.send(json.dumps({"id": 1, "connect": {"token": self.token}}))
                await ws.send(json.dumps({"id": 2, "subscribe": {"channel": self.channel}}))
                reader = asyncio.create_task(self._read(ws))
                await self.while_open(ws, stop)
                reader.cancel()
        except ConnectionClosed:
            pass  # the bench stopped the server (it drains with 3001)
        except Exception as exc:  # noqa: BLE001 - reported, the run goes on
            self.error = f"{type(exc).__name__}: {exc}"

    async def while_open(self, ws: Any, stop: asyncio.Event) -> None:
        """What the probe does while connected; by default it only reads."""
        await stop.wait()

    def on_message(self, message: dict[str, Any], frame: bytes, now: float) -> None:
        """One JSON message (a reply or a push) from ``frame``, the WebSocket message it came
        in (several messages share one frame when the server batches them)."""

    async def _read(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for msg in ws:
                now = time.time()
                frame = msg if isinstance(msg, bytes) else msg.encode()
                for line in frame.splitlines():
                    if line.strip():
                        self.on_message(json.loads(line), frame, now)
        except ConnectionClosed:
            pass

    @staticmethod
    def publication(message: dict[str, Any]) -> dict[str, Any] | None:
        """The data of a publication push whose data is a JSON object, else None."""
        pub = message.get("push", {}).get("pub")
        if pub is None or not isinstance(pub.get("data"), dict):
            return None
        data: dict[str, Any] = pub["data"]
        return data
