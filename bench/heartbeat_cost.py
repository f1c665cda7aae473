"""What one heartbeat and one connect cost, tidegate's echo app vs a bare uvloop server, side by side.

    python bench/heartbeat_cost.py [--connections 18000] [--rounds 2] [--json out.json]

Three measurements, each against a baseline in the same run:

1. Heartbeat CPU: a one-worker ``tidegate serve --app echo`` and a bare uvloop ``Protocol``
   server that answers the same PING frames are each held at ``--connections`` by one
   ``tidegate bench --target`` client pinging every ``--ping-interval`` seconds; the server's
   and the client's CPU (``/proc``) over a window in the middle of the hold, divided by the
   pings sent in it. Rounds alternate the order.
2. The echo app's Python per ping, in-process (a real Worker and Conn, a no-op transport):
   the app's in-place parse vs the generic ``next_frame`` path it replaced.
3. Client CPU per connect (first ping answered included): a socket made in Python and handed
   to ``create_connection(sock=...)`` vs ``create_connection(host, port, local_addr=...)``,
   the uvloop client's path, against the same tidegate server.
4. The load generator's own cost (``--part clients`` runs this one alone): the same hold as 1,
   against the same tidegate server, with the bench's two raw clients: ``--client-loop epoll``
   (a bare ``select.epoll``, the default) vs ``--client-loop uvloop`` (asyncio Protocols). Client
   CPU per heartbeat over the window, client CPU per connect until connected (process start-up
   included, the same for both) and the connect rate, from the bench's report.
5. Why a heartbeat costs more at 500k (``--part processes``): the same connections and pings
   held by 1 server worker + 1 client process, then by ``--processes`` of each (what the fd
   limit forces at scale). Per ping: server and client CPU and their context switches (from
   ``/proc/PID/status``): spread over more processes, each wakeup answers fewer pings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tidegate.bench.procstat import bench_client_pids

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
LINGER_ZERO = struct.pack("ii", 1, 0)
HELLO = b"\x00\x00\x00\x09\x01" + bytes(8)

BARE_SERVER = r'''
import asyncio, sys, uvloop
class Echo(asyncio.Protocol):
    __slots__ = ("t",)
    def connection_made(self, t): self.t = t
    def data_received(self, d):  # every read here is whole PING frames: answer each
        out = bytearray(d)
        for i in range(0, len(out) - 4, 13):
            out[i + 4] = 2
        self.t.write(out)
async def main():
    await asyncio.get_running_loop().create_server(
        Echo, "127.0.0.1", int(sys.argv[1]), backlog=4096)
    print("ready", flush=True)
    await asyncio.sleep(3600)
uvloop.run(main())
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def context_switches(pid: int) -> int:
    total = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
            total += int(line.split()[1])
    return total


def process_count_round(processes: int, args: argparse.Namespace) -> dict[str, float]:
    """``args.connections`` held by ``processes`` server workers and as many client processes;
    CPU and context switches per ping over the middle window."""
    with tempfile.TemporaryDirectory(prefix="tidegate-hb-") as workdir:
        port = free_port()
        server, workers = start_tidegate_workers(port, workdir, processes)
        out = os.path.join(workdir, "bench.json")
        try:
            bench = subprocess.Popen(
                [sys.executable, "-m", "tidegate", "bench", "--target", f"127.0.0.1:{port}",
                 "--connections", str(args.connections), "--clients", str(processes),
                 "--ping-interval", str(args.ping_interval), "--hold", str(args.window + 10),
                 "--scrape-interval", "0", "--no-progress", "--json", out],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 60
            clients: list[int] = []
            while len(clients) < processes and time.monotonic() < deadline:
                time.sleep(0.2)
                clients = bench_client_pids(port)
            time.sleep(args.connections / 4000 + 3)  # connected and ticking

            def sample(pids: list[int]) -> tuple[float, int]:
                return sum(cpu_s(p) for p in pids), sum(context_switches(p) for p in pids)

            (s0, sx0), (c0, cx0), t0 = sample(workers), sample(clients), time.monotonic()
            time.sleep(args.window)
            (s1, sx1), (c1, cx1), t1 = sample(workers), sample(clients), time.monotonic()
            bench.wait(timeout=300)
            report = json.loads(Path(out).read_text())
        finally:
            server.terminate()
            server.wait(30)
    pings = args.connections / args.ping_interval * (t1 - t0)
    return {"processes_each_side": processes,
            "server_us_per_ping": round((s1 - s0) * 1e6 / pings, 1),
            "client_us_per_ping": round((c1 - c0) * 1e6 / pings, 1),
            "server_context_switches_per_ping": round((sx1 - sx0) / pings, 3),
            "client_context_switches_per_ping": round((cx1 - cx0) / pings, 3),
            "heartbeat_missed": report.get("heartbeat_missed"),
            "rtt_ms_p99": report.get("heartbeat_rtt_ms_p99")}


def process_counts(args: argparse.Namespace) -> dict[str, Any]:
    """Measurement 5: 1 + 1 processes vs ``args.processes`` + as many, rounds alternating."""
    runs: dict[str, list[dict[str, float]]] = {"1": [], str(args.processes): []}
    for i in range(args.rounds):
        order = (1, args.processes) if i % 2 == 0 else (args.processes, 1)
        for n in order:
            r = process_count_round(n, args)
            runs[str(n)].append(r)
            print(f"round {i + 1} {n:>2} + {n:<2} processes: {r}", flush=True)
    keys = ("server_us_per_ping", "client_us_per_ping", "server_context_switches_per_ping",
            "client_context_switches_per_ping", "rtt_ms_p99")
    return {"runs": runs, "median": {n: {k: statistics.median(r[k] for r in rs) for k in keys}
                                     for n, rs in runs.items()}}


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def start_tidegate(port: int, workdir: str, workers: int = 1
                   ) -> tuple[subprocess.Popen[bytes], int]:
    proc, pids = start_tidegate_workers(port, workdir, workers)
    return proc, pids[0]


def start_tidegate_workers(port: int, workdir: str, workers: int
                           ) -> tuple[subprocess.Popen[bytes], list[int]]:
    status = os.path.join(workdir, f"status-{port}.json")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tidegate", "serve", "--app", "echo", "--workers", str(workers),
         "--port", str(port), "--metrics-port", "0", "--ping-interval-s", "60",
         "--status-file", status], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            data = json.loads(Path(status).read_text())
            pids = [int(pid) for pid in data.get("workers") or [] if pid]
            if data.get("ready") and len(pids) == workers:
                return proc, pids
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("tidegate did not start")


def start_bare(port: int) -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen([sys.executable, "-c", BARE_SERVER, str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    proc.stdout.readline()
    return proc, proc.pid


def heartbeat_round(port: int, server_pid: int, args: argparse.Namespace,
                    client_loop: str = "uvloop") -> dict[str, float]:
    """Hold ``args.connections`` on ``port`` with pings; CPU per ping over the middle window."""
    out = tempfile.mktemp(suffix=".json")
    bench = subprocess.Popen(
        [sys.executable, "-m", "tidegate", "bench", "--target", f"127.0.0.1:{port}",
         "--connections", str(args.connections), "--clients", "1", "--ping-interval",
         str(args.ping_interval), "--hold", str(args.window + 10), "--scrape-interval", "0",
         "--client-loop", client_loop, "--no-progress", "--json", out],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client_pid = 0
    deadline = time.monotonic() + 60
    while not client_pid and time.monotonic() < deadline:  # the bench's client process
        client_pid = next(iter(bench_client_pids(port)), 0)
        time.sleep(0.2)
    time.sleep(args.connections / 4000 + 3)  # connected and ticking
    s0, c0, t0 = cpu_s(server_pid), cpu_s(client_pid), time.monotonic()
    time.sleep(args.window)
    s1, c1, t1 = cpu_s(server_pid), cpu_s(client_pid), time.monotonic()
    bench.wait(timeout=300)
    report = json.loads(Path(out).read_text())
    os.unlink(out)
    pings = args.connections / args.ping_interval * (t1 - t0)
    established = report.get("connections_established") or 1
    return {"server_us_per_ping": round((s1 - s0) * 1e6 / pings, 1),
            "client_us_per_ping": round((c1 - c0) * 1e6 / pings, 1),
            "pings_per_s": round(args.connections / args.ping_interval),
            "heartbeat_missed": report.get("heartbeat_missed"),
            "rtt_ms_p99": report.get("heartbeat_rtt_ms_p99"),
            "client_us_per_connect": round(
                report.get("client_cpu_seconds_until_connected", 0) * 1e6 / established, 1),
            "connect_rate_per_s": report.get("connect_rate_per_s")}


def python_per_ping() -> dict[str, float]:
    """The echo app's on_traffic: in-place parse vs the generic next_frame path."""
    from tidegate.apps.echo import EchoHandler
    from tidegate.engine.conn import Conn
    from tidegate.engine.handler import EventHandler
    from tidegate.engine.options import EngineOptions
    from tidegate.engine.worker import Worker
    from tidegate.protocol.heartbeat import DATA, PING, PONG, frame

    class Generic(EventHandler):  # the echo app before its in-place parse
        def on_traffic(self, c: Conn) -> None:
            while (payload := c.next_frame()) is not None:
                if payload and payload[0] == PING:
                    c.write(frame(PONG, payload[1:]))
                elif payload and payload[0] == DATA:
                    c.write(frame(DATA, payload[1:]))
            if not c.is_ready:
                c.ready()

    class NoopTransport:
        def write(self, data: bytes) -> None:
            pass

    ping = frame(PING, (123456789).to_bytes(8, "big"))
    out: dict[str, float] = {}

    async def run(name: str, handler: EventHandler, n: int = 200_000) -> None:
        worker = Worker(EngineOptions(), handler)
        handler.on_boot(worker)
        c = worker.conn_class()
        c._transport = NoopTransport()
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(n):
                view = c.get_buffer(13)
                view[:13] = ping
                c.buffer_updated(13)
            best = min(best, time.perf_counter() - t)
        out[name] = round(best / n * 1e6, 2)

    asyncio.run(run("echo_app_us_per_ping", EchoHandler()))
    asyncio.run(run("generic_next_frame_us_per_ping", Generic()))
    return out


