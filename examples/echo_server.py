"""A line-echo server on tidegate's engine: `python examples/echo_server.py --port 9000`.

Try it with `nc 127.0.0.1 9000`: every line you type comes back upper-cased.
"""

from __future__ import annotations

import argparse

from tidegate.engine import Conn, EngineOptions, EventHandler, run
from tidegate.protocol.line import LineCodec


class UpperEcho(EventHandler):
    codec = LineCodec(max_frame_bytes=4096)  # shared by every connection of the worker

    def on_open(self, c: Conn) -> bytes:
        c.ready()  # no handshake: heartbeats are off (ping_frame returns None)
        return b"welcome\n"

    def on_traffic(self, c: Conn) -> None:
        while (line := c.next_frame()) is not None:
            if line == b"quit":
                c.close("client_quit")
                return
            c.write(line.upper() + b"\n")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--status-file", default="")
    a = p.parse_args()
    return run(UpperEcho, EngineOptions(port=a.port, workers=a.workers, status_file=a.status_file))


if __name__ == "__main__":
    raise SystemExit(main())
