"""WebSocket round trips at 1,000 connections: tidegate's RPC vs a picows echo server.

    python bench/ws_echo.py [--connections 1000] [--seconds 10] [--rounds N]
                            [--baseline OTHER_CHECKOUT/src] [--unsynchronized] [--json out.json]

Both servers run as one process each on this machine, driven in turn by the same client:
``--clients`` uvloop processes holding the connections, each connection sending its next
message as soon as the previous answer arrives (closed loop). tidegate answers a Centrifugo
``rpc`` command (JSON, through the client-protocol session, echo handler); picows echoes the
raw frame. Reported: round trips per second, latency percentiles and server CPU per round trip
(``server_*``: the whole drive, connection setup included; ``window_*``: the measured window).

The client processes start their windows together once every connection is up (a
synchronized start): with ``--unsynchronized`` (the original behaviour) each starts as soon as
its own connections are, so one process can run alone while the other still connects (or after
it stopped) and the summed rate overstates a server-bound server. On a shared 2-vCPU machine run
several ``--rounds`` (order swapped each round; medians reported) and compare ratios.
``--baseline`` also runs tidegate from another checkout's ``src`` each round (before/after).

Figures, 2026-11-27 (bench/results/ws-echo-2026-11-27.json; 1000 connections, --seconds 5,
medians of alternating rounds; CPU per round trip over the window):

    synchronized (10 rounds)       round trips/s   vs picows   server CPU us/rt (user+sys)
      tidegate before (e2fa2d7)          11,400       0.26       89  (65 + 23)
      tidegate after (RPC fast path)     29,500       0.65       34  (16 + 19)
      picows                             44,400         -        22  ( 7 + 15)
    unsynchronized (8 rounds; the original method)
      tidegate before                    20,900       0.46       89 (whole drive)
      tidegate after                     37,800       0.85       37 (whole drive)
      picows                             43,500         -        24 (whole drive)
    ceiling: a scratch build answering every read with a constant frame (no parsing at all)
      reached 1.05x picows at 5.4 us user/rt: the engine and uvloop are not the gap, the
      per-message Python work (unmask, RPC recognition, session) is.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing as mp
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SECRET = "dev-only-secret-change-me"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def masked_text(payload: bytes) -> bytes:
    """A client text frame with an all-zero mask key (valid, and no XOR work for the client)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, 0x80 | n)) + b"\0\0\0\0" + payload
    return bytes((0x81, 0x80 | 126)) + n.to_bytes(2, "big") + b"\0\0\0\0" + payload


class EchoClient(asyncio.Protocol):
    """One connection: handshake, optional connect command, then closed-loop round trips."""

    def __init__(self, host: str, port: int, first: bytes | None, message: bytes,
                 stats: dict[str, Any], ready: asyncio.Future[None]) -> None:
        self.host, self.port = host, port
        self.first, self.message = first, message
        self.stats, self.ready = stats, ready
        self.buf = b""
        self.upgraded = False
        self.sent_at = 0.0
        self.running = False
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            f"GET /connection/websocket HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.upgraded:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            assert self.buf.startswith(b"HTTP/1.1 101"), self.buf[:80]
            self.buf = self.buf[end + 4 :]
            self.upgraded = True
            if self.first is not None:
                self.transport.write(masked_text(self.first))
            else:
                self.ready.set_result(None)
        while len(self.buf) >= 2:
            n = self.buf[1] & 0x7F
            head = 2
            if n == 126:
                if len(self.buf) < 4:
                    return
                n, head = int.from_bytes(self.buf[2:4], "big"), 4
            if len(self.buf) < head + n:
                return
            self.buf = self.buf[head + n :]
            if not self.ready.done():
                self.ready.set_result(None)  # the connect reply
                continue
            if self.running:
                now = time.perf_counter()
                self.stats["n"] += 1
                lat = self.stats["lat"]
                if len(lat) < 200_000:
                    lat.append(now - self.sent_at)
                self.sent_at = now
                self.transport.write(self.message)

    def start(self) -> None:
        self.running = True
        self.sent_at = time.perf_counter()
        self.transport.write(self.message)


