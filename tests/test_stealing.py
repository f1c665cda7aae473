"""Work stealing end to end: real servers, raw echo clients, sockets moved between workers."""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import subprocess
import time
from typing import Any

import pytest

from test_engine import connect, echo_ok, recv_frame
from tidegate.protocol.heartbeat import DATA, frame

# Quick rounds for tests: a load table every 0.2 s, any ready connection may move; no server
# pings (the clients here answer them only while they talk).
STEAL = ["--tick-s", "0.1", "--steal-tick-s", "0.2", "--steal-min-idle-ms", "0",
         "--ping-interval-s", "600"]


def actives(st: dict[str, Any]) -> list[int]:
    return [int(w.get("active", 0)) for w in st.get("worker_stats", []) if w]


def balanced(counts: list[int]) -> bool:
    """max/mean <= 1.02, or as even as whole connections allow at small counts."""
    mean = sum(counts) / len(counts)
    return bool(counts) and max(counts) <= max(1.02 * mean, math.ceil(mean))


def stat_sum(st: dict[str, Any], key: str) -> int:
    return sum(int(w.get(key, 0)) for w in st.get("worker_stats", []) if w)


def owners(port: int) -> dict[int, set[int]]:
    """The client's local port -> pids of the server processes holding the accepted socket."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    table: dict[int, set[int]] = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4:
            peer_port = int(fields[3].rsplit(":", 1)[1])
            table.setdefault(peer_port, set()).update(int(p) for p in re.findall(r"pid=(\d+)", line))
    return table


def owner(table: dict[int, set[int]], s: socket.socket) -> int:
    pids = table.get(s.getsockname()[1], set())
    assert len(pids) == 1, pids
    return next(iter(pids))


def settled(srv: Any, n: int) -> dict[str, Any]:
    """Wait until ``n`` connections are spread evenly and no move happened for two reports."""
    seen: list[Any] = []

    def quiet(st: dict[str, Any]) -> bool:
        key = (actives(st), stat_sum(st, "migrated_in"), stat_sum(st, "migrated_out"))
        seen.append((time.monotonic(), key))
        if sum(key[0]) != n or not balanced(key[0]):
            seen.clear()
            return False
        first = next(t for t, k in seen if k == key)
        if any(k != key for _, k in seen):
            seen[:] = [(t, k) for t, k in seen if k == key]
            return False
        return time.monotonic() - first > 2.5  # workers report every second

    return srv.wait_stats(quiet, timeout=60)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_stealing_evens_out_and_refills_a_restarted_worker(serve, loop):
    srv = serve("--workers", "4", "--loop", loop, *STEAL)
    clients = [connect(srv.port) for _ in range(300)]
    assert all(echo_ok(s) for s in clients)
    before = settled(srv, 300)  # SO_REUSEPORT's uneven spread, corrected
    assert all(echo_ok(s, b"after-balance") for s in clients)

    victim = before["worker_stats"][0]
    held = owners(srv.port)
    survivors = [s for s in clients if owner(held, s) != victim["pid"]]
    assert len(survivors) == 300 - victim["active"]
    os.kill(victim["pid"], signal.SIGKILL)
    srv.wait_stats(lambda st: st["restarts"] == 1 and st["ready"])

    # The survivors keep talking while the restarted worker takes its share of them: whatever
    # is in flight when a socket moves is answered by its new worker, on the same socket.
    deadline = time.monotonic() + 60
    rounds = 0
    while True:
        assert all(echo_ok(s, b"round-%d" % rounds) for s in survivors), f"round {rounds}"
        rounds += 1
        st = srv.status()
        counts = actives(st)
        if len(counts) == 4 and balanced(counts) and sum(counts) == len(survivors):
            break
        assert time.monotonic() < deadline, f"not balanced: {counts}"
    after = settled(srv, len(survivors))
    assert all(echo_ok(s, b"after-refill") for s in survivors)

    new = after["worker_stats"][0]
    assert new["pid"] != victim["pid"] and new["migrated_in"] > 0 and new["accepted"] == 0
    # Every move counted once at each end (the dead worker's counters went with it), and no
    # move counted as a close anywhere.
    moved_in = stat_sum(after, "migrated_in") - sum(
        w["migrated_in"] for w in before["worker_stats"][1:])
    moved_out = stat_sum(after, "migrated_out") - sum(
        w["migrated_out"] for w in before["worker_stats"][1:])
    assert moved_in == moved_out == new["migrated_in"]
    assert all(not w["closes"] for w in after["worker_stats"]), after["worker_stats"]
    assert after["stealing"]["dropped"] == 0
    for s in survivors:  # not one client was disconnected by a move
        s.settimeout(0)
        with pytest.raises(BlockingIOError):
            s.recv(1)


def test_stealing_off_leaves_the_spread_alone(serve):
    srv = serve("--workers", "2", "--steal-max-per-tick", "0", *STEAL)
    clients = [connect(srv.port) for _ in range(40)]
    assert all(echo_ok(s) for s in clients)
    st = srv.wait_stats(lambda st: stat_sum(st, "active") == 40)
    victim = st["worker_stats"][0]
    os.kill(victim["pid"], signal.SIGKILL)
    st = srv.wait_stats(lambda st: st["restarts"] == 1 and st["ready"]
                        and st["worker_stats"][0].get("pid"))
    time.sleep(2)  # several would-be rounds
    st = srv.status()
    assert st["worker_stats"][0]["active"] == 0
    assert stat_sum(st, "migrated_in") == stat_sum(st, "migrated_out") == 0


def test_partial_frame_and_pending_output_stay_put(serve):
    srv = serve("--workers", "2", "--max-write-buffer-bytes", str(64 << 20), *STEAL)
    clients = [connect(srv.port) for _ in range(40)]
    assert all(echo_ok(s) for s in clients)
    st = settled(srv, 40)
    keeper, other = st["worker_stats"]
    held = owners(srv.port)
    mine = [s for s in clients if owner(held, s) == keeper["pid"]]
    assert len(mine) == keeper["active"] >= 16

    # Four connections with half a frame kept by the server, four with output it cannot send
    # (the client stops reading), then the other worker restarts empty and takes its share.
    partial, pending, normal = mine[:4], mine[4:8], mine[8:]
    half = frame(DATA, b"p" * 100)
    for s in partial:
        s.sendall(half[:50])
    # 8 MB echoed to each client that is not reading: more than the kernel's buffers hold
    # (tcp_wmem's 4 MB at most), so at least 1.5 MB stays queued in each server transport.
    frames = 134
    flood = frame(DATA, b"z" * 60_000) * frames
    for s in pending:
        s.sendall(flood)
    srv.wait_stats(lambda st: st["worker_stats"][keeper["index"]]["write_buffer_bytes"]
                   >= len(pending) * 1_500_000)
    os.kill(other["pid"], signal.SIGKILL)
    srv.wait_stats(lambda st: st["restarts"] == 1 and st["ready"])
    after = settled(srv, len(mine))

    gave = after["worker_stats"][keeper["index"]]["migrated_out"] - keeper["migrated_out"]
    assert gave in (len(mine) // 2, (len(mine) + 1) // 2)  # from the normal ones only...
    held = owners(srv.port)
    assert all(owner(held, s) == keeper["pid"] for s in partial + pending)  # ...these stayed
    assert sum(owner(held, s) != keeper["pid"] for s in normal) == gave

    for s in partial:  # the kept half frame is completed on the worker that kept it
        s.sendall(half[50:])
        assert recv_frame(s) == bytes([DATA]) + b"p" * 100
    for s in pending:  # and the queued output arrives whole
        s.settimeout(30)
        got = b"".join(recv_frame(s) for _ in range(frames))
        assert got == (bytes([DATA]) + b"z" * 60_000) * frames
    assert all(echo_ok(s) for s in mine)
