"""A channel's owner worker killed under a real multi-worker gateway: its channels are
re-owned by the ring successor while it is down, and handed back when it is ready again."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from test_server_e2e import api, raw_client
from tidegate.cluster.ipc_broker import worker_ring

pytestmark = pytest.mark.timeout(120)
TESTS = str(Path(__file__).parent)
WORKERS = 3
OWNER = 1


def call(srv: Any, method: str, **params: Any) -> dict[str, Any]:
    """A server API call that must answer with a result, not an error."""
    status, body = api(srv, method, json.dumps(params).encode())
    assert status == 200 and "error" not in body, body
    return dict(body["result"])


def ring_members(st: dict[str, Any], worker: int) -> list[int] | None:
    apps = (st["worker_stats"][worker] or {}).get("apps") or [{}]
    members = apps[0].get("broker_ring_members")
    return None if members is None else list(members)


def test_killing_a_channels_owner_re_owns_the_channel(gateway, tmp_path):
    gate = tmp_path / "hold-boot"
    srv = gateway("--workers", str(WORKERS), "--balance", "handoff",
                  "--rpc-handler", "boot_gate:rpc",
                  env={"PYTHONPATH": TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""),
                       "TIDEGATE_TEST_BOOT_GATE": str(gate)})
    ring = worker_ring(WORKERS)  # the ring every worker builds: same members, same owner
    channel = next(c for c in (f"news{i}" for i in range(1000)) if ring.owner(c) == OWNER)

    async def main() -> None:
        # One subscriber per worker (handoff: each connection to the least-loaded worker);
        # where each landed is read from the workers' stats.
        subs, placed = [], []
        for i in range(WORKERS):
            raw = await raw_client(srv, f"user{i}")
            assert "subscribe" in await raw.call("subscribe", {"channel": channel})
            subs.append(raw)
            st = await asyncio.to_thread(srv.wait_stats, lambda st, n=i + 1: sum(
                w.get("active", 0) for w in st["worker_stats"]) == n)
            placed.append(next(w for w, ws in enumerate(st["worker_stats"])
                               if ws["active"] and w not in placed))
        assert sorted(placed) == list(range(WORKERS))
        before = call(srv, "publish", channel=channel, data={"n": "before"})
        assert before["offset"] == 1
        for s in subs:
            assert (await s.push())["pub"]["data"] == {"n": "before"}

        # SIGKILL the owner; its restarted process is held at boot by the gate file.
        victim = st["worker_stats"][OWNER]
        assert victim["index"] == OWNER
        gate.touch()
        os.kill(victim["pid"], signal.SIGKILL)
        down = await asyncio.to_thread(srv.wait_stats, lambda st: st["restarts"] == 1)
        assert not down["ready"] and victim["pid"] not in down["workers"]
        survivors = [w for w in range(WORKERS) if w != OWNER]
        await asyncio.to_thread(srv.wait_stats, lambda st: all(
            ring_members(st, w) == survivors for w in survivors))

        # While it is down: publish, history and presence answer through the successor.
        during = call(srv, "publish", channel=channel, data={"n": "during"})
        assert during["offset"] == 1  # a new stream: the dead owner's history died with it
        assert srv.status()["ready"] is False  # still down
        hist = call(srv, "history", channel=channel, limit=10)
        assert [p["data"] for p in hist["publications"]] == [{"n": "during"}]
        assert isinstance(call(srv, "presence", channel=channel)["presence"], dict)
        assert "num_clients" in call(srv, "presence_stats", channel=channel)
        alive = []
        for w, s in zip(placed, subs, strict=True):
            if w == OWNER:
                continue  # its connection died with its worker
            assert (await s.push())["pub"]["data"] == {"n": "during"}
            alive.append(s)
        assert srv.status()["ready"] is False

        # Let it boot: once ready, the ring hands its channels back (empty: a new process).
        gate.unlink()
        await asyncio.to_thread(srv.wait_ready)
        await asyncio.to_thread(srv.wait_stats, lambda st: all(
            ring_members(st, w) == list(range(WORKERS)) for w in range(WORKERS)))
        after = call(srv, "publish", channel=channel, data={"n": "after"})
        assert after["offset"] == 1 and after["epoch"] != during["epoch"]
        hist = call(srv, "history", channel=channel, limit=10)
        assert [p["data"] for p in hist["publications"]] == [{"n": "after"}]
        assert isinstance(call(srv, "presence", channel=channel)["presence"], dict)
        call(srv, "presence_stats", channel=channel)
        for s in alive:
            assert (await s.push())["pub"]["data"] == {"n": "after"}
        # The successor forgot its interim copy of the channel.
        st = await asyncio.to_thread(srv.wait_stats, lambda st: sum(
            (w.get("apps") or [{}])[0].get("broker_dropped_channels_total", 0)
            for w in st["worker_stats"]) >= 1)
        assert st["restarts"] == 1

    try:
        asyncio.run(main())
    finally:
        gate.unlink(missing_ok=True)
