"""The README's echo example runs as documented."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, free_port


def test_echo_example(tmp_path: Path) -> None:
    port, status = free_port(), tmp_path / "st.json"
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "echo_server.py"),
                             "--port", str(port), "--status-file", str(status)],
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (status.exists() and json.loads(status.read_text() or "{}").get("ready")):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            f = s.makefile("rb")
            assert f.readline() == b"welcome\n"
            s.sendall(b"hello\r\nworld\n")
            assert f.readline() == b"HELLO\n"
            assert f.readline() == b"WORLD\n"
            s.sendall(b"quit\n")
            assert f.readline() == b""
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
