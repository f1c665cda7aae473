"""Task creation-site tracking, the leak report, stale connections and the SIGUSR1 dump."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvloop

from tidegate.observe.leaks import TaskTracker, install_sigusr1, stale_items

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.new_event_loop,
}
HERE = os.path.abspath(__file__)


async def sleep_forever() -> None:
    await asyncio.sleep(3600)


def leaky_function_for_tests() -> asyncio.Task[None]:
    return asyncio.create_task(sleep_forever(), name="the-leak")  # the creation site


LEAK_SITE = f"{HERE}:{leaky_function_for_tests.__code__.co_firstlineno + 1} in leaky_function_for_tests"


async def done_quickly() -> int:
    return 1


@pytest.fixture(params=sorted(LOOPS))
def loop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop]:
    lp = LOOPS[request.param]()
    yield lp
    for task in asyncio.all_tasks(lp):
        task.cancel()
    lp.run_until_complete(asyncio.sleep(0))
    lp.close()


def test_a_long_lived_task_is_reported_with_its_creation_site(
    loop: asyncio.AbstractEventLoop,
) -> None:
    tracker = TaskTracker()
    tracker.install(loop)

    async def main() -> list[dict[str, Any]]:
        leak = leaky_function_for_tests()
        finished = asyncio.create_task(done_quickly())
        await finished
        young = asyncio.ensure_future(sleep_forever())  # too young for the threshold below
        assert tracker.leak_report(min_age_s=0.05) == []
        await asyncio.sleep(0.1)
        young.cancel()
        await asyncio.gather(young, return_exceptions=True)
        assert tracker.site(leak) == LEAK_SITE
        return tracker.leak_report(min_age_s=0.05)

    report = loop.run_until_complete(main())
    tracker.uninstall()
    assert len(report) == 1, report  # the finished task and the young one are not there
    row = report[0]
    assert row["name"] == "the-leak"
    assert row["created_at"] == LEAK_SITE
    assert row["age_s"] >= 0.05
    assert row["coro"] == "sleep_forever"
    assert row["frame"].startswith(f"{HERE}:") and row["frame"].endswith(" in sleep_forever")
    assert " in sleep" in row["awaiting"]  # suspended inside asyncio.sleep
    assert json.loads(json.dumps(report)) == report
    assert loop.get_task_factory() is None


def test_sites_through_gather_wait_for_and_the_loop_itself(
    loop: asyncio.AbstractEventLoop,
) -> None:
    tracker = TaskTracker()
    tracker.install(loop)
    seen: dict[str, str | None] = {}

    async def main() -> None:
        direct = loop.create_task(sleep_forever())
        gathered = asyncio.gather(sleep_forever())
        await asyncio.sleep(0)
        here = f"{HERE}:"
        seen["direct"] = tracker.site(direct)
        seen["gather"] = [tracker.site(t) for t in asyncio.all_tasks() if t is not direct
                          and t is not asyncio.current_task()][0]
        assert all(s is not None and s.startswith(here) for s in seen.values()), seen
        direct.cancel()
        gathered.cancel()

    loop.run_until_complete(main())
    tracker.uninstall()
    assert seen["direct"] is not None and seen["direct"].endswith(" in main")
    assert seen["gather"] is not None and seen["gather"].endswith(" in main")


def test_tasks_from_before_install_and_untracked_tasks(loop: asyncio.AbstractEventLoop) -> None:
    early = loop.create_task(sleep_forever())
    tracker = TaskTracker()
    tracker.install(loop)

    async def main() -> list[dict[str, Any]]:
        raw = asyncio.Task(sleep_forever(), loop=loop)  # bypasses the factory
        await asyncio.sleep(0.03)
        report = tracker.leak_report(0.01, include_untracked=True)
        assert [r for r in tracker.leak_report(0.01) if r["age_s"] is None] == []
        raw.cancel()
        return report

    report = loop.run_until_complete(main())
    tracker.uninstall()
    early.cancel()
    by_site = {r["created_at"]: r for r in report}
    assert by_site["(before tracking)"]["age_s"] >= 0.01
    assert by_site[None]["age_s"] is None


def test_records_go_with_their_tasks(loop: asyncio.AbstractEventLoop) -> None:
    tracker = TaskTracker()
    tracker.install(loop)

    async def main() -> None:
        await asyncio.gather(*(asyncio.create_task(done_quickly()) for _ in range(100)))

    loop.run_until_complete(main())
    gc.collect()
    assert tracker.stats()["tasks_created"] >= 100
    assert tracker.stats()["tasks_tracked"] <= 1  # main() itself, maybe
    tracker.uninstall()


def test_a_factory_already_set_is_kept(loop: asyncio.AbstractEventLoop) -> None:
    made: list[asyncio.Future[Any]] = []

    def factory(lp: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Future[Any]:
        task = asyncio.Task(coro, loop=lp, **kw)
        made.append(task)
        return task

    loop.set_task_factory(factory)
    tracker = TaskTracker()
    tracker.install(loop)
    assert loop.run_until_complete(done_quickly()) == 1
    assert len(made) == 1 and tracker.stats()["tasks_created"] == 1
    tracker.uninstall()
    assert loop.get_task_factory() is factory


class FakeConn:
    def __init__(self, last_rx: float, addr: str) -> None:
        self.last_rx = last_rx
        self.addr = addr


def test_stale_items_lists_silent_connections_most_silent_first() -> None:
    now = 1000.0
    conns = [FakeConn(now - age, f"10.0.0.{i}") for i, age in enumerate([1, 100, 5, 300, 61])]
    conns.append(FakeConn(now - 999, "skipped"))

    def deadline(c: FakeConn, t: float) -> tuple[float, Any] | None:
        return None if c.addr == "skipped" else (t - c.last_rx, c.addr)

    rows = stale_items(conns, now, deadline, max_age_s=60)
    assert [r["where"] for r in rows] == ["10.0.0.3", "10.0.0.1", "10.0.0.4"]
    assert rows[0]["silent_s"] == 300
    assert stale_items(conns, now, deadline, max_age_s=60, limit=1) == rows[:1]
    assert stale_items([], now, deadline, max_age_s=0) == []
    described: list[FakeConn] = []

    def addr(c: FakeConn) -> str:
        described.append(c)
        return c.addr

    rows2 = stale_items(conns, now, lambda c, t: (t - c.last_rx, c), 60, limit=2, describe=addr)
    assert [r["where"] for r in rows2] == ["skipped", "10.0.0.3"]
    assert len(described) == 2  # only the rows returned are described


def test_sigusr1_logs_the_report(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tidegate.leaks")
    loop = uvloop.new_event_loop()
    tracker = TaskTracker()
    tracker.install(loop)
    off = install_sigusr1(
        loop,
        lambda: {
            "tasks": tracker.leak_report(min_age_s=0.02),
            "stale_connections": stale_items(
                [FakeConn(0.0, "10.1.2.3")], 100.0, lambda c, t: (t - c.last_rx, c.addr), 60
            ),
        },
    )

    async def main() -> None:
        leak = leaky_function_for_tests()
        await asyncio.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR1)
        for _ in range(100):
            if any(r.getMessage() == "leak report" for r in caplog.records):
                break
            await asyncio.sleep(0.01)
        leak.cancel()

    try:
        loop.run_until_complete(main())
    finally:
        off()
        tracker.uninstall()
        loop.close()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    dumps = [r for r in caplog.records if r.getMessage() == "leak report"]
    assert len(dumps) == 1
    report = dumps[0].report  # type: ignore[attr-defined]
    # The leak, and main() itself (the handler runs as a plain callback, outside any task).
    sites = [t["created_at"] for t in report["tasks"]]
    assert len(sites) == 2 and LEAK_SITE in sites
    assert any(s.endswith(" in test_sigusr1_logs_the_report") for s in sites)
    assert report["stale_connections"] == [{"silent_s": 100.0, "where": "10.1.2.3"}]


def test_a_failing_report_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tidegate.leaks")
    loop = asyncio.new_event_loop()

    def broken() -> Any:
        raise RuntimeError("boom")

    off = install_sigusr1(loop, broken)

    async def main() -> None:
        os.kill(os.getpid(), signal.SIGUSR1)
        for _ in range(100):
            if caplog.records:
                break
            await asyncio.sleep(0.01)

    try:
        loop.run_until_complete(main())
    finally:
        off()
        loop.close()
    assert [r.getMessage() for r in caplog.records] == ["leak report failed"]
