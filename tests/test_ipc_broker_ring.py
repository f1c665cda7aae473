"""The embedded broker's channel owners on the ring, in one process: a stand-in supervisor
routes the control messages between IpcBroker instances and kills and restarts them."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tidegate.cluster.ipc_broker import IpcBroker, WorkerGone, worker_ring
from tidegate.engine import control
from tidegate.engine.options import EngineOptions
from tidegate.gateway.messages import ClientInfo

HIST = {"history_size": 10, "history_ttl_s": 60.0}


class Recorder:
    """A hub: what a worker's subscribers would have been sent."""

    def __init__(self) -> None:
        self.pubs: list[tuple[str, bytes]] = []

    def handle_publication(self, channel: str, pub: Any) -> None:
        self.pubs.append((channel, pub.data))

    def handle_join(self, channel: str, info: ClientInfo) -> None: ...

    def handle_leave(self, channel: str, info: ClientInfo) -> None: ...


class FakeWorker:
    opts = EngineOptions()

    def __init__(self, sup: FakeSupervisor, index: int) -> None:
        self.sup, self.index = sup, index
        self.handlers: dict[bytes, Any] = {}

    def on_control(self, kind: bytes, fn: Any) -> None:
        self.handlers[kind] = fn

    def send_control(self, kind: bytes, body: bytes) -> bool:
        self.sup.route(self.index, kind, body)
        return True


