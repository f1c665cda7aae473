"""Work stealing between workers: connections are the work. A worker under the mean takes idle
connections from a busier one, socket and state together, and the client notices nothing.

Why: SO_REUSEPORT hashes connections to workers, so they fill unevenly, and a worker that
restarts comes back empty while the others keep theirs. The supervisor places nothing here: it
sends every worker the load table and routes the workers' messages (and their fds) to each other.

One round, every ``steal_tick_s``:

1. The supervisor sends each ready worker the connections per worker (``LOADS``).
2. A worker under ``mean * (1 - steal_slack_ratio)``, or under the mean while some worker is
   over ``mean * (1 + steal_slack_ratio)``, is a thief: it shuffles the workers above the mean
   and asks one for what it lacks (``REQUEST``). Refused or answered, it asks the next, at most
   ``steal_tries_per_tick`` requests and ``steal_max_per_tick`` connections, then waits for the
   next table.
3. The victim gives at most what it holds above the mean, and only migratable connections:
   ready, not closing, not pinged, nothing queued to write, no partial frame kept, silent for
   ``steal_min_idle_ms``, and a handler whose ``export_state`` returns bytes. It sends their
   fds (SCM_RIGHTS) and states in one message (``CONNS``), then drops them with ``abort()``:
   that closes only its descriptor (no shutdown(), so no FIN or RST: the message in flight holds
   the socket open) and counts ``migrated_out``, not a close.
4. The thief adopts each socket like a handed-off one, calls ``import_state`` instead of
   ``on_open`` and puts the connection in its timing wheel with its idle time, so heartbeats go
   on as scheduled. Bytes the client sent meanwhile wait in the kernel's socket buffer and are
   read by the thief. Sockets it is still adopting count in its load, its own and the table's
   (``adopting`` in its stats).

Between the export and the import the connection belongs to neither handler: what the other
workers relay meanwhile is the handler's business. The gateway's sessions miss none of it
(gateway/relaylog.py: the victim's cut travels in the state, the thief delivers what came
after it). The hand-over itself goes round the supervisor's outbox (fds are sent at once or
not at all), so it may overtake control messages queued for the thief: a handler must not
assume the thief has seen what the victim had. ``steal_adopt_delay_ms`` (fault injection for
tests, 0 otherwise) makes the thief wait before each adoption, widening that window.

Step 3's checks and the hand-over run in one loop callback on the victim: no input can be
processed between the decision and the fd leaving, so "nothing buffered" stays true.

Failures: a request or refusal that is lost (a worker died) is forgotten after two ticks. A
hand-over the supervisor cannot deliver (the thief died, its channel is full) goes back to the
victim, which adopts its own connections again (``returned``); one a thief cannot take (it is
full) goes back the same way. Connections inside a message when its receiver dies are closed by
the kernel: those clients see a disconnect, like every client of a worker that dies (the
supervisor counts ``dropped`` when it sees it). TLS connections never move: their session lives
in this process's OpenSSL state.

Drains: stealing stops node-wide before any worker lists its connections for the drain
(:meth:`Router.freeze`), so a drain never has a connection move under it. A worker signalled
directly does not drain on its own: it asks the supervisor to drain the node
(``Worker.on_stop_signal``).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import pickle
import random
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

from tidegate import log
from tidegate.engine import control
from tidegate.engine.conn import CLOSING, EVICTING, MIGRATING, PAUSED, PING_OUT, READY, Conn
from tidegate.engine.handler import EventHandler
from tidegate.observe import trace

if TYPE_CHECKING:
    from tidegate.engine.supervisor import Supervisor, WorkerSlot
    from tidegate.engine.worker import Worker

_log = log.get("stealing")

KINDS = (control.STEAL, control.LOADS, control.STEAL_OFF)
# The first byte of a STEAL message's payload, after the 2-byte worker index (the target on the
# way to the supervisor, the sender on the way out of it).
REQUEST = b"q"  # thief -> victim: how many (u32) and the mean the thief saw (f64)
REFUSE = b"n"  # victim -> thief: nothing to give now
CONNS = b"c"  # victim -> thief, fds attached: pickled [(listener, idle_ms, state), ...]
RETURNED = b"r"  # supervisor -> victim: a CONNS it could not deliver, fds attached
_REQ = struct.Struct(">Id")
# Flags a migratable connection has: exactly READY (not pinged, paused, closing, moving or
# about to be evicted).
_FLAG_MASK = READY | PING_OUT | PAUSED | CLOSING | MIGRATING | EVICTING
_SCAN_PER_CONN = 16  # connections looked at per one asked for, before the victim gives up


def migrates(h: EventHandler) -> bool:
    """Whether a handler carries its connections' state (it overrides ``export_state``)."""
    return type(h).export_state is not EventHandler.export_state


