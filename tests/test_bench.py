"""`tidegate bench`: histogram and sizing units, the client's heartbeat bookkeeping, and real runs
against real `tidegate serve` processes on loopback.

No assertion here depends on how fast the machine is: only counts and the presence of figures.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tidegate.bench import procstat
from tidegate.bench.client import (
    CLOSED,
    OPEN,
    PENDING,
    PingWheel,
    RawConnection,
    RawDriver,
    Stats,
    WheelClock,
)
from tidegate.bench.histogram import Histogram, bucket_bounds, bucket_index
from tidegate.bench.runner import BenchError, parse_target, plan_clients
from tidegate.protocol.heartbeat import DATA, PING, PONG, frame

REQUIRED_KEYS = (
    "connections_target", "connections_established", "connections_held", "connect_seconds",
    "connect_rate_per_s", "hold_seconds", "unexpected_closes", "errors_total", "server_workers",
    "server_rss_bytes_before", "server_rss_bytes_held", "server_pss_bytes_held",
    "server_marginal_bytes_per_connection", "kernel_slab_bytes_delta", "heartbeat_rtt_ms_p50",
    "heartbeat_rtt_ms_p99", "heartbeat_missed", "server_cpu_seconds",
)

# ------------------------------------------------------------------------------ histogram


def test_histogram_small_values_are_exact() -> None:
    h = Histogram()
    h.record_many(range(1, 101))  # 1..100
    assert h.count == 100
    assert h.percentile(50) == 50
    assert h.percentile(99) == 99
    assert h.percentile(100) == 100
    assert h.percentile(0) == 1
    assert h.percentile(1) == 1
    assert h.mean() == pytest.approx(50.5)
    assert (h.min, h.max) == (1, 100)


def test_histogram_empty_has_no_percentiles() -> None:
    h = Histogram()
    assert h.percentile(50) is None
    assert h.mean() is None
    assert h.summary()["p99"] is None
    with pytest.raises(ValueError):
        h.percentile(101)


def test_histogram_percentile_picks_the_right_rank() -> None:
    h = Histogram()
    h.record_many([10] * 98 + [1_000_000, 2_000_000])
    assert h.percentile(50) == 10
    assert h.percentile(98) == 10
    assert h.percentile(99) == pytest.approx(1_000_000, rel=1 / 64)
    assert h.percentile(100) == 2_000_000  # clamped to the exact maximum


def test_histogram_large_values_within_relative_error() -> None:
    values = [int(1.37**k) + 200 for k in range(60)]
    for v in values:
        h = Histogram()
        h.record(v)
        h.record(v * 3)  # so that the median is not clamped to an exact extreme
        h.record(v * 3 + 1)
        assert h.percentile(1) == pytest.approx(v, rel=1 / 64)
        assert h.percentile(50) == pytest.approx(v * 3, rel=1 / 64)


@given(st.integers(min_value=0, max_value=2**62))
def test_bucket_bounds_contain_their_values(value: int) -> None:
    low, high = bucket_bounds(bucket_index(value))
    assert low <= value <= high
    assert high - low <= max(0, value) / 64


@given(st.lists(st.integers(min_value=0, max_value=10**9), min_size=1, max_size=300),
       st.floats(min_value=0, max_value=100))
def test_histogram_percentile_close_to_exact(values: list[int], q: float) -> None:
    h = Histogram()
    h.record_many(values)
    ordered = sorted(values)
    rank = max(1, math.ceil(len(values) * q / 100.0))
    exact = ordered[rank - 1]
    got = h.percentile(q)
    assert got is not None
    assert got == pytest.approx(exact, rel=1 / 64, abs=0.5)


def test_histogram_merge_and_round_trip() -> None:
    a, b = Histogram(), Histogram()
    a.record_many([1, 2, 3, 5000])
    b.record_many([7, 9, 123_456])
    merged = Histogram.from_dict(json.loads(json.dumps(a.to_dict())))
    merged.merge(Histogram.from_dict(json.loads(json.dumps(b.to_dict()))))
    whole = Histogram()
    whole.record_many([1, 2, 3, 5000, 7, 9, 123_456])
    assert merged.to_dict() == whole.to_dict()
    assert merged.percentile(50) == whole.percentile(50) == 7
    assert merged.min == 1 and merged.max == 123_456


def test_histogram_negative_values_count_as_zero() -> None:
    h = Histogram()
    h.record(-5)
    assert h.percentile(50) == 0 and h.min == 0


# ------------------------------------------------------------------------------ sizing


def test_plan_500k_on_a_20000_fd_limit() -> None:
    plans = plan_clients(500_000, 20_000, cores=2)
    assert sum(p.connections for p in plans) == 500_000
    assert len(plans) == 27  # 19,000 fds each at most, with a reserve
    assert max(p.connections for p in plans) <= 20_000 - 1000
    sources = [s for p in plans for s in p.sources]
    # At most a quarter of the 28,232 ephemeral ports per source address: 3 per process.
    assert all(len(p.sources) == 3 for p in plans)
    assert len(sources) == len(set(sources)) == 81
    assert sources[0] == "127.0.0.2" and sources[-1] == "127.0.0.82"


def test_plan_small_runs_use_the_cores() -> None:
    assert len(plan_clients(2000, 20_000, cores=2)) == 1
    assert len(plan_clients(10_000, 20_000, cores=2)) == 2
    assert len(plan_clients(10, 20_000, clients=3, cores=2)) == 3


def test_plan_refuses_too_few_clients() -> None:
    with pytest.raises(BenchError):
        plan_clients(100_000, 20_000, clients=2)


def test_plan_gives_more_sources_than_ports_allow() -> None:
    plans = plan_clients(100_000, 1_000_000, clients=1, port_range=(32768, 60999))
    assert len(plans) == 1
    assert len(plans[0].sources) == 15  # 7,058 connections per source address at most
    plans = plan_clients(300_000, 1_000_000, clients=1, port_range=(1024, 65535))
    # .0 and .255 are skipped
    assert all(not s.endswith((".0", ".255")) for s in plans[0].sources)


def test_target_must_be_loopback() -> None:
    assert parse_target("127.0.0.1:8000") == ("127.0.0.1", 8000)
    assert parse_target("localhost:9") == ("127.0.0.1", 9)
    for bad in ("10.1.2.3:80", "8.8.8.8:53", "127.0.0.1", "127.0.0.1:99999"):
        with pytest.raises(BenchError):
            parse_target(bad)


# ------------------------------------------------------------------------------ client pieces


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> None:
        return None


def _raw_connection(stats: Stats) -> tuple[RawConnection, FakeTransport]:
    RawConnection.stats = stats
    conn = RawConnection()
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    assert conn.state == PENDING
    # The hello (a first ping) goes out as soon as the connection is made.
    assert len(transport.written) == 1 and transport.written[0][4] == PING and conn.hello
    transport.written.clear()
    conn.hello = 0
    conn.state = OPEN  # what the client process does once the connect is done
    stats.open += 1
    return conn, transport


def test_raw_connection_answers_server_pings_across_split_reads() -> None:
    stats = Stats()
    conn, transport = _raw_connection(stats)
    data = frame(PING, b"tok") + frame(DATA, b"x") + frame(PING, b"2")
    for i in range(len(data)):  # one byte at a time
        conn.data_received(data[i : i + 1])
    assert transport.written == [frame(PONG, b"tok"), frame(PONG, b"2")]
    assert stats.server_pings == 2 and stats.data_frames == 1
    assert stats.rtt_connect_phase_us.count == stats.rtt_hold_us.count == 0  # not RTT samples


def test_raw_connection_measures_rtt_from_its_own_pong() -> None:
    stats = Stats()
    conn, transport = _raw_connection(stats)
    token = time.monotonic_ns()
    assert conn.ping(token)
    stats.outstanding += 1
    assert transport.written == [frame(PING, token.to_bytes(8, "big"))]
    conn.data_received(frame(PONG, (token - 1).to_bytes(8, "big")))  # not ours
    assert stats.late_pongs == 1 and conn.ping_sent == token
    conn.data_received(frame(PONG, token.to_bytes(8, "big")))
    assert stats.pongs == 1 and stats.rtt_connect_phase_us.count == 1 and stats.outstanding == 0
    # Pings sent once the hold began are the hold phase's samples.
    stats.hold_since_ns = time.monotonic_ns()
    token = time.monotonic_ns()
    assert conn.ping(token)
    conn.data_received(frame(PONG, token.to_bytes(8, "big")))
    assert stats.rtt_hold_us.count == 1 and stats.rtt_connect_phase_us.count == 1
    assert conn.ping_sent == 0


def test_raw_connection_close_kinds() -> None:
    stats = Stats()
    conn, _ = _raw_connection(stats)
    conn.connection_lost(None)  # the server closed it: unexpected
    assert stats.unexpected_closes == 1 and stats.unexpected_close_reasons == {"eof": 1}
    conn2, transport2 = _raw_connection(stats)
    conn2.close()
    assert transport2.closed
    conn2.connection_lost(ConnectionResetError())
    assert stats.unexpected_closes == 1 and stats.open == 0 and conn2.state == CLOSED
    # Lost before the connect was done: the connect's failure, not a close.
    RawConnection.stats = stats
    conn3 = RawConnection()
    conn3.connection_made(FakeTransport())  # type: ignore[arg-type]
    conn3.connection_lost(ConnectionRefusedError())
    assert stats.unexpected_closes == 1 and stats.open == 0 and conn3.state == CLOSED


def test_raw_connection_first_pong_confirms_the_connect() -> None:
    loop = asyncio.new_event_loop()
    try:
        stats = Stats()
        RawConnection.stats = stats
        conn = RawConnection()
        conn.connection_made(FakeTransport())  # type: ignore[arg-type]
        conn.hello = 12345
        conn.waiter = loop.create_future()
        waiter = conn.waiter
        conn.data_received(frame(PONG, (12345).to_bytes(8, "big")))
        assert waiter.done() and waiter.result() is None and conn.waiter is None
        assert stats.confirmed == 1 and conn.hello == 0 and stats.hello_rtt_us.count == 1
        assert stats.pongs == 0 and stats.late_pongs == 0  # not a heartbeat sample
        # Closed by the server before answering: the connect fails, nothing counted as a close.
        conn2 = RawConnection()
        conn2.connection_made(FakeTransport())  # type: ignore[arg-type]
        conn2.hello = 777
        conn2.waiter = loop.create_future()
        waiter2 = conn2.waiter
        conn2.connection_lost(None)
        assert isinstance(waiter2.exception(), ConnectionResetError)
        assert stats.unexpected_closes == 0 and stats.open == 0 and stats.confirmed == 1
    finally:
        loop.close()


class WheelConn:
    __slots__ = ("ping_sent", "state", "pings")

    def __init__(self) -> None:
        self.ping_sent = 0
        self.state = OPEN
        self.pings = 0

    def ping(self, token_ns: int) -> bool:
        self.ping_sent = token_ns
        self.pings += 1
        return True

    def close(self) -> None:
        self.state = CLOSED


def test_ping_wheel_spreads_and_counts_missed() -> None:
    loop = asyncio.new_event_loop()
    try:
        stats = Stats()
        wheel = PingWheel(loop, stats, interval_s=1.0, pong_timeout_s=0.3, tick_s=0.1)
        assert wheel.clock.nbuckets == 10 and wheel.clock.lag == 4
        conns = [WheelConn() for _ in range(100)]
        for c in conns:
            wheel.add(c)
        assert [len(b) for b in wheel.buckets] == [10] * 10  # spread evenly
        now = 10**12
        wheel._ping_bucket(0, now)
        assert stats.pings_sent == 10 and stats.outstanding == 10
        # Half answer in time.
        for c in wheel.buckets[0][:5]:
            c.ping_sent = 0
            stats.outstanding -= 1
        wheel._expire_bucket(0, now + 100_000_000)  # 0.1 s later: not timed out yet
        assert stats.missed == 0
        wheel._expire_bucket(0, now + 400_000_000)  # 0.4 s later: past the 0.3 s timeout
        assert stats.missed == 5 and stats.outstanding == 0
        # A ping unanswered when its next turn comes is missed too (timeout beyond interval).
        wheel2 = PingWheel(loop, Stats(), interval_s=1.0, pong_timeout_s=5.0, tick_s=0.1)
        assert wheel2.clock.lag == 0
        c = WheelConn()
        wheel2.add(c)
        wheel2._ping_bucket(0, now)
        wheel2._ping_bucket(0, now + 10**9)
        assert wheel2.stats.missed == 1 and c.pings == 2
        # Closed connections are skipped and dropped from their bucket.
        conns[0].state = CLOSED
        wheel._ping_bucket(0, now + 10**9)
        assert len(wheel.buckets[0]) == 9
        assert wheel.expire_all() == 9 and stats.outstanding == 0
    finally:
        loop.close()


def test_wheel_clock_keeps_to_its_schedule_and_catches_up() -> None:
    clock = WheelClock(interval_s=1.0, pong_timeout_s=0.3, tick_s=0.1)
    clock.start(1_000_000_000, phase=0.5)  # half a tick later than the start
    assert clock.next_ns == 1_050_000_000
    assert clock.due_slots(1_049_000_000) == []
    assert clock.due_slots(1_050_000_000) == [0] and clock.next_ns == 1_150_000_000
    # Late by three ticks: the missed turns run now, in order, and the schedule stays put.
    assert clock.due_slots(1_460_000_000) == [1, 2, 3, 4] and clock.next_ns == 1_550_000_000
    assert clock.due_slots(2_060_000_000) == [5, 6, 7, 8, 9, 0]


def test_raw_driver_is_registered() -> None:
    from tidegate.bench.client import PROTOCOLS

    assert PROTOCOLS["raw"] is RawDriver


# ------------------------------------------------------------------------------ real runs


def _bench(tmp_path: Path, *args: str, timeout: float = 280) -> tuple[int, dict[str, Any], str]:
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tidegate", "bench", "--json", str(report),
         "--logs-dir", str(tmp_path / "logs"), *args],
        capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "TIDEGATE_LOG_FORMAT": "text"},
    )
    data = json.loads(report.read_text()) if report.exists() else {}
    return proc.returncode, data, proc.stdout + proc.stderr


def _assert_clean_counts(r: dict[str, Any], n: int) -> None:
    for key in REQUIRED_KEYS:
        assert key in r, key
    assert r["connections_target"] == n
    assert r["connections_established"] == n
    assert r["connections_held"] == n
    assert r["unexpected_closes"] == 0
    assert r["errors_total"] == 0 and r["errors"] == {}
    assert r["heartbeat_missed"] == 0
    assert r["heartbeat_rtt_ms_p50"] > 0
    assert r["heartbeat_rtt_ms_p99"] >= r["heartbeat_rtt_ms_p50"]
    assert r["heartbeat_rtt_ms"]["count"] > 0  # the hold phase's samples
    assert r["heartbeat_rtt_ms_all_phases"]["count"] == r["heartbeat_pongs_received"]
    assert (r["heartbeat_rtt_ms"]["count"] + r["heartbeat_rtt_ms_connect_phase"]["count"]
            == r["heartbeat_pongs_received"])
    assert r["connect_seconds"] > 0 and r["connect_rate_per_s"] > 0
    assert r["hold_seconds"] >= 0
    assert sum(r["connect_rate_timeline_per_s"]) == n
    assert isinstance(r["heartbeat_rtt_ms_max_timeline_hold"], list)
    assert r["kernel_slab_bytes_delta"] is not None
    assert r["completed"] is True and r["ok"] is True and r["failures"] == []
    assert r["kernel_tcp_counters_connect_phase"] is not None
    if r["hello"]:
        assert r["hello_sent"] == r["connections_confirmed"] == n and r["hellos_unanswered"] == 0
    else:
        assert r["hello_sent"] == r["connections_confirmed"] == 0


def test_bench_run_against_its_own_server(tmp_path: Path) -> None:
    n = 2000
    code, r, output = _bench(tmp_path, "--connections", str(n), "--clients", "2", "--hold", "3",
                             "--ping-interval", "1", "--no-progress")
    assert code == 0, output
    _assert_clean_counts(r, n)
    assert r["server_started_by_bench"] is True
    assert r["client_loop"] == "epoll"  # raw's default
    assert r["client_processes"] == 2
    assert r["client_nice"] == 0 and r["client_nice_observed"] == [os.nice(0)]
    # SCHED_BATCH by default: a client woken by a worker's write does not preempt it
    assert r["client_sched"] == "batch" and r["client_sched_observed"] == ["batch"]
    assert r["max_inflight_per_client"] == 500  # 2,160 over 2 clients, capped at 500 each
    # one scheduling group for the whole load generator: the bench's own session
    assert r["clients_in_bench_session"] is True and r["client_session_count"] == 1
    assert r["source_addresses"] == ["127.0.0.2", "127.0.0.3"]
    assert r["server_workers"] >= 1 and len(r["server_worker_pids"]) == r["server_workers"]
    assert r["server_rss_bytes_before"] > 0 and r["server_rss_bytes_held"] > 0
    assert r["server_pss_bytes_held"] > 0
    expected = (r["server_rss_bytes_held"] - r["server_rss_bytes_before"]) / n
    assert r["server_marginal_bytes_per_connection"] == pytest.approx(expected, abs=0.1)
    assert r["server_cpu_seconds"] is not None and r["server_cpu_seconds"] >= 0
    assert sum(r["server_worker_connections_held"]) == n
    assert r["server_worker_connections_counted_by"] == "open fds of each worker"
    assert r["server_exit_code"] == 0
    assert r["server_workers_left_running"] == []
    # Everything it started is gone.
    for pid in [r["server_supervisor_pid"], *r["server_worker_pids"], *r["client_pids"]]:
        assert not procstat.alive(pid), pid
    assert "established / held" in output  # the human summary
    # /metrics was scraped while holding, and what the stats cost the workers is known.
    assert r["metrics_scrapes"] >= 1 and r["metrics_scrape_errors"] == []
    assert r["metrics_scrape_ms_max"] >= r["metrics_scrape_ms_p50"] > 0
    assert r["metrics_scrape_bytes"] > 0
    assert r["server_stats_cpu_percent_per_worker"] is not None
    assert "/metrics scrape ms" in output
    # The machine's CPU in each phase: every core's time is accounted, busy or idle.
    hold = r["host_cpu_seconds_by_phase"]["hold"]
    assert set(hold) >= {"user", "system", "softirq", "idle", "steal"}
    assert sum(hold.values()) == pytest.approx(os.cpu_count() * r["hold_seconds"], rel=0.25)
    assert "machine idle % connect / hold" in output  # a saturated machine shows at a glance
    assert r["client_progress_lines_dropped"] == 0
    # The workers sleep between the heartbeats of the hold: each sleep a wake to pay for.
    hold_switches = r["server_context_switches_by_phase"]["hold"]
    assert hold_switches["voluntary"] > 0 and hold_switches["involuntary"] >= 0


def test_bench_past_the_fd_count_takes_the_workers_own_counts(tmp_path: Path) -> None:
    # At 500k, listing every worker's fds took minutes while the hold went on; past
    # --fd-count-max the spread comes from the workers' own counts.
    n = 1000
    code, r, output = _bench(tmp_path, "--connections", str(n), "--clients", "1", "--hold", "3",
                             "--server-workers", "2", "--fd-count-max", "500", "--no-progress")
    assert code == 0, output
    assert r["server_worker_connections_counted_by"] == "each worker's own count (status file)"
    assert sum(r["server_worker_connections_held"]) == n
    assert "fds" not in r["held_measurement_seconds_by_part"]


def test_bench_uvloop_client_still_runs_and_the_report_names_the_loop(tmp_path: Path) -> None:
    # The asyncio client is the baseline the epoll one is measured against: it must keep working.
    n = 600
    code, r, output = _bench(tmp_path, "--connections", str(n), "--clients", "1", "--hold", "2",
                             "--ping-interval", "1", "--client-loop", "uvloop", "--no-progress",
                             "--client-nice", "5", "--client-sched", "normal")
    assert code == 0, output
    _assert_clean_counts(r, n)
    assert r["client_loop"] == "uvloop"
    assert r["client_sched"] == "normal" and r["client_sched_observed"] == ["normal"]
    # --client-nice: the clients yield the cores to the server, and the report says so
    assert r["client_nice"] == 5 and r["client_nice_observed"] == [os.nice(0) + 5]
    assert r["clients_in_bench_session"] is False and r["client_session_count"] == 1
    if Path("/proc/self/autogroup").exists():  # the client is a session: its group is niced
        assert r["client_autogroup_nice_observed"] == [5]
    code, _, output = _bench(tmp_path, "--protocol", "ws", "--client-loop", "epoll",
                             "--connections", "10", "--no-progress")
    assert code != 0 and "epoll speaks raw only" in output


def test_bench_freezes_clients_and_the_server_closes_exactly_theirs(tmp_path: Path) -> None:
    # A quarter of the clients die without a FIN (SIGSTOP): the server's heartbeat must close
    # each of their connections, and nobody else's.
    code, r, output = _bench(tmp_path, "--connections", "2000", "--clients", "4", "--hold", "20",
                             "--ping-interval", "1", "--server-ping-interval", "2",
                             "--pong-timeout", "2", "--freeze-fraction", "0.25",
                             "--freeze-at", "1", "--no-progress")
    assert code == 0, output
    assert r["frozen_clients"] == 1 and r["frozen_connections"] == 500
    assert r["frozen_detected"] == 500 and r["frozen_detect_seconds"] is not None
    assert r["frozen_close_reasons"] == {"ping_timeout": 500}
    assert r["connections_held"] == 1500
    assert r["unexpected_closes"] == 0 and r["heartbeat_missed"] == 0 and r["errors_total"] == 0
    assert r["frozen_clients_unexpected_closes"] == 500  # what the frozen client saw on waking
    assert "frozen clients" in output


def test_bench_drain_spreads_the_goodbyes_over_the_window(tmp_path: Path) -> None:
    # A redeploy: SIGTERM mid-hold. Every client gets the server's goodbye (none is cut off at
    # the deadline), spread over --drain-s rather than all at once.
    code, r, output = _bench(tmp_path, "--connections", "2000", "--clients", "2", "--hold", "15",
                             "--ping-interval", "1", "--drain-at", "1", "--server-arg=--drain-s",
                             "--server-arg=4", "--no-progress")
    assert code == 0, output
    assert r["drain_connections"] == 2000 and r["drain_server_closes"] == 2000
    per_second = r["drain_closes_per_second"]
    assert sum(per_second) == 2000
    assert len(per_second) >= 3 and max(per_second) <= 0.6 * 2000  # no thundering herd
    assert r["unexpected_closes"] == 0 and r["heartbeat_missed"] == 0 and r["errors_total"] == 0
    assert "drained connections" in output


def test_bench_run_with_target(tmp_path: Path, serve: Any) -> None:
    srv = serve("--connections", "1500", "--workers", "2")
    n = 1500
    code, r, output = _bench(tmp_path, "--target", f"127.0.0.1:{srv.port}", "--connections",
                             str(n), "--clients", "2", "--hold", "2", "--ping-interval", "1",
                             "--no-hello", "--established-on", "tcp")
    assert code == 0, output
    _assert_clean_counts(r, n)
    assert r["server_started_by_bench"] is False
    # The bench does not know the server's processes: no made-up figures.
    for key in ("server_workers", "server_rss_bytes_before", "server_rss_bytes_held",
                "server_pss_bytes_held", "server_marginal_bytes_per_connection",
                "server_cpu_seconds"):
        assert r[key] is None, key
    # Progress bars went to stderr.
    assert "connecting" in output and "holding" in output
    # The server saw them all and is still serving.
    assert srv.proc.poll() is None
    srv.wait_stats(lambda st: sum(w.get("accepted", 0) for w in st["worker_stats"]) >= n)


def test_bench_target_with_status_file_measures_the_server(tmp_path: Path, serve: Any) -> None:
    srv = serve("--connections", "1000", "--workers", "2")
    code, r, output = _bench(tmp_path, "--target", f"127.0.0.1:{srv.port}",
                             "--server-status-file", str(srv.status_path), "--connections", "1000",
                             "--hold", "1", "--ping-interval", "1", "--no-progress",
                             "--established-on", "tcp")
    assert code == 0, output
    _assert_clean_counts(r, 1000)
    assert r["server_workers"] == 2
    assert r["server_marginal_bytes_per_connection"] is not None
    assert r["server_cpu_seconds"] is not None
    assert srv.proc.poll() is None  # not ours to stop
    assert r["established_when"] == "the TCP handshake completed"


def test_bench_refuses_off_loopback_targets(tmp_path: Path) -> None:
    code, r, output = _bench(tmp_path, "--target", "192.0.2.1:80", "--connections", "1",
                             timeout=60)
    assert code == 2
    assert "loopback" in output


def test_bench_reports_a_server_that_is_not_there(tmp_path: Path) -> None:
    from tidegate.bench.runner import free_port

    code, r, output = _bench(tmp_path, "--target", f"127.0.0.1:{free_port()}", "--connections",
                             "50", "--hold", "0", "--no-progress", timeout=120)
    assert code == 1, output
    assert r["connections_established"] == 0 and r["connections_held"] == 0
    assert r["errors_total"] == 50 and r["errors"] == {"ECONNREFUSED": 50}
    assert r["ok"] is False


def test_bench_interrupted_stops_everything(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tidegate", "bench", "--json", str(report), "--connections",
         "1000", "--hold", "120", "--ping-interval", "1", "--clients", "2",
         "--logs-dir", str(tmp_path / "logs")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TIDEGATE_LOG_FORMAT": "text"},
    )
    holding = threading.Event()
    err: list[str] = []

    def watch() -> None:
        assert proc.stderr is not None
        for chunk in iter(lambda: proc.stderr.read(1), ""):  # type: ignore[union-attr]
            err.append(chunk)
            if "holding" in "".join(err[-200:]):
                holding.set()

    threading.Thread(target=watch, daemon=True).start()
    try:
        assert holding.wait(180), "".join(err)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    r = json.loads(report.read_text())
    assert r["completed"] is False and r["ok"] is False
    assert any("interrupted" in f for f in r["failures"])
    pids = [r["server_process_pid"], *r["server_worker_pids"], *r["client_pids"]]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(procstat.alive(p) for p in pids):
        time.sleep(0.1)
    assert not [p for p in pids if procstat.alive(p)]


def test_bench_client_pids_finds_the_clients_of_one_port() -> None:
    # Scripts in bench/ measure the bench's clients from outside, by their command line.
    cmd = [sys.executable, "-c", "import time; time.sleep(30)", "tidegate.bench.client"]
    ours = subprocess.Popen([*cmd, '{"port":47001}'])
    other = subprocess.Popen([*cmd, '{"port":47002}'])
    try:
        assert procstat.bench_client_pids(47001) == [ours.pid]
    finally:
        for proc in (ours, other):
            proc.kill()
            proc.wait()


def test_asyncio_client_tries_a_refused_connect_again() -> None:
    """--connect-retries with the asyncio client (the one --protocol ws uses): a real listener
    refuses the first attempt and answers the second's hello; one connection, one retry."""
    from tidegate.bench.client import ClientConfig, ClientProcess

    async def main() -> None:
        accepted: list[int] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(1)
            if len(accepted) == 1:
                writer.transport.abort()  # a worker at capacity
                return
            hello = await reader.readexactly(13)
            writer.write((9).to_bytes(4, "big") + bytes((PONG,)) + hello[5:])
            await writer.drain()
            await asyncio.sleep(5)

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        config = ClientConfig(index=0, host="127.0.0.1", port=port, sources=["127.0.0.2"],
                              connections=1, connect_retries=1, loop="asyncio")
        proc = ClientProcess(config)
        proc.attempt_started = [0]
        proc.tasks = [None]  # type: ignore[list-item]
        await asyncio.wait_for(proc._connect_worker(0), 10)
        assert proc.stats.established == 1 and proc.stats.attempted == 2
        assert proc.stats.retried == {"ECONNRESET": 1}
        assert proc.stats.failed == 0 and not proc.stats.errors
        server.close()

    asyncio.run(main())


