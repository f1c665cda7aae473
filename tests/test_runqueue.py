"""The worker's run queue: slices that hand the loop back, round-robin, cancellation, errors."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvloop

from tidegate.engine.options import EngineOptions
from tidegate.engine.runqueue import CANCELLED, DONE, FAILED, RunQueue
from tidegate.engine.worker import Worker

pytestmark = pytest.mark.timeout(30)
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def run(loop_name: str, coro_fn: Callable[[], Any]) -> Any:
    loop = LOOPS[loop_name]()
    try:
        return loop.run_until_complete(coro_fn())
    finally:
        loop.close()


def spin(seconds: float) -> None:
    """Busy work: a step that holds the loop like a chunk of writes does."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_a_timer_due_during_a_long_job_fires_before_the_job_ends(loop_name: str) -> None:
    async def main() -> None:
        rq = RunQueue(slice_ms=1.0)
        fired: list[int] = []
        steps = [0]
        limit = 20_000  # ~2 s of steps at most: far longer than any slice

        def job() -> Iterator[None]:
            # the timer is armed from inside the job, so it is due while the job still runs
            asyncio.get_running_loop().call_later(0.005, lambda: fired.append(steps[0]))
            while steps[0] < limit and not fired:
                spin(0.0001)
                steps[0] += 1
                yield

        h = rq.submit(job(), "long")
        assert not h.done  # queued, not run inside submit
        await h.wait()
        assert fired, "the timer never ran while the job was running"
        assert fired[0] < limit  # it ran before the job's end, not after
        assert h.state == DONE
        assert rq.slices > 1 and rq.jobs_done == 1 and rq.depth == 0

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_io_callbacks_run_between_slices(loop_name: str) -> None:
    """A socket read (an I/O callback, like a heartbeat) is served while a job is running."""

    async def main() -> None:
        rq = RunQueue(slice_ms=1.0)
        got: list[bytes] = []
        loop = asyncio.get_running_loop()

        async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(await r.readexactly(4))
            await w.drain()
            w.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        done_at: list[int] = []

        def job() -> Iterator[None]:
            n = 0
            writer.write(b"ping")  # answered by the server side of this same loop
            while not got and n < 20_000:
                spin(0.0001)
                n += 1
                yield
            done_at.append(n)

        async def read() -> None:
            got.append(await reader.readexactly(4))

        reading = loop.create_task(read())
        await rq.submit(job(), "long").wait()
        await reading
        assert got == [b"ping"]
        assert done_at[0] < 20_000  # the job saw the answer: it arrived while it ran
        writer.close()
        server.close()
        await server.wait_closed()

    run(loop_name, main)


def test_round_robin_lets_a_short_job_finish_first() -> None:
    async def main() -> None:
        rq = RunQueue(slice_ms=1000.0, check_every=2)
        order: list[str] = []

        def job(name: str, steps: int) -> Iterator[None]:
            for _ in range(steps):
                yield
            order.append(name)

        a = rq.submit(job("long", 100), "long")
        b = rq.submit(job("short", 3), "short")
        await asyncio.gather(a.wait(), b.wait())
        assert order == ["short", "long"]

    run("asyncio", main)


def test_cancel_drops_a_queued_job_and_closes_it() -> None:
    async def main() -> None:
        rq = RunQueue(slice_ms=0.5)
        closed: list[bool] = []
        steps = [0]

        def job() -> Iterator[None]:
            try:
                while True:
                    steps[0] += 1
                    spin(0.0002)
                    yield
            finally:
                closed.append(True)

        h = rq.submit(job(), "forever")
        other = rq.submit(iter(range(10)), "other")
        await asyncio.sleep(0.01)
        assert steps[0] > 0 and not h.done
        assert h.cancel()
        assert not h.cancel()  # once
        assert h.state == CANCELLED and closed == [True]
        with pytest.raises(asyncio.CancelledError):
            await h.wait()
        at_cancel = steps[0]
        await other.wait()
        await asyncio.sleep(0.01)
        assert steps[0] == at_cancel  # never stepped again
        assert rq.depth == 0 and rq.jobs_cancelled == 1 and rq.jobs_done == 1

    run("asyncio", main)


