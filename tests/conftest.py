"""Shared fixtures: real `tidegate serve` processes on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A `python -m tidegate serve` process; stopped (SIGTERM, then SIGKILL) by the fixture."""

    def __init__(self, tmp: Path, *args: str, app: str = "echo", env: dict[str, str] | None = None):
        self.port = free_port()
        self.tcp_port = free_port()
        if app == "gateway":
            if "--config" not in args:
                args = ("--config", str(ROOT / "config" / "example.toml"), *args)
            self.metrics_port = free_port()
            args = ("--tcp-port", str(self.tcp_port), "--metrics-port", str(self.metrics_port), *args)
        self.status_path = tmp / f"status-{self.port}.json"
        self.log_path = tmp / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", "tidegate", "serve", "--app", app, "--port", str(self.port),
               "--status-file", str(self.status_path), *args]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "TIDEGATE_LOG_FORMAT": "text", **(env or {})})
        self.wait_ready()

    def status(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.status_path.read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log()}")
            st = self.status()
            if st.get("ready"):
                return st
            time.sleep(0.05)
        raise TimeoutError(f"server not ready:\n{self.log()}")

    def wait_stats(self, pred: Any, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until ``pred(status)`` holds (workers report stats every second)."""
        deadline = time.monotonic() + timeout
        st: dict[str, Any] = {}
        while time.monotonic() < deadline:
            st = self.status()
            if st and pred(st):
                return st
            time.sleep(0.1)
        raise AssertionError(f"condition not met; last status: {st}")

    def total(self, key: str) -> int:
        return sum(int(w.get(key, 0)) for w in self.status().get("worker_stats", []) if w)

    def closes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for w in self.status().get("worker_stats", []):
            for k, v in (w or {}).get("closes", {}).items():
                out[k] = out.get(k, 0) + v
        return out

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return int(self.proc.returncode)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    started: list[Server] = []

    def start(*args: str, **kw: Any) -> Server:
        srv = Server(tmp_path, *args, **kw)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture
def gateway(serve: Any) -> Any:
    """Start the gateway (config/example.toml) on free ports: ``gateway("--workers", "2")``."""

    def start(*args: str, **kw: Any) -> Server:
        return serve(*args, app="gateway", **kw)  # type: ignore[no-any-return]

    return start
