"""``tidegate bench``: orchestration of a load run and its report.

A run goes through phases, each with a deadline, so it always ends by itself:

1. start the server (``tidegate serve``) unless ``--target`` names one; wait for its status file;
   measure it idle (memory, CPU, kernel slab);
2. start the client processes (:mod:`tidegate.bench.client`), one source address or more each,
   and wait until each says it is ready;
3. connect: tell every client ``go``; follow the established count (progress bar) until every
   client is done or the phase times out;
4. hold for ``--hold`` seconds with heartbeats running; measure the server near the end;
5. close: tell the clients to close, collect their final counters and histograms;
6. measure the server's CPU once it is quiet again, stop it, write the report.

With ``--protocol ws`` the server is the gateway (``tidegate serve --config ...``): each
connection upgrades, connects with a token and subscribes to ``--channel``; with
``--broadcast-rate`` the runner publishes ``--broadcast-count`` messages to that channel through the
server HTTP API during the hold and the report says how many deliveries arrived, how fast and how
late (see :meth:`Bench.broadcast_phase`).

Figures are measured, never estimated: what cannot be measured (the memory of a ``--target``
server without its status file) is ``null``. Heartbeat RTT percentiles are those of the pings
sent during the hold (every connection up); the connect phase's are reported apart.

On Ctrl-C, SIGTERM or any failure, the clients and the server the bench started are stopped
(and they die with the runner anyway: see :mod:`tidegate.bench.guard`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import ipaddress
import json
import math
import os
import platform
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

from tidegate.bench import procstat
from tidegate.bench.client import PROTOCOLS, TOKEN_ENV, ClientConfig, config_json, error_reason
from tidegate.bench.histogram import Histogram

# fds a client process keeps besides its connections (pipes, epoll, the interpreter's own).
CLIENT_RESERVE_FDS = 1000
# Below this many connections per process, extra client processes buy nothing but start-up time.
MIN_CONNECTIONS_PER_CLIENT = 5000
# Connections per source address, as a share of the ephemeral port range. The clients bind their
# source address with port 0 (the kernel picks a free port); Linux searches one half of the range
# first (even ports for bind(), odd for connect()) from a moving offset, so once an address holds
# ~half the range every further connect scans thousands of taken ports in the kernel (measured
# here: 100k connections over 6 addresses stalled at ~85k, ~1 ms of system time per connect).
# A quarter of the range keeps the scans short; loopback has 16 million addresses to spare.
PORT_RANGE_SHARE_PER_SOURCE = 0.25
# Connects in flight, all clients together (--max-inflight's default: this over the clients, at
# most the per-client cap). 500 each for 27 clients put 13,500 WebSocket handshakes in flight at
# once on 2 cores: 60,000 presence subscribes then waited longer than the broker's 5 s timeout
# and only 5,584 got in (bench/results/2026-11-27-ws-60k-presence-batching.json); the 500k runs
# use 80 a client (2,160 in all).
INFLIGHT_TOTAL = 2160
INFLIGHT_MAX_PER_CLIENT = 500
# Up to this many connections the workers' open fds are counted from /proc (an independent
# check of the spread); past it, each worker's own count is used.
FD_COUNT_MAX = 100_000
FIRST_SOURCE = ipaddress.IPv4Address("127.0.0.2")
LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")

EXIT_OK = 0
EXIT_SHORTFALL = 1  # the run completed but missed a target (see the report's "failures")
EXIT_SETUP = 2  # the run could not be set up (bad options, the server did not start...)
EXIT_INTERRUPTED = 130


class BenchError(Exception):
    """A failure that stops the run: reported, then the run is wound down."""


# --------------------------------------------------------------------------- options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``tidegate bench``'s options to ``parser``."""
    parser.description = (
        "Open N long-lived connections over loopback from many client processes and source "
        "addresses, hold them with heartbeats, close them, and report what it cost the server. "
        "Starts its own `tidegate serve` unless --target is given. Exit status: 0 when every "
        "connection was established and held with no error, unexpected close or missed "
        "heartbeat; 1 when the run completed short of that; 2 when it could not run."
    )
    g = parser.add_argument_group("load")
    g.add_argument("--connections", type=_positive_int, default=10_000, metavar="N",
                   help="connections to open and hold (default: 10000)")
    g.add_argument("--hold", type=_non_negative_float, default=30.0, metavar="SECONDS",
                   help="how long to hold them once connected (default: 30)")
    g.add_argument("--freeze-fraction", type=_non_negative_float, default=0.0, metavar="F",
                   help="kill this share of the client processes without a FIN during the hold "
                   "(SIGSTOP: their connections go silent, the kernel still ACKs), and report "
                   "how long the server takes to find and close each of their connections "
                   "while the others stay untouched; the hold must outlast the server's ping "
                   "interval plus pong timeout (default: 0)")
    g.add_argument("--freeze-at", type=_non_negative_float, default=2.0, metavar="SECONDS",
                   help="when into the hold the clients are frozen (default: 2)")
    g.add_argument("--drain-at", type=_non_negative_float, default=0.0, metavar="SECONDS",
                   help="SIGTERM the server this far into the hold (a redeploy) and report how "
                   "its graceful drain spread the disconnects: closes per second until every "
                   "client is gone (the server's --drain-s sets the window; pass it with "
                   "--server-arg); only for a server the bench starts; 0 = no drain (default)")
    g.add_argument("--ping-interval", type=_positive_float, default=25.0, metavar="SECONDS",
                   help="each connection pings this often, spread evenly (default: 25)")
    g.add_argument("--pong-timeout", type=_positive_float, default=10.0, metavar="SECONDS",
                   help="a ping not answered within this (or before the next ping) is missed "
                   "(default: 10)")
    g.add_argument("--protocol", choices=sorted(PROTOCOLS), default="raw",
                   help="wire protocol the clients speak (default: raw)")
    g.add_argument("--established-on", choices=("pong", "tcp"), default="pong",
                   help="when a connect counts as established: pong: the server's app answered "
                   "the hello, so at most --max-inflight connects per client process wait in "
                   "the server's accept queues (default); tcp: the TCP handshake completed: "
                   "clients may then outrun the server's accepts, overflow its accept queues "
                   "and stall on SYN retransmissions")
    g.add_argument("--no-hello", dest="hello", action="store_false",
                   help="do not send a first ping as soon as a connect completes (by default "
                   "one is sent: its PONG confirms the server's app holds the connection)")
    g.add_argument("--close-mode", choices=("rst", "fin"), default="rst",
                   help="rst: close with SO_LINGER 0, leaving no TIME_WAIT behind (default); "
                   "fin: orderly shutdown")

    g = parser.add_argument_group("ws protocol and broadcast")
    g.add_argument("--channel", default="bench",
                   help="ws: the channel every connection subscribes to (default: bench)")
    g.add_argument("--broadcast-rate", type=_non_negative_float, default=0.0, metavar="R",
                   help="ws: publications per second to the channel through the server HTTP "
                   "API during the hold; 0 = no broadcast (default: 0)")
    g.add_argument("--broadcast-count", type=_positive_int, default=10, metavar="K",
                   help="ws: how many publications (default: 10)")
    g.add_argument("--broadcast-start", type=_non_negative_float, default=2.0, metavar="SECONDS",
                   help="ws: when into the hold the first publication goes out; the second "
                   "before it measures the server's baseline CPU (default: 2)")
    g.add_argument("--broadcast-timeout", type=_positive_float, default=30.0, metavar="SECONDS",
                   help="ws: how long after the last publication to wait for every delivery "
                   "(default: 30); the hold lasts until then if --hold is shorter")

    g = parser.add_argument_group("server")
    g.add_argument("--fd-count-max", type=int, default=FD_COUNT_MAX, metavar="N",
                   help="count each worker's open fds from /proc for the per-worker spread up "
                   "to N connections; past N use the workers' own counts (listing 500,000 fd "
                   f"entries takes minutes on a busy machine; default {FD_COUNT_MAX})")
    g.add_argument("--scrape-interval", type=_non_negative_float, default=15.0,
                   metavar="SECONDS",
                   help="scrape the server's /metrics this often during the hold and report "
                   "how long a scrape takes and what the workers' stats cost them; only for a "
                   "server the bench starts (it knows its metrics port); 0 = never "
                   "(default: 15, Prometheus' usual interval)")
    g.add_argument("--target", metavar="HOST:PORT",
                   help="aim at a server already running (loopback only) instead of starting one")
    g.add_argument("--server-status-file", metavar="PATH",
                   help="with --target: the server's status file, so its memory and CPU can be "
                   "measured (otherwise those figures are null)")
    g.add_argument("--balance", choices=("reuseport", "handoff"),
                   help="passed to the server it starts")
    g.add_argument("--server-workers", type=_positive_int, metavar="W",
                   help="worker count for the server it starts (default: the server sizes itself)")
    g.add_argument("--server-loop", choices=("uvloop", "asyncio"),
                   help="event loop of the server it starts")
    g.add_argument("--server-ping-interval", type=_positive_float, metavar="SECONDS",
                   help="the started server's own --ping-interval-s (default: --ping-interval)")
    g.add_argument("--server-config", metavar="PATH",
                   help="ws: the gateway's TOML config, for the server it starts and for the "
                   "connect token secret and the API key (the TIDEGATE_* environment "
                   "overrides it, as in the server) (default: the source tree's "
                   "config/example.toml)")
    g.add_argument("--server-cmd", metavar="CMD",
                   help="command that starts the server, before `--app ...` "
                   "(default: '<this python> -m tidegate serve')")
    g.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for the started server (repeatable; write flags as "
                   "--server-arg=--handshake-timeout-s --server-arg=30)")
    g.add_argument("--ready-timeout", type=_positive_float, default=120.0, metavar="SECONDS",
                   help="how long to wait for the server to be ready (default: 120)")

    g = parser.add_argument_group("clients")
    g.add_argument("--clients", type=_positive_int, metavar="K",
                   help="client processes (default: enough for the fd limit, at least one per "
                   "core)")
    g.add_argument("--client-nice", type=int, default=0, choices=range(0, 20), metavar="N",
                   help="run the client processes at this nice value (0-19; default 0). On a "
                   "machine the server shares with its load generator, the workers then get "
                   "the cores first, as if the clients ran elsewhere; the report says so")
    g.add_argument("--client-sched", choices=("batch", "normal"), default="batch",
                   help="the clients' scheduling policy (default: batch). batch: SCHED_BATCH, "
                   "so a client woken by a server worker's write does not preempt that worker "
                   "(on loopback it did, 2-3 times per WebSocket connect), as clients on other "
                   "machines could not; normal: SCHED_OTHER")
    g.add_argument("--max-inflight", type=_positive_int, default=None, metavar="M",
                   help=f"connects in flight per client process (default: {INFLIGHT_TOTAL:,} "
                   f"over the client processes, at most {INFLIGHT_MAX_PER_CLIENT} each)")
    g.add_argument("--connect-timeout", type=_positive_float, default=15.0, metavar="SECONDS",
                   help="timeout of one connect (default: 15)")
    g.add_argument("--connect-retries", type=int, default=0, metavar="N",
                   help="try a failed connect again up to N times, as an SDK reconnects; "
                        "retries are reported by reason, only the last failure is an error "
                        "(default: 0)")
    g.add_argument("--connect-phase-timeout", type=_positive_float, metavar="SECONDS",
                   help="timeout of the whole connect phase (default: max(60, N/2000); ws: "
                   "max(60, N/250): each connect is an upgrade, a token check and a subscribe)")
    g.add_argument("--client-loop", choices=("epoll", "uvloop", "asyncio"),
                   help="event loop of the client processes: epoll (raw only: a bare "
                   "select.epoll, the cheapest per heartbeat), uvloop or asyncio (default: epoll "
                   "for raw, uvloop for ws)")

    g = parser.add_argument_group("output")
    g.add_argument("--json", metavar="PATH", help="write the report there as JSON")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--keep-logs", action="store_true",
                   help="keep the server's and clients' logs even after a clean run")
    g.add_argument("--logs-dir", metavar="PATH",
                   help="put the logs there (kept) instead of a temporary directory (removed "
                   "after a clean run)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text} is not a non-negative number")
    return value