def _count_ip(w: Worker, c: Conn) -> None:
    peer = c._transport.get_extra_info("peername")
    ip = peer[0] if peer else ""
    w._per_ip[ip] = w._per_ip.get(ip, 0) + 1
    w._conn_ip[c] = ip


class Stealer:
    """A worker's side: thief when a load table arrives, victim when asked, and adopter."""

    __slots__ = (
        "w", "enabled", "frozen", "adopting", "_movable", "_listener", "_min_idle_ticks", "_mean",
        "_victims", "_tries", "_budget", "_asked", "_asked_from", "_asked_at",
        "migrated_in", "migrated_out", "attempts", "refusals", "refused", "returned",
        "lost", "unmovable", "bounced",
    )

    def __init__(self, w: Worker) -> None:
        o = w.opts
        self.w = w
        self._movable = [migrates(h) for h in w.handlers]
        self._listener = {cls: i for i, cls in enumerate(w.conn_classes)}
        self.enabled = (o.steal_max_per_tick > 0 and w.ctrl is not None and w.workers_total > 1
                        and w.ssl_context is None and any(self._movable))
        self._min_idle_ticks = math.ceil(o.steal_min_idle_ms / 1000 / o.tick_s)
        self.frozen = False  # the node (or this worker) drains: nothing moves any more
        self.adopting = 0  # sockets received, not yet adopted (they count as ours)
        self._mean = 0.0
        self._victims: list[int] = []  # this tick's candidates, shuffled; the next one first
        self._tries = 0
        self._budget = 0
        self._asked = 0  # connections asked for by the request out now (0: none out)
        self._asked_from = -1
        self._asked_at = 0.0
        self.migrated_in = 0
        self.migrated_out = 0
        self.attempts = 0  # requests sent
        self.refusals = 0  # requests refused by victims
        self.refused = 0  # requests this worker refused
        self.returned = 0  # own connections back (undeliverable hand-overs)
        self.lost = 0  # requests never answered, sockets that died in flight
        self.unmovable = 0  # picked, but the handler kept them (export_state None)
        self.bounced = 0  # arrivals sent back: no room here, or stealing stopped

    def stats(self) -> dict[str, Any]:
        return {
            "migrated_in": self.migrated_in,
            "migrated_out": self.migrated_out,
            "adopting": self.adopting,  # (in the load table: ours already)
            "steal": {
                "enabled": self.enabled, "attempts": self.attempts, "refusals": self.refusals,
                "refused": self.refused, "returned": self.returned, "lost": self.lost,
                "unmovable": self.unmovable, "bounced": self.bounced,
            },
        }

    # ---- messages --------------------------------------------------------------------
    def on_control(self, kind: bytes, body: bytes, fds: list[int]) -> None:
        if kind == control.STEAL_OFF:  # the node drains: stop, and say so (see Router.freeze)
            self.freeze()
            self.w.send_control(control.STEAL_OFF, b"")
            return
        if kind == control.STEAL and body[2:3] in (CONNS, RETURNED):
            self._arrive(int.from_bytes(body[:2], "big"), body[3:], fds, body[2:3] == RETURNED)
            return
        for fd in fds:  # none expected: never leak one
            os.close(fd)
        if kind == control.LOADS:
            self._on_loads(json.loads(body))
            return
        src, sub = int.from_bytes(body[:2], "big"), body[2:3]
        if sub == REQUEST:
            want, mean = _REQ.unpack_from(body, 3)
            self._give(src, want, mean)
        elif sub == REFUSE and self._asked and src == self._asked_from:
            self.refusals += 1
            self._answered(self._asked, 0)

    def freeze(self) -> None:
        """Stealing stops for good here: no request sent, none granted; hand-overs that still
        arrive from others go back to their sender (see ``_arrive``)."""
        self.frozen = True
        self._victims = []

    def _send(self, target: int, payload: bytes) -> bool:
        return self.w.send_control(control.STEAL, target.to_bytes(2, "big") + payload)

    # ---- thief -----------------------------------------------------------------------
    def _load(self) -> int:
        # The accept queue too: connections the kernel gave us that we have not accepted yet.
        return self.w.active + self.w.accept_queue() + self.adopting + self._asked

    def _on_loads(self, loads: list[int]) -> None:
        w = self.w
        if not self.enabled or self.frozen or w.stopping:
            return
        if self._asked:
            if w.loop.time() - self._asked_at < 2 * w.opts.steal_tick_s:
                return  # still waiting for an answer
            self._asked = 0  # the victim died, or the answer was lost
            self.lost += 1
        counted = [n for n in loads if n >= 0]
        if len(counted) < 2:
            return
        mean = sum(counted) / len(counted)
        mine = self._load()
        slack = w.opts.steal_slack_ratio
        # Only from workers above the mean, and two more than us (one move must not swap roles).
        richer = [i for i, n in enumerate(loads) if i != w.index and n > mean and n - mine >= 2]
        if mine >= mean * (1 - slack):
            far_over = mean * (1 + slack)
            richer = [i for i in richer if loads[i] > far_over] if mine < mean else []
        if not richer:
            return
        random.shuffle(richer)
        self._mean, self._victims = mean, richer
        self._tries, self._budget = w.opts.steal_tries_per_tick, w.opts.steal_max_per_tick
        self._ask()

    def _ask(self) -> None:
        w = self.w
        load = self._load()
        want = min(math.ceil(self._mean) - load, w.capacity - load, self._budget,
                   control.MAX_FDS_PER_MESSAGE)
        if want <= 0 or self._tries <= 0 or not self._victims or self.frozen or w.stopping:
            self._victims = []
            return
        victim = self._victims[0]
        self._tries -= 1
        self.attempts += 1
        if self._send(victim, REQUEST + _REQ.pack(want, self._mean)):
            self._asked, self._asked_from, self._asked_at = want, victim, w.loop.time()
        else:
            self._victims = []

    def _answered(self, asked: int, got: int) -> None:
        self._asked = 0
        self._budget -= got
        if got < asked:  # that victim has no more to give this tick
            self._victims.pop(0)
        self._ask()

    # ---- victim ----------------------------------------------------------------------
    def _give(self, thief: int, want: int, mean: float) -> None:
        w = self.w
        n = 0
        if self.enabled and not (self.frozen or w.stopping):
            n = min(want, w.active - math.floor(mean), control.MAX_FDS_PER_MESSAGE)
        given = self._hand_over(thief, self._pick(n)) if n > 0 else 0
        if not given:
            self.refused += 1
            self._send(thief, REFUSE)

    def _pick(self, n: int) -> list[Conn]:
        """Up to ``n`` migratable connections, from a random place in the wheel."""
        w = self.w
        slots = w.wheel._slots
        size = len(slots)
        start = random.randrange(size)
        now = w.wheel.now
        out: list[Conn] = []
        budget = max(256, _SCAN_PER_CONN * n)
        for j in range(size):
            for c in slots[(start + j) % size]:
                if self._migratable(c, now):
                    out.append(c)
                    if len(out) >= n:
                        return out
                budget -= 1
                if budget <= 0:
                    return out
        return out

    def _migratable(self, c: Conn, now: int) -> bool:
        return (
            c._flags & _FLAG_MASK == READY
            and c._pending is None
            and now - c._last_rx >= self._min_idle_ticks
            and self._movable[self._listener[type(c)]]
            and not c._transport.get_write_buffer_size()
            and c not in self.w._write_waiters
        )

    def _hand_over(self, thief: int, conns: list[Conn]) -> int:
        """Send the connections' fds and states to ``thief``; drop them here once sent."""
        w = self.w
        assert w.ctrl is not None
        tick_ms = w.opts.tick_s * 1000
        now = w.wheel.now
        records: list[tuple[int, int, bytes]] = []
        fds: list[int] = []
        moving: list[Conn] = []
        for c in conns:
            try:
                state = c._h.export_state(c)
            except Exception:
                _log.exception("export_state failed; the connection stays")
                state = None
            if state is None:
                self.unmovable += 1
                continue
            # After export_state: uvloop caches this socket object on the transport for good.
            sock = c._transport.get_extra_info("socket")
            fd = sock.fileno() if sock is not None else -1
            if fd < 0:
                self._import(c, state)
                continue
            records.append((self._listener[type(c)], int((now - c._last_rx) * tick_ms), state))
            fds.append(fd)
            moving.append(c)
        if not moving:
            return 0
        msg = (control.STEAL + thief.to_bytes(2, "big") + CONNS
               + pickle.dumps(records, pickle.HIGHEST_PROTOCOL))
        try:
            socket.send_fds(w.ctrl, [msg], fds)
        except OSError:  # nothing left: the connections stay, their handler takes them back
            for c, (_listener, _idle, state) in zip(moving, records, strict=True):
                self._import(c, state)
            return 0
        for c in moving:
            self._release(c)
        return len(moving)

    def _release(self, c: Conn) -> None:
        """Forget a connection that left: no close counted, no on_close, no FIN (see above)."""
        w = self.w
        c._flags |= MIGRATING | CLOSING  # CLOSING: writes and reads are dropped until it is gone
        w.wheel.cancel(c)
        if w._conn_ip:
            w.uncount_ip(c)
        w.active -= 1
        self.migrated_out += 1
        w.trace.record_instant(trace.CLOSE, id(c), reason="migrated_out")
        c._transport.abort()  # closes this process's descriptor only; Worker.conn_lost skips it

    # ---- arrivals --------------------------------------------------------------------
    def _arrive(self, src: int, payload: bytes, fds: list[int], returned: bool) -> None:
        w = self.w
        records: list[tuple[int, int, bytes]] = pickle.loads(payload)
        for fd in fds[len(records):]:  # cannot happen between our processes; never leak one
            os.close(fd)
        asked = self._asked if not returned and src == self._asked_from else 0
        if asked:
            self._asked = 0  # from here they count in self.adopting
        full = len(fds) > w.capacity - w.active - self.adopting  # possible for a late answer
        closed = self.frozen or w.stopping
        if not returned and (full or closed) and self._send_back(src, payload, fds):
            self.bounced += len(fds)  # the victim keeps them
            fds = []
        for (listener, idle_ms, state), fd in zip(records, fds, strict=False):
            self.adopting += 1
            sock = socket.socket(fileno=fd)
            w.loop.create_task(self._adopt(sock, w.conn_classes[listener], idle_ms, state, returned))
        if asked:
            self._answered(asked, len(fds))

    def _send_back(self, src: int, payload: bytes, fds: list[int]) -> bool:
        assert self.w.ctrl is not None
        msg = control.STEAL + src.to_bytes(2, "big") + CONNS + payload
        try:
            socket.send_fds(self.w.ctrl, [msg], fds)
        except OSError:
            return False
        for fd in fds:
            os.close(fd)
        return True

    async def _adopt(self, sock: socket.socket, cls: type[Conn], idle_ms: int, state: bytes,
                     returned: bool) -> None:
        def arriving() -> Conn:
            c = cls()
            c._flags = MIGRATING  # Worker.conn_opened hands it to arrived(), not on_open
            c.context = (idle_ms, state, returned)
            return c

        try:
            if self.w.opts.steal_adopt_delay_ms:  # fault injection (tests): a wider window
                await asyncio.sleep(self.w.opts.steal_adopt_delay_ms / 1000)
            await self.w.loop.connect_accepted_socket(arriving, sock)
        except OSError:  # it died in flight
            sock.close()
            self.adopting -= 1
            self.lost += 1

    def arrived(self, c: Conn) -> None:
        """A migrated connection's transport is up here (called by Worker.conn_opened)."""
        w = self.w
        idle_ms, state, returned = c.context
        c.context = None
        c._flags = READY
        self.adopting -= 1
        if returned:
            self.returned += 1
        else:
            self.migrated_in += 1
        w.active += 1
        if w.opts.max_connections_per_ip > 0:
            _count_ip(w, c)
        c._last_rx = w.wheel.now - int(idle_ms / (w.opts.tick_s * 1000))
        w.wheel.schedule(c, w.wheel.now + 1)  # the wheel's check finds its real deadline
        w.trace.record_instant(trace.ACCEPT, id(c), migrated=True)
        self._import(c, state)
        w.arrived_after_snapshot(c)

    def _import(self, c: Conn, state: bytes) -> None:
        try:
            c._h.import_state(c, state)
        except Exception:
            _log.exception("import_state failed; closing the connection")
            c.abort("migration_failed")


