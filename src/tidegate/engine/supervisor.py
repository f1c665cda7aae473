"""The supervisor: sizes, forks, watches and restarts worker processes; stops them on signal.

A prefork arbiter without an event loop of its own (a selector, a signal wake-up pipe and
``waitpid``), so forking never copies a running loop into a child. In ``handoff`` mode it also
accepts connections and passes each socket to the least-loaded worker over SCM_RIGHTS.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tidegate import log
from tidegate.engine import control, cpu_gate, stealing
from tidegate.engine.cpu_gate import GateArbiter, gate_tokens
from tidegate.engine.handler import EventHandler
from tidegate.engine.limits import (
    REUSEPORT_HEADROOM,
    per_worker_capacity,
    raise_nofile,
    workers_for,
)
from tidegate.engine.netopt import keepalive_for, listening_socket
from tidegate.engine.options import EngineOptions

_log = log.get("supervisor")
HandlerFactory = Callable[[], "EventHandler | list[EventHandler]"]
# How long a drain waits for the workers to confirm that stealing stopped (a round trip on each
# control channel; longer only for a worker whose loop is stuck).
STEAL_SETTLE_S = 2.0
# The status file's counters are rewritten at most this often. The loop turns on each of the
# workers' stats messages (27 a second at 500k); encoding and writing ~100 KB of JSON on every
# one of them cost an idle 27-worker supervisor 7.4% of a core (now 1.7%:
# bench/results/2026-11-27-supervisor-idle-cpu.json).
STATUS_INTERVAL_S = 0.5


@dataclass
class WorkerSlot:
    index: int
    pid: int = 0
    ctrl: socket.socket | None = None
    ready: bool = False
    started: float = 0.0
    quick_deaths: int = 0
    restart_at: float = 0.0
    handoff_sent: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    outbox: collections.deque[bytes] = field(default_factory=collections.deque)

    def load(self) -> int:
        """Connections it holds, those waiting in its accept queue, sockets stolen that it is
        still adopting, and sockets handed to it that it has not reported yet."""
        in_flight = self.handoff_sent - int(self.stats.get("handoff_received", 0))
        held = (int(self.stats.get("active", 0)) + int(self.stats.get("accept_queue", 0))
                + int(self.stats.get("adopting", 0)))
        return held + max(0, in_flight)


def plan_workers(opts: EngineOptions) -> int:
    if opts.workers > 0:
        return opts.workers
    limits = raise_nofile()
    headroom = REUSEPORT_HEADROOM if opts.balance == "reuseport" else 1.0
    capacity = per_worker_capacity(limits.soft, opts.reserve_fds, headroom)
    return workers_for(opts.connections_target, capacity)


class Supervisor:
    def __init__(self, opts: EngineOptions, handler_factory: HandlerFactory) -> None:
        opts.validate()
        self.opts = opts
        self.handler_factory = handler_factory
        self.slots: list[WorkerSlot] = []
        self.port = opts.port
        self.ports: list[int] = []
        self.stopping = False
        self._stop_why: dict[str, Any] = {}  # the signal, and the worker that got it if not us
        self.draining = False
        self.restarts = 0
        self.refused_handoff = 0
        self._sel = selectors.DefaultSelector()
        self._listens: list[socket.socket] = []
        self._wake_r = self._wake_w = -1
        self._status_written = ""
        self._status_head: tuple[Any, ...] = ()
        self._status_at = 0.0
        self._metrics: Any = None
        self._stealing = stealing.Router(self)  # load tables, connections between workers
        # The live workers last told to every worker (None until all were ready once), and
        # which pid of each slot has been told: see _announce_members.
        self._members: tuple[int, ...] | None = None
        self._members_told: dict[int, int] = {}
        self._gate: GateArbiter | None = None  # the CPU gate's tokens (engine/cpu_gate.py)

    # ---- lifecycle ---------------------------------------------------------------------
    def run(self) -> int:
        limits = raise_nofile()
        n = plan_workers(self.opts)
        if self.opts.slice_ms > 0 and (tokens := gate_tokens(self.opts.long_job_workers, n)):
            self._gate = GateArbiter(tokens)
        handoff = self.opts.balance == "handoff"
        # reuseport: a bound, non-listening socket reserves each port (and resolves port 0);
        # handoff: the listening sockets themselves, accepted here.
        for port in (self.opts.port, *self.opts.extra_ports):
            sock = listening_socket(self.opts, port, reuseport=not handoff, listen=handoff)
            self._listens.append(sock)
            self.ports.append(sock.getsockname()[1])
        self.port = self.ports[0]
        self._base_nice = os.getpriority(os.PRIO_PROCESS, 0)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop_signal)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the selector
        signal.signal(signal.SIGHUP, self._on_hup)
        signal.signal(signal.SIGUSR1, self._on_usr1)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        if handoff:
            for i, sock in enumerate(self._listens):
                self._sel.register(sock, selectors.EVENT_READ, ("accept", i))
        _log.info(
            "starting",
            extra={
                "workers": n,
                "ports": self.ports,
                "balance": self.opts.balance,
                "loop": self.opts.loop,
                "nofile": limits.soft,
                "connections_target": self.opts.connections_target,
            },
        )
        ka = keepalive_for(self.opts)
        if ka.raised:
            _log.info("L1 keepalive starts past the heartbeat's window", extra={
                "tcp_keepalive_idle_s": ka.idle_s, "tcp_user_timeout_ms": ka.user_timeout_ms,
                "ping_interval_s": self.opts.ping_interval_s,
                "why": "kernel probes to clients that answer heartbeats come in timer-wheel "
                       "bursts the input backlog can drop, and a dropped probe aborts a live "
                       "connection"})
        self.slots = [WorkerSlot(i) for i in range(n)]
        for slot in self.slots:
            self._spawn(slot)
        # After the first forks, before the metrics thread starts (it inherits it; children
        # go back to _base_nice in _in_child).
        self._raise_priority()
        if self.opts.metrics_port:
            from tidegate.observe import metrics

            self._metrics = metrics.serve(
                self.opts.metrics_port, lambda: [s.stats for s in self.slots], self.status,
                host=self.opts.host,
            )
        try:
            while not self.stopping:
                self._poll(0.5)
                self._reap()
                self._respawn_due()
                self._stealing.tick()
                self._announce_members()
                self._write_status()
            self._shutdown()
        finally:
            self._cleanup()
        return 0

    def _on_stop_signal(self, signum: int, _frame: Any) -> None:
        self._stop({"signal": signal.Signals(signum).name})

    def _stop(self, why: dict[str, Any]) -> None:
        """Drain the node (``_shutdown``, once the select loop sees ``stopping``): on SIGTERM or
        SIGINT to the supervisor, or to a worker, which asks for it (``control.STOP_REQUEST``)
        instead of draining on its own. Only the first one counts: when systemd signals every
        process of the unit at once, the supervisor's signal and the workers' requests make one
        shutdown. A second signal changes nothing (no forced stop: ``_shutdown`` is bounded by
        ``drain_s + shutdown_grace_s``, systemd's own escalation is SIGKILL).

        Called from the signal handler too, which may run in the middle of a call from
        ``_on_ctrl``: nothing but two stores here, and ``_shutdown`` logs (once) why."""
        if not self.stopping:
            self._stop_why = why
        self.stopping = True

    def _on_hup(self, _signum: int, _frame: Any) -> None:
        _log.info("SIGHUP: workers reload their TLS certificate")
        for slot in self.slots:
            if slot.pid:
                _kill(slot.pid, signal.SIGHUP)

    def _on_usr1(self, _signum: int, _frame: Any) -> None:
        _log.info("SIGUSR1: workers log their leak reports")
        for slot in self.slots:
            if slot.pid:
                _kill(slot.pid, signal.SIGUSR1)

    def _spawn(self, slot: WorkerSlot) -> None:
        parent_end, child_end = control.pair()
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                parent_end.close()
                self._in_child()
                from tidegate.engine.worker import run_worker

                ports = None if self.opts.balance == "handoff" else self.ports
                code = run_worker(
                    self.opts, self.handler_factory, slot.index, len(self.slots), child_end, ports
                )
            except BaseException:
                _log.exception("worker crashed", extra={"worker": slot.index})
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        child_end.close()
        parent_end.setblocking(False)
        slot.pid, slot.ctrl, slot.ready = pid, parent_end, False
        slot.started, slot.handoff_sent, slot.stats = time.monotonic(), 0, {}
        self._sel.register(parent_end, selectors.EVENT_READ, slot)
        _log.info("worker started", extra={"worker": slot.index, "worker_pid": pid})

    def _raise_priority(self) -> None:
        if not self.opts.supervisor_nice:
            return
        try:
            os.setpriority(os.PRIO_PROCESS, 0, self._base_nice + self.opts.supervisor_nice)
        except OSError as exc:
            _log.warning("supervisor priority unchanged", extra={"error": str(exc)})

    def _in_child(self) -> None:
        """Drop everything that belongs to the supervisor before the worker's loop starts."""
        with contextlib.suppress(OSError):  # the workers keep the node's own priority
            os.setpriority(os.PRIO_PROCESS, 0, self._base_nice)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # until the worker's handler is in
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        for sock in self._listens:
            sock.close()
        if self._metrics is not None:
            self._metrics.socket.close()
        for other in self.slots:
            if other.ctrl is not None:
                other.ctrl.close()

    # ---- the select loop ---------------------------------------------------------------
    def _poll(self, timeout: float) -> None:
        for key, events in self._sel.select(timeout):
            tag = key.data
            if tag == "wake":
                try:
                    while os.read(self._wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
            elif isinstance(tag, tuple):
                self._accept_batch(tag[1])
            else:
                if events & selectors.EVENT_WRITE:
                    self._flush(tag)
                if events & selectors.EVENT_READ:
                    self._on_ctrl(tag)

    def _on_ctrl(self, slot: WorkerSlot) -> None:
        assert slot.ctrl is not None
        while True:
            try:
                msg = control.recv(slot.ctrl)
            except BlockingIOError:
                return
            except OSError:
                msg = None
            if msg is None:
                self._drop_ctrl(slot)
                return
            kind, body, fds = msg
            if kind == control.STEAL:  # its fds go on to another worker
                self._stealing.route(slot, body, fds)
                continue
            for fd in fds:
                os.close(fd)
            if kind == control.RELAY:
                for other in self.slots:
                    if other is not slot and other.ctrl is not None:
                        self._send(other, control.RELAY + body)
            elif kind == control.TO:
                target = int.from_bytes(body[:2], "big")
                if target < len(self.slots):
                    self._send(self.slots[target], control.TO + body[2:])
            elif kind == control.READY:
                slot.ready = True
                _log.info("worker ready", extra={"worker": slot.index, "worker_pid": slot.pid})
            elif kind == control.STATS and body is not None:
                slot.stats = body
            elif kind == control.GATE:
                if self._gate is not None:
                    self._grant(self._gate.on_message(slot.index, bytes(body)))
                elif bytes(body) == cpu_gate.ASK:  # no gate here: never keep a worker waiting
                    self._send(slot, control.GATE + cpu_gate.GRANT)
            elif kind == control.STEAL_OFF:
                self._stealing.stopped(slot)
            elif kind == control.STOP_REQUEST:  # the worker was signalled: the node drains
                self._stop({"signal": bytes(body).decode(errors="replace"), "worker": slot.index})

    def _send(self, slot: WorkerSlot, msg: bytes) -> None:
        """Send in order; what the worker's socket cannot take now waits in its outbox."""
        if slot.ctrl is None:
            return
        if not slot.outbox:
            try:
                slot.ctrl.send(msg)
                return
            except BlockingIOError:
                self._sel.modify(slot.ctrl, selectors.EVENT_READ | selectors.EVENT_WRITE, slot)
            except OSError:
                return
        slot.outbox.append(msg)

    def _flush(self, slot: WorkerSlot) -> None:
        while slot.outbox and slot.ctrl is not None:
            try:
                slot.ctrl.send(slot.outbox[0])
            except BlockingIOError:
                return
            except OSError:
                slot.outbox.clear()
                break
            slot.outbox.popleft()
        if slot.ctrl is not None:
            self._sel.modify(slot.ctrl, selectors.EVENT_READ, slot)

    def _drop_ctrl(self, slot: WorkerSlot) -> None:
        if slot.ctrl is not None:
            self._sel.unregister(slot.ctrl)
            slot.ctrl.close()
            slot.ctrl = None
        slot.outbox.clear()
        if self._gate is not None:  # a token it held goes to the next in line
            self._grant(self._gate.forget(slot.index))

    def _grant(self, workers: list[int]) -> None:
        for i in workers:
            self._send(self.slots[i], control.GATE + cpu_gate.GRANT)

    def _accept_batch(self, listener: int) -> None:
        listen = self._listens[listener]
        batches: dict[int, list[socket.socket]] = {}
        ready = [s for s in self.slots if s.ready and s.ctrl is not None]
        for _ in range(256):
            try:
                conn, _addr = listen.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # EMFILE and friends: the backlog keeps the rest
                _log.warning("accept failed", extra={"error": str(exc)})
                break
            if not ready:
                conn.close()
                self.refused_handoff += 1
                continue
            target = min(ready, key=WorkerSlot.load)
            target.handoff_sent += 1
            batches.setdefault(target.index, []).append(conn)
        for index, socks in batches.items():
            slot = self.slots[index]
            for i in range(0, len(socks), control.MAX_FDS_PER_MESSAGE):
                chunk = socks[i : i + control.MAX_FDS_PER_MESSAGE]
                try:
                    assert slot.ctrl is not None
                    control.send_fds(slot.ctrl, [s.fileno() for s in chunk], listener)
                except (OSError, AssertionError):
                    self.refused_handoff += len(chunk)
                    slot.handoff_sent -= len(chunk)
                for s in chunk:
                    s.close()

    # ---- children -------------------------------------------------------------------
    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            why = _describe_exit(status)
            slot.pid, slot.ready = 0, False
            self._drop_ctrl(slot)
            if self.stopping:
                _log.info("worker exited", extra={"worker": slot.index, "worker_pid": pid, "why": why})
                continue
            lived = time.monotonic() - slot.started
            slot.quick_deaths = slot.quick_deaths + 1 if lived < 5 else 0
            delay = min(10.0, 0.1 * (2 ** slot.quick_deaths)) if slot.quick_deaths else 0.0
            slot.restart_at = time.monotonic() + delay
            self.restarts += 1
            _log.warning(
                "worker died; restarting",
                extra={"worker": slot.index, "worker_pid": pid, "why": why, "restart_in_s": delay},
            )

    def _announce_members(self) -> None:
        """Tell the workers which of them are up (``control.MEMBERS``) when that changes, and
        a freshly forked one at once: the embedded broker moves a dead worker's channels to
        the others and back when it is ready again. During start-up every worker assumes all
        are up, so nothing is said until all were ready once."""
        if self._members is None and not all(s.ready for s in self.slots):
            return
        live = tuple(s.index for s in self.slots if s.ready and s.ctrl is not None)
        changed, self._members = live != self._members, live
        msg = control.MEMBERS + ",".join(map(str, live)).encode()
        for slot in self.slots:
            if slot.ctrl is not None and (changed or self._members_told.get(slot.index) != slot.pid):
                self._send(slot, msg)
                self._members_told[slot.index] = slot.pid

    def _respawn_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.pid == 0 and not self.stopping and now >= slot.restart_at:
                self._spawn(slot)

    def _shutdown(self) -> None:
        _log.info("stopping", extra=self._stop_why)
        self.draining = True
        self._write_status()  # not ready from now on: balancers stop sending clients here
        if self.opts.balance == "handoff":
            for sock in self._listens:
                self._sel.unregister(sock)
                sock.close()
            self._listens = []
        # Stealing stops node-wide first: no connection may move in or out of a worker once it
        # has taken its drain's snapshot (see stealing.Router).
        self._stealing.freeze()
        settle_by = time.monotonic() + STEAL_SETTLE_S
        while not self._stealing.settled() and time.monotonic() < settle_by:
            self._poll(0.05)
            self._reap()
        if not self._stealing.settled():
            _log.warning("workers did not confirm that stealing stopped; draining anyway")
        # Then the drains, by a message on each worker's channel: it comes after the hand-overs
        # sent back to it (a signal could overtake them).
        for slot in self.slots:
            if slot.pid:
                if slot.ctrl is not None:
                    self._send(slot, control.DRAIN)
                else:
                    _kill(slot.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.opts.drain_s + self.opts.shutdown_grace_s + 2
        while any(s.pid for s in self.slots) and time.monotonic() < deadline:
            self._poll(0.1)
            self._reap()
            self._write_status()
        for slot in self.slots:
            if slot.pid:
                _log.warning("worker did not stop in time; killing", extra={"worker_pid": slot.pid})
                _kill(slot.pid, signal.SIGKILL)
        while any(s.pid for s in self.slots):
            self._reap()
            time.sleep(0.01)
        _log.info("stopped", extra={"restarts": self.restarts, **{
            f"steal_{k}": v for k, v in self._stealing.stats().items()}})

    def _cleanup(self) -> None:
        signal.set_wakeup_fd(-1)
        if self._metrics is not None:
            self._metrics.shutdown()
            self._metrics.server_close()
        for sock in self._listens:
            sock.close()
        if self.opts.status_file:
            try:
                os.unlink(self.opts.status_file)
            except FileNotFoundError:
                pass

    # ---- status file -------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "host": self.opts.host,
            "port": self.port,
            "ports": self.ports,
            "balance": self.opts.balance,
            "ready": bool(self.slots) and all(s.ready for s in self.slots) and not self.draining,
            "draining": self.draining,
            "workers": [s.pid for s in self.slots if s.pid],
            "worker_stats": [s.stats for s in self.slots],
            "restarts": self.restarts,
            "refused_handoff": self.refused_handoff,
            "stealing": self._stealing.stats(),
            "cpu_gate": self._gate.stats() if self._gate is not None else None,
        }

    def _status_head_now(self) -> tuple[Any, ...]:
        """The part of the status a reader waits on (readiness, draining, the workers' pids
        and connection counts): a change to it is written at once, the workers' other
        counters at most every ``STATUS_INTERVAL_S``."""
        return (
            bool(self.slots) and all(s.ready for s in self.slots), self.draining,
            tuple(s.pid for s in self.slots), self.restarts,
            tuple(s.stats.get("active") for s in self.slots),
        )

    def _write_status(self) -> None:
        path = self.opts.status_file
        if not path:
            return
        now = time.monotonic()
        head = self._status_head_now()
        if head == self._status_head and now - self._status_at < STATUS_INTERVAL_S:
            return
        self._status_head, self._status_at = head, now
        text = json.dumps(self.status())
        if text == self._status_written:
            return
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
        self._status_written = text


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.WEXITSTATUS(status)}"