class _Hello(asyncio.Protocol):
    __slots__ = ("waiter", "answered")

    def __init__(self) -> None:
        self.waiter: asyncio.Future[None] | None = None
        self.answered = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(HELLO)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.answered = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


def client_connect_cost(port: int, mode: str, n: int, base: int) -> float:
    """Client CPU (us) per connect + answered hello, ``n`` connects, 200 in flight."""
    import uvloop

    async def main() -> float:
        loop = asyncio.get_running_loop()
        transports: list[asyncio.BaseTransport] = []
        todo = iter(range(n))

        async def worker(k: int) -> None:
            src = f"127.{base}.{k // 50}.{2 + k % 50}"
            for _ in todo:
                if mode == "local_addr":
                    t, p = await loop.create_connection(
                        _Hello, "127.0.0.1", port, local_addr=(src, 0))
                else:
                    sock = socket.socket()
                    sock.setblocking(False)
                    sock.setsockopt(socket.SOL_IP, 24, 1)  # IP_BIND_ADDRESS_NO_PORT
                    sock.bind((src, 0))
                    await loop.sock_connect(sock, ("127.0.0.1", port))
                    t, p = await loop.create_connection(_Hello, sock=sock)
                if not p.answered:
                    p.waiter = loop.create_future()
                    await p.waiter
                transports.append(t)

        r0 = resource.getrusage(resource.RUSAGE_SELF)
        await asyncio.gather(*(worker(k) for k in range(200)))
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        for t in transports:
            t.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
            t.close()
        await asyncio.sleep(0.5)
        used = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        return round(used * 1e6 / n, 1)

    return uvloop.run(main())


