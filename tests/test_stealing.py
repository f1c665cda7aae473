"""Work stealing end to end: real servers, raw echo clients, sockets moved between workers."""

from __future__ import annotations

import math
import os
import re
import select
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


def test_a_drain_while_stealing_loses_no_connection_and_says_every_goodbye(serve):
    """SIGTERM while a restarted worker is still taking its share: the supervisor stops
    stealing node-wide before any worker lists its connections for the drain, so no
    connection moves under a drain, none is lost in flight, and every client gets the
    drain's goodbye (a FIN, never the reset of the abort at the end); the drain's safety net
    for late arrivals (Worker.arrived_after_snapshot) never fires."""
    srv, survivors, _ = stealing_node(serve, settle_s=1.0)
    srv.proc.send_signal(signal.SIGTERM)
    assert_drained_gracefully(srv, survivors)


def assert_drained_gracefully(srv: Any, survivors: list[socket.socket]) -> str:
    """Every survivor got the drain's goodbye, each of the 4 workers drained once with no late
    arrival and no goodbye missed, the node exited 0 and no steal was dropped; the log."""
    goodbye, reset = goodbyes(survivors)
    assert not reset, f"{reset} connections were cut off without a goodbye"
    assert goodbye == len(survivors)
    assert srv.proc.wait(30) == 0
    log: str = srv.log()
    drained = log_lines(log, "drained")
    assert len(drained) == 4, log  # each worker drained once
    assert sum(int(d["goodbyes"]) for d in drained) == len(survivors)
    assert all(d["late"] == "0" and d["no_goodbye"] == "0" for d in drained), drained
    stopped = next(line for line in log.splitlines() if " stopped " in line)
    assert "steal_dropped=0" in stopped, stopped
    return log


def stealing_node(serve: Any, n: int = 800, settle_s: float = 0.0
                  ) -> tuple[Any, list[socket.socket], dict[str, Any]]:
    """Four workers, ``n`` clients, worker 0 killed and restarted: it is still stealing its
    share from the others when this returns (the moment a drain must not lose a connection)."""
    srv = serve("--workers", "4", "--drain-s", "2", "--steal-max-per-tick", "8", *STEAL)
    clients = [connect(srv.port) for _ in range(n)]
    assert all(echo_ok(s) for s in clients)
    st = srv.wait_stats(lambda st: stat_sum(st, "active") == n)
    victim = st["worker_stats"][0]
    os.kill(victim["pid"], signal.SIGKILL)
    # The restarted worker steals (8 per 0.2 s round: ~5 s to refill); ``settle_s`` into that,
    # hand-overs are still going on.
    st = srv.wait_stats(lambda st: st["restarts"] == 1 and st["ready"]
                        and st["worker_stats"][0].get("migrated_in", 0) > 0)
    time.sleep(settle_s)
    survivors = [s for s in clients if echo_ok(s, b"before-drain")]
    assert len(survivors) == n - victim["active"]
    st = srv.status()
    assert not balanced(actives(st)), f"stealing was over before the drain: {actives(st)}"
    return srv, survivors, st


def goodbyes(survivors: list[socket.socket]) -> tuple[int, int]:
    """Read every client until the server closes it: (clean closes, resets)."""
    goodbye: set[socket.socket] = set()
    reset: set[socket.socket] = set()
    deadline = time.monotonic() + 30
    while len(goodbye) + len(reset) < len(survivors) and time.monotonic() < deadline:
        waiting = [s for s in survivors if s not in goodbye and s not in reset]
        readable, _, _ = select.select(waiting, [], [], 1)
        for s in readable:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                reset.add(s)
                continue
            assert not data, data  # nothing but the goodbye (no server pings here)
            goodbye.add(s)
            s.close()  # the client's side of the close, as a client would
    return len(goodbye), len(reset)


def log_lines(log: str, word: str) -> list[dict[str, str]]:
    return [dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            for line in log.splitlines() if f" {word} " in f"{line} "]