def test_a_job_may_cancel_itself() -> None:
    async def main() -> None:
        rq = RunQueue(slice_ms=5.0)
        box: list[Any] = []
        steps = [0]

        def job() -> Iterator[None]:
            while True:
                steps[0] += 1
                if steps[0] == 3:
                    box[0].cancel()
                yield

        box.append(rq.submit(job(), "self"))
        with pytest.raises(asyncio.CancelledError):
            await box[0].wait()
        assert steps[0] == 3 and rq.depth == 0

    run("asyncio", main)


def test_an_error_in_one_job_is_logged_and_the_others_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        rq = RunQueue(slice_ms=5.0)
        ran: list[int] = []

        def bad() -> Iterator[None]:
            yield
            raise RuntimeError("boom")

        def good() -> Iterator[None]:
            for i in range(50):
                ran.append(i)
                yield

        b = rq.submit(bad(), "bad")
        g = rq.submit(good(), "good")
        with pytest.raises(RuntimeError):
            await b.wait()
        await g.wait()
        assert b.state == FAILED and g.state == DONE
        assert ran == list(range(50))
        assert rq.jobs_failed == 1 and rq.jobs_done == 1
        # and the queue still takes work
        await rq.submit(iter(range(3)), "after").wait()
        assert rq.jobs_done == 2

    with caplog.at_level(logging.ERROR):
        run("asyncio", main)
    assert any("run-queue job failed" in r.getMessage() for r in caplog.records)


def test_slicing_off_runs_a_job_inside_submit() -> None:
    async def main() -> None:
        rq = RunQueue(slice_ms=0)
        seen: list[int] = []
        h = rq.submit(iter(seen.append(i) for i in range(5)), "inline")
        assert h.state == DONE and seen == [0, 1, 2, 3, 4]
        await h.wait()  # already done: resolves at once
        assert not rq.enabled and rq.slices == 0

    run("asyncio", main)


def test_a_slice_ends_once_its_time_is_up() -> None:
    """Each slice ends after slice_ms (plus at most check_every steps): many slices for a job
    much longer than one."""

    async def main() -> None:
        rq = RunQueue(slice_ms=2.0, check_every=1)

        def job() -> Iterator[None]:
            for _ in range(100):
                spin(0.0005)  # 50 ms of work in all
                yield

        await rq.submit(job(), "long").wait()
        assert rq.slices >= 5
        assert rq.steps == 100

    run("asyncio", main)


def test_worker_has_a_run_queue_and_reports_it() -> None:
    async def main() -> None:
        from tidegate.apps.echo import EchoHandler

        w = Worker(EngineOptions(slice_ms=3.0), EchoHandler())
        assert w.runqueue.enabled and w.runqueue.slice_s == pytest.approx(0.003)
        await w.runqueue.submit(iter(range(4)), "x").wait()
        st = w.stats()["runqueue"]
        assert st["jobs_done"] == 1 and st["depth"] == 0 and st["slice_ms"] == pytest.approx(3.0)

    run("asyncio", main)


def test_the_drain_is_a_run_queue_job_in_small_steps() -> None:
    """Worker._drain_batch: every connection gets its goodbye, DRAIN_STEP per step."""
    from tidegate.apps.echo import EchoHandler
    from tidegate.engine.worker import DRAIN_STEP

    said: list[int] = []

    class Stub:
        closing = False

        def __init__(self, i: int) -> None:
            self.i = i
            self._h = self

        def on_drain(self, c: Stub) -> None:
            said.append(c.i)

    async def main() -> None:
        w = Worker(EngineOptions(), EchoHandler())
        conns: list[Any] = [Stub(i) for i in range(3 * DRAIN_STEP + 1)]
        steps = list(w._drain_batch(conns))
        assert len(steps) == 3 and said == list(range(len(conns)))
        assert all(w.close_reasons[c] == "drain" for c in conns)

    run("asyncio", main)
