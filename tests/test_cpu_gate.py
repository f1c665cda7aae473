"""The node's CPU gate (engine/cpu_gate.py): at most ``long_job_workers`` workers run long
run-queue jobs at once; short jobs never wait; a dead holder's token comes back."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import free_port
from test_engine import connect, recv_frame
from tidegate.engine import cpu_gate
from tidegate.engine.cpu_gate import GateArbiter, GateClient, gate_tokens
from tidegate.engine.runqueue import LONG_AFTER_STEPS, RunQueue
from tidegate.protocol.heartbeat import DATA, frame

pytestmark = pytest.mark.timeout(60)


# ---- the arbiter and the sizing -------------------------------------------------------------
def test_tokens_are_granted_first_come_first_served_and_come_back() -> None:
    a = GateArbiter(2)
    assert a.on_message(0, cpu_gate.ASK) == [0]
    assert a.on_message(1, cpu_gate.ASK) == [1]
    assert a.on_message(2, cpu_gate.ASK) == []  # both tokens out: 2 waits, then 3
    assert a.on_message(3, cpu_gate.ASK) == []
    assert a.on_message(2, cpu_gate.ASK) == []  # asking twice keeps one place in the line
    assert a.on_message(1, cpu_gate.GIVE_BACK) == [2]
    assert a.on_message(0, cpu_gate.GIVE_BACK) == [3]
    assert a.stats()["held"] == 2 and a.stats()["waiting"] == 0 and a.stats()["grants"] == 4


def test_a_holder_that_asks_again_gets_its_token_back_not_a_second_one() -> None:
    """Its give-back never came (its channel was full): it must not wait for ever."""
    a = GateArbiter(1)
    assert a.on_message(0, cpu_gate.ASK) == [0]
    a.on_message(1, cpu_gate.ASK)
    assert a.on_message(0, cpu_gate.ASK) == [0]
    assert a.holders == {0} and list(a.queue) == [1]


def test_a_grant_nobody_asked_for_goes_straight_back() -> None:
    sent: list[bytes] = []
    c = GateClient(lambda body: sent.append(body) is None)
    c.on_message(cpu_gate.GRANT)
    assert sent == [cpu_gate.GIVE_BACK] and not c.held
    c.ask()
    c.on_message(cpu_gate.GRANT)
    assert c.held and c.grants == 1 and sent == [cpu_gate.GIVE_BACK, cpu_gate.ASK]


def test_a_dead_holders_token_goes_to_the_next_in_line() -> None:
    a = GateArbiter(1)
    assert a.on_message(0, cpu_gate.ASK) == [0]
    a.on_message(1, cpu_gate.ASK)
    a.on_message(2, cpu_gate.ASK)
    assert a.forget(2) == []  # a waiter that dies leaves the line
    assert a.forget(0) == [1]  # the holder dies: its token goes on
    assert a.stats()["reclaimed"] == 1 and a.holders == {1} and not a.queue


def test_gate_sizing() -> None:
    cores = cpu_gate.cores()
    assert gate_tokens(0, 27) == (cores if cores < 27 else 0)  # one per core
    assert gate_tokens(3, 27) == 3
    assert gate_tokens(-1, 27) == 0  # off
    assert gate_tokens(4, 4) == 0  # as many as the workers: no gate
    assert gate_tokens(0, 1) == 0


# ---- run queues sharing one arbiter, in one loop ------------------------------------------------
class Node:
    """N run queues wired to one arbiter, the grants delivered on a later loop turn (as the
    supervisor's message would be)."""

    def __init__(self, n: int, tokens: int, slice_ms: float = 2.0) -> None:
        self.arbiter = GateArbiter(tokens)
        self.queues = [RunQueue(slice_ms=slice_ms, check_every=1) for _ in range(n)]
        self.clients = [GateClient(self._sender(i)) for i in range(n)]
        for q, c in zip(self.queues, self.clients, strict=True):
            q.use_gate(c)

    def _sender(self, i: int) -> Any:
        def send(body: bytes) -> bool:
            loop = asyncio.get_running_loop()
            for w in self.arbiter.on_message(i, body):
                loop.call_soon(self.clients[w].on_message, cpu_gate.GRANT)
            return True
        return send


def spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def job(steps: int, step_s: float, log: list[tuple[int, float, float]], who: int,
        q: RunQueue) -> Iterator[None]:
    for i in range(steps):
        t0 = time.monotonic()
        spin(step_s)
        if i >= LONG_AFTER_STEPS:
            assert q.gate is not None and q.gate.held, "a long step ran without a token"
        log.append((who, t0, time.monotonic()))
        yield


def test_one_token_long_jobs_take_turns_and_all_finish() -> None:
    async def main() -> None:
        node = Node(3, tokens=1)
        log: list[tuple[int, float, float]] = []
        steps = LONG_AFTER_STEPS + 150  # ~0.3 s each: past HOLD_S, so the token moves on
        handles = [q.submit(job(steps, 0.002, log, i, q), f"j{i}")
                   for i, q in enumerate(node.queues)]
        await asyncio.wait_for(asyncio.gather(*(h.wait() for h in handles)), 20)
        for i in range(3):
            assert sum(1 for w, _, _ in log if w == i) == steps
        # every worker gave its token back before its job ended, for the others' turns
        assert all(c.gave_back_early >= 1 for c in node.clients)
        assert not any(c.held for c in node.clients) and node.arbiter.stats()["held"] == 0
        assert node.arbiter.stats()["waiting_max"] >= 1

    asyncio.run(main())


def test_short_jobs_run_while_another_queue_holds_the_only_token() -> None:
    async def main() -> None:
        node = Node(2, tokens=1)
        q0, q1 = node.queues
        log: list[tuple[int, float, float]] = []
        long_job = q0.submit(job(LONG_AFTER_STEPS + 400, 0.002, log, 0, q0), "long")
        while not node.clients[0].held:
            await asyncio.sleep(0.001)
        short = q1.submit(job(LONG_AFTER_STEPS - 1, 0.001, log, 1, q1), "short")
        await asyncio.wait_for(short.wait(), 5)
        assert not long_job.done  # the short one did not wait for the long one's token
        assert node.clients[1].grants == 0
        long_job.cancel()
        await asyncio.sleep(0.01)
        assert not node.clients[0].held and q0.depth == 0

    asyncio.run(main())


def test_a_job_cancelled_while_waiting_returns_the_token_it_gets() -> None:
    async def main() -> None:
        node = Node(2, tokens=1)
        q0, q1 = node.queues
        log: list[tuple[int, float, float]] = []
        first = q0.submit(job(10_000, 0.001, log, 0, q0), "holder")
        while not node.clients[0].held:
            await asyncio.sleep(0.001)
        waiting = q1.submit(job(10_000, 0.001, log, 1, q1), "waiter")
        while not node.clients[1].asking:
            await asyncio.sleep(0.001)
        waiting.cancel()
        first.cancel()
        await asyncio.sleep(0.05)
        assert node.arbiter.stats()["held"] == 0 and not any(c.held for c in node.clients)

    asyncio.run(main())


def test_without_the_gate_waiting_long_jobs_run_at_once() -> None:
    """What a draining worker does: its long jobs stop waiting for a token (here one that
    never comes: a gate without tokens)."""

    async def main() -> None:
        node = Node(1, tokens=0)
        q = node.queues[0]
        steps = [0]

        def plain() -> Iterator[None]:
            for _ in range(LONG_AFTER_STEPS + 20):
                steps[0] += 1
                yield

        h = q.submit(plain(), "waiter")
        await asyncio.sleep(0.05)
        assert not h.done and node.clients[0].asking and steps[0] == LONG_AFTER_STEPS
        q.use_gate(None)
        await asyncio.wait_for(h.wait(), 5)
        assert steps[0] == LONG_AFTER_STEPS + 20

    asyncio.run(main())


# ---- a real node -------------------------------------------------------------------------------
TESTS = os.path.dirname(os.path.abspath(__file__))


def _node(serve: Any, *args: str) -> Any:
    return serve("--workers", "2", *args, app="gate_app:GateHandler",
                 env={"PYTHONPATH": TESTS + os.pathsep + os.environ.get("PYTHONPATH", "")})


def _conn_on_each_worker(port: int, workers: int) -> dict[int, socket.socket]:
    by_pid: dict[int, socket.socket] = {}
    spare: list[socket.socket] = []
    for _ in range(200):
        s = connect(port)
        s.sendall(frame(DATA, b"pid"))
        pid = int(recv_frame(s)[1:])
        if pid in by_pid:
            spare.append(s)
        else:
            by_pid[pid] = s
        if len(by_pid) == workers:
            break
    for s in spare:
        s.close()
    assert len(by_pid) == workers, "could not reach every worker"
    return by_pid


def _result(s: socket.socket, timeout: float) -> dict[str, Any]:
    s.settimeout(timeout)
    while True:
        payload = recv_frame(s)
        if payload[:1] == bytes([DATA]) and payload[1:2] == b"{":
            return dict(json.loads(payload[1:]))


def test_two_workers_one_token_never_run_long_steps_at_once(serve: Any) -> None:
    metrics_port = free_port()
    srv = _node(serve, "--long-job-workers", "1", "--metrics-port", str(metrics_port))
    conns = _conn_on_each_worker(srv.port, 2)
    for s in conns.values():
        s.sendall(frame(DATA, b"job 120 3"))  # ~0.36 s each: more than one hold each
    results = [_result(s, 30) for s in conns.values()]
    long_steps = []
    for r in results:
        steps = r["steps"]
        assert len(steps) == 120
        assert all(held for _, _, held in steps[LONG_AFTER_STEPS:])
        long_steps.append([(t0, t1) for t0, t1, _ in steps[LONG_AFTER_STEPS:]])
    a, b = long_steps
    overlaps = [(x, y) for x in a for y in b if x[0] < y[1] and y[0] < x[1]]
    assert not overlaps, f"both workers ran long steps at once: {overlaps[:3]}"
    gate = srv.status()["cpu_gate"]
    assert gate["tokens"] == 1 and gate["grants"] >= 3  # the token changed hands
    # /metrics: each worker's grants and waits (the stats come once a second)
    srv.wait_stats(lambda st: all((w.get("runqueue") or {}).get("gate", {}).get("grants", 0) >= 1
                                  for w in st["worker_stats"]))
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10
                                  ).read().decode()
    grants = [float(line.split()[-1]) for line in text.splitlines()
              if line.startswith("tidegate_cpu_gate_grants_total{")]
    assert len(grants) == 2 and all(g >= 1 for g in grants)
    assert "tidegate_cpu_gate_tokens 1.0" in text


