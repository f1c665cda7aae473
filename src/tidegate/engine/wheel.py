"""A hashed timing wheel: O(1) schedule and cancel, one loop timer per worker.

Each item (a connection) sits in exactly one slot, the tick of its next deadline. Items do not
move when traffic arrives: they record the tick of their last traffic, and when their slot comes
round the owner's check decides the next deadline (lazy rescheduling). So a message costs one
attribute store, and a tick costs work proportional to the connections due in it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class TimingWheel:
    __slots__ = ("tick_s", "now", "_slots", "_mask", "_check")

    def __init__(self, tick_s: float, horizon_s: float, check: Callable[[Any, int], int | None]):
        """``check(item, now_tick)`` returns the tick the item is next due, or None to drop it."""
        self.tick_s = tick_s
        self.now = 0
        horizon_ticks = int(horizon_s / tick_s) + 2
        size = 1
        while size < horizon_ticks:
            size <<= 1
        self._slots: list[set[Any]] = [set() for _ in range(size)]
        self._mask = size - 1
        self._check = check

    @property
    def horizon_ticks(self) -> int:
        return self._mask

    def ticks(self, seconds: float) -> int:
        """Whole ticks covering ``seconds`` (at least one)."""
        return max(1, int(seconds / self.tick_s + 0.999))

    def schedule(self, item: Any, due_tick: int) -> None:
        delay = due_tick - self.now
        if delay < 1:
            due_tick = self.now + 1
        elif delay > self._mask:
            due_tick = self.now + self._mask  # re-checked then; the check reschedules
        idx = due_tick & self._mask
        self._slots[idx].add(item)
        item._wslot = idx

    def cancel(self, item: Any) -> None:
        idx = item._wslot
        if idx >= 0:
            self._slots[idx].discard(item)
            item._wslot = -1

    def advance(self, to_tick: int) -> int:
        """Process every tick up to ``to_tick``; returns how many items were checked."""
        checked = 0
        check = self._check
        while self.now < to_tick:
            self.now += 1
            slot = self._slots[self.now & self._mask]
            if not slot:
                continue
            due_now = list(slot)
            slot.clear()
            checked += len(due_now)
            for item in due_now:
                item._wslot = -1
                nxt = check(item, self.now)
                if nxt is not None:
                    self.schedule(item, nxt)
        return checked

    def __len__(self) -> int:
        return sum(len(s) for s in self._slots)
