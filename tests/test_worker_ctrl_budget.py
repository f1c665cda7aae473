"""A burst on a worker's control channel (every worker's presence calls to a hot channel's
owner, a relay storm) is read one ``slice_ms`` at a time, so the loop keeps turning between
slices: heartbeats and accepts are not held up behind it. Real control channels, no fork."""

from __future__ import annotations

import asyncio
import time

from tidegate.apps.echo import EchoHandler
from tidegate.engine import control
from tidegate.engine.options import EngineOptions
from tidegate.engine.worker import Worker

KIND = b"z"  # a kind the engine does not use, as an app's own messages would be
BURST = 200
HANDLING_S = 0.001  # each message costs 1 ms to handle: the burst is 200 ms of work


def _worker_with_burst() -> tuple[Worker, list[int], object]:
    sup_end, ctrl = control.pair()
    ctrl.setblocking(False)
    w = Worker(EngineOptions(slice_ms=5.0), EchoHandler(), index=1, ctrl=ctrl, workers_total=2)
    handled: list[int] = []

    def slow(body: bytes) -> None:
        time.sleep(HANDLING_S)
        handled.append(int(body))

    w.on_control(KIND, slow)
    for i in range(BURST):
        sup_end.send(KIND + b"%d" % i)
    return w, handled, sup_end


def test_one_read_stops_after_its_slice_and_the_next_goes_on_in_order() -> None:
    async def main() -> None:
        w, handled, sup_end = _worker_with_burst()
        w._on_ctrl()
        assert 0 < len(handled) < 50, "one turn handles about one slice's worth, not the burst"
        assert w.ctrl_yields == 1
        while len(handled) < BURST:
            w._on_ctrl()
        assert handled == list(range(BURST)), "nothing lost, nothing reordered"
        assert w.stats()["ctrl_yields"] == w.ctrl_yields > 1

    asyncio.run(main())


def test_reading_everything_at_once_when_asked() -> None:
    """The drain reads what waits on the channel before it lists its connections."""

    async def main() -> None:
        w, handled, sup_end = _worker_with_burst()
        w._on_ctrl(budget_s=None)
        assert handled == list(range(BURST))
        assert w.ctrl_yields == 0

    asyncio.run(main())


def test_the_loop_turns_between_slices_of_a_burst() -> None:
    """With the reader on the loop, a callback scheduled meanwhile (a wheel tick, an accept)
    runs long before the 200 ms burst is through."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        w, handled, sup_end = _worker_with_burst()
        assert w.ctrl is not None
        loop.add_reader(w.ctrl.fileno(), w._on_ctrl)
        seen_at: list[int] = []
        t0 = time.monotonic()

        def tick() -> None:
            seen_at.append(len(handled))
            if len(seen_at) < 5:
                loop.call_soon(tick)

        loop.call_soon(tick)
        while len(handled) < BURST and time.monotonic() - t0 < 10:
            await asyncio.sleep(0.001)
        loop.remove_reader(w.ctrl.fileno())
        assert handled == list(range(BURST))
        assert len(seen_at) == 5
        assert seen_at[-1] < BURST, f"ticks ran only after the burst: {seen_at}"

    asyncio.run(main())


def test_with_the_run_queue_off_a_read_takes_everything() -> None:
    """``slice_ms`` 0 means "in one go" everywhere, here too; and even a budget already spent
    reads one message a call (the reader never spins without progress)."""

    async def main() -> None:
        w, handled, sup_end = _worker_with_burst()
        w.opts.slice_ms = 0.0
        w._on_ctrl()
        assert handled == list(range(BURST)) and w.ctrl_yields == 0
        w, handled, sup_end = _worker_with_burst()
        w._on_ctrl(budget_s=0.0)
        w._on_ctrl(budget_s=0.0)
        assert handled == [0, 1] and w.ctrl_yields == 2

    asyncio.run(main())
