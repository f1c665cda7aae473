"""The node's CPU gate: at most ``long_job_workers`` workers run long jobs at once.

Why: the file limit makes a node here run 27 workers on 2 cores. A broadcast to every
subscriber makes all 27 busy at once; each runs its fan-out in 5 ms slices and turns its loop
in between (engine/runqueue.py), but it gets a CPU ~4% of the time, so a heartbeat that reaches
it waits behind the other 26 workers' scheduler turns. Through the gate two workers (one per
core) run their long jobs while the other 25 sleep in ``epoll`` and answer heartbeats, API calls
and small channels' publications as they come: at 500,000 subscribers the probes' heartbeat p99
went from 231 to 50 ms, the server's CPU for the broadcast unchanged (README, "The CPU gate",
for what it cost the broadcast with the clients on the same machine).

A job becomes *long* after ``runqueue.LONG_AFTER_STEPS`` steps: a small job (a drain batch, an
eviction, the start of any fan-out) never waits for the gate.

Protocol over the control channel (``control.GATE``): the worker sends ``+`` to ask for a
token and ``-`` to give it back; the supervisor answers ``+`` when it grants one. Tokens are
granted first come, first served; a worker gives its token back when its long jobs are done,
or after holding it ``HOLD_S`` and asks again at the back of the line (granted at once when
nobody waits). The supervisor takes back the token of a worker that dies. There is no gate
when ``long_job_workers`` is at least the number of workers, as on a host whose file limit
lets one worker per core hold every connection.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable

__all__ = ["GateArbiter", "GateClient", "gate_tokens"]

ASK = b"+"
GIVE_BACK = b"-"
GRANT = b"+"
# A holder whose long jobs go on gives its token back after this long and asks again: a worker
# with a small long job waits for at most ~HOLD_S x workers / tokens, not for the whole of
# other workers' broadcasts (a 500k one is ~0.4 s of CPU per worker).
HOLD_S = 0.1


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def gate_tokens(long_job_workers: int, workers: int) -> int:
    """Tokens the node's gate has, 0 when there is no gate: ``long_job_workers`` (0: one per
    core, < 0: no gate); no gate either when every worker could hold one."""
    if long_job_workers < 0 or workers <= 1:
        return 0
    n = long_job_workers or cores()
    return n if n < workers else 0


class GateClient:
    """A worker's side: ``ask()``, and ``on_grant`` runs when the token comes; ``give_back()``.

    ``send(body) -> bool`` sends a ``control.GATE`` message; when it fails (no supervisor),
    the token is taken as granted: a gate nobody keeps must not stop a worker's jobs.
    """

    __slots__ = ("_send", "on_grant", "held", "asking", "held_since", "_asked_at",
                 "grants", "wait_s_total", "wait_s_max", "gave_back_early")

    def __init__(self, send: Callable[[bytes], bool]) -> None:
        self._send = send
        self.on_grant: Callable[[], None] = lambda: None
        self.held = False
        self.asking = False
        self.held_since = 0.0
        self._asked_at = 0.0
        self.grants = 0
        self.wait_s_total = 0.0
        self.wait_s_max = 0.0
        self.gave_back_early = 0  # tokens given back after HOLD_S with long jobs left

    def ask(self) -> None:
        if self.held or self.asking:
            return
        self.asking = True
        self._asked_at = time.monotonic()
        if not self._send(ASK):
            self.granted()

    def granted(self) -> None:
        now = time.monotonic()
        wait = now - self._asked_at
        self.asking = False
        self.held = True
        self.held_since = now
        self.grants += 1
        self.wait_s_total += wait
        if wait > self.wait_s_max:
            self.wait_s_max = wait
        self.on_grant()

    def on_message(self, body: bytes) -> None:
        if body != GRANT:
            return
        if self.asking:
            self.granted()
        elif not self.held:  # not asked for (cannot happen; if it did, the token would leak)
            self._send(GIVE_BACK)

    def give_back(self) -> None:
        if self.held:
            self.held = False
            self._send(GIVE_BACK)

    def held_too_long(self, now: float) -> bool:
        return self.held and now - self.held_since >= HOLD_S

    def stats(self) -> dict[str, float | int]:
        return {
            "grants": self.grants,
            "held": int(self.held),
            "asking": int(self.asking),
            "wait_s_total": round(self.wait_s_total, 6),
            "wait_ms_max": round(self.wait_s_max * 1000.0, 3),
            "gave_back_early": self.gave_back_early,
        }


class GateArbiter:
    """The supervisor's side: who holds the tokens and who waits, first come first served."""

    __slots__ = ("tokens", "holders", "queue", "grants", "queue_max", "reclaimed")

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.holders: set[int] = set()
        self.queue: collections.deque[int] = collections.deque()
        self.grants = 0
        self.queue_max = 0
        self.reclaimed = 0  # tokens taken back from workers that died holding them

    def on_message(self, worker: int, body: bytes) -> list[int]:
        """Handle a worker's message; the workers to send a grant to now."""
        if body == ASK:
            if worker in self.holders:
                # It asks while we think it holds one: its give-back was lost (its channel was
                # full). It has no token: the one we count for it is its, again.
                return [worker, *self._grant()]
            if worker not in self.queue:
                self.queue.append(worker)
                if len(self.queue) > self.queue_max:
                    self.queue_max = len(self.queue)
        elif body == GIVE_BACK:
            self.holders.discard(worker)
        return self._grant()

    def forget(self, worker: int) -> list[int]:
        """``worker`` is gone: its token comes back, its place in the line goes."""
        if worker in self.holders:
            self.holders.discard(worker)
            self.reclaimed += 1
        try:
            self.queue.remove(worker)
        except ValueError:
            pass
        return self._grant()

    def _grant(self) -> list[int]:
        out = []
        while self.queue and len(self.holders) < self.tokens:
            w = self.queue.popleft()
            self.holders.add(w)
            self.grants += 1
            out.append(w)
        return out

    def stats(self) -> dict[str, int]:
        return {
            "tokens": self.tokens,
            "held": len(self.holders),
            "waiting": len(self.queue),
            "waiting_max": self.queue_max,
            "grants": self.grants,
            "reclaimed": self.reclaimed,
        }
