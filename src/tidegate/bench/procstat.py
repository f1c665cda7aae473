"""Reading /proc: process memory (RSS, PSS), CPU time, open fds, kernel slab and TCP figures.

Every reader returns ``None`` (or an empty result) when the figure cannot be read, for example
when the process has exited: the report then says ``null`` rather than guessing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _kib_field(text: str, name: str) -> int | None:
    """The value of a ``Name:   1234 kB`` line, in bytes; of a line without a unit (a
    counter such as ``voluntary_ctxt_switches``), the number as it is."""
    prefix = name + ":"
    for line in text.splitlines():
        if line.startswith(prefix):
            parts = line[len(prefix) :].split()
            if not parts:
                return None
            try:
                value = int(parts[0])
            except ValueError:
                return None
            unit = parts[1].lower() if len(parts) > 1 else ""
            return value * 1024 if unit == "kb" else value
    return None


def status_bytes(pid: int, field: str) -> int | None:
    """A memory field of /proc/<pid>/status (``VmRSS``, ``VmHWM``, ``RssAnon``...) in bytes."""
    text = _read_text(f"/proc/{pid}/status")
    return None if text is None else _kib_field(text, field)


def context_switches(pid: int) -> tuple[int, int] | None:
    """(voluntary, involuntary) context switches of ``pid``'s main thread so far: a voluntary
    one is the process going to sleep (each costs a wake later), an involuntary one the
    scheduler taking the CPU from it while it had work."""
    text = _read_text(f"/proc/{pid}/status")
    if text is None:
        return None
    voluntary = _kib_field(text, "voluntary_ctxt_switches")
    involuntary = _kib_field(text, "nonvoluntary_ctxt_switches")
    if voluntary is None or involuntary is None:
        return None
    return voluntary, involuntary


def rss_bytes(pid: int) -> int | None:
    return status_bytes(pid, "VmRSS")


def pss_bytes(pid: int) -> int | None:
    """Proportional set size from /proc/<pid>/smaps_rollup (shared pages split among sharers)."""
    text = _read_text(f"/proc/{pid}/smaps_rollup")
    return None if text is None else _kib_field(text, "Pss")


def cpu_ticks(pid: int, *, children: bool = False) -> int | None:
    """utime+stime of ``pid`` in clock ticks; with ``children``, plus its waited-for children's."""
    text = _read_text(f"/proc/{pid}/stat")
    if text is None:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    rest = text[text.rfind(")") + 2 :].split()
    try:
        # rest[0] is field 3 (state): utime is field 14, stime 15, cutime 16, cstime 17.
        ticks = int(rest[11]) + int(rest[12])
        if children:
            ticks += int(rest[13]) + int(rest[14])
    except (IndexError, ValueError):
        return None
    return ticks


def cpu_ticks_split(pid: int) -> tuple[int, int] | None:
    """(user, system) CPU of ``pid`` in clock ticks (utime, stime of /proc/<pid>/stat)."""
    text = _read_text(f"/proc/{pid}/stat")
    if text is None:
        return None
    rest = text[text.rfind(")") + 2 :].split()
    try:
        return int(rest[11]), int(rest[12])
    except (IndexError, ValueError):
        return None


def cpu_seconds(pid: int, *, children: bool = False) -> float | None:
    ticks = cpu_ticks(pid, children=children)
    return None if ticks is None else ticks / CLOCK_TICKS


def cpu_ns(pid: int) -> int | None:
    """Nanoseconds ``pid`` spent on a CPU, all its threads (``/proc/<pid>/task/*/schedstat``):
    finer than :func:`cpu_ticks` for short windows. Threads that already exited are not counted.
    """
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    total = 0
    for tid in tids:
        text = _read_text(f"/proc/{pid}/task/{tid}/schedstat")
        if text is None:
            continue
        try:
            total += int(text.split()[0])
        except (IndexError, ValueError):
            continue
    return total


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


_COUNT_FDS = (  # the child runs open_fds itself: one line per pid, -1 when unknown
    "import sys\n"
    "from tidegate.bench.procstat import open_fds\n"
    "for pid in sys.argv[1:]:\n"
    "    n = open_fds(int(pid))\n"
    "    print(-1 if n is None else n)\n"
)


