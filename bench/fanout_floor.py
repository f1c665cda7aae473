"""Server CPU per broadcast delivery: tidegate vs its floors, side by side in one run.

    python bench/fanout_floor.py [--connections 10000] [--count 5] [--rate 1] [--rounds 3]
                                 [--json bench/results/2026-11-27-fanout-floor.json]

One delivery = one ~120-byte WebSocket frame (the size of a gateway publication push) written
to one subscriber's loopback socket. Three ways of delivering ``--count`` (K) publications to
``--connections`` (N) subscribers, each measured the same way:

1. ``blocking_send``: one Python process holding N accepted loopback sockets (blocking,
   TCP_NODELAY) runs a plain ``for s in socks: s.send(frame)`` per publication;
2. ``uvloop_write``: a bare uvloop server (an ``asyncio.Protocol`` per connection, no
   framing, no parsing) runs ``for t in transports: t.write(frame)`` per publication;
3. ``tidegate``: the gateway itself: ``tidegate bench --protocol ws --server-workers 1
   --clients 1 --broadcast-rate R --broadcast-count K`` (it starts ``tidegate serve`` with one
   worker); its report's ``server_cpu_us_per_delivery`` (supervisor + worker, all threads,
   first publication to the last delivery seen, divided by the deliveries).

In 1 and 2 the receivers are real: a separate reader process (``select.epoll``, one
``recv`` per ready socket) holds the N client ends and reads everything until it has N*K
frames' worth of bytes; on loopback the receiver's wakeups are part of what a delivery costs
(the sender's ``send()`` runs the receiving socket's TCP input and wakes the reader). The
publications are paced like the gateway's broadcast, one every 1/R s, so the reader is asleep
when each one starts, as the bench client is. The sender's CPU (``/proc/PID/task/*/schedstat``,
as the runner measures the gateway) is taken from just before the first publication until the
reader has every byte, and divided by the deliveries; its user/system split comes from
``/proc/PID/stat`` (clock ticks), its CPU inside the send loops alone from its own
``getrusage``. The receivers' CPU per delivery is reported too: the epoll reader for 1 and 2;
for 3 the bench's client process (uvloop, WebSocket parse, JSON decode, latency histogram per
delivery, so not comparable to the bare reader), over the delivery window, found by a probe
connection of this script subscribed to the channel (it reads each publication's send time).

Rounds alternate the order of the variants (forward, then reversed); the report gives every
round and the medians, plus the ratios tidegate / uvloop_write and tidegate / blocking_send.
Each process holds N sockets: keep N under the per-process fd limit (20,000 here).

On this 2-core machine a round at N = 10,000, K = 5 takes ~30 s (3 rounds: 1.5 min).

Figures, 2026-11-27 (bench/results/2026-11-27-fanout-floor.json; N = 10,000, K = 5 at
1 publication/s, 3 rounds, the machine otherwise quiet; medians, us of CPU per delivery):

                    server (user / system)     receivers
    blocking_send   17.2  (1.0 / 16.0)         11.0  (epoll reader)
    uvloop_write    18.2  (1.0 / 17.4)         11.5  (epoll reader)
    tidegate        24.6  (6.0 / 18.2)         15.4  (bench client: WebSocket + JSON)
    tidegate / uvloop_write 1.35, tidegate / blocking_send 1.44; target <= 12: not met,
    and below the floor: one cold send() per subscriber already costs ~16 us of system time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from tidegate.bench import procstat  # noqa: E402
from tidegate.bench.runner import default_server_config  # noqa: E402
from tidegate.bench.wsprobe import WsProbe  # noqa: E402
from tidegate.gateway.auth import encode_hs256  # noqa: E402
from tidegate.gateway.config import load_config  # noqa: E402

DATE = "2026-11-27"
VARIANTS = ("blocking_send", "uvloop_write", "tidegate")
TARGET_US = 12.0
CLOCK_TICKS = procstat.CLOCK_TICKS

# ---------------------------------------------------------------------- the child processes
# Each prints one line per step on stdout and waits for the next command ("go", "close") on
# stdin, so the parent can read their CPU while they are idle, before and after the sends.

BLOCKING_SENDER = r'''
import json, resource, socket, struct, sys, time
n, k, rate, frame, timeout = (int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]),
                              bytes.fromhex(sys.argv[4]), float(sys.argv[5]))
size = len(frame)
lst = socket.socket()
lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lst.bind(("127.0.0.1", 0))
lst.listen(4096)
lst.settimeout(timeout)
print("port", lst.getsockname()[1], flush=True)
socks = []
deadline = time.monotonic() + timeout
while len(socks) < n and time.monotonic() < deadline:
    s, _ = lst.accept()
    s.setblocking(True)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    socks.append(s)
lst.close()
print("ready", len(socks), flush=True)
sys.stdin.readline()  # go
rounds = []
short = 0
start = time.monotonic()
for r in range(k):
    delay = start + r / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    u0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for s in socks:
        if s.send(frame) != size:
            short += 1
    w1, u1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    rounds.append([w1 - w0, u1.ru_utime - u0.ru_utime, u1.ru_stime - u0.ru_stime])
print(json.dumps({"rounds": rounds, "short_sends": short}), flush=True)
sys.stdin.readline()  # close: reset, no TIME_WAIT left behind
linger = struct.pack("ii", 1, 0)
for s in socks:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    s.close()
'''

UVLOOP_SENDER = r'''
import asyncio, json, resource, socket, struct, sys, time, uvloop
n, k, rate, frame, timeout = (int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]),
                              bytes.fromhex(sys.argv[4]), float(sys.argv[5]))
transports = []
class Sub(asyncio.Protocol):
    def connection_made(self, t):
        transports.append(t)
        if len(transports) == n and not ALL_IN.done():
            ALL_IN.set_result(None)
    def data_received(self, data):
        pass
async def main():
    global ALL_IN
    loop = asyncio.get_running_loop()
    ALL_IN = loop.create_future()
    server = await loop.create_server(Sub, "127.0.0.1", 0, backlog=4096)
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    print("port", server.sockets[0].getsockname()[1], flush=True)
    await asyncio.wait_for(ALL_IN, timeout)
    server.close()  # the listener only; the connections stay
    print("ready", len(transports), flush=True)
    await asyncio.wait_for(stdin.readline(), timeout)  # go
    rounds = []
    start = loop.time()
    for r in range(k):
        await asyncio.sleep(max(0.0, start + r / rate - loop.time()))
        u0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for t in transports:
            t.write(frame)
        w1, u1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        rounds.append([w1 - w0, u1.ru_utime - u0.ru_utime, u1.ru_stime - u0.ru_stime])
    buffered = sum(1 for t in transports if t.get_write_buffer_size())
    print(json.dumps({"rounds": rounds, "buffered_after_last_round": buffered}), flush=True)
    await asyncio.wait_for(stdin.readline(), timeout)  # close
    linger = struct.pack("ii", 1, 0)
    for t in transports:
        t.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        t.abort()
    await asyncio.sleep(0.2)
uvloop.run(main())
'''

READER = r'''
import json, resource, select, socket, struct, sys, time
port, n, expected, src, timeout = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                   sys.argv[4], float(sys.argv[5]))
deadline = time.monotonic() + timeout
ep = select.epoll()
socks = {}
for _ in range(n):
    s = socket.socket()
    s.setsockopt(socket.SOL_IP, 24, 1)  # IP_BIND_ADDRESS_NO_PORT: the port is picked at connect
    s.bind((src, 0))
    s.settimeout(max(0.1, deadline - time.monotonic()))
    s.connect(("127.0.0.1", port))
    s.setblocking(False)
    socks[s.fileno()] = s
    ep.register(s.fileno(), select.EPOLLIN)
print("connected", len(socks), flush=True)
got = wakeups = recvs = closed = 0
poll, now = ep.poll, time.monotonic
while got < expected:
    left = deadline - now()
    if left <= 0:
        break
    events = poll(min(left, 1.0))
    if events:
        wakeups += 1
    for fd, _ in events:
        try:
            data = socks[fd].recv(65536)
        except BlockingIOError:
            continue
        if not data:
            closed += 1
            ep.unregister(fd)
            continue
        got += len(data)
        recvs += 1
print(json.dumps({"bytes": got, "wakeups": wakeups, "recvs": recvs, "closed": closed}),
      flush=True)
sys.stdin.readline()  # close
linger = struct.pack("ii", 1, 0)
for s in socks.values():
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    s.close()
'''


# ---------------------------------------------------------------------- measuring


def push_frame(size: int, channel: str) -> bytes:
    """A server-to-client WebSocket text frame of ``size`` bytes (unmasked, as the gateway
    sends), holding a publication push shaped like the gateway's."""
    def build(pad: str) -> bytes:
        payload = (b'{"push":{"channel":"%s","pub":{"data":{"seq":0,"t":1795765432.123456%s},'
                   b'"offset":1}}}' % (channel.encode(), pad.encode()))
        n = len(payload)
        head = bytes([0x81, n]) if n < 126 else bytes([0x81, 126]) + n.to_bytes(2, "big")
        return head + payload

    bare = build("")
    if len(bare) >= size:
        return bare
    extra = size - len(bare) - len(',"p":""')
    return build(',"p":"%s"' % ("x" * max(0, extra)))