def parse_target(text: str) -> tuple[str, int]:
    """``HOST:PORT`` → (IPv4 loopback address, port). Anything off loopback is refused."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise BenchError(f"--target {text!r}: expected HOST:PORT")
    port = int(port_text)
    if not 0 < port < 65536:
        raise BenchError(f"--target {text!r}: port out of range")
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise BenchError(f"--target {text!r}: {exc}") from exc
    address = ipaddress.IPv4Address(infos[0][4][0])
    if address not in LOOPBACK:
        raise BenchError(f"--target {text!r}: only loopback (127.0.0.0/8) targets are allowed")
    return str(address), port


# --------------------------------------------------------------------------- sizing


@dataclass
class ClientPlan:
    index: int
    connections: int
    sources: list[str]


def plan_clients(
    connections: int,
    nofile: int,
    *,
    clients: int | None = None,
    cores: int | None = None,
    port_range: tuple[int, int] = (32768, 60999),
    reserve_fds: int = CLIENT_RESERVE_FDS,
) -> list[ClientPlan]:
    """Split ``connections`` over client processes and give each its source addresses."""
    per_process = nofile - reserve_fds
    if per_process <= 0:
        raise BenchError(f"RLIMIT_NOFILE {nofile} leaves no fds for connections")
    needed = math.ceil(connections / per_process)
    cores = cores or os.cpu_count() or 1
    if clients is not None:
        if clients < needed:
            raise BenchError(
                f"--clients {clients} is too few: {connections} connections need at least "
                f"{needed} processes at RLIMIT_NOFILE {nofile}"
            )
        count = clients
    else:
        count = max(needed, min(cores, math.ceil(connections / MIN_CONNECTIONS_PER_CLIENT)))
    count = max(1, min(count, connections))
    ports = max(1, int((port_range[1] - port_range[0] + 1) * PORT_RANGE_SHARE_PER_SOURCE))
    base, extra = divmod(connections, count)
    plans: list[ClientPlan] = []
    next_source = FIRST_SOURCE
    for index in range(count):
        n = base + (1 if index < extra else 0)
        sources: list[str] = []
        for _ in range(max(1, math.ceil(n / ports))):
            while int(next_source) & 0xFF in (0, 255):  # keep clear of .0 and .255
                next_source += 1
            if next_source not in LOOPBACK:
                raise BenchError("ran out of loopback source addresses")
            sources.append(str(next_source))
            next_source += 1
        plans.append(ClientPlan(index=index, connections=n, sources=sources))
    return plans


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- processes


class MetricsScraper:
    """Scrapes the server's ``/metrics`` during the hold, as Prometheus would.

    Reports the scrape's wall time and size, and what producing the figures costs the workers:
    they send their stats to the supervisor every second whether anyone scrapes or not, and
    count the CPU time that takes (``stats_cpu_seconds`` in their status); the supervisor
    answers scrapes from what it holds, so its own CPU over the hold is reported too.
    """

    def __init__(self, server: Server | None, port: int | None, interval: float) -> None:
        self.server = server
        self.url = f"http://127.0.0.1:{port}/metrics" if port else ""
        self.interval = interval
        self.durations_ms: list[float] = []
        self.sizes: list[int] = []
        self.errors: list[str] = []
        self.task: asyncio.Task[None] | None = None
        self.t0 = 0.0
        self.stats_cpu0: float | None = None
        self.stats_t0 = 0.0
        self.supervisor_cpu0: float | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.url and self.interval > 0 and self.server is not None
                    and self.server.started)

    def _stats_cpu(self) -> float | None:
        assert self.server is not None
        self.server.refresh()
        stats = self.server.status.get("worker_stats") or []
        values = [w.get("stats_cpu_seconds") for w in stats]
        if not values or None in values:
            return None
        return float(sum(values))

    def start(self) -> None:
        if not self.enabled:
            return
        assert self.server is not None
        self.t0 = self.stats_t0 = time.monotonic()
        self.stats_cpu0 = self._stats_cpu()
        self.supervisor_cpu0 = procstat.cpu_seconds(self.server.pid) if self.server.pid else None
        self.task = asyncio.create_task(self._run())

    def _scrape(self) -> None:
        t = time.perf_counter()
        try:
            with urllib.request.urlopen(self.url, timeout=10) as resp:
                body = resp.read()
        except OSError as exc:
            self.errors.append(str(exc))
            return
        self.durations_ms.append((time.perf_counter() - t) * 1000)
        self.sizes.append(len(body))

    async def _run(self) -> None:
        next_scrape = time.monotonic()
        while True:
            if self.stats_cpu0 is None:  # until every worker has reported its stats once
                self.stats_cpu0 = self._stats_cpu()
                self.stats_t0 = time.monotonic()
            if time.monotonic() >= next_scrape:
                await asyncio.to_thread(self._scrape)
                next_scrape += self.interval
            await asyncio.sleep(0.25)

    async def finish(self) -> dict[str, Any]:
        if self.task is None:
            return {"metrics_scrape_interval_s": None}
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        assert self.server is not None
        elapsed = time.monotonic() - self.t0
        stats_elapsed = time.monotonic() - self.stats_t0
        stats_cpu1 = self._stats_cpu()
        workers = len(self.server.workers) or 1
        supervisor_cpu1 = procstat.cpu_seconds(self.server.pid) if self.server.pid else None
        d = sorted(self.durations_ms)
        return {
            "metrics_scrape_interval_s": self.interval,
            "metrics_scrapes": len(d),
            "metrics_scrape_errors": self.errors[:5],
            "metrics_scrape_ms_p50": round(d[len(d) // 2], 2) if d else None,
            "metrics_scrape_ms_max": round(d[-1], 2) if d else None,
            "metrics_scrape_bytes": max(self.sizes) if self.sizes else None,
            "server_stats_cpu_percent_per_worker": (
                None if stats_cpu1 is None or self.stats_cpu0 is None or stats_elapsed <= 0
                else round(100 * (stats_cpu1 - self.stats_cpu0) / stats_elapsed / workers, 3)),
            "server_supervisor_cpu_percent_hold": (
                None if supervisor_cpu1 is None or self.supervisor_cpu0 is None or elapsed <= 0
                else round(100 * (supervisor_cpu1 - self.supervisor_cpu0) / elapsed, 3)),
        }


@dataclass
class Server:
    """The server under test: started by the bench, or found through a status file."""

    started: bool
    host: str
    port: int
    proc: asyncio.subprocess.Process | None = None
    log_path: str | None = None
    status_path: str | None = None
    pid: int | None = None
    workers: list[int] = field(default_factory=list)
    restarts: int = 0
    status_history: list[dict[str, Any]] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)

    def read_status(self) -> dict[str, Any] | None:
        if not self.status_path:
            return None
        try:
            with open(self.status_path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def refresh(self) -> None:
        """Follow the status file: the server rewrites it when it restarts a worker."""
        status = self.read_status()
        if not status or not status.get("ready"):
            return
        self.status = status
        workers = [int(pid) for pid in status.get("workers", [])]
        if self.pid is None:
            self.pid = int(status["pid"]) if status.get("pid") else None
        if workers != self.workers:
            if self.workers:
                self.restarts += len(set(self.workers) - set(workers))
                self.status_history.append({"at": time.time(), "workers": workers})
            self.workers = workers

    @property
    def measurable(self) -> bool:
        return bool(self.workers)

    def rss(self) -> int | None:
        return procstat.sum_known(procstat.rss_bytes(pid) for pid in self.workers) \
            if self.workers else None

    def cpu_ticks(self) -> int | None:
        if not self.workers:
            return None
        # The supervisor's own time plus its reaped children's (a restarted worker's time
        # moves there), plus each live worker's.
        values: list[int | None] = [procstat.cpu_ticks(pid) for pid in self.workers]
        if self.pid is not None:
            values.append(procstat.cpu_ticks(self.pid, children=True))
        return procstat.sum_known(values)

    def cpu_ns(self) -> int | None:
        """CPU time of the supervisor (which relays publications between workers) and the
        workers, all threads, in ns: for short windows (a broadcast)."""
        if not self.workers:
            return None
        pids = [*self.workers, *([self.pid] if self.pid is not None else [])]
        return procstat.sum_known(procstat.cpu_ns(pid) for pid in pids)

    def cpu_user_system_ticks(self) -> tuple[int, int] | None:
        """(user, system) clock ticks of the supervisor and the workers."""
        if not self.workers:
            return None
        pids = [*self.workers, *([self.pid] if self.pid is not None else [])]
        user = system = 0
        for pid in pids:
            split = procstat.cpu_ticks_split(pid)
            if split is None:
                return None
            user += split[0]
            system += split[1]
        return user, system

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.returncode is None
        return self.pid is None or procstat.alive(self.pid)


@dataclass
class Client:
    plan: ClientPlan
    proc: asyncio.subprocess.Process
    log_path: str
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)
    subscribed_msg: dict[str, Any] | None = None
    latest: dict[str, Any] = field(default_factory=dict)
    connected_msg: dict[str, Any] | None = None
    final: dict[str, Any] | None = None
    fatal: str | None = None
    reader: asyncio.Task[None] | None = None
    window_rtt_max_us: int = 0  # the largest RTT reported since the runner last took it
    frozen_open: int | None = None  # --freeze-fraction: its open connections when stopped
    nice: int | None = None  # the process's nice value, as it reported it when ready
    autogroup_nice: int | None = None  # its session's (None: no autogroup scheduling)
    sid: int | None = None  # its session id
    sched: str | None = None  # its scheduling policy, as it reported it

    def take_rtt_max(self) -> int:
        value, self.window_rtt_max_us = self.window_rtt_max_us, 0
        return value

    def send(self, command: str) -> None:
        stdin = self.proc.stdin
        if stdin is None or stdin.is_closing():
            return
        with contextlib.suppress(OSError, RuntimeError):
            stdin.write(command.encode() + b"\n")

    async def read(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        while True:
            try:
                line = await stdout.readline()
            except (ValueError, OSError) as exc:
                self.fatal = self.fatal or f"bad output: {exc}"
                break
            if not line:
                break
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            kind = msg.get("type")
            if kind == "ready":
                self.nice = msg.get("nice")
                self.autogroup_nice = msg.get("autogroup_nice")
                self.sid = msg.get("sid")
                self.sched = msg.get("sched")
                self.ready.set()
            elif kind == "progress":
                self.latest = msg
                rtt_max = int(msg.get("rtt_max_us", 0))
                if rtt_max > self.window_rtt_max_us:
                    self.window_rtt_max_us = rtt_max
            elif kind == "connected":
                self.latest = msg
                self.connected_msg = msg
                self.connected.set()
            elif kind == "subscribed":
                self.subscribed_msg = msg
                self.subscribed.set()
            elif kind == "final":
                self.latest = msg
                self.final = msg
            elif kind == "fatal":
                self.fatal = str(msg.get("error"))
        # The process is gone (or going): nobody should wait for it any more.
        self.ready.set()
        self.connected.set()
        self.subscribed.set()
        self.finished.set()


def _tail(path: str | None, lines: int = 20) -> str:
    if not path:
        return ""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def _sum(clients: Iterable[Client], key: str) -> int:
    return sum(int(c.latest.get(key, 0)) for c in clients)


class ApiPublisher:
    """One keep-alive HTTP/1.1 connection to the server API: ``POST /api/publish``."""

    def __init__(self, host: str, port: int, api_key: str, timeout: float = 60.0) -> None:
        self.host = host
        self.port = port
        self.api_key = api_key
        self.timeout = timeout  # a stalled server may take seconds: its latency is a figure
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.requests = 0  # requests sent, retries included

    async def publish(self, body: bytes) -> str:
        """Publish; return "" when the API acknowledged it, else a short error label.

        A request is sent again (once, on a new connection) only when a reused keep-alive
        connection turned out closed before any byte of the reply came: never after a
        timeout or a partial reply, when the server may have taken the first one (a
        publication sent twice would show as duplicated deliveries).
        """
        head = (f"POST /api/publish HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"X-API-Key: {self.api_key}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        for attempt in (0, 1):
            reused = self.writer is not None
            try:
                if self.writer is None:
                    self.reader, self.writer = await asyncio.wait_for(
                        asyncio.open_connection(self.host, self.port), self.timeout)
                writer = self.writer
                assert writer is not None
                self.requests += 1
                writer.write(head + body)
                await writer.drain()
                status, reply, close = await asyncio.wait_for(self._response(), self.timeout)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ValueError) as exc:  # TimeoutError is an OSError
                await self.close()
                stale = (isinstance(exc, (BrokenPipeError, ConnectionResetError))
                         or (isinstance(exc, asyncio.IncompleteReadError) and not exc.partial))
                if attempt == 0 and reused and stale and not isinstance(exc, TimeoutError):
                    continue
                if isinstance(exc, asyncio.IncompleteReadError):
                    return "api_closed_before_reply"
                return f"api_{error_reason(exc)}"
            if close:
                await self.close()
            if status != 200:
                return f"api_http_{status}"
            try:
                data = json.loads(reply)
            except ValueError:
                return "api_bad_reply"
            if not isinstance(data, dict) or data.get("error"):
                code = (data.get("error") or {}).get("code") if isinstance(data, dict) else None
                return f"api_error_{code}"
            return ""
        return "api_unreachable"  # not reached

    async def _response(self) -> tuple[int, bytes, bool]:
        assert self.reader is not None
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = 0
        close = False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value.strip())
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        body = await self.reader.readexactly(length) if length else b""
        return status, body, close

    async def close(self) -> None:
        writer, self.writer, self.reader = self.writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2.0)


def default_server_config() -> str | None:
    """The source tree's config/example.toml, when the bench runs from a checkout."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "config",
                        "example.toml")
    return os.path.normpath(path) if os.path.isfile(path) else None