def test_host_notes_name_what_the_kernel_counters_say() -> None:
    from tidegate.bench.runner import host_notes

    assert host_notes({"SoftnetDropped": 0, "TCPAbortOnTimeout": 0, "ListenDrops": 5}) == []
    notes = host_notes({"SoftnetDropped": 3060872, "TCPAbortOnTimeout": 325981,
                        "TCPMemoryPressures": 1, "TCPMemoryPressuresChrono": 46684})
    assert len(notes) == 3
    assert "3060872 packets dropped" in notes[0] and "netdev_max_backlog" in notes[0]
    assert "325981 connections aborted" in notes[1]
    assert "46.7 s" in notes[2]


def test_a_client_drops_progress_lines_rather_than_block_on_a_runner_not_reading() -> None:
    """A client whose stdout pipe is full (the runner busy elsewhere) must go on answering
    heartbeats: progress lines are offered and dropped, never waited for; the final line, which
    the runner needs, still waits and arrives after every progress line the pipe took."""
    code = (
        "import sys, time\n"
        "from tidegate.bench.client import emit, offer\n"
        "sent = 0\n"
        "while offer('progress', n=sent, pad='x' * 200):\n"
        "    sent += 1\n"
        "print(sent, flush=True, file=sys.stderr)\n"
        "emit('final', sent=sent)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None and proc.stdout is not None
        # Nobody reads stdout yet: an offer that blocked would never get to stderr.
        ready, _, _ = select.select([proc.stderr], [], [], 60)
        assert ready, "the client blocked on its full stdout"
        sent = int(proc.stderr.readline())
        assert 100 < sent < 1000  # a 64 KiB pipe holds a few hundred 230-byte lines
        lines = [json.loads(line) for line in proc.stdout.read().splitlines()]
        assert [m["n"] for m in lines[:-1]] == list(range(sent))
        assert lines[-1] == {"type": "final", "sent": sent}
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_open_fds_counted_by_a_child_process() -> None:
    # The bench counts the workers' fds from a child process (its own GIL) at 500k.
    code = ("import socket, sys, time\n"
            "s = [socket.socket() for _ in range(50)]\n"
            "print(1, flush=True)\n"
            "time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        assert holder.stdout is not None and holder.stdout.readline()
        dead.wait()
        counted = procstat.open_fds_elsewhere([holder.pid, dead.pid])
        here = procstat.open_fds(holder.pid)
        assert here is not None and here >= 50
        assert counted == [here, None]
    finally:
        holder.kill()
        holder.wait()
    assert procstat.open_fds_elsewhere([]) == []


def test_idle_percent_of_a_phase() -> None:
    from tidegate.bench.runner import _idle_percent

    assert _idle_percent({"user": 1.0, "system": 0.5, "softirq": 0.5, "idle": 6.0}) == 75.0
    assert _idle_percent({"user": 120.0, "idle": 0.0}) == 0.0  # saturated
    assert _idle_percent(None) is None and _idle_percent({}) is None
