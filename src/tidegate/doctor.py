"""``tidegate doctor``: every limit that caps held connections on this host, and its fix.

RLIMIT_NOFILE caps each *process*, so tidegate runs many workers: nofile sets the connections
per worker and so the worker count. What caps the *host* is system-wide: file-max, memory and
tcp_mem. somaxconn and the ephemeral port range cap connect bursts and clients, not held
connections; they are reported as warnings with their fixes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tidegate.engine.limits import per_worker_capacity, raise_nofile, workers_for

# Memory budget of one held connection on the server. Measured on this host with 15,000
# loopback connections held by a bare uvloop server: its RSS grew 1.0 KiB per connection
# (budgeted 2 KiB for tidegate's per-connection state), and /proc/meminfo Slab grew 4.1 KB
# per socket (tcp_sock, file, inode, dentry, epoll item; budgeted 5 KiB).
USER_BYTES_PER_CONN = 2 * 1024
KERNEL_BYTES_PER_CONN = 5 * 1024
# RSS of a worker before its first connection (22 MiB measured for python + uvloop).
WORKER_BASE_BYTES = 32 * 1024 * 1024
# TCP charges socket buffers to tcp_mem in whole pages, so a connection with any data queued
# holds at least one page, and a broadcast queues data on every connection at once. Idle
# sockets hold none; one page each is the conservative bound. Past tcp_mem's "high" the
# kernel drops segments and senders stall on retransmits.
TCP_PAGES_PER_CONN = 1
# max_map_count is per process: a worker maps ~165 regions at start (budget 1024), then one
# per 1 MiB pymalloc arena (Python >= 3.10). It caps connections only when tiny.
MAPS_PER_WORKER_BASE = 1024
BYTES_PER_MAP = 1024 * 1024
ONE_MILLION_NOFILE = 1_048_576


@dataclass(frozen=True)
class Host:
    """The limit values of one host, as read from its /proc."""

    nofile_soft: int
    nofile_hard: int
    nr_open: int
    file_max: int
    files_in_use: int
    port_range: tuple[int, int]
    somaxconn: int
    tcp_mem: tuple[int, int, int]
    mem_available: int  # bytes
    max_map_count: int
    cores: int
    page_size: int
    netdev_max_backlog: int = 1000  # the kernel's default


@dataclass(frozen=True)
class Limit:
    name: str
    value: str
    allows: int | None  # held connections it allows on the host; None: it does not cap them
    per_worker: int | None  # connections it allows per worker process, for per-process limits
    binding: bool
    fix: str
    note: str


@dataclass(frozen=True)
class Report:
    limits: list[Limit]
    capacity_connections: int
    capped_by: str
    requested_connections: int
    fits: bool
    reason: str
    workers_needed: int | None
    per_worker_capacity: int
    cores: int
    max_nofile: int
    workers_needed_at_max_nofile: int | None


def _ints(root: Path, rel: str) -> list[int]:
    return [int(x) for x in (root / rel).read_text().split()]


def _nofile(root: Path) -> tuple[int, int]:
    for line in (root / "proc/self/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise ValueError("no 'Max open files' line in proc/self/limits")


def _meminfo(root: Path) -> dict[str, int]:
    fields = {}
    for line in (root / "proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        fields[key] = int(rest.split()[0]) * 1024  # kB
    return fields


def read_host(root: str | Path = "/", cores: int | None = None) -> Host:
    """Read the limits from ``root``/proc: "/" for this host, or a copy of another's /proc."""
    root = Path(root)
    soft, hard = _nofile(root)
    file_nr = root / "proc/sys/fs/file-nr"
    mem = _meminfo(root)
    low_port, high_port = _ints(root, "proc/sys/net/ipv4/ip_local_port_range")
    tcp_low, tcp_pressure, tcp_high = _ints(root, "proc/sys/net/ipv4/tcp_mem")
    return Host(
        nofile_soft=soft,
        nofile_hard=hard,
        nr_open=_ints(root, "proc/sys/fs/nr_open")[0],
        file_max=_ints(root, "proc/sys/fs/file-max")[0],
        files_in_use=_ints(root, "proc/sys/fs/file-nr")[0] if file_nr.exists() else 0,
        port_range=(low_port, high_port),
        somaxconn=_ints(root, "proc/sys/net/core/somaxconn")[0],
        tcp_mem=(tcp_low, tcp_pressure, tcp_high),
        mem_available=mem.get("MemAvailable", mem.get("MemFree", 0)),
        max_map_count=_ints(root, "proc/sys/vm/max_map_count")[0],
        cores=cores or os.cpu_count() or 1,
        page_size=resource.getpagesize(),
        netdev_max_backlog=_ints(root, "proc/sys/net/core/netdev_max_backlog")[0]
        if (root / "proc/sys/net/core/netdev_max_backlog").exists() else 1000,
    )


