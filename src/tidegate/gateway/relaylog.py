"""Exactly-once across a session's move between workers: the relay log (sans-I/O).

Work stealing (engine/stealing.py) exports a session on one worker (the victim) and imports it
on another (the thief) a moment later; in between it is in neither hub. A message relayed to
every worker (cluster/ipc_broker.py: publications, join/leave, the HTTP API's actions on users)
that the victim handles after the export and the thief before the import would reach neither.
Channels with history catch up from their stream position (gateway/migration.py); everything
else goes through this log.

**Stamps.** Every worker numbers what it relays: a counter that starts at the process's
CLOCK_MONOTONIC in ns, so a restarted worker's stamps stay above those of the process it
replaces (one number per worker slot, no incarnation ids). The supervisor passes each worker's
control messages on to every other worker in order, so each worker handles each origin's
messages in stamp order; ``seen[origin]`` is the last stamp it handled from each (its own:
``top``, its own delivery counting at the moment it relays). That vector is a consistent cut:
this worker has delivered exactly the messages with ``stamp <= seen[origin]``.

**The ring** keeps what this worker delivered lately, its own messages included, bounded by
``RING_ENTRIES`` entries, ``RING_BYTES`` of payload and ``RING_AGE_S`` seconds: one deque
append per message, nothing per connection. The window it must cover is a supervisor hop plus
the thief's adoption of the socket (well under a millisecond idle; a loop slice, a GC pause or
a backlog of control messages under load). 8192 entries hold that window up to ~80k relayed
messages/s at 100 ms; 16 MiB caps what big payloads can pin (64 KiB publications: 256 of
them); 2 s is longer than any sane hand-over and short enough not to keep payloads around.

**A move.** The victim writes its cut into the session state (:meth:`cut`). On import, the
thief (or the victim itself, for a hand-over that came back) first makes sure it has handled
everything the victim had (:meth:`behind`): the supervisor sends a hand-over with its fds at
once, while relays for the thief may still wait in the supervisor's outbox. If it is behind,
the session waits (:meth:`wait`), pending in the hub, until ``seen`` reaches the cut (or
``RING_AGE_S`` passes); messages handled meanwhile go to the ring. Then :meth:`since` gives
every ring entry after the cut (``stamp > cut[origin]``) in the order this worker handled
them, the session delivers those that concern it and goes live, in the same loop callback:
each message once, in each origin's order. If the ring no longer reaches back to the cut
(``gone``: evicted, or sent before this worker could hear the origin), or the wait timed out:
None, and the session is disconnected with 3010 "insufficient state" (the SDK reconnects).

**Knowing the origins.** A worker receives an origin's messages from the moment the supervisor
knows its control channel; what was sent before never comes. Each worker therefore says hello
to every other on boot, through the same ordered channels (``hello``): the request carries its
``top``, the reply the other's, so each learns where the other's stamps stood when it could
first hear them (``base``; a first message does the same). Until its hellos are answered a
worker exports nothing (``ready``): its cut would not say where it stands with every origin.
A hello that fails marks the origin down (``DEAD``): nothing more will come from that process,
and whatever it sent before this worker existed was handled by every victim before this
worker's own hello (one ordered channel), so no cut waits for it.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Any

__all__ = ["CMD", "DEAD", "JOIN", "LEAVE", "PUB", "RelayLog"]

RING_ENTRIES = 8192
RING_BYTES = 16 << 20
RING_AGE_S = 2.0
# Message kinds, as relayed (cluster/ipc_broker.py). CMD: a session command of the HTTP API
# (key: its name, obj: its arguments, user and client first).
PUB, JOIN, LEAVE, CMD = "pub", "join", "leave", "cmd"
DEAD = -2  # seen[origin]: never heard, and its hello failed: it is down

# A ring entry: (origin, stamp, kind, key, obj, time, payload bytes)
Entry = tuple[int, int, str, str, Any, float, int]
Done = Callable[[list[Entry] | None], None]


class RelayLog:
    """One worker's stamps, its cut, the ring of recent deliveries and the sessions waiting."""

    __slots__ = (
        "index", "top", "seen", "gone", "base", "ring", "bytes", "max_entries", "max_bytes",
        "max_age_s", "clock", "commands", "ready", "schedule", "_waiting",
        "resumed", "waited", "insufficient", "replayed",
    )

    def __init__(
        self,
        index: int,
        start: int | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = RING_ENTRIES,
        max_bytes: int = RING_BYTES,
        max_age_s: float = RING_AGE_S,
    ) -> None:
        self.index = index
        self.top = time.monotonic_ns() if start is None else start  # our last stamp
        self.seen: dict[int, int] = {}  # other origins: last stamp handled (or DEAD)
        self.gone: dict[int, int] = {}  # origin: the highest stamp the ring cannot give back
        self.base: dict[int, int] = {index: self.top}  # origin: where our knowledge starts
        self.ring: collections.deque[Entry] = collections.deque()
        self.bytes = 0
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.clock = clock
        # The API's session commands by name: fn(session, *args) (registered by the app).
        self.commands: dict[str, Callable[..., Any]] = {}
        self.ready = True  # until a hello is out: see the module doc
        # Called with a delay when the first session starts waiting (the broker's timer).
        self.schedule: Callable[[float], None] | None = None
        # cut (as a sorted tuple) -> [cut, deadline, callbacks]: sessions of one hand-over
        # share their victim's cut, so a relay checks each cut once.
        self._waiting: dict[tuple[tuple[int, int], ...], list[Any]] = {}
        self.resumed = 0  # imports that went through the log
        self.waited = 0  # of those, how many had to wait for this worker to catch up
        self.insufficient = 0  # ... and could not be served exactly once (3010)
        self.replayed = 0  # messages delivered from the ring to sessions that moved

    def stats(self) -> dict[str, Any]:
        return {
            "relay_ring_entries": len(self.ring),
            "migration_resumed_total": self.resumed,
            "migration_waited_total": self.waited,
            "migration_insufficient_total": self.insufficient,
            "migration_replayed_total": self.replayed,
        }

    # ---- stamping and recording (the hot path: once per relayed message) -------------------
    def stamp(self) -> int:
        """The next stamp of a message this worker relays."""
        self.top += 1
        return self.top

    def add(self, origin: int, stamp: int, kind: str, key: str, obj: Any) -> None:
        """Record a message this worker handled: ``origin``'s ``stamp`` (its own ones too)."""
        if origin != self.index:
            if self.seen.get(origin, -1) < 0:
                self._first(origin, stamp)
            self.seen[origin] = stamp
        size = len(obj.data) if kind == PUB else 0
        now = self.clock()
        ring = self.ring
        ring.append((origin, stamp, kind, key, obj, now, size))
        self.bytes += size
        if (len(ring) > self.max_entries or self.bytes > self.max_bytes
                or now - ring[0][5] > self.max_age_s):
            self._trim(now)

    def _first(self, origin: int, stamp: int) -> None:
        # Its first message here: what it sent before never reached us.
        self.base[origin] = stamp - 1
        self.gone[origin] = max(self.gone.get(origin, -1), stamp - 1)

    def _trim(self, now: float) -> None:
        ring, gone = self.ring, self.gone
        while ring and (len(ring) > self.max_entries or self.bytes > self.max_bytes
                        or now - ring[0][5] > self.max_age_s):
            origin, stamp, _kind, _key, _obj, _t, size = ring.popleft()
            gone[origin] = stamp
            self.bytes -= size

    # ---- knowing the origins ----------------------------------------------------------------
    def hello(self, origin: int, top: int) -> None:
        """``origin`` said its stamps stood at ``top``; everything it sent before that reached
        us already (same ordered channel)."""
        if origin == self.index:
            return
        have = self.seen.get(origin, -1)
        if have < 0:  # never heard (or thought down): our knowledge starts here
            self.seen[origin] = self.base[origin] = top
            self.gone[origin] = max(self.gone.get(origin, -1), top)
        elif top > have:  # a new process in that slot: its stamps start above the old one's
            self.seen[origin] = top

    def hello_failed(self, origin: int) -> None:
        if origin != self.index and origin not in self.seen:
            self.seen[origin] = DEAD

    # ---- a move -----------------------------------------------------------------------------
    def cut(self) -> dict[int, int]:
        """What this worker has delivered: the last stamp handled per origin, its own included."""
        out = {o: s for o, s in self.seen.items() if s >= 0}
        out[self.index] = self.top
        return out

    def behind(self, cut: dict[int, int]) -> bool:
        """This worker has not yet handled everything the cut says was delivered."""
        seen = self.seen
        for origin, stamp in cut.items():
            if origin == self.index:
                continue  # nobody has seen our stamps before we made them
            have = seen.get(origin)
            if have is None:
                return True  # not heard yet: its hello is on the way
            if have != DEAD and have < stamp:
                return True
        return False

    def since(self, cut: dict[int, int]) -> list[Entry] | None:
        """The ring's entries after ``cut``, oldest first; None when it does not reach back
        that far (call once :meth:`behind` is False)."""
        after: dict[int, int] = {}
        want = 0
        gone, base, seen = self.gone, self.base, self.seen
        for origin in cut.keys() | base.keys():
            at = cut.get(origin)
            if at is None:  # the victim never heard it: it delivered nothing from it
                at = base.get(origin)
                if at is None:
                    continue
            if gone.get(origin, -1) > at:
                self.insufficient += 1
                return None
            last = self.top if origin == self.index else seen.get(origin, -1)
            if last > at:
                after[origin] = at
                want += last - at  # as many as stamps (fewer if some relay was lost)
        if not want:
            return []
        want = min(want, len(self.ring))
        out: list[Entry] = []
        for entry in reversed(self.ring):  # the newest first: the window is at the end
            at = after.get(entry[0])
            if at is not None and entry[1] > at:
                out.append(entry)
                want -= 1
                if not want:
                    break
        out.reverse()
        return out

    def resume(self, cut: dict[int, int], done: Done) -> bool:
        """Call ``done(since(cut))`` now if this worker is not behind the cut (True), or once
        it has caught up; ``done(None)`` when the ring cannot serve it or the wait times out."""
        self.resumed += 1
        if not self.behind(cut):
            done(self.since(cut))
            return True
        self.waited += 1
        key = tuple(sorted(cut.items()))
        group = self._waiting.get(key)
        if group is None:
            first = not self._waiting
            self._waiting[key] = [cut, self.clock() + self.max_age_s, [done]]
            if first and self.schedule is not None:
                self.schedule(self.max_age_s)
        else:
            group[2].append(done)
        return False

    @property
    def waiting(self) -> bool:
        return bool(self._waiting)

    def release(self) -> None:
        """After each message handled: sessions whose cut this worker reached go on."""
        if not self._waiting:
            return
        ready = [k for k, (cut, _d, _f) in self._waiting.items() if not self.behind(cut)]
        for key in ready:
            cut, _deadline, callbacks = self._waiting.pop(key)
            entries = self.since(cut)
            if entries is None:
                self.insufficient += len(callbacks) - 1  # (since counted one)
            for done in callbacks:
                done(entries)

    def expire(self) -> float | None:
        """Give up on waits past their deadline (``done(None)``: 3010); returns the delay
        until the next deadline, None when nothing waits."""
        now = self.clock()
        late = [k for k, (_c, deadline, _f) in self._waiting.items() if deadline <= now]
        for key in late:
            _cut, _deadline, callbacks = self._waiting.pop(key)
            self.insufficient += len(callbacks)
            for done in callbacks:
                done(None)
        if not self._waiting:
            return None
        return max(0.0, min(d for _c, d, _f in self._waiting.values()) - now)
