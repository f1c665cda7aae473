"""Engine options: every limit is named with its unit and has a safe default."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    # More listening ports, each served by its own handler (the app returns a list of them).
    extra_ports: tuple[int, ...] = ()
    # Worker processes; 0 = sized from `connections_target`, the fd limit and the cores.
    workers: int = 0
    connections_target: int = 10_000
    # "reuseport": every worker listens with SO_REUSEPORT and the kernel spreads accepts.
    # "handoff": the supervisor accepts and passes each socket (SCM_RIGHTS) to the least-loaded
    # worker; even spread, one extra hop per accept.
    balance: str = "reuseport"
    loop: str = "uvloop"  # or "asyncio"
    backlog: int = 4096
    reserve_fds: int = 256
    # Ceiling per worker; 0 = what the fd limit allows (RLIMIT_NOFILE - reserve_fds).
    max_connections_per_worker: int = 0

    # Timing wheel resolution and liveness (L1 keepalive in the kernel, L2 heartbeat here).
    tick_s: float = 0.5
    ping_interval_s: float = 25.0
    pong_timeout_s: float = 10.0
    handshake_timeout_s: float = 10.0
    # After we close, how long the peer gets to close its side before we abort.
    linger_s: float = 2.0
    tcp_keepalive_idle_s: int = 60
    tcp_keepalive_interval_s: int = 10
    tcp_keepalive_count: int = 6
    tcp_user_timeout_ms: int = 120_000

    # One read buffer per worker; a connection keeps only an incomplete frame's bytes.
    read_buffer_bytes: int = 262_144
    max_frame_bytes: int = 65_536
    # A client that stops reading is closed once this much output is queued for it.
    max_write_buffer_bytes: int = 1_048_576

    # TLS on every listener when both are set; SIGHUP reloads them without dropping connections.
    tls_cert_file: str = ""
    tls_key_file: str = ""

    # The bounded pool for blocking work (worker.blocking): threads, then callers that may wait.
    blocking_threads: int = 4
    blocking_max_waiting: int = 64

    # Cyclic GC: young-generation threshold (objects); start-up objects are frozen.
    gc_gen0_threshold: int = 50_000
    # SIGTERM drains: disconnects (with a reconnect hint) are spread over this long, so the
    # clients do not all reconnect at once; then the grace below, then SIGKILL.
    drain_s: float = 5.0
    shutdown_grace_s: float = 10.0
    # Admission limits: 0 = off. The accept rate is for the whole node (split over workers).
    max_connections_per_ip: int = 0
    accept_rate_per_s: float = 0.0
    # OpenTelemetry traces: none | console | otlp (OTEL_EXPORTER_OTLP_ENDPOINT), sampled.
    tracing_exporter: str = "none"
    tracing_sample_ratio: float = 1.0
    # Diagnostics: a loop that does not turn for this long is reported with its stack (0 = off);
    # tasks older than leak_task_age_s are listed in leak reports (SIGUSR1, /api/debug_leaks);
    # lifecycle events kept per worker for `tidegate trace`.
    stall_threshold_ms: float = 200.0
    leak_task_age_s: float = 60.0
    trace_ring_events: int = 65536
    # /metrics (Prometheus) served by the supervisor on this port; 0 = off.
    metrics_port: int = 0
    # Where the supervisor writes its JSON status (pids, port, ready); "" = nowhere.
    status_file: str = ""

    def validate(self) -> None:
        if self.balance not in ("reuseport", "handoff"):
            raise ValueError(f"balance must be reuseport or handoff, not {self.balance!r}")
        if self.loop not in ("uvloop", "asyncio"):
            raise ValueError(f"loop must be uvloop or asyncio, not {self.loop!r}")
        if self.tick_s <= 0:
            raise ValueError("tick_s must be > 0")
        if self.read_buffer_bytes < 2 * self.max_frame_bytes + 4096:
            # A partial frame is copied to the front of the shared buffer before the next read.
            self.read_buffer_bytes = 2 * self.max_frame_bytes + 4096
