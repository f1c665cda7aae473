"""``tidegate trace``: record a running node's lifecycle events into a Perfetto-ready file.

    tidegate trace --seconds 10 --out trace.json [--url http://127.0.0.1:8000] [--api-key KEY]

Asks every worker (through the server API's ``debug_trace``) for the accepts, closes (with
reasons), handshakes, restarts and GC pauses of the next ``--seconds``, and writes Chrome
Trace Event JSON: open it at ui.perfetto.dev or chrome://tracing.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.request
from typing import Any

from tidegate.observe.trace import export_chrome


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=f"http://127.0.0.1:{os.environ.get('TIDEGATE_PORT', '8000')}",
                   help="the node's HTTP API (default http://127.0.0.1:$TIDEGATE_PORT or 8000)")
    p.add_argument("--api-key", default=os.environ.get("TIDEGATE_API_KEY", ""),
                   help="server API key (default $TIDEGATE_API_KEY)")
    p.add_argument("--seconds", type=float, default=10.0, help="how long to record")
    p.add_argument("--out", default="trace.json", help="where to write the trace")


def _call(url: str, key: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(f"{url.rstrip('/')}/api/debug_trace",
                                 data=json.dumps(body).encode(), method="POST",
                                 headers={"X-API-Key": key})
    with urllib.request.urlopen(req, timeout=30) as resp:
        reply = json.loads(resp.read())
    if "error" in reply:
        raise RuntimeError(f"debug_trace: {reply['error']}")
    return dict(reply["result"])


def run(args: argparse.Namespace) -> int:
    start = _call(args.url, args.api_key, {"since_us": 0, "limit": 0})
    since = min(w["now_us"] for w in start["workers"])
    time.sleep(args.seconds)
    got = _call(args.url, args.api_key, {"since_us": since})
    events = {w["worker"]: w["events"] for w in got["workers"]}
    doc = export_chrome(events)
    with open(args.out, "w") as fh:
        json.dump(doc, fh)
    n = sum(len(e) for e in events.values())
    print(f"{n} events from {len(events)} workers over {args.seconds:g} s -> {args.out}")
    return 0