def test_the_freeze_refuses_requests_and_sends_hand_overs_back_to_their_owner():
    """stealing.Router once frozen, on real control channels (no fork): both workers are told
    STEAL_OFF, a request on its way is refused for its victim, a hand-over on its way goes
    back to its sender with its socket, and the freeze is settled once both answered."""
    from tidegate.apps.echo import EchoHandler
    from tidegate.engine import control, stealing
    from tidegate.engine.options import EngineOptions
    from tidegate.engine.supervisor import Supervisor, WorkerSlot

    sup = Supervisor(EngineOptions(steal_max_per_tick=8), EchoHandler)
    pairs = [control.pair() for _ in range(2)]
    sup.slots = [WorkerSlot(i, pid=os.getpid(), ctrl=a, ready=True)
                 for i, (a, _b) in enumerate(pairs)]
    workers = [b for _a, b in pairs]
    for s in workers:
        s.settimeout(5)
    router = sup._stealing

    def recv(i: int) -> tuple[bytes, bytes, list[int]]:
        msg = control.recv(workers[i])
        assert msg is not None
        return msg

    router.freeze()
    assert [recv(i)[0] for i in range(2)] == [control.STEAL_OFF] * 2
    assert not router.settled()

    # worker 1 asked worker 0 before it heard of the freeze: refused in worker 0's name
    router.route(sup.slots[1], (0).to_bytes(2, "big") + stealing.REQUEST + bytes(12), [])
    kind, body, fds = recv(1)
    assert (kind, body, fds) == (control.STEAL, (0).to_bytes(2, "big") + stealing.REFUSE, [])

    # worker 0 handed a connection to worker 1 just before: it comes back to worker 0
    client, server_side = socket.socketpair()
    payload = stealing.CONNS + b"records"
    # (the fd is the supervisor's copy, as control.recv gives it: route closes it)
    router.route(sup.slots[0], (1).to_bytes(2, "big") + payload, [server_side.detach()])
    kind, body, fds = recv(0)
    assert kind == control.STEAL and body == (1).to_bytes(2, "big") + stealing.RETURNED + b"records"
    assert len(fds) == 1
    with socket.socket(fileno=fds[0]) as back:  # the same connection, still open
        client.sendall(b"still-here")
        assert back.recv(10) == b"still-here"
    workers[1].setblocking(False)
    with pytest.raises(BlockingIOError):  # worker 1 got nothing
        control.recv(workers[1])
    assert router.stats() == {"routed": 0, "returned": 1, "dropped": 0, "kept": 1}

    router.stopped(sup.slots[0])
    assert not router.settled()
    router.stopped(sup.slots[1])
    assert router.settled()
    router.tick()  # no load table goes out any more
    with pytest.raises(BlockingIOError):
        control.recv(workers[1])
    client.close()
    for a, b in pairs:
        a.close()
        b.close()


def test_a_frozen_worker_answers_refuses_and_sends_arrivals_back():
    """Stealer once told STEAL_OFF (a real control channel, no fork): it answers at once,
    refuses what it is asked for and sends a hand-over that still reaches it back."""
    import asyncio
    import pickle

    from tidegate.apps.echo import EchoHandler
    from tidegate.engine import control, stealing
    from tidegate.engine.options import EngineOptions
    from tidegate.engine.worker import Worker

    async def main() -> None:
        sup_end, ctrl = control.pair()
        sup_end.settimeout(5)
        w = Worker(EngineOptions(steal_max_per_tick=8), EchoHandler(), index=1, ctrl=ctrl,
                   workers_total=2)
        st = w.stealer
        assert st.enabled and not st.frozen
        st.on_control(control.STEAL_OFF, b"", [])
        assert st.frozen and control.recv(sup_end) == (control.STEAL_OFF, b"", [])
        st.on_control(control.STEAL, (0).to_bytes(2, "big") + stealing.REQUEST
                      + stealing._REQ.pack(4, 1.0), [])
        assert control.recv(sup_end) == (control.STEAL, (0).to_bytes(2, "big")
                                         + stealing.REFUSE, [])
        client, server_side = socket.socketpair()
        records = pickle.dumps([(0, 0, b"")])
        st.on_control(control.STEAL, (0).to_bytes(2, "big") + stealing.CONNS + records,
                      [server_side.detach()])
        kind, body, fds = control.recv(sup_end)
        assert (kind, body, len(fds)) == (control.STEAL, (0).to_bytes(2, "big")
                                          + stealing.CONNS + records, 1)
        assert st.bounced == 1 and st.adopting == 0 and w.active == 0
        for fd in fds:
            os.close(fd)
        client.close()
        sup_end.close()
        ctrl.close()

    asyncio.run(main())
