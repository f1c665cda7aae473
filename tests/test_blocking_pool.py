"""The bounded blocking pool: never more threads than the cap, overload is an error, not a pile."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from tidegate.engine.blocking import BlockingPool, Overloaded


def test_cap_on_threads_and_waiting_callers_then_clear_errors():
    pool = BlockingPool(max_threads=2, max_waiting=2, default_timeout_s=5)
    gate = threading.Event()
    running = []

    def work(i: int) -> int:
        running.append(threading.get_ident())
        gate.wait(5)
        return i

    async def main() -> None:
        calls = [asyncio.create_task(pool.run(work, i)) for i in range(4)]
        await asyncio.sleep(0.2)
        assert pool.busy == 2 and pool.waiting == 2
        with pytest.raises(Overloaded):  # a fifth caller is refused at once
            await pool.run(work, 99)
        gate.set()
        assert sorted(await asyncio.gather(*calls)) == [0, 1, 2, 3]
        assert len(set(running)) <= 2
        assert pool.stats()["rejections"] == 1

    asyncio.run(main())
    pool.shutdown()


def test_deadline_covers_waiting_and_running():
    pool = BlockingPool(max_threads=1, max_waiting=4)

    async def main() -> None:
        slow = asyncio.create_task(pool.run(time.sleep, 0.5, timeout_s=2))
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded):  # waits for the only thread past its deadline
            await pool.run(time.sleep, 0, timeout_s=0.1)
        await slow
        with pytest.raises(Overloaded):  # runs past its deadline
            await pool.run(time.sleep, 0.5, timeout_s=0.1)

    asyncio.run(main())
    pool.shutdown()
