"""Loop stalls, leaks and lifecycle traces, seen from outside a running node."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_engine import connect, echo_ok
from test_server_e2e import API_KEY, api

TESTS = str(Path(__file__).parent)


def wait_for(pred, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_blocked_loop_is_reported_with_the_blocking_function(serve):
    srv = serve("--workers", "1", app="diag_app:DiagHandler",
                env={"PYTHONPATH": TESTS + os.pathsep + os.environ.get("PYTHONPATH", "")})
    s = connect(srv.port)
    assert echo_ok(s, b"block")
    wait_for(lambda: "loop stall" in srv.log() and "block_the_loop_for_tests" in srv.log())
    srv.wait_stats(lambda st: st["worker_stats"][0].get("stall", {}).get("stalls_total") == 1)


def test_a_leaked_task_is_reported_with_where_it_was_created(serve):
    srv = serve("--workers", "2", "--leak-task-age-s", "0.5", app="diag_app:DiagHandler",
                env={"PYTHONPATH": TESTS + os.pathsep + os.environ.get("PYTHONPATH", "")})
    s = connect(srv.port)
    assert echo_ok(s, b"leak")
    time.sleep(1.0)
    os.kill(srv.proc.pid, signal.SIGUSR1)  # the supervisor forwards it to every worker
    wait_for(lambda: srv.log().count("leak report") >= 2 and "diag_app.py" in srv.log())
    assert "leaky_task_for_tests" in srv.log()
    assert srv.proc.poll() is None and echo_ok(connect(srv.port))  # SIGUSR1 killed nothing


def test_leaks_endpoint_and_trace_command(gateway, tmp_path):
    srv = gateway("--workers", "2", "--balance", "handoff")
    status, body = api(srv, "debug_leaks", b"{}")
    assert status == 200 and len(body["result"]["workers"]) == 2
    out = tmp_path / "trace.json"
    rec = subprocess.Popen([sys.executable, "-m", "tidegate", "trace", "--url",
                            f"http://127.0.0.1:{srv.port}", "--api-key", API_KEY,
                            "--seconds", "3", "--out", str(out)],
                           stdout=subprocess.PIPE, text=True)
    time.sleep(1)
    for _ in range(6):
        connect(srv.port).close()
    assert rec.wait(30) == 0, rec.stdout.read() if rec.stdout else ""
    doc = json.loads(out.read_text())
    events = [e for e in doc["traceEvents"] if e["ph"] != "M"]
    accepts = [e for e in events if e["name"] == "accept"]
    closes = [e for e in events if e["name"] == "close"]
    assert len(accepts) >= 6 and len(closes) >= 6
    assert {e["pid"] for e in accepts} == {0, 1}  # both workers, one process track each
    names = {e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "process_name"}
    assert names == {"worker 0", "worker 1"}
    assert all(isinstance(e["ts"], int) and e["ts"] >= 0 for e in events)