def _raise_to(current: int, needed: int) -> int:
    """The value a fix should set: what ``needed`` takes, or double when that is no raise."""
    return needed if needed > current else 2 * current


def _workers(target: int, capacity: int, cores: int) -> int | None:
    return workers_for(target, capacity, cores) if capacity > 0 else None


def assess(host: Host, requested: int) -> Report:
    """Every limit's allowance, the capacity the host can promise, and the verdict for
    ``requested`` connections."""
    maps_per_worker = max(0, host.max_map_count - MAPS_PER_WORKER_BASE) * (
        BYTES_PER_MAP // USER_BYTES_PER_CONN
    )
    pwc = min(per_worker_capacity(host.nofile_soft), maps_per_worker)
    workers = _workers(requested, pwc, host.cores)
    w_text = f"{workers} workers" if workers else "no workers possible"
    conn_bytes = USER_BYTES_PER_CONN + KERNEL_BYTES_PER_CONN + -(-WORKER_BASE_BYTES // max(pwc, 1))
    ports = host.port_range[1] - host.port_range[0] + 1
    lo, pressure, hi = host.tcp_mem
    tcp_high = _raise_to(hi, math.ceil(requested * TCP_PAGES_PER_CONN * 1.25))
    tcp_fix = " ".join(str(v * tcp_high // hi) for v in (lo, pressure)) + f" {tcp_high}"
    nofile_target = max(host.nofile_hard, min(ONE_MILLION_NOFILE, host.nr_open))
    gib = 1024**3
    rows = [
        Limit("nofile", f"soft={host.nofile_soft} hard={host.nofile_hard}",
              None if pwc > 0 else 0, per_worker_capacity(host.nofile_soft), False,
              f"ulimit -n {nofile_target}; LimitNOFILE={nofile_target} in the systemd unit; "
              f"'* - nofile {nofile_target}' in /etc/security/limits.conf",
              f"fds per process: caps each worker, so {w_text} for {requested:,}"),
        Limit("nr_open", str(host.nr_open), None, None, False,
              f"sysctl -w fs.nr_open={_raise_to(host.nr_open, nofile_target)}",
              "ceiling for the hard nofile limit"),
        Limit("file-max", f"{host.file_max} ({host.files_in_use} in use)",
              max(0, host.file_max - host.files_in_use), None, False,
              f"sysctl -w fs.file-max={_raise_to(host.file_max, 2 * requested)}",
              "system-wide fds: 1 per held connection; a load generator on this host costs 1 more"),
        Limit("memory", f"MemAvailable {host.mem_available / gib:.1f} GiB",
              host.mem_available // conn_bytes, None, False,
              f"add RAM or spread over hosts: {requested:,} connections need "
              f"{requested * conn_bytes / gib:.1f} GiB",
              f"{conn_bytes} B per connection: {USER_BYTES_PER_CONN} user + "
              f"{KERNEL_BYTES_PER_CONN} kernel + worker RSS shared by {pwc:,} connections"),
        Limit("tcp_mem", f"{lo} {pressure} {hi} pages (high {hi * host.page_size / gib:.1f} GiB)", hi // TCP_PAGES_PER_CONN, None, False,
              f'sysctl -w net.ipv4.tcp_mem="{tcp_fix}"',
              f"socket buffers, charged in pages: {TCP_PAGES_PER_CONN} page per connection "
              "with data queued, all of them during a broadcast"),
        Limit("max_map_count", str(host.max_map_count), None, maps_per_worker, False,
              f"sysctl -w vm.max_map_count={_raise_to(host.max_map_count, 262144)}",
              "maps per process: caps a worker's memory, only when tiny"),
        Limit("somaxconn", str(host.somaxconn), None, None, False,
              f"sysctl -w net.core.somaxconn={_raise_to(host.somaxconn, 65535)}",
              f"warning: accept backlog per listener ({host.somaxconn:,} per worker); caps "
              "connect bursts, not held connections"),
        Limit("netdev_max_backlog", str(host.netdev_max_backlog), None, None, False,
              f"sysctl -w net.core.netdev_max_backlog="
              f"{_raise_to(host.netdev_max_backlog, 65536)}",
              "warning: packets queued at once per CPU on the input backlog that loopback "
              "and veth (container) traffic goes through; kernel keepalive probes of "
              "connections opened together fire in one timer batch, and past this they are "
              "dropped and the live connection aborted. tidegate starts keepalive past the "
              "heartbeat so clients that answer it are never probed"),
        Limit("ip_local_port_range", f"{host.port_range[0]}-{host.port_range[1]}", None, None,
              False,
              'more client source addresses (127.0.0.2, ...) or sysctl -w '
              'net.ipv4.ip_local_port_range="1024 65000"',
              f"warning: {ports:,} connections per client source address to one server "
              f"ip:port; {math.ceil(requested / max(ports, 1))} source addresses for "
              f"{requested:,} (load generator, proxies)"),
    ]
    capping = sorted((r for r in rows if r.allows is not None), key=lambda r: r.allows or 0)
    top = capping[0]
    rows = [replace(r, binding=r is top) for r in rows]
    exceeded = [f"{r.name} (allows {r.allows:,})" for r in capping if (r.allows or 0) < requested]
    fits = not exceeded and workers is not None
    if fits:
        reason = (f"{requested:,} <= {top.allows:,} allowed by {top.name}; "
                  f"{workers} workers x {pwc:,} connections")
    elif exceeded:
        reason = f"{requested:,} connections exceed " + ", ".join(exceeded)
    else:
        reason = f"nofile {host.nofile_soft} leaves no fds for connections: raise RLIMIT_NOFILE"
    max_pwc = per_worker_capacity(max(host.nr_open, host.nofile_hard))
    return Report(
        limits=rows,
        capacity_connections=top.allows or 0,
        capped_by=top.name,
        requested_connections=requested,
        fits=fits,
        reason=reason,
        workers_needed=workers,
        per_worker_capacity=pwc,
        cores=host.cores,
        max_nofile=max(host.nr_open, host.nofile_hard),
        workers_needed_at_max_nofile=_workers(requested, min(max_pwc, maps_per_worker), host.cores),
    )


def render(report: Report) -> str:
    """The report as an aligned table, then the summary and the verdict."""
    head = ("LIMIT", "VALUE", "CONNECTIONS", "")
    cells = [head] + [
        (r.name, r.value,
         f"{r.allows:,}" if r.allows is not None
         else f"{r.per_worker:,}/worker" if r.per_worker is not None else "-",
         "<- caps first" if r.binding else "")
        for r in report.limits
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(3)]
    lines = []
    for i, c in enumerate(cells):
        lines.append("  ".join(c[j].ljust(widths[j]) for j in range(3)) + "  " + c[3])
        if i:
            r = report.limits[i - 1]
            lines += [f"    {r.note}", f"    fix: {r.fix}"]
    lines = [ln.rstrip() for ln in lines]
    lines.append("")
    lines.append(f"can promise {report.capacity_connections:,} connections on this host "
                 f"(capped by {report.capped_by})")
    lines.append(f"per worker: {report.per_worker_capacity:,} connections; "
                 f"{report.requested_connections:,} need {report.workers_needed} workers "
                 f"({report.cores} cores)")
    if report.workers_needed_at_max_nofile != report.workers_needed:
        lines.append(f"with nofile raised to {report.max_nofile:,} (fs.nr_open): "
                     f"{report.workers_needed_at_max_nofile} workers")
    lines.append("sysctl fixes last until reboot: persist them in /etc/sysctl.d/99-tidegate.conf")
    lines.append(("FITS: " if report.fits else "DOES NOT FIT: ") + report.reason)
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connections", type=int, default=500_000, metavar="N",
                        help="connections to check against this host's limits (default 500000)")
    parser.add_argument("--json", metavar="PATH",
                        help="also write the report as JSON to PATH ('-' for stdout only)")


def run(args: argparse.Namespace) -> int:
    """Raise the soft fd limit, read this host's limits, report; 0 if ``--connections`` fits."""
    if args.connections < 0:
        print("--connections must be >= 0", file=sys.stderr)
        return 2
    raise_nofile()
    report = assess(read_host("/"), args.connections)
    as_json = json.dumps(asdict(report), indent=2) + "\n"
    if args.json == "-":
        sys.stdout.write(as_json)
    else:
        sys.stdout.write(render(report))
        if args.json:
            Path(args.json).write_text(as_json)
    return 0 if report.fits else 1