def client_process(host: str, port: int, conns: int, seconds: float, tidegate: bool,
                   out: Any, ready_q: Any = None, go: Any = None) -> None:
    """Hold ``conns`` connections, then count round trips for ``seconds``. With ``ready_q``
    and ``go`` (synchronized mode) the window starts only once every client process is
    connected (``go`` set by the parent), so no client's window overlaps another's connection
    phase; the counts are sent before the connections are dropped."""
    import uvloop

    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        stats: dict[str, Any] = {"n": 0, "lat": []}
        token = None
        if tidegate:
            from tidegate.gateway.auth import encode_hs256

            token = encode_hs256({"sub": "bench", "exp": int(time.time()) + 3600}, SECRET)
        first = json.dumps({"id": 1, "connect": {"token": token}}).encode() if tidegate else None
        body = b'{"id":2,"rpc":{"method":"echo","data":{"n":12345}}}' if tidegate else \
            b'{"n":12345}'
        message = masked_text(body)
        clients = []
        for i in range(0, conns, 100):
            batch = []
            for _ in range(min(100, conns - i)):
                ready: asyncio.Future[None] = loop.create_future()
                _, proto = await loop.create_connection(
                    lambda r=ready: EchoClient(host, port, first, message, stats, r), host, port)
                batch.append(proto)
            await asyncio.gather(*(p.ready for p in batch))
            clients += batch
        if go is not None:
            ready_q.put(os.getpid())
            await loop.run_in_executor(None, go.wait)
        for c in clients:
            c.start()
        await asyncio.sleep(seconds)
        for c in clients:
            c.running = False
        if go is not None:
            out.put({"n": stats["n"], "lat": stats["lat"][:50_000]})
        for c in clients:
            c.transport.abort()
        return stats

    stats = uvloop.run(main())
    if go is None:
        out.put({"n": stats["n"], "lat": stats["lat"][:50_000]})


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    return sum(cpu_times(pid))


