"""A worker told to stop itself (SIGTERM to it, not to the supervisor) does not drain on its own:
it asks the supervisor, which drains the whole node as on its own SIGTERM (stealing stopped on
every worker first, then DRAIN to each). Real `tidegate serve` processes, real loopback clients;
the last tests drive Worker and Supervisor on real control channels, without forking."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from typing import Any

import pytest

from test_stealing import assert_drained_gracefully, log_lines, stealing_node


def _assert_one_graceful_drain(srv: Any, survivors: list[socket.socket]) -> str:
    log = assert_drained_gracefully(srv, survivors)
    assert len(log_lines(log, "stopping")) == 1, log  # one shutdown
    assert len(log_lines(log, "stopped")) == 1, log
    assert log.count("restarting") == 1, log  # the SIGKILL's only: no signalled worker restarted
    assert "on its own" not in log, log  # every worker waited for the supervisor's DRAIN
    return log


def test_sigterm_to_one_worker_drains_the_whole_node(serve):
    """The operator's kill of one worker (the one still stealing): the node drains as on the
    supervisor's SIGTERM, every client gets its goodbye, nothing arrives after a drain's list."""
    srv, survivors, st = stealing_node(serve)
    thief = st["worker_stats"][0]["pid"]
    os.kill(thief, signal.SIGTERM)
    log = _assert_one_graceful_drain(srv, survivors)
    stopping = log_lines(log, "stopping")[0]
    assert stopping["signal"] == "SIGTERM" and stopping["worker"] == "0", stopping
    asked = log_lines(log, "asked")
    assert len(asked) == 1 and asked[0]["worker"] == "0", asked


@pytest.mark.parametrize("supervisor_first", [True, False], ids=["supervisor-first", "workers-first"])
def test_sigterm_to_every_process_at_once_is_one_shutdown(serve, supervisor_first):
    """systemd's KillMode=control-group: SIGTERM to the supervisor and every worker at once."""
    srv, survivors, st = stealing_node(serve)
    workers = [int(w["pid"]) for w in st["worker_stats"]]
    pids = [srv.proc.pid, *workers] if supervisor_first else [*workers, srv.proc.pid]
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    log = _assert_one_graceful_drain(srv, survivors)
    assert len(log_lines(log, "asked")) <= 4


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