def open_fds_elsewhere(pids: list[int]) -> list[int | None]:
    """:func:`open_fds` of each pid, counted by a child process, so that the listing (~3.5 us
    an entry) does not compete for this process's GIL with its event loop (the bench runner's,
    which reads its clients' progress meanwhile)."""
    if not pids:
        return []
    try:
        done = subprocess.run([sys.executable, "-c", _COUNT_FDS, *map(str, pids)],
                              capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return [None] * len(pids)
    counts = [int(line) for line in done.stdout.split()]
    if len(counts) != len(pids):
        return [None] * len(pids)
    return [None if n < 0 else n for n in counts]


def bench_client_pids(port: int) -> list[int]:
    """The ``tidegate bench`` client processes aimed at ``port`` (found by their command line:
    for scripts that run the bench and measure its clients from outside)."""
    pids = []
    marker = f'"port":{port}'.encode()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if b"tidegate.bench.client" in cmd and marker in cmd:
                pids.append(int(pid))
    return pids


def alive(pid: int) -> bool:
    text = _read_text(f"/proc/{pid}/stat")
    if text is None:
        return False
    state = text[text.rfind(")") + 2 : text.rfind(")") + 3]
    return state not in ("Z", "X", "")


def sum_pairs(pairs: Iterable[tuple[int, int] | None]) -> tuple[int, int] | None:
    """Element-wise sum of the pairs, or ``None`` if any is unknown (or there are none)."""
    first = second = 0
    seen = False
    for pair in pairs:
        if pair is None:
            return None
        first += pair[0]
        second += pair[1]
        seen = True
    return (first, second) if seen else None


def sum_known(values: Iterable[int | None]) -> int | None:
    """The sum of the values, or ``None`` if any of them is unknown (or there are none)."""
    total = 0
    seen = False
    for value in values:
        if value is None:
            return None
        total += value
        seen = True
    return total if seen else None


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (``Slab``, ``SUnreclaim``, ``MemAvailable``...)."""
    text = _read_text("/proc/meminfo") or ""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if parts:
            try:
                number = int(parts[0])
            except ValueError:
                continue
            out[name] = number * 1024 if len(parts) > 1 and parts[1].lower() == "kb" else number
    return out


HOST_CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def host_cpu_seconds() -> dict[str, float]:
    """The machine's CPU time so far by kind (the ``cpu`` line of /proc/stat), all cores summed:
    ``steal`` is time the hypervisor gave our virtual CPUs to someone else."""
    text = _read_text("/proc/stat") or ""
    for line in text.splitlines():
        if line.startswith("cpu "):
            values = line.split()[1:]
            return {name: int(value) / CLOCK_TICKS
                    for name, value in zip(HOST_CPU_FIELDS, values, strict=False)}
    return {}


def host_cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: round(after[name] - before[name], 2) for name in before if name in after}


def slab_bytes() -> int | None:
    return meminfo().get("Slab")


def tcp_sockstat() -> dict[str, int]:
    """The ``TCP:`` line of /proc/net/sockstat: inuse, orphan, tw, alloc and mem (pages)."""
    text = _read_text("/proc/net/sockstat") or ""
    for line in text.splitlines():
        if line.startswith("TCP:"):
            parts = line.split()[1:]
            out: dict[str, int] = {}
            for name, value in zip(parts[::2], parts[1::2], strict=False):
                try:
                    out[name] = int(value)
                except ValueError:
                    pass
            return out
    return {}


def tcp_ext() -> dict[str, int]:
    """The ``TcpExt`` counters of /proc/net/netstat (``ListenOverflows``, ``ListenDrops``...),
    plus ``SoftnetDropped`` (:func:`softnet_dropped`)."""
    text = _read_text("/proc/net/netstat") or ""
    lines = text.splitlines()
    out: dict[str, int] = {}
    for names, values in zip(lines, lines[1:], strict=False):
        if names.startswith("TcpExt:") and values.startswith("TcpExt:"):
            for name, value in zip(names.split()[1:], values.split()[1:], strict=False):
                try:
                    out[name] = int(value)
                except ValueError:
                    pass
            break
    dropped = softnet_dropped()
    if dropped is not None:
        out["SoftnetDropped"] = dropped
    return out


def softnet_dropped() -> int | None:
    """Packets the per-CPU input backlog dropped (/proc/net/softnet_stat, 2nd column, summed):
    loopback (and veth) traffic goes through it, and past ``net.core.netdev_max_backlog``
    packets queued at once - a burst of keepalive probes from timers that expire together -
    are lost before TCP sees them."""
    text = _read_text("/proc/net/softnet_stat")
    if text is None:
        return None
    try:
        return sum(int(line.split()[1], 16) for line in text.splitlines() if line.strip())
    except (IndexError, ValueError):
        return None


# Accept-queue overflows; aborts (TCPAbortOnTimeout: keepalive or TCP_USER_TIMEOUT gave up on
# a peer, which on loopback means its probes were lost); keepalive probes sent; TCP memory
# pressure (tcp_mem); input backlog drops.
TCP_EXT_WATCHED = ("ListenOverflows", "ListenDrops", "SyncookiesSent", "TCPReqQFullDrop",
                   "TCPAbortOnData", "TCPAbortOnClose", "TCPTimeWaitOverflow",
                   "TCPAbortOnTimeout", "TCPKeepAlive", "TCPMemoryPressures",
                   "TCPMemoryPressuresChrono", "SoftnetDropped")


def tcp_ext_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The watched counters' growth between two :func:`tcp_ext` readings."""
    return {name: after[name] - before[name] for name in TCP_EXT_WATCHED
            if name in before and name in after}


def page_size() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4096


def ip_local_port_range() -> tuple[int, int]:
    text = _read_text("/proc/sys/net/ipv4/ip_local_port_range")
    if text:
        parts = text.split()
        if len(parts) == 2:
            try:
                return int(parts[0]), int(parts[1])
            except ValueError:
                pass
    return 32768, 60999