class Router:
    """The supervisor's side: the load table every ``steal_tick_s``, and STEAL routing.

    When the node drains, :meth:`freeze` stops stealing node-wide *before* any worker takes its
    drain's snapshot (Supervisor._shutdown): no load table goes out any more, every worker is
    told ``STEAL_OFF`` and stops asking and giving, a request still on its way is refused here
    and a hand-over still on its way goes back to its sender (``RETURNED``: the socket stays
    with its owner). A worker answers ``STEAL_OFF`` after every message it sent before, so
    once all have answered nothing is in flight but those returns, already written to their
    owners' channels ahead of the ``DRAIN`` that follows: each owner adopts its sockets back
    before its drain begins.
    """

    __slots__ = ("sup", "enabled", "frozen", "_unconfirmed", "_next_at", "routed", "returned",
                 "dropped", "kept")

    def __init__(self, sup: Supervisor) -> None:
        o = sup.opts
        self.sup = sup
        self.enabled = o.steal_max_per_tick > 0 and not (o.tls_cert_file and o.tls_key_file)
        self.frozen = False
        self._unconfirmed: set[int] = set()  # workers told STEAL_OFF that have not answered
        self._next_at = 0.0
        self.routed = 0  # connections passed from a victim to a thief
        self.returned = 0  # connections sent back to their victim: the thief was gone
        self.dropped = 0  # connections lost: neither end could take them
        self.kept = 0  # of the returned: stopped on their way by the freeze (drain)

    def stats(self) -> dict[str, int]:
        return {"routed": self.routed, "returned": self.returned, "dropped": self.dropped,
                "kept": self.kept}

    # ---- the drain ---------------------------------------------------------------------
    def freeze(self) -> None:
        """Stop stealing node-wide; :meth:`settled` says when every worker has stopped."""
        if self.frozen:
            return
        self.frozen = True
        if not self.enabled:
            return  # nothing ever moves
        for s in self.sup.slots:
            if s.pid and s.ctrl is not None:
                self.sup._send(s, control.STEAL_OFF)
                self._unconfirmed.add(s.index)

    def stopped(self, slot: WorkerSlot) -> None:
        """``slot`` answered STEAL_OFF: it will neither give nor ask any more."""
        self._unconfirmed.discard(slot.index)

    def settled(self) -> bool:
        """Every live worker told STEAL_OFF has answered (a dead one never will)."""
        slots = self.sup.slots
        self._unconfirmed = {i for i in self._unconfirmed if slots[i].ctrl is not None}
        return not self._unconfirmed

    def tick(self) -> None:
        if not self.enabled or self.frozen:
            return
        now = time.monotonic()
        if now < self._next_at:
            return
        self._next_at = now + self.sup.opts.steal_tick_s
        slots = self.sup.slots
        live = [s.ready and s.ctrl is not None for s in slots]
        if sum(live) < 2 or not any(s.stats.get("steal", {}).get("enabled") for s in slots):
            return  # nobody to balance, or an app whose connections never move
        loads = [s.load() if ok else -1 for s, ok in zip(slots, live, strict=True)]
        msg = control.LOADS + json.dumps(loads, separators=(",", ":")).encode()
        for s, ok in zip(slots, live, strict=True):
            if ok:
                self.sup._send(s, msg)

    def route(self, src: WorkerSlot, body: bytes, fds: list[int]) -> None:
        """Pass a STEAL message on; fds the target cannot take go back to the sender."""
        target, payload = int.from_bytes(body[:2], "big"), body[2:]
        slots = self.sup.slots
        try:
            if self.frozen and self._stopped_on_the_way(src, target, payload, fds):
                return
            out = control.STEAL + src.index.to_bytes(2, "big") + payload
            if target < len(slots) and self._deliver(slots[target], out, fds):
                self.routed += len(fds)
                return
            if not fds:
                return  # a request or refusal for a worker that is gone: the asker times out
            back = control.STEAL + target.to_bytes(2, "big") + RETURNED + payload[1:]
            if self._deliver(src, back, fds):
                self.returned += len(fds)
            else:
                self.dropped += len(fds)
                _log.warning("migrating connections dropped: neither worker can take them",
                             extra={"connections": len(fds), "worker": src.index})
        finally:
            for fd in fds:  # ours are copies: the receiver holds its own now
                os.close(fd)

    def _stopped_on_the_way(self, src: WorkerSlot, target: int, payload: bytes,
                            fds: list[int]) -> bool:
        """Frozen (the node drains): a request is refused for its victim, a hand-over goes
        back to its sender. False: pass it on as usual (a refusal; a hand-over whose sender
        cannot take it back, so the thief is its only chance)."""
        sub = payload[:1]
        if sub == REQUEST:
            self.sup._send(src, control.STEAL + target.to_bytes(2, "big") + REFUSE)
            return True
        if sub == CONNS and fds:
            back = control.STEAL + target.to_bytes(2, "big") + RETURNED + payload[1:]
            if self._deliver(src, back, fds):
                self.returned += len(fds)
                self.kept += len(fds)
                return True
        return False

    def _deliver(self, slot: WorkerSlot, msg: bytes, fds: list[int]) -> bool:
        if slot.ctrl is None or not slot.ready:
            return False
        if not fds:
            self.sup._send(slot, msg)
            return True
        try:
            socket.send_fds(slot.ctrl, [msg], fds)
        except OSError:  # full or gone: never queued, an fd must not wait in an outbox
            return False
        return True
