"""Chunked fan-out in the hub, with real sessions (recording transports) and a real run queue.

The run queue here runs one step (16 writes) per loop turn, so a test can stop a publication
half-way - some subscribers have it, others not yet - and act then: unsubscribe, close,
subscribe, publish again. What each subscriber ends up with must be what the inline path would
have given it. The chunk threshold is 8, so 40 subscribers take the chunked path.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from test_gateway_async_broker import GatedBroker, remote_publish
from test_gateway_session import SDKClient, make_config, token
from tidegate.engine.runqueue import RunQueue
from tidegate.gateway.hub import FANOUT_STEP
from tidegate.gateway.node import Node

pytestmark = pytest.mark.timeout(30)
CHUNK_MIN = 8
N = 40  # subscribers of the big channel: 3 steps of FANOUT_STEP
CH = "news"  # history on (positions), no join/leave


class Sub:
    """A connected client whose every received message is kept, in order."""

    def __init__(self, node: Node, user: str, fmt: str = "json", connect: bool = True) -> None:
        self.c = SDKClient(node, fmt)
        self.log: list[dict[str, Any]] = []
        if connect:  # (an inline broker: the reply is written at once)
            assert "connect" in self.reply(self.fire("connect", {"token": token(user)}))

    @classmethod
    async def connected(cls, node: Node, user: str) -> Sub:
        """Connect through a broker that is not inline."""
        s = cls(node, user, connect=False)
        cmd_id = s.fire("connect", {"token": token(user)})
        for _ in range(100):
            if any(m.get("id") == cmd_id for m in s.take()):
                break
            await asyncio.sleep(0)
        assert "connect" in s.reply(cmd_id)
        return s

    def take(self) -> list[dict[str, Any]]:
        self.log += self.c.replies()
        return self.log

    def fire(self, method: str, params: dict[str, Any]) -> int:
        self.take()
        self.c.fire(method, params)
        self.take()
        return self.c._id

    def reply(self, cmd_id: int) -> dict[str, Any]:
        (r,) = [m for m in self.take() if m.get("id") == cmd_id]
        return r

    def values(self, channel: str = CH, after: int = -1) -> list[int]:
        """The ``n`` of the publications received on ``channel`` (after log index ``after``)."""
        out = []
        for m in self.take()[after + 1 :]:
            push = m.get("push")
            if push and push.get("channel") == channel and "pub" in push:
                out.append(int(self.c.dec(push["pub"]["data"])["n"]))
        return out

    def offsets(self, channel: str = CH) -> list[int]:
        return [
            int(m["push"]["pub"].get("offset", 0))
            for m in self.take()
            if "push" in m and m["push"].get("channel") == channel and "pub" in m["push"]
        ]

    def index_of(self, cmd_id: int) -> int:
        return next(i for i, m in enumerate(self.take()) if m.get("id") == cmd_id)


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(main())


def chunked_node(broker: Any = None) -> tuple[Node, RunQueue]:
    node = Node(make_config(), broker=broker)
    rq = RunQueue(slice_ms=1e-6, check_every=1)  # one step per slice: one per loop turn
    node.hub.use_runqueue(rq, CHUNK_MIN)
    return node, rq


def subscribers(node: Node, n: int = N, channel: str = CH, **params: Any) -> list[Sub]:
    out = []
    for i in range(n):
        s = Sub(node, f"u{i}", "protobuf" if i % 3 == 0 else "json")  # both encodings
        r = s.reply(s.fire("subscribe", {"channel": channel, **params}))
        assert "subscribe" in r, r
        out.append(s)
    return out


async def publish(node: Node, n: int, channel: str = CH) -> int:
    pub = await node.hub.publish(channel, json.dumps({"n": n}).encode())
    return pub.offset


async def until(pred: Callable[[], bool], rq: RunQueue) -> None:
    """Turn the loop until ``pred()`` (the run queue must still have work, or it is too late)."""
    for _ in range(10_000):
        if pred():
            return
        assert rq.depth, "the fan-out ended before the state the test waits for"
        await asyncio.sleep(0)
    raise AssertionError("condition never met")


async def drained(rq: RunQueue) -> None:
    for _ in range(10_000):
        if not rq.depth:
            return
        await asyncio.sleep(0)
    raise AssertionError("run queue never emptied")


def got(subs: list[Sub], n: int, channel: str = CH) -> list[Sub]:
    return [s for s in subs if n in s.values(channel)]


def half_way(subs: list[Sub], n: int, channel: str = CH) -> Callable[[], bool]:
    return lambda: 0 < len(got(subs, n, channel)) < len(subs) - FANOUT_STEP


# ---- which path -----------------------------------------------------------------------------
def test_big_channel_goes_through_the_run_queue_small_channel_stays_inline() -> None:
    async def main() -> None:
        node, rq = chunked_node()
        big = subscribers(node)
        small = subscribers(node, CHUNK_MIN, channel="small")
        await publish(node, 1, "small")
        assert all(s.values("small") == [1] for s in small)  # written inside the publish
        assert rq.submitted == 0
        await publish(node, 1)
        assert not got(big, 1)  # queued, not written inside the publish
        await drained(rq)
        assert all(s.values() == [1] for s in big)
        assert node.hub.chunked_fanouts == 1 and rq.jobs_done == 1 and rq.slices >= 3
        assert not node.hub._fanouts  # the job ended with its queue

    run(main)


# ---- order ----------------------------------------------------------------------------------
def test_publications_queued_behind_a_broadcast_keep_their_order() -> None:
    async def main() -> None:
        node, rq = chunked_node()
        subs = subscribers(node)
        for n in range(1, 6):  # all five queued before the first step runs
            await publish(node, n)
        queued = node.hub._fanouts[CH].queue
        assert len(queued) == 5 and len({id(p.subs) for p in queued}) == 1  # one snapshot
        await until(half_way(subs, 1), rq)
        for n in range(6, 9):  # and three more half-way through the first
            await publish(node, n)
        await drained(rq)
        for s in subs:
            assert s.values() == list(range(1, 9))
            assert s.offsets() == list(range(1, 9))

    run(main)


def test_a_channel_that_shrinks_mid_broadcast_still_queues_behind_it() -> None:
    """Below the threshold a publication would go inline - not while an earlier one of the
    same channel is still being written: it would overtake it."""

    async def main() -> None:
        node, rq = chunked_node()
        subs = subscribers(node)
        await publish(node, 1)
        await until(half_way(subs, 1), rq)
        waiting = [s for s in subs if 1 not in s.values()]
        keep = waiting[:3]
        for s in subs:
            if s not in keep:
                s.fire("unsubscribe", {"channel": CH})
        assert node.hub.num_subscribers(CH) == 3 <= CHUNK_MIN
        await publish(node, 2)
        await drained(rq)
        for s in keep:
            assert s.values() == [1, 2]

    run(main)


# ---- leaving mid-broadcast -------------------------------------------------------------------
def test_no_writes_after_unsubscribe_or_close_mid_broadcast() -> None:
    async def main() -> None:
        node, rq = chunked_node()
        subs = subscribers(node)
        await publish(node, 1)
        await publish(node, 2)
        await until(half_way(subs, 1), rq)
        waiting = [s for s in subs if 1 not in s.values()]
        leaver, closer = waiting[0], waiting[1]
        unsub_id = leaver.fire("unsubscribe", {"channel": CH})
        closer.take()
        closer.c.s.on_transport_closed()  # the connection is gone
        await publish(node, 3)
        await drained(rq)
        assert leaver.values(after=leaver.index_of(unsub_id)) == []
        assert leaver.values() == []
        assert closer.c.t.writes == [] and closer.values() == []
        for s in subs:
            if s not in (leaver, closer):
                assert s.values() == [1, 2, 3]

    run(main)


def test_unsubscribe_and_subscribe_again_mid_broadcast_gets_only_what_follows() -> None:
    """The new subscription starts at its position: the publications queued for the old one
    are not written to it, even though the session is a subscriber again when the job gets
    to it."""

    async def main() -> None:
        node, rq = chunked_node()
        subs = subscribers(node)
        await publish(node, 1)
        await until(half_way(subs, 1), rq)
        back = next(s for s in subs if 1 not in s.values())
        back.fire("unsubscribe", {"channel": CH})
        r = back.reply(back.fire("subscribe", {"channel": CH, "recoverable": True}))
        assert int(r["subscribe"]["offset"]) == 1  # its stream starts after publication 1
        await publish(node, 2)
        await drained(rq)
        assert back.values() == [2] and back.offsets() == [2]

    run(main)


# ---- joining mid-broadcast -------------------------------------------------------------------
def test_a_subscriber_joining_mid_broadcast_gets_what_follows_its_position_once() -> None:
    async def main() -> None:
        node, rq = chunked_node()
        subs = subscribers(node)
        await publish(node, 1)
        await until(half_way(subs, 1), rq)
        late = Sub(node, "late")
        r = late.reply(late.fire("subscribe", {"channel": CH, "recoverable": True}))
        top = int(r["subscribe"]["offset"])
        assert top == 1
        await publish(node, 2)
        await publish(node, 3)
        await drained(rq)
        assert late.offsets() == [2, 3]  # from its position on: nothing missed, nothing twice
        assert all(s.values() == [1, 2, 3] for s in subs)

    run(main)


@pytest.mark.parametrize("read_before", [True, False], ids=["read-before-pub", "read-after-pub"])
def test_a_subscribe_in_flight_across_a_chunked_broadcast_is_consistent(read_before: bool) -> None:
    """A broker that is not inline: the subscribe registers (pending), reads its position, and
    replies later. Publications relayed meanwhile are chunked; whatever the interleaving, the
    new subscriber's stream continues its position exactly."""

    async def main() -> None:
        broker = GatedBroker()
        node, rq = chunked_node(broker)
        subs = [await Sub.connected(node, f"u{i}") for i in range(N)]
        for s in subs:
            s.fire("subscribe", {"channel": CH})
        await drained(rq)
        for _ in range(50):
            await asyncio.sleep(0)
        assert node.hub.num_subscribers(CH) == N and not node.hub._pending

        def pub(n: int) -> None:
            remote_publish(node, CH, {"n": n})

        late = await Sub.connected(node, "late")
        gate = broker.hold("history", CH)
        late.fire("subscribe", {"channel": CH, "positioned": True})
        sub_id = late.c._id
        await gate.arrived.wait()  # registered (pending), its position not read yet
        if read_before:
            gate.go_read.set()
            await gate.has_read.wait()
        pub(1)  # chunked; for `late` buffered
        await until(half_way(subs, 1), rq)
        if not read_before:
            gate.go_read.set()
            await gate.has_read.wait()
        pub(2)
        await until(lambda: len(got(subs, 2)) > 0, rq)
        gate.go_return.set()  # the reply goes out mid-broadcast
        for _ in range(20):
            await asyncio.sleep(0)
        pub(3)
        await drained(rq)
        for _ in range(20):
            await asyncio.sleep(0)
        top = int(late.reply(sub_id)["subscribe"].get("offset", 0))
        assert top == (0 if read_before else 1)
        assert late.offsets() == list(range(top + 1, 4))
        assert late.index_of(sub_id) < min(
            i for i, m in enumerate(late.take()) if "push" in m
        )  # the reply comes before any publication
        assert all(s.values() == [1, 2, 3] for s in subs)
        assert not node.hub._pending

    run(main)


# ---- join/leave pushes -------------------------------------------------------------------------
def test_join_push_queues_behind_a_publication_in_progress() -> None:
    async def main() -> None:
        node, rq = chunked_node()
        subs = subscribers(node, channel="chat:big", join_leave=True)
        await drained(rq)  # their own joins
        await publish(node, 1, "chat:big")
        await until(half_way(subs, 1, "chat:big"), rq)
        newcomer = Sub(node, "newcomer")
        newcomer.fire("subscribe", {"channel": "chat:big"})
        await drained(rq)
        for s in subs:
            kinds = [
                "pub" if "pub" in m["push"] else "join" if "join" in m["push"] else "?"
                for m in s.take()
                if "push" in m and m["push"].get("channel") == "chat:big"
            ]
            assert kinds[-2:] == ["pub", "join"], kinds  # in the order they happened

    run(main)