class FakeSupervisor:
    """Relays and directed messages as the real one does (one loop turn later, in order);
    messages to a dead worker are dropped, like a closed control socket."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.workers: list[FakeWorker] = []
        self.brokers: list[IpcBroker] = []
        self.hubs: list[Recorder] = []
        self.down: set[int] = set()
        for i in range(n):
            self.workers.append(FakeWorker(self, i))
            self.brokers.append(IpcBroker(i, n))
            self.hubs.append(Recorder())
            self._boot(i)

    def _boot(self, i: int) -> None:
        self.brokers[i].register(self.hubs[i])
        self.brokers[i].attach(self.workers[i])  # type: ignore[arg-type]

    def route(self, src: int, kind: bytes, body: bytes) -> None:
        loop = asyncio.get_running_loop()
        if kind == control.RELAY:
            for w in self.workers:
                if w.index != src:
                    loop.call_soon(self._deliver, w.index, kind, body)
        elif kind == control.TO:
            loop.call_soon(self._deliver, int.from_bytes(body[:2], "big"), kind, body[2:])

    def _deliver(self, target: int, kind: bytes, body: bytes) -> None:
        if target not in self.down:
            self.workers[target].handlers[kind](body)

    def announce(self, to: list[int] | None = None) -> None:
        live = [i for i in range(self.n) if i not in self.down]
        body = ",".join(map(str, live)).encode()
        for i in live if to is None else to:
            self.workers[i].handlers[control.MEMBERS](body)

    def kill(self, i: int) -> None:
        self.down.add(i)

    def restart(self, i: int) -> None:
        self.brokers[i] = IpcBroker(i, self.n)  # a new process: empty memory
        self.hubs[i] = Recorder()
        self.workers[i] = FakeWorker(self, i)
        self._boot(i)
        self.down.discard(i)


def channel_owned_by(owner: int, n: int, prefix: str = "room") -> str:
    ring = worker_ring(n)
    return next(c for c in (f"{prefix}-{i}" for i in range(10_000)) if ring.owner(c) == owner)


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_an_id_that_hashes_to_a_dead_worker_is_re_routed_not_lost():
    async def main() -> None:
        sup = FakeSupervisor(3)
        b0 = sup.brokers[0]
        ch = channel_owned_by(2, 3)
        first = await b0.publish(ch, b"1", b"1", **HIST)
        assert first.offset == 1 and ch in sup.brokers[2].local.history_store.streams
        sup.kill(2)
        sup.announce()
        successor = worker_ring(3).owners(ch, 2)[1]
        assert b0.owner(ch) == successor and sup.brokers[1].owner(ch) == successor
        pub = await b0.publish(ch, b"2", b"2", **HIST)  # answered by the successor at once
        assert pub.offset == 1  # a new stream: the dead owner's history died with it
        await settle()
        for i in (0, 1):
            assert sup.hubs[i].pubs[-1] == (ch, b"2")  # delivered on every live worker
        hist = await b0.history(ch, limit=-1, **HIST)
        assert [p.data for p in hist.publications] == [b"2"]
        await b0.add_presence(ch, ClientInfo("alice", "c1"))
        assert await sup.brokers[1].presence_stats(ch) == (1, 1)
        assert b0.stats()["broker_ring_members"] == [0, 1]

    run(main())


def test_only_the_dead_workers_channels_move():
    async def main() -> None:
        sup = FakeSupervisor(4)
        chans = [f"c{i}" for i in range(400)]
        before = {c: sup.brokers[0].owner(c) for c in chans}
        sup.kill(3)
        sup.announce()
        after = {c: sup.brokers[0].owner(c) for c in chans}
        assert all(after[c] == before[c] for c in chans if before[c] != 3)
        assert all(after[c] != 3 for c in chans)

    run(main())


def test_calls_waiting_on_a_worker_that_dies_fail_fast_or_go_to_the_successor():
    async def main() -> None:
        sup = FakeSupervisor(3)
        b0 = sup.brokers[0]
        ch = channel_owned_by(1, 3)
        sup.kill(1)  # dead, but nobody has been told yet: the requests vanish
        hist = asyncio.ensure_future(b0.history(ch, limit=-1, **HIST))
        pub = asyncio.ensure_future(b0.publish(ch, b"x", b"x", **HIST))
        await settle()
        assert not hist.done() and not pub.done()
        sup.announce()  # now told: no waiting for the 5 s timeout
        with pytest.raises(WorkerGone):
            await asyncio.wait_for(pub, 1)  # a publish is not sent twice: it may have landed
        result = await asyncio.wait_for(hist, 1)  # a read is asked again, of the successor
        assert result.offset == 0
        assert b0.rerouted == 1
        # The API's per-worker calls skip a dead worker at once.
        b0.register_service("ping", lambda: "pong")
        sup.brokers[2].register_service("ping", lambda: "pong")
        res = await asyncio.wait_for(b0.call_all("ping"), 1)
        assert res[0] == res[2] == "pong" and isinstance(res[1], WorkerGone)

    run(main())


def test_a_returning_worker_takes_its_share_back_and_the_successor_forgets_it():
    async def main() -> None:
        sup = FakeSupervisor(3)
        ch = channel_owned_by(2, 3)
        successor = worker_ring(3).owners(ch, 2)[1]
        kept = channel_owned_by(successor, 3, prefix="kept")  # the successor's own channel
        sup.kill(2)
        sup.announce()
        b0 = sup.brokers[0]
        interim = await b0.publish(ch, b"interim", b"interim", **HIST)
        await b0.publish(kept, b"mine", b"mine", **HIST)
        await b0.add_presence(ch, ClientInfo("bob", "c2"))
        assert ch in sup.brokers[successor].local.history_store.streams
        sup.restart(2)
        sup.announce()  # ready again
        assert all(b.owner(ch) == 2 for b in sup.brokers)
        store = sup.brokers[successor].local
        assert ch not in store.history_store.streams and ch not in store.presence_store.names()
        assert kept in store.history_store.streams  # what it owns anyway stays
        top = await b0.history(ch, limit=0, **HIST)
        assert top.offset == 0 and top.epoch != interim  # the returning worker starts empty
        assert await b0.presence_stats(ch) == (0, 0)
        # Later failover again: no stale interim stream comes back to life.
        sup.kill(2)
        sup.announce()
        top = await b0.history(ch, limit=0, **HIST)
        assert top.offset == 0

    run(main())


def test_a_request_to_a_worker_that_no_longer_owns_the_channel_is_forwarded():
    async def main() -> None:
        sup = FakeSupervisor(3)
        full, without2 = worker_ring(3), worker_ring(3)
        without2.remove(2)
        ch = next(c for c in (f"f{i}" for i in range(10_000))
                  if full.owner(c) == 2 and without2.owner(c) == 1)
        sup.brokers[0].set_members([0, 1])  # worker 0's view is stale: it thinks 2 is down
        pub = await sup.brokers[0].publish(ch, b"p", b"p", **HIST)
        assert pub.offset == 1
        assert ch in sup.brokers[2].local.history_store.streams  # stored by the real owner
        assert ch not in sup.brokers[1].local.history_store.streams
        assert sup.brokers[1].rerouted == 1

    run(main())


def test_members_message_is_parsed_and_never_leaves_the_ring_empty():
    b = IpcBroker(1, 3)
    b._on_members(b"0,2")
    assert sorted(b.ring.members) == [0, 2] and b.ring_changes == 1
    b._on_members(b"")  # nobody is up but this (booting) worker: it keeps its own channels
    assert list(b.ring.members) == [1]
    b._on_members(b"0,1,2,7")  # an index past the worker count is ignored
    assert sorted(b.ring.members) == [0, 1, 2]


class CountingSupervisor(FakeSupervisor):
    """Counts the directed messages each worker sends."""

    def __init__(self, n: int) -> None:
        self.sent: list[tuple[int, int, bytes]] = []  # (from, to, first byte of the body)
        super().__init__(n)

    def route(self, src: int, kind: bytes, body: bytes) -> None:
        if kind == control.TO:
            self.sent.append((src, int.from_bytes(body[:2], "big"), body[2:3]))
        super().route(src, kind, body)


def test_presence_updates_to_an_owner_go_as_one_message_per_turn_each_way() -> None:
    """A hot channel's subscribes: a worker's presence updates of one loop turn reach the
    owner in one message, the owner's answers come back in one, and every update lands."""

    async def main() -> None:
        sup = CountingSupervisor(3)
        ch = "hot"
        owner = sup.brokers[0].owner(ch)
        caller = next(i for i in range(3) if i != owner)
        b = sup.brokers[caller]
        infos = [ClientInfo(client=f"c{i}", user=f"u{i}") for i in range(50)]
        await asyncio.sleep(0.05)  # the workers' hellos to each other are done
        sup.sent.clear()
        await asyncio.gather(*(b.add_presence(ch, info) for info in infos))
        await asyncio.gather(b.remove_presence(ch, "c0"), b.remove_presence(ch, "c1"))
        assert await b.presence_stats(ch) == (48, 48)
        there = [(s, t) for s, t, _ in sup.sent if {s, t} == {caller, owner}]
        # adds: one batch there, one back; removes: the same; the stats read: one each way
        assert there == [(caller, owner), (owner, caller)] * 3, sup.sent
        assert b.stats()["broker_batched_messages_total"] == 52
        assert sup.brokers[owner].stats()["broker_batches_sent_total"] == 2

    asyncio.run(main())


def test_a_message_sent_at_once_follows_the_batched_ones_before_it() -> None:
    """Order per worker is kept: an immediate call flushes what waits for the end of the turn,
    so a presence read right after an update sees the update."""

    async def main() -> None:
        sup = CountingSupervisor(2)
        ch = "room"
        owner = sup.brokers[0].owner(ch)
        b = sup.brokers[1 - owner]
        add = asyncio.ensure_future(b.add_presence(ch, ClientInfo(client="a", user="u")))
        await asyncio.sleep(0)  # the add waits in the outbox
        assert set(await b.presence(ch)) == {"a"}
        await add

    asyncio.run(main())
