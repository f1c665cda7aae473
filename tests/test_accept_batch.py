"""A worker accepts a burst of waiting connections in a few loop turns, not one turn each
(uvloop's own server accepts one connection per turn: ``accept_batch 0``)."""

from __future__ import annotations

import os
import signal
import socket
import time
from typing import Any

import pytest
from tests.test_engine import connect, echo_ok

from tidegate.protocol.heartbeat import PING, frame


def _burst_while_stopped(srv: Any, n: int) -> list[socket.socket]:
    """``n`` connections that reach the kernel's accept queue while the worker is frozen,
    so they all wait when it next turns."""
    pid = srv.wait_ready()["workers"][0]
    os.kill(pid, signal.SIGSTOP)
    try:
        clients = [connect(srv.port) for _ in range(n)]
    finally:
        os.kill(pid, signal.SIGCONT)
    return clients


@pytest.mark.parametrize(("batch", "loop"), [(64, "uvloop"), (64, "asyncio"), (0, "uvloop")])
def test_a_burst_of_connections_is_accepted_in_few_turns(serve: Any, batch: int,
                                                         loop: str) -> None:
    n = 300
    srv = serve("--workers", "1", "--accept-batch", str(batch), "--backlog", "1024",
                "--loop", loop)
    clients = _burst_while_stopped(srv, n)
    try:
        assert all(echo_ok(s) for s in clients)  # every one served, none refused
        st = srv.wait_stats(lambda st: st["worker_stats"][0].get("accepted", 0) == n)
        turns = st["worker_stats"][0]["accept_turns"]
        if batch:
            assert 1 <= turns <= n // batch + 3, turns
        else:
            assert turns == 0  # uvloop's server: not counted, one accept a turn
    finally:
        for s in clients:
            s.close()


def test_drain_stops_the_batch_accepting_listener(serve: Any) -> None:
    """After SIGTERM a new connect is no longer accepted by the draining worker."""
    srv = serve("--workers", "1", "--drain-s", "3")
    s = connect(srv.port)
    assert echo_ok(s)
    srv.proc.send_signal(signal.SIGTERM)
    srv.wait_stats(lambda st: st.get("draining"), timeout=10)
    time.sleep(0.3)
    late = socket.socket()
    late.settimeout(5)
    try:
        late.connect(("127.0.0.1", srv.port))
        late.sendall(frame(PING, b"late"))
        assert late.recv(16) == b""  # reset or closed, never served
    except ConnectionError:
        pass  # refused or reset: the listener is gone (a timeout, waiting in a queue, fails)
    finally:
        late.close()
        s.close()
