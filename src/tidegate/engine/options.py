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
    # Work stealing (engine/stealing.py): every steal_tick_s a worker under the mean (by more
    # than steal_slack_ratio, or at all while another is over it by that much) takes up to
    # steal_max_per_tick idle connections (silent steal_min_idle_ms) from busier workers, in at
    # most steal_tries_per_tick requests. Only apps whose handler exports connection state
    # (the echo app, the gateway's sessions); never TLS. steal_max_per_tick 0 = off.
    steal_tick_s: float = 1.0
    steal_max_per_tick: int = 1024
    steal_tries_per_tick: int = 16
    steal_min_idle_ms: float = 500.0
    steal_slack_ratio: float = 0.01
    # Fault injection for tests only: a thief waits this long before adopting each socket it
    # received, which widens the window between a session's export and its import. 0 in use.
    steal_adopt_delay_ms: float = 0.0

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
    # Writes a connection may queue once its output is above the high-water mark (0: no cap);
    # past either cap it is closed as a slow consumer.
    max_write_buffer_messages: int = 0

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
    # Long jobs (a big channel's fan-out, the drain) run in the worker's run queue
    # (engine/runqueue.py) in slices of this much wall time, so heartbeats and accepts run in
    # between; 0 = no slicing, they run in one go. A publication goes to the run queue when
    # the worker has more than fanout_chunk_subscribers subscribers of its channel.
    slice_ms: float = 5.0
    fanout_chunk_subscribers: int = 256
    # How many workers of the node run long jobs at once (engine/cpu_gate.py): 0 = one per
    # core, -1 = every worker. With more workers than cores (the file limit's doing), the others
    # wait for a token and meanwhile answer heartbeats at once instead of queueing for a CPU.
    long_job_workers: int = 0
    # Accepts a loop turn: uvloop's server accepts one connection per turn of the loop, so a
    # worker's accept rate is its turn rate (at 27 workers on 2 cores a turn is ~200 us of CPU).
    # N > 0: the worker accepts up to N per turn itself and hands each socket to the loop
    # (130,000 connections over 27 workers: 8,000-8,300 connects/s and 138-144 us of server
    # CPU per connect, against 4,500-5,100/s and 240-278 us), at ~70 B more per connection
    # (uvloop's connect_accepted_socket copies the context for each); 0: uvloop's server.
    accept_batch: int = 64
    # Admission limits: 0 = off. The accept rate is for the whole node (split over workers).
    max_connections_per_ip: int = 0
    accept_rate_per_s: float = 0.0
    # L3 liveness, the eviction controller (engine/eviction.py): every eviction_tick_s each
    # worker measures itself against these ceilings (0 = not watched; all 0 = off). Above one it
    # sheds at most eviction_max_fraction_per_tick of its connections per tick, least valuable
    # first, telling them to reconnect in eviction_reconnect_delay_s, until every measurement is
    # under eviction_resume_fraction of its ceiling. Connections, RSS and write buffers are
    # node-wide (split evenly over the workers); CPU (% of one core) and loop lag (p99 over the
    # tick) are per worker process. Dry run: log and count what would go, close nothing.
    eviction_tick_s: float = 60.0
    eviction_max_connections: int = 0
    eviction_max_rss_bytes: int = 0
    eviction_max_cpu_percent: float = 0.0
    eviction_max_loop_lag_ms: float = 0.0
    eviction_max_write_buffer_bytes: int = 0
    eviction_max_fraction_per_tick: float = 0.05
    eviction_resume_fraction: float = 0.9
    eviction_reconnect_delay_s: float = 10.0
    eviction_dry_run: bool = False
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
    # The supervisor's niceness relative to the workers' (they keep the one the node started
    # with). Under CPU overload the control plane (/metrics, restarts, stealing) still gets
    # its turn: at 486k connections a scrape took ~1 s at equal priority. Needs CAP_SYS_NICE;
    # without it the supervisor stays at the workers' priority (logged once).
    supervisor_nice: int = -5
    # Where the supervisor writes its JSON status (pids, port, ready); "" = nowhere.
    status_file: str = ""

    def validate(self) -> None:
        if self.balance not in ("reuseport", "handoff"):
            raise ValueError(f"balance must be reuseport or handoff, not {self.balance!r}")
        if self.loop not in ("uvloop", "asyncio"):
            raise ValueError(f"loop must be uvloop or asyncio, not {self.loop!r}")
        if self.tick_s <= 0:
            raise ValueError("tick_s must be > 0")
        if (self.steal_tick_s <= 0 or self.steal_max_per_tick < 0 or self.steal_slack_ratio < 0
                or self.steal_adopt_delay_ms < 0):
            raise ValueError("steal_tick_s must be > 0, steal_max_per_tick, "
                             "steal_slack_ratio and steal_adopt_delay_ms >= 0")
        if self.eviction_tick_s <= 0:
            raise ValueError("eviction_tick_s must be > 0")
        if not 0 < self.eviction_max_fraction_per_tick <= 1:
            raise ValueError("eviction_max_fraction_per_tick must be in (0, 1]")
        if not 0 < self.eviction_resume_fraction <= 1:
            raise ValueError("eviction_resume_fraction must be in (0, 1]")
        if self.read_buffer_bytes < 2 * self.max_frame_bytes + 4096:
            # A partial frame is copied to the front of the shared buffer before the next read.
            self.read_buffer_bytes = 2 * self.max_frame_bytes + 4096
