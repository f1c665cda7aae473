"""Server memory per connection, plain TCP vs TLS, side by side in one run.

    python bench/tls_memory.py [--connections 4000] [--json out.json]

Starts a one-worker `tidegate serve --app echo` twice (plain, then with a throwaway
self-signed certificate), opens the same number of idle connections to each, each saying one
ping, and reports the worker's RSS growth per connection.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from tidegate.protocol.heartbeat import PING, frame


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss(pid: int) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines()
                if x.startswith("VmRSS"))
    return int(line.split()[1]) * 1024


class Idle(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        transport.write(frame(PING, b"12345678"))


def measure(n: int, tmp: Path, cert: tuple[Path, Path] | None) -> dict[str, Any]:
    port, status = free_port(), tmp / f"status-{'tls' if cert else 'plain'}.json"
    cmd = [sys.executable, "-m", "tidegate", "serve", "--app", "echo", "--port", str(port),
           "--workers", "1", "--status-file", str(status), "--handshake-timeout-s", "120",
           "--ping-interval-s", "120"]
    if cert:
        cmd += ["--tls-cert-file", str(cert[0]), "--tls-key-file", str(cert[1])]
    srv = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (status.exists() and json.loads(status.read_text() or "{}").get("ready")):
            if time.monotonic() > deadline:
                raise TimeoutError("server not ready")
            time.sleep(0.05)
        pid = json.loads(status.read_text())["workers"][0]
        time.sleep(1)
        before = rss(pid)

        async def main() -> int:
            loop = asyncio.get_running_loop()
            ctx = None
            if cert:
                ctx = ssl.create_default_context()
                ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            gate = asyncio.Semaphore(100)
            transports = []

            async def one() -> None:
                async with gate:
                    t, _ = await loop.create_connection(Idle, "127.0.0.1", port, ssl=ctx)
                    transports.append(t)

            await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), 300)
            await asyncio.sleep(3)
            held = rss(pid)
            for t in transports:
                t.abort()
            return held

        held = uvloop.run(main())
    finally:
        srv.terminate()
        srv.wait(30)
    return {"connections": n, "server_rss_bytes_before": before, "server_rss_bytes_held": held,
            "server_marginal_bytes_per_connection": round((held - before) / n, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--connections", type=int, default=4000)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cert, key = tmp / "cert.pem", tmp / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=bench", "-keyout", str(key), "-out", str(cert)],
                       check=True, capture_output=True)
        report = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": sys.argv,
                  "plain": measure(a.connections, tmp, None),
                  "tls": measure(a.connections, tmp, (cert, key))}
    report["tls_extra_bytes_per_connection"] = round(
        report["tls"]["server_marginal_bytes_per_connection"]
        - report["plain"]["server_marginal_bytes_per_connection"], 1)
    text = json.dumps(report, indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
