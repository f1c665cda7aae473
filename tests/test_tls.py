"""TLS on the engine's listeners, and certificate reload on SIGHUP without dropping connections."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

from test_engine import echo_ok


def make_cert(tmp: Path, name: str) -> tuple[Path, Path]:
    cert, key = tmp / f"{name}.pem", tmp / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def tls_connect(port: int) -> tuple[ssl.SSLSocket, str]:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    s = ctx.wrap_socket(raw)
    der = s.getpeercert(binary_form=True)
    assert der is not None
    pem = ssl.DER_cert_to_PEM_cert(der)
    return s, pem


def test_tls_echo_and_reload_on_sighup(serve, tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "first")
    live_cert, live_key = tmp_path / "live.pem", tmp_path / "live.key"
    live_cert.write_bytes(cert.read_bytes())
    live_key.write_bytes(key.read_bytes())
    srv = serve("--workers", "2", "--tls-cert-file", str(live_cert), "--tls-key-file", str(live_key))

    old, pem = tls_connect(srv.port)
    assert pem.strip() == cert.read_text().strip()
    assert echo_ok(old)

    cert2, key2 = make_cert(tmp_path, "second")
    live_cert.write_bytes(cert2.read_bytes())
    live_key.write_bytes(key2.read_bytes())
    os.kill(srv.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 15
    while srv.log().count("tls certificate reloaded") < 2:
        assert time.monotonic() < deadline, srv.log()
        time.sleep(0.05)

    new, pem2 = tls_connect(srv.port)
    assert pem2.strip() == cert2.read_text().strip()
    assert echo_ok(new)
    assert echo_ok(old)  # the connection made before the reload is untouched