def client_loops(args: argparse.Namespace, port: int = 0, worker_pid: int = 0
                 ) -> dict[str, Any]:
    """Measurement 4: the epoll client vs the uvloop client, rounds alternating the order."""
    with tempfile.TemporaryDirectory(prefix="tidegate-hb-") as workdir:
        server = None
        if not port:
            port = free_port()
            server, worker_pid = start_tidegate(port, workdir)
        try:
            runs: dict[str, list[dict[str, float]]] = {"epoll": [], "uvloop": []}
            for i in range(args.rounds):
                for loop in ("epoll", "uvloop") if i % 2 == 0 else ("uvloop", "epoll"):
                    r = heartbeat_round(port, worker_pid, args, loop)
                    runs[loop].append(r)
                    print(f"round {i + 1} client {loop:>6}: {r}", flush=True)
        finally:
            if server is not None:
                server.terminate()
                server.wait(30)
    keys = ("client_us_per_ping", "server_us_per_ping", "client_us_per_connect",
            "connect_rate_per_s", "rtt_ms_p99")
    return {"runs": runs, "median": {loop: {k: statistics.median(r[k] for r in rs) for k in keys}
                                     for loop, rs in runs.items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--connections", type=int, default=18000)
    p.add_argument("--ping-interval", type=float, default=2.0)
    p.add_argument("--window", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--connects", type=int, default=12000)
    p.add_argument("--part", choices=("all", "clients", "processes"), default="all",
                   help="clients: only measurement 4, the bench client loops; processes: only "
                        "measurement 5, one process a side vs --processes")
    p.add_argument("--processes", type=int, default=9,
                   help="server workers and client processes each, for measurement 5")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    result: dict[str, Any] = {"benchmark": "heartbeat_cost", "date": time.strftime("%Y-%m-%d"),
                              "connections": args.connections,
                              "ping_interval_s": args.ping_interval}
    if args.part != "all":  # one measurement alone
        key, measure = {"processes": ("process_counts", process_counts),
                        "clients": ("client_loops", client_loops)}[args.part]
        result[key] = measure(args)
        print(json.dumps(result[key]["median"], indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return 0
    with tempfile.TemporaryDirectory(prefix="tidegate-hb-") as workdir:
        tg_port = free_port()
        tg, tg_worker = start_tidegate(tg_port, workdir)
        bare_port = free_port()
        bare, bare_pid = start_bare(bare_port)
        try:
            runs: dict[str, list[dict[str, float]]] = {"tidegate_echo": [], "bare_uvloop": []}
            for i in range(args.rounds):
                order = [("tidegate_echo", tg_port, tg_worker), ("bare_uvloop", bare_port,
                                                                  bare_pid)]
                for name, port, pid in order if i % 2 == 0 else order[::-1]:
                    r = heartbeat_round(port, pid, args)
                    runs[name].append(r)
                    print(f"round {i + 1} {name:>13}: {r}", flush=True)
            result["heartbeat_runs"] = runs
            result["heartbeat_median"] = {
                name: {k: statistics.median(r[k] for r in rs)
                       for k in ("server_us_per_ping", "client_us_per_ping")}
                for name, rs in runs.items()}
            connects: dict[str, list[float]] = {"sock_in_python": [], "local_addr": []}
            for i in range(args.rounds):
                for j, mode in enumerate(("sock_in_python", "local_addr")
                                         if i % 2 == 0 else ("local_addr", "sock_in_python")):
                    connects[mode].append(
                        client_connect_cost(tg_port, mode, args.connects, 10 + 2 * i + j))
            result["client_us_per_connect"] = connects
            result["client_us_per_connect_median"] = {
                k: statistics.median(v) for k, v in connects.items()}
            result["client_loops"] = client_loops(args, tg_port, tg_worker)
        finally:
            tg.terminate()
            bare.terminate()
            tg.wait(30)
            bare.wait(30)
    result["python_us_per_ping"] = python_per_ping()
    print(json.dumps({k: v for k, v in result.items() if k.endswith(("median", "per_ping"))},
                     indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
