"""Chunked fan-out on a real `tidegate serve` (one worker), driven by `websockets` clients.

The server runs with ``--fanout-chunk-subscribers 16`` so a few hundred subscribers take the
chunked path. Every assertion is about what each client received and in which order - never
about how long anything took.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

from conftest import Server
from tidegate.gateway.auth import encode_hs256

SECRET = "dev-only-secret-change-me"
API_KEY = "dev-only-api-key-change-me"
pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("chunked"), "--workers", "1",
               "--fanout-chunk-subscribers", "16", "--slice-ms", "1", app="gateway")
    yield s
    s.stop()


def token(user: str) -> str:
    return encode_hs256({"sub": user, "exp": int(time.time()) + 3600}, SECRET)


def api(srv: Server, method: str, params: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{srv.port}/api/{method}", data=json.dumps(params).encode(),
        method="POST", headers={"X-API-Key": API_KEY})
    with urllib.request.urlopen(req, timeout=30) as resp:
        body = json.loads(resp.read())
    assert "result" in body, body
    return dict(body["result"])


async def broadcast(srv: Server, channel: str, values: list[int]) -> None:
    """Publish ``values`` to ``channel`` in ONE API call: every publication is handed to the
    hub in one callback, so the fan-out has all of them to do at once."""
    res = await asyncio.to_thread(
        api, srv, "broadcast", {"channels": [channel] * len(values), "data": {"n": 0}})
    assert len(res["responses"]) == len(values)
    assert all("result" in r for r in res["responses"]), res


class Client:
    """A JSON-protocol client; a reader task keeps every message it gets, in order."""

    def __init__(self, ws: ClientConnection, read: bool) -> None:
        self.ws = ws
        self.next_id = 0
        self.log: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        self.on_message: Callable[[Client, dict[str, Any]], None] | None = None
        # Not reading: reads its replies by hand, nothing else (a silent subscriber).
        self.reader = asyncio.get_running_loop().create_task(self._read()) if read else None

    @classmethod
    async def open(cls, srv: Server, user: str, read: bool = True) -> Client:
        ws = await ws_connect(f"ws://127.0.0.1:{srv.port}/connection/websocket",
                              max_queue=None if read else 4)
        c = cls(ws, read)
        r = await c.call("connect", {"token": token(user)})
        assert "connect" in r, r
        return c

    async def _read(self) -> None:
        async for msg in self.ws:
            for line in str(msg).splitlines():
                m = json.loads(line)
                self.log.append(m)
                if self.on_message is not None:
                    self.on_message(self, m)
            self.changed.set()

    def send(self, method: str, params: dict[str, Any]) -> int:
        self.next_id += 1
        asyncio.get_running_loop().create_task(
            self.ws.send(json.dumps({"id": self.next_id, method: params})))
        return self.next_id

    async def call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        cmd_id = self.send(method, params)
        if self.reader is None:  # silent: read this one reply by hand
            while True:
                for line in str(await asyncio.wait_for(self.ws.recv(), 20)).splitlines():
                    m = json.loads(line)
                    if m.get("id") == cmd_id:
                        return dict(m)
        reply: dict[str, Any] = await self.wait_for(lambda: self.reply(cmd_id))
        return reply

    def reply(self, cmd_id: int) -> dict[str, Any] | None:
        return next((m for m in self.log if m.get("id") == cmd_id), None)

    def index_of(self, cmd_id: int) -> int:
        return next(i for i, m in enumerate(self.log) if m.get("id") == cmd_id)

    def offsets(self, channel: str, after: int = -1) -> list[int]:
        return [int(m["push"]["pub"].get("offset", 0)) for m in self.log[after + 1 :]
                if "push" in m and m["push"].get("channel") == channel and "pub" in m["push"]]

    async def wait_for(self, pred: Callable[[], Any], timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while not (v := pred()):
            self.changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out; last messages: {self.log[-3:]}")
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                pass
        return v

    def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        self.ws.transport.abort()  # no closing handshake: a silent client would not answer


async def open_many(srv: Server, prefix: str, n: int, channel: str | None,
                    read: bool = True, **params: Any) -> list[Client]:
    async def one(i: int) -> Client:
        c = await Client.open(srv, f"{prefix}{i}", read)
        if channel is not None:
            r = await c.call("subscribe", {"channel": channel, **params})
            assert "subscribe" in r, r
        return c

    out: list[Client] = []
    for start in range(0, n, 50):
        out += await asyncio.gather(*(one(i) for i in range(start, min(n, start + 50))))
    return out


def top_offset(srv: Server, channel: str) -> int:
    return int(api(srv, "history", {"channel": channel, "limit": 0}).get("offset", 0))


def test_order_leavers_and_joiners_during_chunked_broadcasts(srv: Server) -> None:
    """Readers get every publication once, in order; a client that unsubscribes mid-broadcast
    gets nothing after its unsubscribe reply; one that subscribes mid-broadcast gets exactly
    the publications after the position its reply gave."""
    channel = "order"

    async def main() -> None:
        base = top_offset(srv, channel)
        readers = await open_many(srv, "r", 150, channel)
        leavers = await open_many(srv, "l", 20, channel)
        joiners = await open_many(srv, "j", 10, None)
        unsub_ids: dict[Client, int] = {}

        def leave_on_first_pub(c: Client, m: dict[str, Any]) -> None:
            if "push" in m and c not in unsub_ids:  # reacts from inside the broadcast
                unsub_ids[c] = c.send("unsubscribe", {"channel": channel})

        for c in leavers:
            c.on_message = leave_on_first_pub
        await broadcast(srv, channel, list(range(40)))
        await readers[0].wait_for(lambda: readers[0].offsets(channel))
        sub_ids = {c: c.send("subscribe", {"channel": channel, "recoverable": True})
                   for c in joiners}  # while the 40 are still being written, most likely
        for c in joiners:
            await c.wait_for(lambda c=c: c.reply(sub_ids[c]))
        await broadcast(srv, channel, list(range(20)))
        last = base + 60
        for c in readers:
            await c.wait_for(lambda c=c: c.offsets(channel)[-1:] == [last])
            assert c.offsets(channel) == list(range(base + 1, last + 1))
        for c in joiners:
            reply = c.reply(sub_ids[c])
            assert reply is not None and "subscribe" in reply, reply
            top = int(reply["subscribe"].get("offset", 0))
            assert base <= top <= last
            await c.wait_for(lambda c=c: c.offsets(channel)[-1:] == [last])
            assert c.offsets(channel) == list(range(top + 1, last + 1))  # no gap, no repeat
            assert c.offsets(channel, after=c.index_of(sub_ids[c])) == c.offsets(channel)
        await asyncio.sleep(0.2)  # anything still in flight to the leavers has arrived
        for c in leavers:
            i = c.index_of(unsub_ids[c])
            assert c.offsets(channel, after=i) == [], "written after the unsubscribe reply"
            got = c.offsets(channel)
            assert got == list(range(base + 1, base + 1 + len(got)))
        for c in readers + leavers + joiners:
            c.close()

    asyncio.run(main())


def test_the_loop_answers_a_ping_in_the_middle_of_a_big_fan_out(srv: Server) -> None:
    """60 publications to 400 subscribers, handed to the hub in one callback: inline that is
    24,000 writes before the loop reads anything again. Chunked, a ping sent by a subscriber
    when its first publication arrives is answered before its last one: the loop turned."""
    channel = "big"

    async def main() -> None:
        silent = await open_many(srv, "s", 400, channel, read=False)
        probe = (await open_many(srv, "p", 1, channel))[0]
        base = top_offset(srv, channel)
        ping_id: list[int] = []

        def ping_on_first_pub(c: Client, m: dict[str, Any]) -> None:
            if "push" in m and not ping_id:
                ping_id.append(c.send("ping", {}))

        probe.on_message = ping_on_first_pub
        await broadcast(srv, channel, list(range(60)))
        last = base + 60
        await probe.wait_for(lambda: probe.offsets(channel)[-1:] == [last])
        await probe.wait_for(lambda: ping_id and probe.reply(ping_id[0]))
        assert probe.offsets(channel) == list(range(base + 1, last + 1))
        pong_at = probe.index_of(ping_id[0])
        assert probe.offsets(channel, after=pong_at), (
            "the ping was answered only after the whole broadcast")
        st = srv.wait_stats(lambda st: st["worker_stats"][0]["runqueue"]["jobs_done"] > 0)
        assert st["worker_stats"][0]["runqueue"]["slices"] > 1
        for c in [*silent, probe]:
            c.close()

    asyncio.run(main())
