"""A worker told to stop itself (SIGTERM to it, not to the supervisor) does not drain on its own:
it asks the supervisor, which drains the whole node as on its own SIGTERM (stealing stopped on
every worker first, then DRAIN to each). Real `tidegate serve` processes, real loopback clients;
the last tests drive Worker and Supervisor on real control channels, without forking."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import time
from typing import Any

import pytest

from test_engine import connect, echo_ok
from test_stealing import STEAL, actives, balanced, stat_sum


def _stealing_node(serve: Any, n: int = 800) -> tuple[Any, list[socket.socket], dict[str, Any]]:
    """Four workers, ``n`` clients, worker 0 killed and restarted: it is still stealing its
    share from the others when this returns (the moment a drain must not lose a connection)."""
    srv = serve("--workers", "4", "--drain-s", "2", "--steal-max-per-tick", "8", *STEAL)
    clients = [connect(srv.port) for _ in range(n)]
    assert all(echo_ok(s) for s in clients)
    st = srv.wait_stats(lambda st: stat_sum(st, "active") == n)
    victim = st["worker_stats"][0]
    os.kill(victim["pid"], signal.SIGKILL)
    st = srv.wait_stats(lambda st: st["restarts"] == 1 and st["ready"]
                        and st["worker_stats"][0].get("migrated_in", 0) > 0)
    survivors = [s for s in clients if echo_ok(s, b"before-drain")]
    assert len(survivors) == n - victim["active"]
    st = srv.status()
    assert not balanced(actives(st)), f"stealing was over before the drain: {actives(st)}"
    return srv, survivors, st


def _goodbyes(survivors: list[socket.socket]) -> tuple[int, int]:
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


def _lines(log: str, word: str) -> list[dict[str, str]]:
    return [dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            for line in log.splitlines() if f" {word} " in f"{line} "]


def _assert_one_graceful_drain(srv: Any, survivors: list[socket.socket]) -> str:
    goodbye, reset = _goodbyes(survivors)
    assert not reset, f"{reset} connections were cut off without a goodbye"
    assert goodbye == len(survivors)
    assert srv.proc.wait(30) == 0
    log = srv.log()
    drained = _lines(log, "drained")
    assert len(drained) == 4, log  # each worker drained once
    assert sum(int(d["goodbyes"]) for d in drained) == len(survivors)
    assert all(d["late"] == "0" and d["no_goodbye"] == "0" for d in drained), drained
    assert len(_lines(log, "stopping")) == 1, log  # one shutdown
    assert len(_lines(log, "stopped")) == 1, log
    assert log.count("restarting") == 1, log  # the SIGKILL's only: no signalled worker restarted
    assert "on its own" not in log, log  # every worker waited for the supervisor's DRAIN
    stopped = next(line for line in log.splitlines() if " stopped " in line)
    assert "steal_dropped=0" in stopped, stopped
    return log


def test_sigterm_to_one_worker_drains_the_whole_node(serve):
    """The operator's kill of one worker (the one still stealing): the node drains as on the
    supervisor's SIGTERM, every client gets its goodbye, nothing arrives after a drain's list."""
    srv, survivors, st = _stealing_node(serve)
    thief = st["worker_stats"][0]["pid"]
    os.kill(thief, signal.SIGTERM)
    log = _assert_one_graceful_drain(srv, survivors)
    stopping = _lines(log, "stopping")[0]
    assert stopping["signal"] == "SIGTERM" and stopping["worker"] == "0", stopping
    asked = _lines(log, "asked")
    assert len(asked) == 1 and asked[0]["worker"] == "0", asked


@pytest.mark.parametrize("supervisor_first", [True, False], ids=["supervisor-first", "workers-first"])
def test_sigterm_to_every_process_at_once_is_one_shutdown(serve, supervisor_first):
    """systemd's KillMode=control-group: SIGTERM to the supervisor and every worker at once."""
    srv, survivors, st = _stealing_node(serve)
    workers = [int(w["pid"]) for w in st["worker_stats"]]
    pids = [srv.proc.pid, *workers] if supervisor_first else [*workers, srv.proc.pid]
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    log = _assert_one_graceful_drain(srv, survivors)
    assert len(_lines(log, "asked")) <= 4


# ---- on real control channels, no fork ---------------------------------------------------

def _worker(ctrl: socket.socket | None) -> Any:
    from tidegate.apps.echo import EchoHandler
    from tidegate.engine.options import EngineOptions
    from tidegate.engine.worker import Worker

    if ctrl is not None:
        ctrl.setblocking(False)
    return Worker(EngineOptions(), EchoHandler(), index=1, ctrl=ctrl, workers_total=2)


def test_a_signalled_worker_asks_and_drains_on_the_supervisors_word():
    from tidegate.engine import control

    async def main() -> None:
        sup_end, ctrl = control.pair()
        sup_end.settimeout(5)
        w = _worker(ctrl)
        w.on_stop_signal(signal.SIGTERM)
        assert control.recv(sup_end) == (control.STOP_REQUEST, b"SIGTERM", [])
        assert w.stop_asked and not w.stopping
        w.on_stop_signal(signal.SIGINT)  # a second signal changes nothing
        w.on_stop_signal(signal.SIGTERM)
        sup_end.setblocking(False)
        with pytest.raises(BlockingIOError):
            control.recv(sup_end)
        assert not w.stopping
        sup_end.send(control.DRAIN)
        w._on_ctrl()
        assert w.stopping
        sup_end.close()
        ctrl.close()

    asyncio.run(main())


def test_a_worker_without_a_supervisor_to_ask_drains_on_its_own():
    from tidegate.engine import control

    async def main() -> None:
        w = _worker(None)  # no supervisor at all
        w.on_stop_signal(signal.SIGTERM)
        assert w.stopping and not w.stop_asked

        sup_end, ctrl = control.pair()
        sup_end.close()  # the supervisor died
        w = _worker(ctrl)
        w.on_stop_signal(signal.SIGINT)
        assert w.stopping and not w.stop_asked
        ctrl.close()

        sup_end, ctrl = control.pair()  # a supervisor that never answers
        w = _worker(ctrl)
        w.stop_ask_wait_s = 0.05
        w.on_stop_signal(signal.SIGTERM)
        assert w.stop_asked and not w.stopping
        await asyncio.sleep(0.2)
        assert w.stopping
        sup_end.close()
        ctrl.close()

    asyncio.run(main())


def test_the_supervisor_stops_once_on_its_workers_requests():
    from tidegate.apps.echo import EchoHandler
    from tidegate.engine import control
    from tidegate.engine.options import EngineOptions
    from tidegate.engine.supervisor import Supervisor, WorkerSlot

    sup = Supervisor(EngineOptions(), EchoHandler)
    pairs = [control.pair() for _ in range(2)]
    for a, _b in pairs:
        a.setblocking(False)
    sup.slots = [WorkerSlot(i, pid=os.getpid(), ctrl=a, ready=True)
                 for i, (a, _b) in enumerate(pairs)]
    assert not sup.stopping
    pairs[1][1].send(control.STOP_REQUEST + b"SIGTERM")
    sup._on_ctrl(sup.slots[1])
    assert sup.stopping
    pairs[0][1].send(control.STOP_REQUEST + b"SIGTERM")  # a second one: still one shutdown
    sup._on_ctrl(sup.slots[0])
    assert sup.stopping and all(s.ctrl is not None for s in sup.slots)
    for a, b in pairs:
        a.close()
        b.close()