def children_cpu() -> float:
    """CPU seconds of the reaped children (the client processes once joined)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def drive(name: str, port: int, server_pids: list[int], args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    q: Any = ctx.Queue()
    sync = not args.unsynchronized
    ready_q: Any = ctx.Queue() if sync else None
    go: Any = ctx.Event() if sync else None
    per = args.connections // args.clients
    cpu0 = [cpu_times(p) for p in server_pids]
    clients0 = children_cpu()
    procs = [ctx.Process(target=client_process,
                         args=("127.0.0.1", port, per, args.seconds, name != "picows", q, ready_q,
                               go))
             for _ in range(args.clients)]
    for p in procs:
        p.start()
    window: dict[str, Any] = {}
    if sync:
        client_pids = [ready_q.get(timeout=120) for _ in procs]
        w0 = [cpu_times(p) for p in server_pids]
        c0 = sum(cpu_seconds(p) for p in client_pids)
        go.set()
    results = [q.get(timeout=args.seconds + 120) for _ in procs]
    if sync:
        w1 = [cpu_times(p) for p in server_pids]
        c1 = sum(cpu_seconds(p) for p in client_pids)
        window = {
            "user": sum(b[0] - a[0] for a, b in zip(w0, w1, strict=True)),
            "sys": sum(b[1] - a[1] for a, b in zip(w0, w1, strict=True)),
            "clients": c1 - c0,
        }
    for p in procs:
        p.join(30)
    cpu1 = [cpu_times(p) for p in server_pids]
    user = sum(b[0] - a[0] for a, b in zip(cpu0, cpu1, strict=True))
    system = sum(b[1] - a[1] for a, b in zip(cpu0, cpu1, strict=True))
    cpu = user + system
    clients = children_cpu() - clients0
    n = sum(r["n"] for r in results)
    lat = sorted(x for r in results for x in r["lat"])
    pct = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 3)) if lat else \
        (lambda q: None)
    per_rt = (lambda s: round(s / n * 1e6, 2)) if n else (lambda s: None)
    out = {
        "connections": per * args.clients,
        "seconds": args.seconds,
        "synchronized": sync,
        "round_trips": n,
        "round_trips_per_s": round(n / args.seconds, 1),
        "latency_ms_p50": pct(0.5),
        "latency_ms_p99": pct(0.99),
        # over the whole drive: connection setup (handshakes, connect commands) included
        "server_cpu_seconds": round(cpu, 2),
        "server_cpu_us_per_round_trip": per_rt(cpu),
        "server_user_us_per_round_trip": per_rt(user),
        "server_sys_us_per_round_trip": per_rt(system),
        "client_cpu_us_per_round_trip": per_rt(clients),
    }
    if window:  # the measured window only: the steady-state cost of a round trip
        out["window_server_cpu_us_per_round_trip"] = per_rt(window["user"] + window["sys"])
        out["window_server_user_us_per_round_trip"] = per_rt(window["user"])
        out["window_server_sys_us_per_round_trip"] = per_rt(window["sys"])
        out["window_client_cpu_us_per_round_trip"] = per_rt(window["clients"])
    return out


def run_tidegate(name: str, args: argparse.Namespace, src: str | None = None) -> dict[str, Any]:
    """One tidegate worker (``src``: another checkout's ``src`` directory, for a baseline)."""
    env = {**os.environ, "PYTHONPATH": src} if src else None
    with tempfile.TemporaryDirectory() as tmp:
        port, tcp, status = free_port(), free_port(), Path(tmp) / "status.json"
        tg = subprocess.Popen(
            [sys.executable, "-m", "tidegate", "serve", "--config", str(ROOT / "config/example.toml"),
             "--port", str(port), "--tcp-port", str(tcp), "--metrics-port", "0", "--workers", "1",
             "--rpc-handler", "tidegate.server.app:echo_rpc", "--status-file", str(status)],
            stderr=subprocess.DEVNULL, env=env)
        try:
            while not (status.exists() and json.loads(status.read_text() or "{}").get("ready")):
                if tg.poll() is not None:
                    raise RuntimeError(f"{name} exited with {tg.returncode}")
                time.sleep(0.05)
            pids = json.loads(status.read_text())["workers"]
            return drive(name, port, pids, args)
        finally:
            tg.send_signal(signal.SIGTERM)
            tg.wait(30)


def run_picows(args: argparse.Namespace) -> dict[str, Any]:
    pport = free_port()
    pw = subprocess.Popen([sys.executable, str(ROOT / "bench/picows_echo_server.py"), str(pport)],
                          stdout=subprocess.PIPE, text=True)
    try:
        assert pw.stdout is not None and pw.stdout.readline().strip() == "ready"
        return drive("picows", pport, [pw.pid], args)
    finally:
        pw.kill()
        pw.wait()


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Field by field median of several runs of one server."""
    out: dict[str, Any] = {}
    for key, value in runs[0].items():
        values = [r[key] for r in runs if r.get(key) is not None]
        if not values or not isinstance(value, float | int):
            out[key] = value
        elif isinstance(value, int):
            out[key] = int(statistics.median_low(values))
        else:
            out[key] = round(statistics.median(values), 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the servers in turn this many times, swapping the order each round;\n"
                         "the report gives the per-round figures and their medians")
    ap.add_argument("--baseline", default="",
                    help="also run tidegate from this src directory (another checkout) each round")
    ap.add_argument("--unsynchronized", action="store_true",
                    help="let each client process start its window as soon as its own\n"
                         "connections are up (the original behaviour): one client's window can\n"
                         "then overlap the other's connection phase")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "command": sys.argv, "cores": os.cpu_count(),
                              "load_average": os.getloadavg()}
    servers: list[tuple[str, Any]] = [("tidegate", lambda: run_tidegate("tidegate", args))]
    if args.baseline:
        servers.append(("baseline", lambda: run_tidegate("baseline", args, args.baseline)))
    servers.append(("picows", lambda: run_picows(args)))
    rounds: list[dict[str, Any]] = []
    for i in range(args.rounds):
        order = servers if i % 2 == 0 else servers[::-1]
        one: dict[str, Any] = {"order": [name for name, _ in order]}
        for name, run in order:
            one[name] = run()
        p = one["picows"]["round_trips_per_s"]
        for name, _ in servers[:-1]:
            one[f"{name}_vs_picows_round_trips"] = \
                round(one[name]["round_trips_per_s"] / p, 3) if p else None
        rounds.append(one)
        if args.rounds > 1:
            print(json.dumps({k: v for k, v in one.items() if k.endswith("_round_trips")}),
                  file=sys.stderr, flush=True)
    for name, _ in servers:
        report[name] = rounds[0][name] if args.rounds == 1 else median_of([r[name] for r in rounds])
    for name, _ in servers[:-1]:
        ratios = [r[f"{name}_vs_picows_round_trips"] for r in rounds
                  if r[f"{name}_vs_picows_round_trips"] is not None]
        key = f"{name}_vs_picows_round_trips"
        report[key] = round(statistics.median(ratios), 3) if ratios else None
        if args.rounds > 1:
            report[f"{key}_per_round"] = ratios
    if args.rounds > 1:
        report["rounds"] = rounds
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