def test_no_gate_when_every_worker_may_run_long_jobs(serve: Any) -> None:
    srv = _node(serve, "--long-job-workers", "-1")
    conns = _conn_on_each_worker(srv.port, 2)
    for s in conns.values():
        s.sendall(frame(DATA, b"job 40 1"))
    for s in conns.values():
        r = _result(s, 30)
        assert len(r["steps"]) == 40 and not any(held for _, _, held in r["steps"])
    assert srv.status()["cpu_gate"] is None


def test_a_worker_killed_holding_the_token_does_not_keep_it(serve: Any) -> None:
    srv = _node(serve, "--long-job-workers", "1")
    conns = _conn_on_each_worker(srv.port, 2)
    (pid_a, a), (pid_b, b) = conns.items()
    a.sendall(frame(DATA, f"job {LONG_AFTER_STEPS + 2} 1 30000".encode()))  # holds 30 s
    a.settimeout(20)
    assert recv_frame(a) == bytes([DATA]) + f"holding {pid_a}".encode()
    b.sendall(frame(DATA, f"job {LONG_AFTER_STEPS + 5} 1".encode()))
    time.sleep(0.3)  # b's job is waiting for the token by now
    os.kill(pid_a, signal.SIGKILL)
    r = _result(b, 15)  # without the token coming back b would wait 30 s
    assert r["pid"] == pid_b and all(held for _, _, held in r["steps"][LONG_AFTER_STEPS:])
    # the token came back once, and b gave it back when its job ended
    srv.wait_stats(lambda st: st["cpu_gate"]["reclaimed"] == 1 and st["cpu_gate"]["held"] == 0)