def machine_busy_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return total - idle, total


def context_switches(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return sum(int(line.split()[1]) for line in text.splitlines()
               if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")))


def sample(pids: dict[str, int]) -> dict[str, Any]:
    """CPU (ns, and user/system ticks) and context switches of each process, the machine's
    busy ticks and the time."""
    out: dict[str, Any] = {"t": time.monotonic(), "machine": machine_busy_ticks()}
    for name, pid in pids.items():
        out[name] = {"ns": procstat.cpu_ns(pid), "ticks": procstat.cpu_ticks_split(pid),
                     "cs": context_switches(pid)}
    return out


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


async def _line(stream: asyncio.StreamReader | None, timeout: float, what: str) -> str:
    assert stream is not None
    try:
        line = await asyncio.wait_for(stream.readline(), timeout)
    except TimeoutError:
        raise RuntimeError(f"timed out ({timeout:g} s) waiting for {what}") from None
    if not line:
        raise RuntimeError(f"{what}: the process exited")
    return line.decode().strip()


async def _stop(proc: asyncio.subprocess.Process | None, timeout: float = 20.0) -> None:
    """Wait for a child of ours to exit; kill it (by its own PID) if it does not."""
    if proc is None or proc.returncode is not None:
        return
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()


async def floor_round(variant: str, args: argparse.Namespace, frame: bytes, src: str
                      ) -> dict[str, Any]:
    """One run of ``blocking_send`` or ``uvloop_write`` against an epoll reader process."""
    n, k = args.connections, args.count
    expected = n * k * len(frame)
    script = BLOCKING_SENDER if variant == "blocking_send" else UVLOOP_SENDER
    pipe = asyncio.subprocess.PIPE
    setup = max(30.0, n / 500)
    sender = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, str(n), str(k), str(args.rate), frame.hex(), str(setup),
        stdin=pipe, stdout=pipe)
    reader: asyncio.subprocess.Process | None = None
    try:
        port = int((await _line(sender.stdout, 30, f"{variant}'s port")).split()[1])
        reader = await asyncio.create_subprocess_exec(
            sys.executable, "-c", READER, str(port), str(n), str(expected), src,
            str(setup + k / args.rate + 60), stdin=pipe, stdout=pipe)
        await _line(reader.stdout, setup, "the reader's connects")
        ready = await _line(sender.stdout, setup, f"{variant}'s accepts")
        if int(ready.split()[1]) != n:
            raise RuntimeError(f"{variant} accepted {ready.split()[1]} of {n}")
        await asyncio.sleep(args.settle)
        load = loadavg()
        pids = {"sender": sender.pid, "reader": reader.pid}
        s0 = sample(pids)
        assert sender.stdin is not None
        sender.stdin.write(b"go\n")
        done = json.loads(await _line(reader.stdout, k / args.rate + 60, "the reader's bytes"))
        s1 = sample(pids)
        sent = json.loads(await _line(sender.stdout, 30, f"{variant}'s send report"))
        for p in (sender, reader):
            assert p.stdin is not None
            p.stdin.write(b"close\n")
    finally:
        await _stop(reader)
        await _stop(sender)
    deliveries = done["bytes"] // len(frame)
    window = s1["t"] - s0["t"]
    out: dict[str, Any] = {
        "variant": variant, "connections": n, "publications": k,
        "deliveries": deliveries, "deliveries_expected": n * k,
        "deliveries_lost": n * k - deliveries, "window_s": round(window, 3),
        "loadavg_1m_before": load,
    }
    out.update(_cpu_figures("server", s0["sender"], s1["sender"], deliveries))
    out.update(_cpu_figures("receiver", s0["reader"], s1["reader"], deliveries))
    rounds = sent["rounds"]
    loop_cpu = sum(u + s for _, u, s in rounds)
    out["server_cpu_us_per_delivery_send_loops_only"] = round(loop_cpu * 1e6 / (n * k), 3)
    out["server_send_loop_wall_us_per_delivery"] = round(
        sum(w for w, _, _ in rounds) * 1e6 / (n * k), 3)
    out["server_send_loop_s_by_round"] = [round(w, 4) for w, _, _ in rounds]
    out["receiver_wakeups_per_delivery"] = round(done["wakeups"] / max(1, deliveries), 4)
    out["receiver_recvs_per_delivery"] = round(done["recvs"] / max(1, deliveries), 4)
    out.update({k2: v for k2, v in sent.items() if k2 != "rounds"})
    out.update(_machine(s0["machine"], s1["machine"], window,
                        [(s0[p]["ns"], s1[p]["ns"]) for p in ("sender", "reader")]))
    return out


def _cpu_figures(role: str, a: dict[str, Any], b: dict[str, Any], deliveries: int
                 ) -> dict[str, Any]:
    if not deliveries or a["ns"] is None or b["ns"] is None:
        return {f"{role}_cpu_us_per_delivery": None}
    out: dict[str, Any] = {
        f"{role}_cpu_s": round((b["ns"] - a["ns"]) / 1e9, 4),
        f"{role}_cpu_us_per_delivery": round((b["ns"] - a["ns"]) / 1e3 / deliveries, 3)}
    if a["ticks"] and b["ticks"]:
        user = (b["ticks"][0] - a["ticks"][0]) / CLOCK_TICKS
        system = (b["ticks"][1] - a["ticks"][1]) / CLOCK_TICKS
        out[f"{role}_user_us_per_delivery"] = round(user * 1e6 / deliveries, 2)
        out[f"{role}_system_us_per_delivery"] = round(system * 1e6 / deliveries, 2)
    if a["cs"] is not None and b["cs"] is not None:
        out[f"{role}_context_switches_per_delivery"] = round((b["cs"] - a["cs"]) / deliveries, 4)
    return out


def _machine(m0: tuple[int, int], m1: tuple[int, int], window: float,
             ours: list[tuple[int | None, int | None]]) -> dict[str, Any]:
    """How busy the 2 cores were over the window, and how much of it was not ours."""
    busy = (m1[0] - m0[0]) / CLOCK_TICKS / window if window > 0 else None
    mine = sum((b - a) for a, b in ours if a is not None and b is not None) / 1e9
    return {"machine_busy_cores": None if busy is None else round(busy, 2),
            "others_busy_cores": None if busy is None else round(max(0.0, busy - mine / window),
                                                                  2)}


# ---------------------------------------------------------------------- the gateway


class Probe(WsProbe):
    """One WebSocket connection subscribed to the channel: learns each publication's send
    time (its ``t``) and the size of the push frame."""

    def __init__(self, url: str, token: str, channel: str, count: int) -> None:
        super().__init__(url, token, channel)
        self.count = count
        self.sent_t: dict[int, float] = {}
        self.frame_bytes: int | None = None

    def on_message(self, message: dict[str, Any], frame: bytes, now: float) -> None:
        data = self.publication(message)
        if data is None or "seq" not in data or "t" not in data:
            return
        self.sent_t[int(data["seq"])] = float(data["t"])
        if self.frame_bytes is None and b"\n" not in frame:
            n = len(frame)
            self.frame_bytes = n + (2 if n < 126 else 4)


async def watch_cpu(status_path: Path, port: int, series: list[tuple[float, int, int, int]],
                    stop: asyncio.Event, interval: float) -> None:
    """Every ``interval``: (time.time(), server ns, bench clients ns, machine busy ticks)."""
    server: list[int] = []
    clients: list[int] = []
    deadline = time.monotonic() + 120
    while not stop.is_set() and (not server or not clients) and time.monotonic() < deadline:
        try:
            st = json.loads(status_path.read_text())
            server = [int(p) for p in [st.get("pid"), *(st.get("workers") or [])] if p]
        except (OSError, ValueError):
            pass
        clients = procstat.bench_client_pids(port)
        await asyncio.sleep(0.2)
    while not stop.is_set():
        s = procstat.sum_known(procstat.cpu_ns(p) for p in server)
        c = procstat.sum_known(procstat.cpu_ns(p) for p in clients)
        if s is not None and c is not None:
            series.append((time.time(), s, c, machine_busy_ticks()[0]))
        await asyncio.sleep(interval)


def at(series: list[tuple[float, int, int, int]], col: int, x: float) -> float | None:
    """Column ``col`` of the series at time ``x``, linearly interpolated."""
    if not series or x < series[0][0] or x > series[-1][0]:
        return None
    for a, b in zip(series, series[1:], strict=False):
        if a[0] <= x <= b[0]:
            f = (x - a[0]) / (b[0] - a[0]) if b[0] > a[0] else 0.0
            return a[col] + f * (b[col] - a[col])
    return float(series[-1][col])


async def tidegate_round(args: argparse.Namespace, token: str, workdir: Path, tag: str
                         ) -> dict[str, Any]:
    logs = workdir / tag
    logs.mkdir(parents=True, exist_ok=True)
    report_path = logs / "bench.json"
    status_path = logs / "server-status.json"
    n, k = args.connections, args.count
    cmd = [sys.executable, "-m", "tidegate", "bench", "--protocol", "ws",
           "--connections", str(n), "--server-workers", "1", "--clients", "1",
           "--hold", "1", "--broadcast-start", "2", "--broadcast-rate", str(args.rate),
           "--broadcast-count", str(k), "--broadcast-timeout", "30",
           "--scrape-interval", "0", "--channel", args.channel, "--no-progress",
           "--json", str(report_path), "--logs-dir", str(logs)]
    load = loadavg()
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=str(ROOT), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    assert proc.stdout is not None
    output = asyncio.create_task(proc.stdout.read())
    stop = asyncio.Event()
    series: list[tuple[float, int, int, int]] = []
    tasks: list[asyncio.Task[None]] = []
    probe: Probe | None = None
    try:
        port = 0
        deadline = time.monotonic() + 120
        while proc.returncode is None and not port and time.monotonic() < deadline:
            try:
                port = int(json.loads(status_path.read_text()).get("port") or 0)
            except (OSError, ValueError):
                pass
            await asyncio.sleep(0.1)
        if port:
            probe = Probe(f"ws://127.0.0.1:{port}/connection/websocket", token, args.channel, k)
            tasks = [asyncio.create_task(probe.run(stop)),
                     asyncio.create_task(watch_cpu(status_path, port, series, stop,
                                                   args.sample_interval))]
        try:
            await asyncio.wait_for(proc.wait(), max(120.0, n / 100) + k / args.rate + 120)
        except TimeoutError:
            proc.kill()  # the runner we started; its server and clients die with it
            await proc.wait()
            raise RuntimeError("tidegate bench did not finish in time") from None
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    text = await output
    try:
        rep = json.loads(report_path.read_text())
    except (OSError, ValueError):
        tail = text.decode(errors="replace")[-3000:]
        raise RuntimeError(f"no bench report; its output ends with:\n{tail}") from None
    deliveries = int(rep.get("broadcast_deliveries") or 0)
    out: dict[str, Any] = {
        "variant": "tidegate", "connections": rep.get("connections_established"),
        "publications": rep.get("broadcast_published"), "deliveries": deliveries,
        "deliveries_expected": rep.get("broadcast_deliveries_expected"),
        "deliveries_lost": rep.get("deliveries_lost"), "window_s": rep.get("broadcast_window_s"),
        "loadavg_1m_before": load,
        "server_cpu_us_per_delivery": rep.get("server_cpu_us_per_delivery"),
        "server_cpu_us_per_delivery_net_of_baseline":
            rep.get("server_cpu_us_per_delivery_net_of_baseline"),
        "server_baseline_cpu_percent_before_broadcast":
            rep.get("server_baseline_cpu_percent_before_broadcast"),
        "server_cpu_s": rep.get("broadcast_server_cpu_seconds"),
        "broadcast_last_delivery_s": rep.get("broadcast_last_delivery_s"),
        "broadcast_latency_ms_p50": rep.get("broadcast_latency_ms_p50"),
        "broadcast_latency_ms_p99": rep.get("broadcast_latency_ms_p99"),
        "bench_exit_code": proc.returncode,
        "bench_failures": rep.get("failures"),
        "push_frame_bytes": probe.frame_bytes if probe else None,
        "probe_error": probe.error if probe else "no port",
    }
    split = rep.get("broadcast_server_cpu_user_system_seconds")
    if split and deliveries:
        out["server_user_us_per_delivery"] = round(split[0] * 1e6 / deliveries, 2)
        out["server_system_us_per_delivery"] = round(split[1] * 1e6 / deliveries, 2)
    out.update(delivery_window(rep, probe, series, deliveries))
    return out


def delivery_window(rep: dict[str, Any], probe: Probe | None,
                    series: list[tuple[float, int, int, int]], deliveries: int
                    ) -> dict[str, Any]:
    """CPU over the deliveries themselves, from the first publication's send time (the probe
    read it) to the last delivery (its send time + the report's last delivery by seq): the
    bench clients' (the receivers'), and the server's again as a cross-check of the report's
    window (which ends when the runner saw the clients' counts)."""
    by_seq = rep.get("broadcast_last_delivery_s_by_seq") or []
    if probe is None or not probe.sent_t or not deliveries:
        return {"receiver_cpu_us_per_delivery": None}
    start = min(probe.sent_t.values())
    ends = [probe.sent_t[i] + d for i, d in enumerate(by_seq)
            if d is not None and i in probe.sent_t]
    if not ends:
        return {"receiver_cpu_us_per_delivery": None}
    end = max(ends)
    out: dict[str, Any] = {"delivery_window_s": round(end - start, 3)}
    for col, name in ((2, "receiver"), (1, "server")):
        a, b = at(series, col, start), at(series, col, end)
        base = at(series, col, start - 1.0)
        key = "receiver_cpu_us_per_delivery" if name == "receiver" else \
            "server_cpu_us_per_delivery_delivery_window"
        if a is None or b is None:
            out[key] = None
            continue
        out[key] = round((b - a) / 1e3 / deliveries, 3)
        if base is not None:
            net = (b - a) - (a - base) * (end - start)
            out[f"{key}_net_of_baseline"] = round(max(0.0, net) / 1e3 / deliveries, 3)
    m0, m1 = at(series, 3, start), at(series, 3, end)
    if m0 is not None and m1 is not None and end > start:
        busy = (m1 - m0) / CLOCK_TICKS / (end - start)
        out["machine_busy_cores"] = round(busy, 2)
        ours = [(at(series, col, start), at(series, col, end)) for col in (1, 2)]
        mine = sum(b - a for a, b in ours if a is not None and b is not None) / 1e9
        out["others_busy_cores"] = round(max(0.0, busy - mine / (end - start)), 2)
    return out


# ---------------------------------------------------------------------- the run


SUMMARY_KEYS = ("server_cpu_us_per_delivery", "server_user_us_per_delivery",
                "server_system_us_per_delivery", "server_cpu_us_per_delivery_net_of_baseline",
                "server_cpu_us_per_delivery_send_loops_only", "receiver_cpu_us_per_delivery",
                "receiver_system_us_per_delivery", "receiver_wakeups_per_delivery",
                "machine_busy_cores", "others_busy_cores")


def medians(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, rs in runs.items():
        m: dict[str, float] = {}
        for key in SUMMARY_KEYS:
            values = [r[key] for r in rs if isinstance(r.get(key), int | float)]
            if values:
                m[key] = round(statistics.median(values), 3)
        out[name] = m
    return out


def ratios(med: dict[str, dict[str, float]]) -> dict[str, float | None]:
    def r(a: str, b: str) -> float | None:
        x = med.get(a, {}).get("server_cpu_us_per_delivery")
        y = med.get(b, {}).get("server_cpu_us_per_delivery")
        return round(x / y, 2) if x and y else None

    return {"tidegate_over_uvloop_write": r("tidegate", "uvloop_write"),
            "tidegate_over_blocking_send": r("tidegate", "blocking_send"),
            "uvloop_write_over_blocking_send": r("uvloop_write", "blocking_send")}


def print_table(med: dict[str, dict[str, float]]) -> None:
    rows = (("server CPU us / delivery", "server_cpu_us_per_delivery"),
            ("  user / system (ticks)", None),
            ("  net of baseline", "server_cpu_us_per_delivery_net_of_baseline"),
            ("  inside the send loops", "server_cpu_us_per_delivery_send_loops_only"),
            ("receivers' CPU us / delivery", "receiver_cpu_us_per_delivery"),
            ("machine busy cores", "machine_busy_cores"))
    names = [v for v in VARIANTS if v in med]
    print()
    print(f"{'median':30}" + "".join(f"{n:>16}" for n in names))
    for label, key in rows:
        cells = []
        for n in names:
            m = med[n]
            if key is None:
                u, s = m.get("server_user_us_per_delivery"), m.get("server_system_us_per_delivery")
                cells.append(f"{u} / {s}" if u is not None else "-")
            else:
                cells.append(str(m.get(key, "-")))
        print(f"{label:30}" + "".join(f"{c:>16}" for c in cells))


async def amain(args: argparse.Namespace) -> int:
    frame = push_frame(args.frame_bytes, args.channel)
    cfg = load_config(default_server_config(), os.environ)
    token = encode_hs256({"sub": "fanout-floor-probe", "exp": int(time.time()) + 7200},
                         cfg.token_hmac_secret)
    workdir = Path(tempfile.mkdtemp(prefix="fanout-floor-"))
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants}
    started = time.monotonic()
    try:
        for i in range(args.rounds):
            order = list(args.variants) if i % 2 == 0 else list(reversed(args.variants))
            for j, variant in enumerate(order):
                if variant == "tidegate":
                    r = await tidegate_round(args, token, workdir, f"round{i + 1}")
                else:
                    src = f"127.{90 + i}.{j}.2"  # a source address of its own per run
                    r = await floor_round(variant, args, frame, src)
                r["round"], r["position"] = i + 1, j + 1
                runs[variant].append(r)
                print(f"round {i + 1} {variant:>13}: "
                      + json.dumps({key: r.get(key) for key in (
                          "server_cpu_us_per_delivery", "receiver_cpu_us_per_delivery",
                          "deliveries", "deliveries_lost", "machine_busy_cores")}), flush=True)
                await asyncio.sleep(args.settle)
    finally:
        if args.keep_logs:
            print(f"logs: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    med = medians(runs)
    rat = ratios(med)
    tg = med.get("tidegate", {}).get("server_cpu_us_per_delivery")
    floor = med.get("blocking_send", {}).get("server_cpu_us_per_delivery")
    bare = med.get("uvloop_write", {}).get("server_cpu_us_per_delivery")
    report: dict[str, Any] = {
        "schema": "tidegate.bench.fanout_floor/1",
        "date": DATE,
        "command": [sys.executable, *sys.argv],
        "host": {"cores": os.cpu_count(), "python": platform.python_version(),
                 "kernel": platform.release(),
                 "nofile_soft": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                 "note": "2 cores, shared with other work (see machine_busy_cores, "
                         "others_busy_cores, loadavg_1m_before per run)"},
        "workload": {"connections": args.connections, "publications": args.count,
                     "rate_per_s": args.rate, "rounds": args.rounds,
                     "frame_bytes": len(frame), "channel": args.channel,
                     "order": "rounds alternate: odd rounds " + ", ".join(args.variants)
                              + "; even rounds reversed",
                     "run_seconds": round(time.monotonic() - started, 1)},
        "scope": {
            "server_cpu_us_per_delivery":
                "blocking_send / uvloop_write: the sender process, schedstat (all threads), "
                "from just before the first publication until the reader had every byte, "
                "divided by the deliveries; tidegate: the bench report's figure (supervisor + "
                "worker, schedstat, first publication until the runner saw the last delivery)",
            "server_user/system_us_per_delivery": "utime / stime clock ticks over the same "
                                                  "window",
            "server_cpu_us_per_delivery_send_loops_only":
                "the sender's own getrusage around its send loops only (no idle, no timers)",
            "receiver_cpu_us_per_delivery":
                "blocking_send / uvloop_write: the epoll reader process (one recv per ready "
                "socket, no parsing); tidegate: the bench's client process (uvloop, WebSocket "
                "+ JSON parse, latency histogram), first publication to last delivery",
            "tidegate_extra_subscriber": "the probe connection is one more subscriber (N+1 "
                                         "writes per publication, N counted)",
        },
        "runs": runs,
        "median": med,
        "ratios_of_median_server_cpu": rat,
        "target": {"server_cpu_us_per_delivery_max": TARGET_US,
                   "tidegate_median": tg,
                   "met": None if tg is None else tg <= TARGET_US,
                   "floor_share_of_target": None if floor is None else round(floor / TARGET_US,
                                                                              2),
                   "bare_uvloop_share_of_target": None if bare is None else round(
                       bare / TARGET_US, 2)},
    }
    print_table(med)
    print("ratios of the medians: " + ", ".join(f"{k} {v}" for k, v in rat.items()))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"written: {args.json}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=10_000,
                   help="subscribers N: sockets held by each side (default: 10000)")
    p.add_argument("--count", type=int, default=5, help="publications K (default: 5)")
    p.add_argument("--rate", type=float, default=1.0,
                   help="publications per second, all variants (default: 1)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the three (default: 3)")
    p.add_argument("--frame-bytes", type=int, default=120,
                   help="size of the frame of variants 1 and 2 (default: 120)")
    p.add_argument("--channel", default="bench")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--settle", type=float, default=1.0,
                   help="seconds to wait after set-up and between runs (default: 1)")
    p.add_argument("--sample-interval", type=float, default=0.02,
                   help="tidegate: how often the server's and clients' CPU is read (s)")
    p.add_argument("--json", metavar="PATH", help="write the report there")
    p.add_argument("--keep-logs", action="store_true")
    args = p.parse_args()
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if not 1 <= args.connections <= soft - 200:
        p.error(f"--connections must be 1..{soft - 200} (fd limit {soft} per process)")
    if args.count < 1 or args.rate <= 0 or args.rounds < 1:
        p.error("--count, --rate and --rounds must be positive")
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
