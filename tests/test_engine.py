"""The engine end to end: real `tidegate serve` processes, real sockets on loopback."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import time

import pytest

from tidegate.protocol.heartbeat import DATA, PING, PONG, frame

FAST = ["--ping-interval-s", "1", "--pong-timeout-s", "1", "--handshake-timeout-s", "1",
        "--tick-s", "0.1"]


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return out


def recv_frame(s: socket.socket) -> bytes:
    size = int.from_bytes(recv_exact(s, 4), "big")
    return recv_exact(s, size)


def wait_closed(s: socket.socket, timeout: float = 15.0) -> float:
    """Read (answering nothing) until the server closes; return how long it took."""
    t0 = time.monotonic()
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - t0


def echo_ok(s: socket.socket, body: bytes = b"hi") -> bool:
    try:
        s.sendall(frame(DATA, body))
        while True:
            payload = recv_frame(s)
            if payload[0] == PING:  # answer server heartbeats on the way
                s.sendall(frame(PONG, payload[1:]))
                continue
            return payload == bytes([DATA]) + body
    except OSError:
        return False


def test_echo_and_ping_pong(serve):
    srv = serve("--workers", "2")
    s = connect(srv.port)
    s.sendall(frame(PING, b"token-01") + frame(DATA, b"hello"))
    assert recv_frame(s) == bytes([PONG]) + b"token-01"
    assert recv_frame(s) == bytes([DATA]) + b"hello"
    # Split across many writes: frames are reassembled from partial reads.
    data = frame(DATA, b"x" * 5000)
    for i in range(0, len(data), 7):
        s.sendall(data[i : i + 7])
    assert recv_frame(s) == bytes([DATA]) + b"x" * 5000
    s.close()


def test_silent_client_is_pinged_then_closed(serve):
    srv = serve("--workers", "1", *FAST)
    s = connect(srv.port)
    s.sendall(frame(DATA, b"ready"))
    assert recv_frame(s) == bytes([DATA]) + b"ready"
    ping = recv_frame(s)  # silent for a whole interval: the server pings
    assert ping[0] == PING
    wait_closed(s)  # and never answering it gets us closed
    srv.wait_stats(lambda st: srv.closes().get("ping_timeout") == 1)


def test_first_ping_follows_the_ping_interval_not_the_handshake_timeout(serve):
    # A client that dies right after its handshake must be found within ping + pong timeout,
    # even when the handshake timeout is longer than the ping interval.
    srv = serve("--workers", "1", "--tick-s", "0.1", "--ping-interval-s", "1",
                "--pong-timeout-s", "1", "--handshake-timeout-s", "30")
    s = connect(srv.port)
    s.sendall(frame(DATA, b"ready"))
    assert recv_frame(s) == bytes([DATA]) + b"ready"
    t0 = time.monotonic()
    s.settimeout(20)
    assert recv_frame(s)[0] == PING
    assert time.monotonic() - t0 < 15  # not the 30 s handshake deadline
    wait_closed(s)
    srv.wait_stats(lambda st: srv.closes().get("ping_timeout") == 1)


def test_client_answering_pings_stays_connected(serve):
    srv = serve("--workers", "1", *FAST)
    s = connect(srv.port)
    s.sendall(frame(DATA, b"go"))
    recv_frame(s)
    pings = 0
    deadline = time.monotonic() + 4
    s.settimeout(5)
    while time.monotonic() < deadline:
        payload = recv_frame(s)
        if payload[0] == PING:
            pings += 1
            s.sendall(frame(PONG, payload[1:]))
    assert pings >= 2
    assert echo_ok(s)
    assert "ping_timeout" not in srv.closes()


def test_client_that_sends_nothing_hits_handshake_timeout(serve):
    srv = serve("--workers", "1", *FAST)
    s = connect(srv.port)
    assert wait_closed(s) < 10
    srv.wait_stats(lambda st: srv.closes().get("handshake_timeout") == 1)


def test_half_frame_then_silence_is_closed(serve):
    srv = serve("--workers", "1", *FAST)
    s = connect(srv.port)
    s.sendall(frame(DATA, b"abcdef")[:5])  # header + 1 byte of a 7-byte payload
    wait_closed(s)
    srv.wait_stats(lambda st: srv.closes().get("handshake_timeout") == 1)
    assert echo_ok(connect(srv.port))  # and the server is still serving


def test_oversized_frame_is_refused_from_its_header(serve):
    srv = serve("--workers", "1", "--max-frame-bytes", "1024")
    s = connect(srv.port)
    s.sendall((10_000).to_bytes(4, "big") + b"\x03")  # declares 10 kB; never sends the body
    wait_closed(s)
    srv.wait_stats(lambda st: srv.closes().get("frame_too_large") == 1)
    assert echo_ok(connect(srv.port))


def test_garbage_bytes_close_the_connection_not_the_server(serve):
    srv = serve("--workers", "1")
    s = connect(srv.port)
    s.sendall(os.urandom(4096) + b"\xff\xff\xff\xff")
    wait_closed(s)
    t = connect(srv.port)
    t.sendall(frame(0x7F, b"?"))  # a well-formed frame of an unknown type
    wait_closed(t)
    srv.wait_stats(lambda st: sum(srv.closes().values()) == 2)
    assert set(srv.closes()) <= {"frame_too_large", "unknown_frame_type"}
    assert echo_ok(connect(srv.port))


def test_connections_past_capacity_are_refused_and_counted(serve):
    srv = serve("--workers", "1", "--max-connections-per-worker", "50")
    held = [connect(srv.port) for _ in range(50)]
    for s in held:
        assert echo_ok(s)
    extra = [connect(srv.port) for _ in range(30)]
    for s in extra:  # accepted by the kernel, then closed by the worker without a byte
        assert wait_closed(s) < 10
    srv.wait_stats(lambda st: srv.total("refused") == 30 and srv.total("active") == 50)
    assert all(echo_ok(s) for s in held[:5])
    held[0].close()
    srv.wait_stats(lambda st: srv.total("active") == 49)
    assert echo_ok(connect(srv.port))  # room again


def test_sigkilled_worker_is_restarted_and_others_untouched(serve):
    srv = serve("--workers", "2", "--balance", "handoff")
    conns = [connect(srv.port) for _ in range(20)]
    assert all(echo_ok(s) for s in conns)
    st = srv.wait_stats(lambda st: srv.total("active") == 20)
    victim = st["worker_stats"][0]
    survivors_expected = 20 - victim["active"]
    os.kill(victim["pid"], signal.SIGKILL)
    new = srv.wait_stats(lambda st: st["restarts"] == 1 and st["ready"])
    assert victim["pid"] not in new["workers"]
    alive = sum(echo_ok(s) for s in conns)
    assert alive == survivors_expected
    assert "worker died; restarting" in srv.log() and "SIGKILL" in srv.log()
    assert all(echo_ok(connect(srv.port)) for _ in range(4))


def test_handoff_balances_evenly(serve):
    srv = serve("--workers", "3", "--balance", "handoff")
    conns = [connect(srv.port) for _ in range(90)]
    assert all(echo_ok(s) for s in conns)
    st = srv.wait_stats(lambda st: srv.total("active") == 90)
    per_worker = [w["active"] for w in st["worker_stats"]]
    assert max(per_worker) - min(per_worker) <= 2, per_worker
    assert srv.total("handoff_received") == 90


def test_reuseport_workers_share_the_port(serve):
    srv = serve("--workers", "2", "--balance", "reuseport")
    conns = [connect(srv.port) for _ in range(200)]
    assert all(echo_ok(s) for s in conns)
    st = srv.wait_stats(lambda st: srv.total("active") == 200)
    assert all(w["active"] > 0 for w in st["worker_stats"])  # the kernel spread them
    assert srv.total("handoff_received") == 0


def test_client_that_never_reads_is_closed_and_memory_stays_bounded(serve):
    srv = serve("--workers", "1", "--max-write-buffer-bytes", "262144")
    pid = srv.status()["workers"][0]
    s = connect(srv.port)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    chunk = frame(DATA, b"z" * 60_000) * 16  # ~1 MB of echoes per send; we never read
    sent = 0
    s.settimeout(0.5)
    try:
        for _ in range(200):
            s.sendall(chunk)
            sent += len(chunk)
    except (TimeoutError, ConnectionError):
        pass
    srv.wait_stats(lambda st: srv.closes().get("slow_consumer") == 1)
    rss_kb = int(next(line.split()[1] for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS")))
    assert rss_kb < 200_000, f"worker RSS {rss_kb} kB after a slow consumer"
    assert echo_ok(connect(srv.port))


def test_client_that_never_reads_is_closed_at_the_message_cap(serve):
    # Bytes alone would allow ~100 MB of queue here: the message cap closes it first.
    srv = serve("--workers", "1", "--max-write-buffer-bytes", "100000000",
                "--max-write-buffer-messages", "2")
    s = connect(srv.port)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    chunk = frame(DATA, b"z" * 60_000) * 16  # ~1 MB of echoes per send; we never read
    s.settimeout(0.5)
    try:
        for _ in range(200):
            s.sendall(chunk)
    except (TimeoutError, ConnectionError):
        pass
    srv.wait_stats(lambda st: srv.closes().get("slow_consumer") == 1)
    assert echo_ok(connect(srv.port))


def test_keepalive_is_set_on_accepted_sockets(serve):
    srv = serve("--workers", "1", "--tcp-keepalive-idle-s", "77")
    s = connect(srv.port)
    assert echo_ok(s)
    out = subprocess.run(["ss", "-tnoH", "state", "established", f"( sport = :{srv.port} )"],
                         capture_output=True, text=True, check=True).stdout
    assert "keepalive" in out, out  # the kernel's keepalive timer runs on the server side


def _keepalive_timer_s(port: int) -> float:
    """The server-side keepalive timer of the one connection to ``port``, from ``ss -o``."""
    out = subprocess.run(["ss", "-tnoH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"timer:\(keepalive,(?:(\d+)min)?(?:([\d.]+)sec)?(?:([\d.]+)ms)?", out)
    assert m, out
    minutes, secs, ms = (float(g) if g else 0.0 for g in m.groups())
    return minutes * 60 + secs + ms / 1000


def test_keepalive_never_probes_inside_a_long_heartbeat(serve):
    """With a 300 s heartbeat, the kernel's first probe comes only after the heartbeat's window
    (300 + 10 s, plus ticks): a client answering heartbeats is never probed (probes come in
    bursts the input backlog can drop, aborting live connections)."""
    srv = serve("--workers", "1", "--ping-interval-s", "300", "--pong-timeout-s", "10")
    s = connect(srv.port)
    assert echo_ok(s)
    assert _keepalive_timer_s(srv.port) > 310


def test_keepalive_as_configured_when_the_heartbeat_is_shorter(serve):
    srv = serve("--workers", "1", "--tcp-keepalive-idle-s", "77")
    s = connect(srv.port)
    assert echo_ok(s)
    assert 60 < _keepalive_timer_s(srv.port) <= 77


def test_user_timeout_never_cuts_the_keepalive_probes_short():
    from tidegate.engine.netopt import keepalive_for
    from tidegate.engine.options import EngineOptions

    default = keepalive_for(EngineOptions())
    assert (default.idle_s, default.user_timeout_ms, default.raised) == (60, 120_000, False)
    long = keepalive_for(EngineOptions(ping_interval_s=300, pong_timeout_s=10))
    assert long.raised and long.idle_s >= 311
    assert long.user_timeout_ms >= (long.idle_s + long.interval_s * long.count) * 1000
    off = keepalive_for(EngineOptions(tcp_user_timeout_ms=0))
    assert off.user_timeout_ms == 0  # not set stays not set


def test_sigterm_stops_everything_cleanly(serve):
    srv = serve("--workers", "2")
    s = connect(srv.port)
    assert echo_ok(s)
    pids = srv.status()["workers"]
    assert srv.stop() == 0
    assert wait_closed(s) < 15
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_sigterm_drains_connections_over_the_window(serve):
    srv = serve("--workers", "1", "--drain-s", "2", "--tick-s", "0.1")
    conns = [connect(srv.port) for _ in range(40)]
    assert all(echo_ok(s) for s in conns)
    srv.proc.send_signal(signal.SIGTERM)
    closed_at: dict[socket.socket, float] = {}
    deadline = time.monotonic() + 30
    while len(closed_at) < len(conns) and time.monotonic() < deadline:
        readable, _, _ = select.select([s for s in conns if s not in closed_at], [], [], 1)
        for s in readable:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                closed_at[s] = time.monotonic()
        if len(closed_at) < len(conns) and closed_at:
            assert not srv.status().get("ready")  # not ready while draining
    assert len(closed_at) == len(conns)
    span = max(closed_at.values()) - min(closed_at.values())
    assert span > 0.5, closed_at  # spread over the window, not all at once
    assert srv.proc.wait(30) == 0
    assert "draining" in srv.log()


def test_per_ip_limit_and_accept_rate_refuse_cleanly(serve):
    srv = serve("--workers", "1", "--max-connections-per-ip", "3")
    ok = [connect(srv.port) for _ in range(3)]
    assert all(echo_ok(s) for s in ok)
    extra = connect(srv.port)
    assert wait_closed(extra) < 10
    srv.wait_stats(lambda st: st["worker_stats"][0].get("refusals", {}).get("per_ip_limit") == 1)
    other = socket.create_connection(("127.0.0.1", srv.port), source_address=("127.0.0.2", 0))
    assert echo_ok(other)  # another address has its own allowance
    ok[0].close()
    srv.wait_stats(lambda st: srv.total("active") == 3)
    assert echo_ok(connect(srv.port))

    limited = serve("--workers", "1", "--accept-rate-per-s", "5")
    burst = [connect(limited.port) for _ in range(30)]
    served = sum(echo_ok(s) for s in burst)
    assert 1 <= served < 30
    limited.wait_stats(lambda st: st["worker_stats"][0].get("refusals", {}).get("rate_limit", 0) >= 1)


def test_a_stalled_worker_does_not_time_out_clients_that_answered(serve):
    """After a stall (here: SIGSTOP), the wheel catches up one tick per loop iteration, so
    pongs waiting unread in the sockets count before any ping deadline is judged."""
    srv = serve("--workers", "1", *FAST)
    pid = srv.status()["workers"][0]
    conns = [connect(srv.port) for _ in range(20)]
    for s in conns:
        assert echo_ok(s)

    def answer_pings(duration: float) -> None:
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline:
            readable, _, _ = select.select(conns, [], [], 0.05)
            for s in readable:
                payload = recv_frame(s)
                if payload[0] == PING:
                    s.sendall(frame(PONG, payload[1:]))

    answer_pings(1.5)  # the server has pinged: every client is silent-but-answering
    os.kill(pid, signal.SIGSTOP)
    time.sleep(4)  # several ping intervals and pong timeouts pass while it is frozen
    os.kill(pid, signal.SIGCONT)
    answer_pings(3)
    srv.wait_stats(lambda st: st["worker_stats"][0]["active"] == 20)
    assert "ping_timeout" not in srv.closes()
    assert all(echo_ok(s) for s in conns)


def test_supervisor_runs_at_a_higher_priority_than_its_workers(serve):
    # Under CPU overload the control plane (/metrics, restarts) must still get its turn.
    srv = serve("--workers", "2")
    st = srv.status()

    def nice(pid: int) -> int:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[16])

    assert all(nice(pid) == os.getpriority(os.PRIO_PROCESS, 0) for pid in st["workers"])
    assert nice(st["pid"]) == os.getpriority(os.PRIO_PROCESS, 0) - 5