def host_notes(counters: dict[str, int]) -> list[str]:
    """What the machine-wide kernel counters say about the host during a run (not a failure
    of the server, but often the cause of one)."""
    notes = []
    if counters.get("SoftnetDropped", 0) > 0:
        notes.append(f"{counters['SoftnetDropped']} packets dropped by the input backlog "
                     "(net.core.netdev_max_backlog; see `tidegate doctor`)")
    if counters.get("TCPAbortOnTimeout", 0) > 0:
        notes.append(f"{counters['TCPAbortOnTimeout']} connections aborted by keepalive / "
                     "TCP_USER_TIMEOUT (on loopback: their probes were lost)")
    if counters.get("TCPMemoryPressures", 0) > 0:
        notes.append(f"TCP memory pressure (tcp_mem) for "
                     f"{counters.get('TCPMemoryPressuresChrono', 0) / 1000:.1f} s")
    return notes


class Progress:
    """A tqdm bar on stderr, or nothing with --no-progress."""

    def __init__(self, enabled: bool, **kwargs: Any) -> None:
        self.bar: Any = None
        if enabled:
            from tqdm import tqdm

            tty = sys.stderr.isatty()
            self.bar = tqdm(file=sys.stderr, dynamic_ncols=True, leave=True,
                            mininterval=0.2 if tty else 5.0, **kwargs)

    def update(self, n: float, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.n = n
            if postfix:
                # Strings: tqdm would print large numbers as 2e+04.
                self.bar.set_postfix({k: str(v) for k, v in postfix.items()}, refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# --------------------------------------------------------------------------- the run


class Bench:
    def __init__(self, args: argparse.Namespace, out: TextIO) -> None:
        self.args = args
        self.out = out
        self.report: dict[str, Any] = {}
        self.failures: list[str] = []
        self.server: Server | None = None
        self.metrics_port: int | None = None
        self.clients: list[Client] = []
        if args.logs_dir:
            os.makedirs(args.logs_dir, exist_ok=True)
            self.workdir = args.logs_dir
        else:
            self.workdir = tempfile.mkdtemp(prefix="tidegate-bench-")
        self.keep_logs = bool(args.keep_logs or args.logs_dir)
        self.t_start = time.monotonic()
        self.phases: dict[str, float] = {}
        self.before: dict[str, Any] = {}
        self.go_ns = 0
        self.ws = args.protocol == "ws"
        self.client_loop = args.client_loop or ("uvloop" if self.ws else "epoll")
        self.broadcast_on = self.ws and args.broadcast_rate > 0
        # ws: the gateway's config (path), its token secret and API key.
        self.server_config: str | None = None
        self.token_secret = ""
        self.api_key = ""
        # What the broadcast phase measured (see broadcast_phase); empty when it did not run.
        self.bcast: dict[str, Any] = {}

    # ---------------------------------------------------------------- setup

    def _base_report(self, plans: list[ClientPlan], nofile: tuple[int, int]) -> None:
        a = self.args
        mem = procstat.meminfo()
        self.report.update({
            "schema": "tidegate.bench/1",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": [sys.executable, *sys.argv],
            "config": {k: v for k, v in sorted(vars(a).items()) if not callable(v)},
            "client_loop": self.client_loop,
            "client_nice": a.client_nice,  # > 0: the clients yielded the cores to the server
            "client_sched": a.client_sched,
            "client_sessions": ("one each, its scheduling group niced" if a.client_nice else
                                "the bench's own (one scheduling group for all clients)"),
            "host": {
                "hostname": platform.node(),
                "kernel": platform.release(),
                "python": platform.python_version(),
                "cores": os.cpu_count(),
                "mem_total_bytes": mem.get("MemTotal"),
                "nofile_soft": nofile[0],
                "nofile_hard": nofile[1],
                "ip_local_port_range": list(procstat.ip_local_port_range()),
                "somaxconn": _read_int("/proc/sys/net/core/somaxconn"),
                "netdev_max_backlog": _read_int("/proc/sys/net/core/netdev_max_backlog"),
            },
            "protocol": a.protocol,
            "connections_target": a.connections,
            "client_processes": len(plans),
            "connections_per_client": [p.connections for p in plans],
            "source_addresses": [s for p in plans for s in p.sources],
            "max_inflight_per_client": a.max_inflight,
            "connect_timeout_s": a.connect_timeout,
            "connect_retries_per_connection": a.connect_retries,
            "ping_interval_s": a.ping_interval,
            "pong_timeout_s": a.pong_timeout,
            "close_mode": a.close_mode,
            "established_when": {
                "pong": "the server answered the hello (a first ping sent at connect)",
                "tcp": "the TCP handshake completed",
            }[a.established_on] if not self.ws else (
                "the subscribe reply arrived (HTTP upgrade, connect, subscribe done)"),
            "hello": a.hello and not self.ws,
        })
        if self.ws:
            self.report.update({
                "channel": a.channel,
                "server_config": self.server_config,
                "heartbeat_method": "client ping command {\"id\":N,\"ping\":{}} answered by "
                                    "the server; the server's own pings ({}) are answered too "
                                    "(server_pings_answered)",
                "broadcast_rate_per_s": a.broadcast_rate if self.broadcast_on else 0,
                "broadcast_count": a.broadcast_count if self.broadcast_on else 0,
            })
        for key in BROADCAST_KEYS:
            self.report.setdefault(key, None)

    def load_gateway_config(self) -> None:
        """ws: find the gateway config and take the token secret and API key from it."""
        from tidegate.gateway.config import load_config

        a = self.args
        path = a.server_config or default_server_config()
        try:
            cfg = load_config(path, os.environ)
        except Exception as exc:  # noqa: BLE001 - whatever the loader raises stops the run
            raise BenchError(f"--server-config {path}: {exc}") from exc
        self.server_config = path
        self.token_secret = cfg.token_hmac_secret
        self.api_key = cfg.api_key
        if not self.token_secret and not cfg.allow_anonymous:
            raise BenchError(f"the gateway config ({path or 'none'}) has no token secret and "
                             "refuses anonymous clients: --server-config names one that works")
        if self.broadcast_on and not self.api_key:
            raise BenchError(f"the gateway config ({path or 'none'}) has no API key: the "
                             "broadcast publishes through the server API")

    def client_token(self, index: int, lifetime_s: float) -> str:
        if not self.token_secret:
            return ""
        from tidegate.gateway.auth import encode_hs256

        exp = int(time.time() + lifetime_s + 600)
        return encode_hs256({"sub": f"bench-{index}", "exp": exp}, self.token_secret)

    async def start_server(self) -> Server:
        a = self.args
        if a.target:
            host, port = parse_target(a.target)
            server = Server(started=False, host=host, port=port, status_path=a.server_status_file)
            server.refresh()
            if a.server_status_file and not server.workers:
                raise BenchError(f"--server-status-file {a.server_status_file}: no ready server")
            return server
        host = "127.0.0.1"
        port = free_port(host)
        status_path = os.path.join(self.workdir, "server-status.json")
        log_path = os.path.join(self.workdir, "server.log")
        base = shlex.split(a.server_cmd) if a.server_cmd else [
            sys.executable, "-m", "tidegate", "serve"]
        self.metrics_port = metrics_port = free_port(host)
        if self.ws:
            # The gateway as its config says (heartbeat settings included, unless
            # --server-ping-interval is given), on ports of its own: never a default port
            # another server on this machine may hold.
            cmd = [*base, "--app", "gateway", "--host", host, "--port", str(port),
                   "--tcp-port", str(free_port(host)), "--metrics-port", str(metrics_port),
                   "--connections", str(a.connections), "--status-file", status_path]
            if self.server_config:
                cmd += ["--config", self.server_config]
            if a.server_ping_interval:
                cmd += ["--ping-interval-s", _num(a.server_ping_interval)]
        else:
            cmd = [*base, "--app", "echo", "--host", host, "--port", str(port),
                   "--metrics-port", str(metrics_port),
                   "--connections", str(a.connections), "--status-file", status_path,
                   "--ping-interval-s", _num(a.server_ping_interval or a.ping_interval),
                   "--pong-timeout-s", _num(a.pong_timeout)]
        if a.server_workers:
            cmd += ["--workers", str(a.server_workers)]
        if a.balance:
            cmd += ["--balance", a.balance]
        if a.server_loop:
            cmd += ["--loop", a.server_loop]
        cmd += list(a.server_arg)
        self.report["server_command"] = cmd
        guarded = [sys.executable, "-m", "tidegate.bench.guard", str(os.getpid()), "--", *cmd]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log_path, "wb") as log:
            proc = await asyncio.create_subprocess_exec(
                *guarded, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, env=env)
        server = Server(started=True, host=host, port=port, proc=proc, log_path=log_path,
                        status_path=status_path, pid=proc.pid)
        self.server = server
        deadline = time.monotonic() + a.ready_timeout
        while True:
            server.refresh()
            if server.workers:
                return server
            if proc.returncode is not None:
                raise BenchError(f"the server exited with status {proc.returncode} before it was "
                                 f"ready; its log ({log_path}) ends with:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise BenchError(f"the server was not ready within {a.ready_timeout:g}s; its log "
                                 f"({log_path}) ends with:\n{_tail(log_path)}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), 0.05)

    async def start_clients(self, plans: list[ClientPlan], host: str, port: int,
                            lifetime_s: float) -> None:
        a = self.args
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for plan in plans:
            config = ClientConfig(
                index=plan.index, host=host, port=port, sources=plan.sources,
                connections=plan.connections, parent_pid=os.getpid(), protocol=a.protocol,
                tick_phase=plan.index / len(plans),
                max_inflight=a.max_inflight, ping_interval_s=a.ping_interval,
                pong_timeout_s=a.pong_timeout, connect_timeout_s=a.connect_timeout,
                connect_retries=max(0, a.connect_retries),
                close_mode=a.close_mode, hello=a.hello, established_on=a.established_on,
                lifetime_s=lifetime_s, loop=self.client_loop, channel=a.channel,
                broadcast_count=a.broadcast_count if self.broadcast_on else 0,
                nice=a.client_nice, sched_batch=a.client_sched == "batch")
            log_path = os.path.join(self.workdir, f"client-{plan.index}.log")
            client_env = env
            if self.ws:  # the token goes in the environment, not on the command line
                client_env = dict(env, **{TOKEN_ENV: self.client_token(plan.index, lifetime_s)})
            # The scheduler's view of the load generator. With autogroup scheduling (on by
            # default) every session is a group with one share of the CPU: a session per
            # client gave each of 27 client processes the claim of the whole server (its own
            # session, 27 workers). So by default the clients stay in the bench's session, one
            # group, and get half the machine against the server's half when both are busy;
            # their own process group keeps a terminal's Ctrl-C to the runner. With
            # --client-nice each gets a session of its own whose group is niced (set_nice).
            own_session = {"start_new_session": True} if a.client_nice else {"process_group": 0}
            with open(log_path, "wb") as log:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "tidegate.bench.client", config_json(config),
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
                    env=client_env, limit=1 << 22, **own_session)
            client = Client(plan=plan, proc=proc, log_path=log_path)
            client.reader = asyncio.create_task(client.read())
            self.clients.append(client)
        deadline = 60.0 + 2.0 * len(plans)
        try:
            await asyncio.wait_for(asyncio.gather(*(c.ready.wait() for c in self.clients)),
                                   deadline)
        except TimeoutError as exc:
            raise BenchError(f"client processes not ready within {deadline:g}s") from exc
        self._check_clients("starting")

    def _check_clients(self, phase: str) -> None:
        for c in self.clients:
            if c.fatal or (c.proc.returncode is not None and c.final is None):
                raise BenchError(
                    f"client {c.plan.index} failed while {phase}: "
                    f"{c.fatal or f'exit status {c.proc.returncode}'}\n{_tail(c.log_path)}")

    # ---------------------------------------------------------------- measurements

    def measure_server(self, *, detailed: bool) -> dict[str, Any]:
        server = self.server
        parts: dict[str, float] = {}
        t = time.perf_counter()

        def took(name: str) -> None:
            nonlocal t
            now = time.perf_counter()
            parts[name] = round(now - t, 4)
            t = now

        out: dict[str, Any] = {"slab": procstat.slab_bytes(),
                               "mem_available": procstat.meminfo().get("MemAvailable"),
                               "sockstat": procstat.tcp_sockstat(), "seconds_by_part": parts}
        took("kernel")
        if server is None or not server.measurable:
            return out
        server.refresh()
        took("refresh")
        out["workers"] = list(server.workers)
        out["rss_each"] = [procstat.rss_bytes(pid) for pid in server.workers]
        out["rss"] = procstat.sum_known(out["rss_each"])
        out["cpu_ticks"] = server.cpu_ticks()
        out["cpu_ticks_each"] = [procstat.cpu_ticks(pid) for pid in server.workers]
        out["switches"] = procstat.sum_pairs(
            procstat.context_switches(pid) for pid in server.workers)
        if server.pid is not None:
            out["supervisor_rss"] = procstat.rss_bytes(server.pid)
            out["supervisor_cpu_ticks"] = procstat.cpu_ticks(server.pid)
        took("rss_cpu")
        if detailed:
            out["pss_each"] = [procstat.pss_bytes(pid) for pid in server.workers]
            out["pss"] = procstat.sum_known(out["pss_each"])
            took("pss")
            # Listing every fd entry costs ~3.5 us each, seconds of CPU at 500k and minutes
            # when the machine is saturated (112 s in a 500k run, while the hold went on):
            # past FD_COUNT_MAX connections the server's own per-worker counts are used.
            if self.args.connections <= self.args.fd_count_max:
                out["fds_each"] = procstat.open_fds_elsewhere(server.workers)
                took("fds")
        out["worker_stats"] = server.status.get("worker_stats")
        return out

    # ---------------------------------------------------------------- phases

    async def run(self) -> int:
        a = self.args
        limits = _raise_nofile()
        if self.ws:
            self.load_gateway_config()
        plans = plan_clients(a.connections, limits[0], clients=a.clients,
                             port_range=procstat.ip_local_port_range())
        if a.max_inflight is None:
            a.max_inflight = max(1, min(INFLIGHT_MAX_PER_CLIENT, INFLIGHT_TOTAL // len(plans)))
        self._base_report(plans, limits)
        connect_phase_timeout = a.connect_phase_timeout or max(
            60.0, a.connections / (250 if self.ws else 2000))

        # 1. server
        t = time.monotonic()
        server = await self.start_server()
        self.server = server
        self.phases["server_start"] = time.monotonic() - t
        self.report["target"] = f"{server.host}:{server.port}"
        self.report["server_started_by_bench"] = server.started
        self.report["server_workers"] = len(server.workers) if server.workers else None
        self.report["server_supervisor_pid"] = server.pid if server.measurable else None
        self.report["server_worker_pids"] = list(server.workers) or None
        before = self.before = self.measure_server(detailed=True)
        self.report["server_rss_bytes_before"] = before.get("rss")
        self.report["server_pss_bytes_before"] = before.get("pss")
        self.report["server_supervisor_rss_bytes_before"] = before.get("supervisor_rss")
        self.report["kernel_slab_bytes_before"] = before["slab"]
        self.report["kernel_tcp_sockstat_before"] = before["sockstat"]
        self.report["mem_available_bytes_before"] = before["mem_available"]

        # 2. clients
        t = time.monotonic()
        lifetime = connect_phase_timeout + a.hold + 180.0
        if self.broadcast_on:
            lifetime += (a.broadcast_start + a.broadcast_count / a.broadcast_rate
                         + a.broadcast_timeout + 10.0)
        await self.start_clients(plans, server.host, server.port, lifetime)
        self.phases["clients_start"] = time.monotonic() - t

        # 3. connect
        go = self.measure_server(detailed=False)
        cpu_go = go.get("cpu_ticks")
        switches = [go.get("switches")]
        host = [procstat.host_cpu_seconds()]
        tcp_go = procstat.tcp_ext()
        await self.connect_phase(connect_phase_timeout)
        connected = self.measure_server(detailed=False)
        cpu_connected = connected.get("cpu_ticks")
        switches.append(connected.get("switches"))
        host.append(procstat.host_cpu_seconds())
        # Machine-wide kernel counters: ListenOverflows/ListenDrops grow when a listener's
        # accept queue is full (the server accepts slower than the clients connect); each such
        # connect then waits for a SYN retransmission (1 s, then 3 s...).
        self.report["kernel_tcp_counters_connect_phase"] = procstat.tcp_ext_delta(
            tcp_go, procstat.tcp_ext())

        # 4. hold
        held_figures = await self.hold_phase()
        cpu_held = held_figures.get("cpu_ticks")
        switches.append(held_figures.get("switches"))
        host.append(procstat.host_cpu_seconds())

        # 5. close
        await self.close_phase()
        host.append(procstat.host_cpu_seconds())

        # 6. server: wait until it is quiet, measure, stop
        cpu_end = await self.settle_server()
        self.report["kernel_tcp_counters_whole_run"] = procstat.tcp_ext_delta(
            tcp_go, procstat.tcp_ext())
        ticks = [before.get("cpu_ticks"), cpu_go, cpu_connected, cpu_held, cpu_end]
        self.report["server_cpu_seconds"] = _ticks_delta(ticks[0], ticks[4])
        self.report["server_cpu_scope"] = (
            "supervisor + workers (+ reaped children), from ready before any connection until "
            "quiet after the close")
        self.report["server_cpu_seconds_by_phase"] = {
            "idle_before_connect": _ticks_delta(ticks[0], ticks[1]),
            "connect": _ticks_delta(ticks[1], ticks[2]),
            "hold": _ticks_delta(ticks[2], ticks[3]),
            "close": _ticks_delta(ticks[3], ticks[4]),
        }
        # The whole machine's CPU by kind in each phase (both sides of every loopback
        # connection, the runner, anything else): how busy it was, and any hypervisor steal.
        self.report["host_cpu_seconds_by_phase"] = (
            {phase: procstat.host_cpu_delta(a, b) for phase, a, b in
             zip(("connect", "hold", "close"), host, host[1:], strict=False)}
            if all(host) else None)
        # The workers' context switches (main threads, summed) in the connect and hold
        # phases: voluntary = went to sleep (a wake to pay for later), involuntary = preempted.
        known = [pair for pair in switches if pair is not None]
        self.report["server_context_switches_by_phase"] = (
            {phase: {"voluntary": b[0] - a[0], "involuntary": b[1] - a[1]} for phase, a, b in
             zip(("connect", "hold"), known, known[1:], strict=False)}
            if len(known) == len(switches) else None)
        self.report["server_cpu_percent_of_one_core_during_hold"] = (
            None if self.report["server_cpu_seconds_by_phase"]["hold"] is None
            or not self.report.get("hold_seconds")
            else round(100 * self.report["server_cpu_seconds_by_phase"]["hold"]
                       / self.report["hold_seconds"], 2))
        await self.stop_server()
        return self.finish()

    async def connect_phase(self, timeout: float) -> None:
        a = self.args
        bar = Progress(not a.no_progress, total=a.connections, desc="connecting", unit="conn")
        go_ns = self.go_ns = time.monotonic_ns()
        t0 = time.monotonic()
        for c in self.clients:
            c.send("go")
        timeline: list[int] = []
        last_second_count = 0
        next_second = t0 + 1.0
        timed_out = False
        try:
            while True:
                done = all(c.connected.is_set() for c in self.clients)
                now = time.monotonic()
                established = _sum(self.clients, "established")
                while now >= next_second:
                    timeline.append(established - last_second_count)
                    last_second_count = established
                    next_second += 1.0
                bar.update(established, failed=_sum(self.clients, "failed"),
                           open=_sum(self.clients, "open"))
                if done:
                    break
                if now - t0 > timeout:
                    timed_out = True
                    self.failures.append(f"connect phase timed out after {timeout:g}s")
                    for c in self.clients:
                        c.send("halt")
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            asyncio.gather(*(c.connected.wait() for c in self.clients)),
                            a.connect_timeout + 10)
                    break
                if (self.server is not None and not self.server.alive()
                        and "the server exited during the connect phase" not in self.failures):
                    self.failures.append("the server exited during the connect phase")
                await asyncio.sleep(0.1)
        finally:
            bar.close()
        self._check_clients("connecting")
        elapsed = time.monotonic() - t0
        self.phases["connect"] = elapsed
        if established - last_second_count > 0 or not timeline:
            timeline.append(established - last_second_count)
        msgs = [c.connected_msg for c in self.clients if c.connected_msg]
        last_ns = max((m.get("last_established_ns") or 0 for m in msgs), default=0)
        established = _sum(self.clients, "established")
        connect_seconds = (last_ns - go_ns) / 1e9 if last_ns > go_ns else None
        self.report["connections_established"] = established
        self.report["connect_seconds"] = _round(connect_seconds, 3)
        self.report["connect_rate_per_s"] = (
            round(established / connect_seconds, 1) if connect_seconds else None)
        self.report["connect_phase_seconds"] = round(elapsed, 3)
        self.report["connect_phase_timed_out"] = timed_out
        self.report["connect_rate_timeline_per_s"] = timeline

    async def hold_phase(self) -> dict[str, Any]:
        a = self.args
        bar = Progress(not a.no_progress, total=a.hold, desc="holding", unit="s",
                       bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f}s{postfix}")
        for c in self.clients:
            c.send("hold")
        t0 = time.monotonic()
        measure_at = t0 + max(0.0, a.hold - min(1.0, a.hold / 10))
        peak_rss: int | None = None
        rtt_max_timeline: list[float] = []
        rss_timeline: list[int | None] = []
        for c in self.clients:
            c.take_rtt_max()
        next_sample = t0
        held: dict[str, Any] | None = None
        server_died = False
        broadcast = (asyncio.create_task(self.broadcast_phase(t0)) if self.broadcast_on
                     else None)
        scraper = MetricsScraper(self.server, self.metrics_port, a.scrape_interval)
        scraper.start()
        freezer = (asyncio.create_task(self.freeze_phase(t0)) if a.freeze_fraction > 0
                   else None)
        drainer = (asyncio.create_task(self.drain_phase(t0))
                   if a.drain_at > 0 and self.server is not None and self.server.started
                   else None)
        try:
            while True:
                now = time.monotonic()
                if now >= next_sample:
                    if next_sample > t0:
                        rtt_max_timeline.append(
                            round(max(c.take_rtt_max() for c in self.clients) / 1000, 1))
                    next_sample += 1.0
                    if self.server is not None and self.server.measurable:
                        self.server.refresh()
                        rss = self.server.rss()
                        rss_timeline.append(rss)
                        if rss is not None and (peak_rss is None or rss > peak_rss):
                            peak_rss = rss
                # With a broadcast, the held figures are taken once it is over (its fan-out
                # and write buffers done), so the hold lasts at least that long.
                if held is None and now >= measure_at and (
                        broadcast is None or broadcast.done()):
                    t_measure = time.monotonic()
                    held = await asyncio.to_thread(self.measure_server, detailed=True)
                    self.report["held_measurement_seconds"] = round(
                        time.monotonic() - t_measure, 3)
                    self.report["held_measured_at_hold_second"] = round(t_measure - t0, 3)
                    self.report["held_measurement_seconds_by_part"] = held["seconds_by_part"]
                    held["client_rss"] = procstat.sum_known(
                        procstat.rss_bytes(c.proc.pid) for c in self.clients)
                    held["open"] = _sum(self.clients, "open")
                    now = time.monotonic()
                if (self.server is not None and not server_died and drainer is None
                        and not self.server.alive()):
                    server_died = True
                    self.failures.append("the server exited during the hold")
                bar.update(min(now - t0, a.hold), open=_sum(self.clients, "open"),
                           unexpected=_sum(self.clients, "unexpected_closes"),
                           missed=_sum(self.clients, "missed"),
                           pongs=_sum(self.clients, "pongs"))
                if held is not None and now - t0 >= a.hold and (
                        broadcast is None or broadcast.done()):
                    break
                if all(c.finished.is_set() for c in self.clients):
                    self.failures.append("every client process ended during the hold")
                    break
                if now - t0 >= a.hold:  # the broadcast is still going: the hold lasts
                    await asyncio.sleep(0.05)
                else:
                    await asyncio.sleep(min(0.2, max(0.0, t0 + a.hold - now)) or 0.01)
        finally:
            bar.close()
            if broadcast is not None:
                if not broadcast.done():
                    broadcast.cancel()
                    self.failures.append("the broadcast did not finish within the hold")
                with contextlib.suppress(asyncio.CancelledError):
                    await broadcast
        self.phases["hold"] = time.monotonic() - t0
        self.report["hold_seconds"] = round(time.monotonic() - t0, 3)
        self.report.update(await scraper.finish())
        if drainer is not None:
            if not drainer.done():
                drainer.cancel()
                self.failures.append("the drain did not end within the hold")
            with contextlib.suppress(asyncio.CancelledError):
                await drainer
        if freezer is not None:
            if not freezer.done():
                freezer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await freezer
            self.thaw()
        held = held or {}
        r = self.report
        r["server_rss_bytes_held"] = held.get("rss")
        r["server_pss_bytes_held"] = held.get("pss")
        r["server_rss_bytes_peak"] = peak_rss
        # One figure a second of the hold: the largest heartbeat RTT (ms) any client saw, and
        # the workers' summed RSS.
        r["heartbeat_rtt_ms_max_timeline_hold"] = rtt_max_timeline
        r["server_rss_bytes_timeline_hold"] = rss_timeline or None
        r["server_supervisor_rss_bytes_held"] = held.get("supervisor_rss")
        r["server_worker_rss_bytes_held"] = held.get("rss_each")
        r["server_worker_pss_bytes_held"] = held.get("pss_each")
        r["kernel_slab_bytes_held"] = held.get("slab")
        r["kernel_tcp_sockstat_held"] = held.get("sockstat")
        r["mem_available_bytes_held"] = held.get("mem_available")
        r["client_rss_bytes_held"] = held.get("client_rss")
        r["connections_open_at_measurement"] = held.get("open")
        before_slab, held_slab = r.get("kernel_slab_bytes_before"), held.get("slab")
        r["kernel_slab_bytes_delta"] = (
            held_slab - before_slab if held_slab is not None and before_slab is not None else None)
        # Per-worker spread: each accepted connection is one more open fd of its worker.
        fds, fds_before = held.get("fds_each"), self.before.get("fds_each")
        # The server's own view (the status file's worker_stats, refreshed every second or so).
        stats = held.get("worker_stats")
        if stats:
            r["server_reported_worker_stats_held"] = stats
        if (fds and fds_before and len(fds) == len(fds_before) and None not in fds
                and None not in fds_before and held.get("workers") == self.before.get("workers")):
            per_worker = [a - b for a, b in zip(fds, fds_before, strict=True)]
            r["server_worker_connections_held"] = per_worker
            r["server_worker_connections_spread"] = _spread(per_worker)
            r["server_worker_connections_counted_by"] = "open fds of each worker"
        elif stats and all("active" in w for w in stats):
            per_worker = [int(w["active"]) for w in stats]
            r["server_worker_connections_held"] = per_worker
            r["server_worker_connections_spread"] = _spread(per_worker)
            r["server_worker_connections_counted_by"] = "each worker's own count (status file)"
        return held

    async def broadcast_phase(self, t0: float) -> None:
        """ws, during the hold: publish ``--broadcast-count`` messages to the channel through
        the server API at ``--broadcast-rate`` per second, then wait until every subscribed
        connection got every acknowledged publication (or ``--broadcast-timeout``).

        Each publication's data is ``{"seq": i, "t": <time.time() when sent>}``; the clients
        count per seq and time each delivery against ``t`` (same clock). Before it: the clients
        say how many connections are up (those are expected to get everything) and the
        server's CPU is taken over the second before the first publication (its baseline) and
        over the broadcast window, first publication to the last delivery seen.
        """
        a = self.args
        server = self.server
        start_at = t0 + a.broadcast_start
        baseline_at = start_at - min(1.0, a.broadcast_start)
        await asyncio.sleep(max(0.0, baseline_at - time.monotonic()))
        b = self.bcast
        times: list[float | None] = [None] * a.broadcast_count
        b["times"] = times
        for c in self.clients:
            c.subscribed.clear()
            c.subscribed_msg = None
            c.send("subscribed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(c.subscribed.wait() for c in self.clients)), 10.0)
        missing = [c.plan.index for c in self.clients if c.subscribed_msg is None]
        if missing:
            self.failures.append(f"client processes {missing} did not say how many connections "
                                 "were up before the broadcast")
        b["subscribed"] = sum(int((c.subscribed_msg or {}).get("open", 0)) for c in self.clients)
        measurable = server is not None and server.measurable
        if measurable and server is not None:
            self.report["server_rss_bytes_before_broadcast"] = server.rss()
        cpu0 = server.cpu_ns() if measurable and server is not None else None
        tb0 = time.monotonic()
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        cpu1 = server.cpu_ns() if measurable and server is not None else None
        split1 = server.cpu_user_system_ticks() if measurable and server is not None else None
        tb1 = time.monotonic()
        api_ms = Histogram()
        errors: dict[str, int] = {}
        assert server is not None
        publisher = ApiPublisher(server.host, server.port, self.api_key)
        try:
            for i in range(a.broadcast_count):
                await asyncio.sleep(max(0.0, tb1 + i / a.broadcast_rate - time.monotonic()))
                t = time.time()
                body = json.dumps({"channel": a.channel, "data": {"seq": i, "t": t}},
                                  separators=(",", ":")).encode()
                sent = time.monotonic_ns()
                error = await publisher.publish(body)
                api_ms.record((time.monotonic_ns() - sent) // 1000)
                if error:
                    errors[error] = errors.get(error, 0) + 1
                else:
                    times[i] = t
        finally:
            await publisher.close()
        b["api_requests"] = publisher.requests
        b["last_publish_done"] = time.monotonic()
        acked = sum(1 for t in times if t is not None)
        expected = b["subscribed"] * acked
        deadline = time.monotonic() + a.broadcast_timeout
        while time.monotonic() < deadline and _sum(self.clients, "deliveries") < expected:
            if all(c.finished.is_set() for c in self.clients):
                break
            await asyncio.sleep(0.02)
        cpu2 = server.cpu_ns() if measurable else None
        split2 = server.cpu_user_system_ticks() if measurable else None
        tb2 = time.monotonic()
        if split1 is not None and split2 is not None:
            b["cpu_user_s"] = round((split2[0] - split1[0]) / procstat.CLOCK_TICKS, 2)
            b["cpu_system_s"] = round((split2[1] - split1[1]) / procstat.CLOCK_TICKS, 2)
        b["waited_for_deliveries_s"] = round(tb2 - b["last_publish_done"], 3)
        b["all_seen"] = _sum(self.clients, "deliveries") >= expected
        b["window_s"] = tb2 - tb1
        b["api_ms"] = api_ms.summary(scale=1000.0)
        b["api_errors"] = errors
        if cpu0 is not None and cpu1 is not None and cpu2 is not None:
            b["cpu_ns"] = cpu2 - cpu1
            b["baseline_cpu_ns_per_s"] = (cpu1 - cpu0) / (tb1 - tb0) if tb1 > tb0 else 0.0

    def broadcast_report(self, finals: list[dict[str, Any]], complete: bool) -> None:
        """Merge the clients' per-seq counts into the broadcast figures (see BROADCAST_KEYS)."""
        b = self.bcast
        r = self.report
        if not b.get("times"):
            return
        times: list[float | None] = b["times"]
        k = len(times)
        received = [0] * k
        last_ns = [0] * k
        first_ns = [0] * k
        latency = Histogram()
        duplicates = out_of_order = other = 0
        for f in finals:
            d = f.get("broadcast") or {}
            if int(d.get("count", -1)) != k:
                continue
            for i in range(k):
                received[i] += int(d["received"][i])
                last_ns[i] = max(last_ns[i], int(d["last_ns"][i]))
                f_ns = int(d["first_ns"][i])
                if f_ns and (not first_ns[i] or f_ns < first_ns[i]):
                    first_ns[i] = f_ns
            latency.merge(Histogram.from_dict(d.get("latency_us") or {}))
            duplicates += int(d.get("duplicates", 0))
            out_of_order += int(d.get("out_of_order", 0))
            other += int(d.get("other_pushes", 0))
        subscribed = int(b.get("subscribed", 0))
        acked = [i for i in range(k) if times[i] is not None]
        deliveries = sum(received)
        r["broadcast_subscribed"] = subscribed
        r["broadcast_attempted"] = k
        r["broadcast_published"] = len(acked)
        r["broadcast_api_errors"] = b.get("api_errors") or {}
        r["broadcast_api_ms"] = b.get("api_ms")
        r["broadcast_api_requests"] = b.get("api_requests")
        r["broadcast_deliveries"] = deliveries
        r["broadcast_deliveries_expected"] = subscribed * len(acked)
        lost_by_seq = [max(0, subscribed - received[i]) if times[i] is not None else None
                       for i in range(k)]
        r["deliveries_lost"] = (sum(x for x in lost_by_seq if x is not None)
                                if complete else None)
        r["deliveries_lost_by_seq"] = lost_by_seq
        # More than expected for an acknowledged seq, or anything for an unacknowledged one.
        r["deliveries_unexpected"] = sum(
            max(0, received[i] - subscribed) if times[i] is not None else received[i]
            for i in range(k))
        r["deliveries_duplicated"] = duplicates
        r["deliveries_out_of_order"] = out_of_order
        r["pushes_not_of_the_broadcast"] = other
        by_seq: list[float | None] = []
        first_by_seq: list[float | None] = []
        for i in range(k):
            t = times[i]
            by_seq.append(round(last_ns[i] / 1e9 - t, 4) if t is not None and last_ns[i]
                          else None)
            first_by_seq.append(round(first_ns[i] / 1e9 - t, 4) if t is not None and first_ns[i]
                                else None)
        known = [x for x in by_seq if x is not None]
        r["broadcast_last_delivery_s"] = max(known) if known else None
        r["broadcast_last_delivery_s_by_seq"] = by_seq
        r["broadcast_first_delivery_s_by_seq"] = first_by_seq
        first_t = min((t for t in times if t is not None), default=None)
        last_delivery = max(last_ns) / 1e9 if any(last_ns) else None
        span = (last_delivery - first_t if first_t is not None and last_delivery is not None
                else None)
        r["broadcast_seconds"] = _round(span, 3)
        r["broadcast_deliveries_per_s"] = (round(deliveries / span, 1)
                                           if span and span > 0 else None)
        r["broadcast_latency_scope"] = (
            "publish call started (runner) to the frame parsed by a client process: the "
            "server's API, relay and fan-out plus the client loop's queue (same clock)")
        r["broadcast_latency_ms_p50"] = _ms(latency.percentile(50))
        r["broadcast_latency_ms_p99"] = _ms(latency.percentile(99))
        r["broadcast_latency_ms"] = latency.summary(scale=1000.0)
        r["broadcast_latency_histogram_us"] = latency.to_dict()
        r["broadcast_all_delivered_before_timeout"] = b.get("all_seen")
        r["broadcast_waited_after_last_publish_s"] = b.get("waited_for_deliveries_s")
        cpu = b.get("cpu_ns")
        window = b.get("window_s")
        r["broadcast_window_s"] = _round(window, 3)
        r["broadcast_server_cpu_seconds"] = None if cpu is None else round(cpu / 1e9, 4)
        # User (Python: fan-out, framing, the event loop) and system (send(); on loopback the
        # kernel also runs the receiving socket's TCP input in the sender's time) in ticks.
        r["broadcast_server_cpu_user_system_seconds"] = (
            [b["cpu_user_s"], b["cpu_system_s"]] if "cpu_user_s" in b else None)
        r["server_cpu_us_per_delivery"] = (round(cpu / 1000 / deliveries, 3)
                                           if cpu is not None and deliveries else None)
        rate = b.get("baseline_cpu_ns_per_s")
        if cpu is not None and rate is not None and window is not None and deliveries:
            net = max(0.0, cpu - rate * window)
            r["server_baseline_cpu_percent_before_broadcast"] = round(rate / 1e7, 2)
            r["server_cpu_us_per_delivery_net_of_baseline"] = round(net / 1000 / deliveries, 3)
        r["server_cpu_per_delivery_scope"] = (
            "supervisor + workers, all threads (schedstat), from the first publication until "
            "the runner saw the last delivery, divided by the deliveries")

    def _server_closes(self) -> dict[str, int] | None:
        if self.server is None or not self.server.status_path:
            return None
        self.server.refresh()
        stats = self.server.status.get("worker_stats") or []
        out: dict[str, int] = {}
        for w in stats:
            for reason, n in (w.get("closes") or {}).items():
                out[reason] = out.get(reason, 0) + int(n)
        return out

    async def freeze_phase(self, hold_t0: float) -> None:
        """--freeze-fraction: SIGSTOP some client processes (clients that die without a FIN)
        and follow the server's closes until it has closed as many connections as they held.

        The kernel of a stopped process still ACKs, so TCP keepalive (L1) sees nothing; the
        server's heartbeat (L2: ping after ``ping_interval_s`` of silence, close after
        ``pong_timeout_s``) is what must find them. Closes are read from the server's status
        file (refreshed about once a second), so the times have ~1 s resolution.
        """
        a = self.args
        r = self.report
        await asyncio.sleep(max(0.0, hold_t0 + a.freeze_at - time.monotonic()))
        count = max(1, round(a.freeze_fraction * len(self.clients)))
        victims = self.clients[-count:]
        before = self._server_closes()
        t_freeze = time.monotonic()
        for c in victims:
            c.frozen_open = int(c.latest.get("open", 0))
            with contextlib.suppress(ProcessLookupError):
                os.kill(c.proc.pid, signal.SIGSTOP)
        frozen = sum(c.frozen_open or 0 for c in victims)
        r["frozen_clients"] = count
        r["frozen_connections"] = frozen
        r["frozen_at_hold_second"] = round(t_freeze - hold_t0, 3)
        r["frozen_detected"] = 0
        r["frozen_detect_seconds"] = None
        r["frozen_detect_timeline"] = []
        if before is None:
            r["frozen_detect_scope"] = "unknown: no server status file"
            return
        r["frozen_detect_scope"] = (
            "server closes (all reasons) counted from the freeze, read from its status file "
            "about once a second")
        while True:
            await asyncio.sleep(0.5)
            now_closes = self._server_closes() or {}
            closed = sum(now_closes.values()) - sum(before.values())
            by_reason = {k: v - before.get(k, 0) for k, v in now_closes.items()
                         if v - before.get(k, 0) > 0}
            r["frozen_detected"] = closed
            r["frozen_close_reasons"] = by_reason
            r["frozen_detect_timeline"].append([round(time.monotonic() - t_freeze, 1), closed])
            if closed >= frozen:
                r["frozen_detect_seconds"] = round(time.monotonic() - t_freeze, 2)
                return

    async def drain_phase(self, hold_t0: float) -> None:
        """--drain-at: SIGTERM the server (a redeploy) and count the clients' connections as
        its graceful drain closes them, second by second, until none is left."""
        a = self.args
        r = self.report
        assert self.server is not None and self.server.pid
        await asyncio.sleep(max(0.0, hold_t0 + a.drain_at - time.monotonic()))
        for c in self.clients:
            c.send("expect_close")
        await asyncio.sleep(0.2)  # the clients have read it before the first goodbye
        open_at_start = _sum(self.clients, "open")
        t_drain = time.monotonic()
        os.kill(self.server.pid, signal.SIGTERM)
        r["drain_started_at_hold_second"] = round(t_drain - hold_t0, 3)
        r["drain_connections"] = open_at_start
        per_second: list[int] = []
        last_open, next_mark = open_at_start, t_drain + 1.0
        while True:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            if now >= next_mark or _sum(self.clients, "open") == 0:
                still = _sum(self.clients, "open")
                per_second.append(last_open - still)
                last_open, next_mark = still, next_mark + 1.0
                r["drain_closes_per_second"] = per_second
                if still == 0:
                    r["drain_seconds"] = round(now - t_drain, 2)
                    r["drain_max_closes_per_second"] = max(per_second)
                    return

    def thaw(self) -> None:
        for c in self.clients:
            if c.frozen_open is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(c.proc.pid, signal.SIGCONT)

    async def close_phase(self) -> None:
        t0 = time.monotonic()
        for c in self.clients:
            c.send("close")
        limit = min(self.args.pong_timeout, 10.0) + 30.0 + 15.0
        try:
            await asyncio.wait_for(asyncio.gather(*(c.finished.wait() for c in self.clients)),
                                   limit)
        except TimeoutError:
            self.failures.append(f"client processes did not finish within {limit:g}s of close")
        await self.reap_clients()
        self.phases["close"] = time.monotonic() - t0
        self.collect_client_finals()

    async def reap_clients(self, grace: float = 10.0) -> None:
        for c in self.clients:
            if c.proc.stdin is not None and not c.proc.stdin.is_closing():
                c.proc.stdin.close()
        deadline = time.monotonic() + grace
        for c in self.clients:
            if c.proc.returncode is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(c.proc.wait(), max(0.1, deadline - time.monotonic()))
            if c.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    c.proc.kill()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(c.proc.wait(), 5)
            if c.reader is not None:
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(c.reader, 2)

    def collect_client_finals(self) -> None:
        r = self.report
        # Frozen clients (--freeze-fraction) lost their connections to the server's liveness
        # checks on purpose: their figures are reported apart, not as failures.
        frozen_finals = [c.final for c in self.clients
                         if c.final is not None and c.frozen_open is not None]
        if any(c.frozen_open is not None for c in self.clients):
            r["frozen_clients_unexpected_closes"] = sum(
                int(f.get("unexpected_closes", 0)) for f in frozen_finals)
            r["frozen_clients_heartbeat_missed"] = sum(
                int(f.get("missed", 0)) for f in frozen_finals)
        finals = [c.final for c in self.clients
                  if c.final is not None and c.frozen_open is None]
        missing = [c.plan.index for c in self.clients if c.final is None]
        if missing:
            self.failures.append(f"no final report from client processes {missing}")
        rtt_connect_phase = Histogram()
        rtt_hold = Histogram()
        connect = Histogram()
        hello = Histogram()
        errors: dict[str, int] = {}
        reasons: dict[str, int] = {}
        retried: dict[str, int] = {}
        for f in finals:
            rtt_connect_phase.merge(Histogram.from_dict(f["rtt_connect_phase_us"]))
            rtt_hold.merge(Histogram.from_dict(f["rtt_hold_us"]))
            connect.merge(Histogram.from_dict(f["connect_us"]))
            hello.merge(Histogram.from_dict(f["hello_rtt_us"]))
            for k, v in f.get("errors", {}).items():
                errors[k] = errors.get(k, 0) + int(v)
            for k, v in f.get("unexpected_close_reasons", {}).items():
                reasons[k] = reasons.get(k, 0) + int(v)
            for k, v in f.get("connect_retried", {}).items():
                retried[k] = retried.get(k, 0) + int(v)
        for c in self.clients:
            if c.final is None:
                errors["client_process_lost"] = errors.get("client_process_lost", 0) + 1

        def total(key: str) -> int:
            return sum(int(f.get(key, 0)) for f in finals)

        r["connections_established"] = sum(
            int(c.latest.get("established", 0)) for c in self.clients)
        r["connections_held"] = total("held") if not missing else None
        r["unexpected_closes"] = total("unexpected_closes")
        if self.args.drain_at > 0:
            r["drain_server_closes"] = total("server_closes")
        r["unexpected_closes_during_hold"] = total("unexpected_during_hold")
        r["unexpected_close_reasons"] = reasons
        r["connect_failures"] = total("failed")
        r["errors_total"] = sum(errors.values())
        r["errors"] = errors
        r["connect_retries_total"] = sum(retried.values())
        r["connect_retries"] = retried
        # heartbeat_rtt_ms_p50/p99 are the hold phase's: every connection up, the steady state
        # a gateway lives in. Pings also run while connecting (a connection is held from the
        # moment it is up); those samples, taken with every loop busy with connects, are
        # reported apart, and so are all samples together.
        whole = Histogram()
        whole.merge(rtt_connect_phase)
        whole.merge(rtt_hold)
        r["heartbeat_rtt_scope"] = "hold phase (all connections up)"
        r["heartbeat_rtt_ms_p50"] = _ms(rtt_hold.percentile(50))
        r["heartbeat_rtt_ms_p99"] = _ms(rtt_hold.percentile(99))
        r["heartbeat_rtt_ms"] = rtt_hold.summary(scale=1000.0)
        r["heartbeat_rtt_ms_connect_phase"] = rtt_connect_phase.summary(scale=1000.0)
        r["heartbeat_rtt_ms_all_phases"] = whole.summary(scale=1000.0)
        r["heartbeat_missed"] = total("missed")
        r["heartbeat_pings_sent"] = total("pings_sent")
        r["heartbeat_pongs_received"] = total("pongs")
        r["heartbeat_late_pongs"] = total("late_pongs")
        # Progress lines a client dropped rather than block on a runner that was not reading.
        r["client_progress_lines_dropped"] = total("progress_dropped")
        r["heartbeat_unanswered_at_end"] = total("unanswered_at_end")
        r["server_pings_answered"] = total("server_pings")
        r["protocol_errors"] = total("protocol_errors")
        r["connect_ms"] = connect.summary(scale=1000.0)
        # The hello: a ping sent as each connect completes; its PONG confirms the server's app
        # holds the connection (with --established-on tcp it may come well after the connect).
        r["hello_sent"] = total("hello_sent")
        r["connections_confirmed"] = total("confirmed")
        r["hellos_unanswered"] = r["hello_sent"] - r["connections_confirmed"]
        r["hello_rtt_ms"] = hello.summary(scale=1000.0)
        last_confirmed = max((int(f.get("last_confirmed_ns") or 0) for f in finals), default=0)
        confirm_seconds = (last_confirmed - self.go_ns) / 1e9 if last_confirmed > self.go_ns \
            else None
        r["confirm_seconds"] = _round(confirm_seconds, 3)
        r["confirm_rate_per_s"] = (round(r["connections_confirmed"] / confirm_seconds, 1)
                                   if confirm_seconds else None)
        r["connections_still_open_after_close"] = total("still_open_after_close")
        r["close_seconds"] = _round(max((float(f.get("close_seconds", 0)) for f in finals),
                                        default=None), 3)
        r["client_cpu_seconds"] = round(sum(float(f.get("cpu_seconds", 0)) for f in finals), 2)
        connected = [c.connected_msg for c in self.clients if c.connected_msg]
        r["client_cpu_seconds_until_connected"] = round(
            sum(float(m.get("cpu_seconds", 0)) for m in connected), 2)
        r["client_max_rss_bytes_per_process"] = max(
            (int(f.get("max_rss_bytes", 0)) for f in finals), default=None)
        r["client_nice_observed"] = sorted({c.nice for c in self.clients if c.nice is not None})
        r["client_sched_observed"] = sorted({c.sched for c in self.clients if c.sched})
        r["client_autogroup_nice_observed"] = sorted(
            {c.autogroup_nice for c in self.clients if c.autogroup_nice is not None})
        sids = {c.sid for c in self.clients if c.sid is not None}
        r["client_session_count"] = len(sids)
        r["clients_in_bench_session"] = sids == {os.getsid(0)}
        r["heartbeat_rtt_histogram_us_hold"] = rtt_hold.to_dict()
        self.broadcast_report(finals, complete=not missing)

    async def settle_server(self) -> int | None:
        """Wait (at most 15 s) until the server's CPU stops moving; return its CPU ticks then."""
        server = self.server
        if server is None or not server.measurable:
            return None
        t0 = time.monotonic()
        last = server.cpu_ticks()
        quiet = 0
        while time.monotonic() - t0 < 15.0 and quiet < 2:
            await asyncio.sleep(0.5)
            now = server.cpu_ticks()
            if now is None or last is None:
                break
            quiet = quiet + 1 if now - last <= max(2, len(server.workers) // 4) else 0
            last = now
        self.phases["server_settle"] = time.monotonic() - t0
        server.refresh()
        after = self.measure_server(detailed=False)
        reported = server.status.get("restarts")
        self.report["server_worker_restarts"] = (
            int(reported) if isinstance(reported, int) else server.restarts)
        self.report["server_rss_bytes_after"] = after.get("rss")
        # Where the server's CPU went, process by process, from ready (before any connection)
        # until quiet after the close: the supervisor relays every cross-worker message
        # (publications, calls to a channel's owner).
        before = self.before
        self.report["server_cpu_seconds_supervisor"] = _ticks_delta(
            before.get("supervisor_cpu_ticks"), after.get("supervisor_cpu_ticks"))
        self.report["server_cpu_seconds_per_worker"] = (
            [_ticks_delta(b, e) for b, e in zip(before["cpu_ticks_each"],
                                                 after["cpu_ticks_each"], strict=True)]
            if before.get("workers") == after.get("workers") and "cpu_ticks_each" in after
            else None)
        self.report["kernel_tcp_sockstat_after"] = after.get("sockstat")
        if after.get("worker_stats"):
            self.report["server_reported_worker_stats_end"] = after["worker_stats"]
        return last

    async def stop_server(self, timeout: float = 60.0) -> None:
        server = self.server
        if server is None or not server.started or server.proc is None:
            return
        proc = server.proc
        if proc.returncode is None:
            t0 = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                self.failures.append(f"the server did not stop within {timeout:g}s of SIGTERM")
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the session the bench started it in
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 10)
            self.phases["server_stop"] = time.monotonic() - t0
            self.report["server_exit_code"] = proc.returncode
            if proc.returncode not in (0, None):
                self.failures.append(f"the server exited with status {proc.returncode}")
        # Workers left behind after the supervisor exited would be a server bug: report them.
        leftover = [pid for pid in server.workers if procstat.alive(pid)]
        if leftover:
            await asyncio.sleep(1.0)
            leftover = [pid for pid in leftover if procstat.alive(pid)]
        self.report["server_workers_left_running"] = leftover
        if leftover:
            self.failures.append(f"server workers still running after it stopped: {leftover}")

    # ---------------------------------------------------------------- report

    def finish(self) -> int:
        r = self.report
        held, before = r.get("server_rss_bytes_held"), r.get("server_rss_bytes_before")
        n_held = r.get("connections_held")
        r["server_marginal_bytes_per_connection"] = (
            round((held - before) / n_held, 1)
            if held is not None and before is not None and n_held else None)
        pss_held, pss_before = r.get("server_pss_bytes_held"), r.get("server_pss_bytes_before")
        r["server_marginal_pss_bytes_per_connection"] = (
            round((pss_held - pss_before) / n_held, 1)
            if pss_held is not None and pss_before is not None and n_held else None)
        slab = r.get("kernel_slab_bytes_delta")
        r["kernel_slab_bytes_per_connection"] = (
            round(slab / n_held, 1) if slab is not None and n_held else None)
        target = r["connections_target"]
        if r.get("connections_established", 0) != target:
            self.failures.append(
                f"established {r.get('connections_established')} of {target} connections")
        frozen = r.get("frozen_connections")
        if r.get("drain_connections") is not None:
            # Drained: every connection was closed by the server's goodbye, none held.
            if r.get("drain_server_closes") != r["drain_connections"]:
                self.failures.append(
                    f"the clients saw {r.get('drain_server_closes')} goodbyes for "
                    f"{r['drain_connections']} connections")
        elif n_held != target - (frozen or 0):
            self.failures.append(f"held {n_held} of {target - (frozen or 0)} connections"
                                 + (f" (target minus {frozen} frozen)" if frozen else ""))
        if frozen is not None and r.get("frozen_detect_seconds") is None:
            self.failures.append(f"the server closed {r.get('frozen_detected')} of the {frozen} "
                                 "connections of frozen clients before the hold ended")
        for key in ("unexpected_closes", "errors_total", "heartbeat_missed", "hellos_unanswered",
                    "deliveries_lost", "deliveries_unexpected", "deliveries_duplicated",
                    "deliveries_out_of_order", "protocol_errors"):
            if r.get(key):
                self.failures.append(f"{key} = {r[key]}")
        if self.broadcast_on and r.get("broadcast_published") != self.args.broadcast_count:
            self.failures.append(
                f"published {r.get('broadcast_published')} of {self.args.broadcast_count} "
                f"messages ({r.get('broadcast_api_errors') or 'no broadcast'})")
        return EXIT_SHORTFALL if self.failures else EXIT_OK

    def write_report(self, completed: bool) -> None:
        r = self.report
        for key in REQUIRED_KEYS:
            r.setdefault(key, None)
        r["completed"] = completed
        r["client_pids"] = [c.proc.pid for c in self.clients]
        if self.server is not None and self.server.proc is not None:
            r["server_process_pid"] = self.server.proc.pid
        r["failures"] = list(dict.fromkeys(self.failures))
        r["ok"] = completed and not self.failures
        self.phases["total"] = time.monotonic() - self.t_start
        r["phases_seconds"] = {k: round(v, 3) for k, v in self.phases.items()}
        logs_kept = self.keep_logs or not r["ok"]
        r["logs_dir"] = self.workdir if logs_kept else None
        if self.args.json:
            path = self.args.json
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            tmp = f"{path}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(_ordered(r), f, indent=2)
                f.write("\n")
            os.replace(tmp, path)
        self.print_summary()
        if not logs_kept:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def print_summary(self) -> None:
        r = self.report
        out = self.out

        def line(label: str, value: Any) -> None:
            print(f"  {label:<38} {value}", file=out)

        print(f"tidegate bench: {r.get('connections_target')} {r.get('protocol')} connections "
              f"to {r.get('target')} ({'ok' if r.get('ok') else 'NOT ok'})", file=out)
        line("client processes", r.get("client_processes"))
        line("server workers", r.get("server_workers"))
        line("established / held", f"{r.get('connections_established')} / "
             f"{r.get('connections_held')}")
        line("connect seconds / rate per s",
             f"{r.get('connect_seconds')} / {r.get('connect_rate_per_s')}")
        if r.get("hello"):
            line("confirmed (hello answered) / seconds", f"{r.get('connections_confirmed')} / "
                 f"{r.get('confirm_seconds')}")
        line("hold seconds", r.get("hold_seconds"))
        line("unexpected closes / errors", f"{r.get('unexpected_closes')} / "
             f"{r.get('errors_total')} {r.get('errors') or ''}")
        line("heartbeat rtt ms p50 / p99 / max", f"{r.get('heartbeat_rtt_ms_p50')} / "
             f"{r.get('heartbeat_rtt_ms_p99')} / {(r.get('heartbeat_rtt_ms') or {}).get('max')}")
        line("heartbeats sent / missed", f"{r.get('heartbeat_pings_sent')} / "
             f"{r.get('heartbeat_missed')}")
        line("server rss before / held (MiB)", f"{_mib(r.get('server_rss_bytes_before'))} / "
             f"{_mib(r.get('server_rss_bytes_held'))}")
        line("server pss held (MiB)", _mib(r.get("server_pss_bytes_held")))
        line("server marginal bytes per connection", r.get("server_marginal_bytes_per_connection"))
        line("kernel slab delta (MiB)", _mib(r.get("kernel_slab_bytes_delta")))
        line("server cpu seconds", r.get("server_cpu_seconds"))
        host = r.get("host_cpu_seconds_by_phase")
        if host:
            # Saturated cores explain a bad run better than anything the server reports.
            line("machine idle % connect / hold", " / ".join(
                f"{_idle_percent(host.get(phase))}" for phase in ("connect", "hold")))
        if r.get("drain_connections") is not None:
            line("drained connections / seconds / max per s",
                 f"{r.get('drain_connections')} / {r.get('drain_seconds')} / "
                 f"{r.get('drain_max_closes_per_second')}")
        if r.get("frozen_clients"):
            line("frozen clients / connections / closed by server",
                 f"{r.get('frozen_clients')} / {r.get('frozen_connections')} / "
                 f"{r.get('frozen_detected')} in {r.get('frozen_detect_seconds')} s "
                 f"{r.get('frozen_close_reasons') or ''}")
        if r.get("metrics_scrapes"):
            line("/metrics scrape ms p50 / max (bytes)", f"{r.get('metrics_scrape_ms_p50')} / "
                 f"{r.get('metrics_scrape_ms_max')} ({r.get('metrics_scrape_bytes')})")
            line("worker cpu % for stats / supervisor %",
                 f"{r.get('server_stats_cpu_percent_per_worker')} / "
                 f"{r.get('server_supervisor_cpu_percent_hold')}")
        if r.get("broadcast_count"):
            line("broadcast published / deliveries / lost", f"{r.get('broadcast_published')} / "
                 f"{r.get('broadcast_deliveries')} / {r.get('deliveries_lost')}")
            line("deliveries per s", r.get("broadcast_deliveries_per_s"))
            line("delivery latency ms p50 / p99 / max", f"{r.get('broadcast_latency_ms_p50')} / "
                 f"{r.get('broadcast_latency_ms_p99')} / "
                 f"{(r.get('broadcast_latency_ms') or {}).get('max')}")
            line("last subscriber after (s)", r.get("broadcast_last_delivery_s"))
            line("server cpu us per delivery (net)", f"{r.get('server_cpu_us_per_delivery')} "
                 f"({r.get('server_cpu_us_per_delivery_net_of_baseline')})")
        for failure in r.get("failures") or []:
            print(f"  ! {failure}", file=out)
        for note in host_notes(r.get("kernel_tcp_counters_whole_run") or {}):
            print(f"  ~ host: {note}", file=out)
        if r.get("logs_dir"):
            print(f"  logs: {r['logs_dir']}", file=out)
        if self.args.json:
            print(f"  report: {self.args.json}", file=out)

    async def shutdown(self) -> None:
        """Stop whatever is still running (after a failure or an interruption)."""
        for c in self.clients:
            if c.proc.returncode is None:
                c.send("close")
        if self.clients:
            with contextlib.suppress(Exception):
                await self.reap_clients(grace=15.0)
        with contextlib.suppress(Exception):
            await self.stop_server(timeout=30.0)


REQUIRED_KEYS = (
    "connections_target", "connections_established", "connections_held", "connect_seconds",
    "connect_rate_per_s", "hold_seconds", "unexpected_closes", "errors_total", "server_workers",
    "server_rss_bytes_before", "server_rss_bytes_held", "server_pss_bytes_held",
    "server_marginal_bytes_per_connection", "kernel_slab_bytes_delta", "heartbeat_rtt_ms_p50",
    "heartbeat_rtt_ms_p99", "heartbeat_missed", "server_cpu_seconds",
)
# In every report (null without a broadcast): the broadcast's headline figures.
BROADCAST_KEYS = (
    "broadcast_published", "broadcast_deliveries", "broadcast_deliveries_per_s",
    "broadcast_latency_ms_p50", "broadcast_latency_ms_p99", "broadcast_last_delivery_s",
    "deliveries_lost", "server_cpu_us_per_delivery",
)


def _idle_percent(cpu: dict[str, float] | None) -> float | None:
    """The share of the machine's CPU time that was idle, from a phase's /proc/stat delta."""
    if not cpu:
        return None
    total = sum(cpu.values())
    return round(100 * cpu.get("idle", 0.0) / total, 1) if total > 0 else None


def _spread(values: list[int]) -> dict[str, float | int]:
    mean = sum(values) / len(values)
    return {"min": min(values), "max": max(values), "mean": round(mean, 1),
            "max_over_mean": round(max(values) / mean, 4) if mean else 0}


def _ordered(report: dict[str, Any]) -> dict[str, Any]:
    """The required keys first, in the spec's order, then the rest."""
    out = {k: report.get(k) for k in REQUIRED_KEYS}
    out.update((k, v) for k, v in report.items() if k not in out)
    return out


def _raise_nofile() -> tuple[int, int]:
    from tidegate.engine.limits import raise_nofile

    limits = raise_nofile()
    return limits.soft, limits.hard


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _num(value: float) -> str:
    return f"{value:g}"


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _ms(us: float | None) -> float | None:
    return None if us is None else round(us / 1000.0, 3)


def _mib(value: int | None) -> str:
    return "null" if value is None else f"{value / 1048576:.1f}"


def _ticks_delta(a: int | None, b: int | None) -> float | None:
    return None if a is None or b is None else round((b - a) / procstat.CLOCK_TICKS, 2)


async def _main(args: argparse.Namespace, out: TextIO) -> int:
    bench = Bench(args, out)
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    interrupted: list[str] = []

    def on_signal(name: str) -> None:
        interrupted.append(name)
        if task is not None:
            task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal, sig.name)
    code = EXIT_SETUP
    completed = False
    try:
        code = await bench.run()
        completed = True
    except BenchError as exc:
        bench.failures.append(str(exc).splitlines()[0])
        print(f"tidegate bench: {exc}", file=sys.stderr)
        code = EXIT_SETUP
    except asyncio.CancelledError:
        bench.failures.append(f"interrupted ({', '.join(interrupted) or 'cancelled'})")
        code = EXIT_INTERRUPTED
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        if not completed:
            await bench.shutdown()
            if bench.clients:
                with contextlib.suppress(Exception):
                    bench.collect_client_finals()
        bench.write_report(completed)
    return code


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run ``tidegate bench`` with parsed ``args``; return the exit status."""
    if args.broadcast_rate and args.protocol != "ws":
        print("tidegate bench: --broadcast-rate needs --protocol ws", file=sys.stderr)
        return EXIT_SETUP
    if args.established_on == "pong" and not args.hello and args.protocol != "ws":
        print("tidegate bench: --established-on pong needs the hello (drop --no-hello)",
              file=sys.stderr)
        return EXIT_SETUP
    if args.client_loop == "epoll" and args.protocol != "raw":
        print("tidegate bench: --client-loop epoll speaks raw only (ws: uvloop or asyncio)",
              file=sys.stderr)
        return EXIT_SETUP
    if args.server_status_file and not args.target:
        print("tidegate bench: --server-status-file goes with --target", file=sys.stderr)
        return EXIT_SETUP
    if args.target:
        try:
            parse_target(args.target)
        except BenchError as exc:
            print(f"tidegate bench: {exc}", file=sys.stderr)
            return EXIT_SETUP
    return asyncio.run(_main(args, out or sys.stdout))
