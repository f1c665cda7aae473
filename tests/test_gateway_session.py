"""ClientSession driven with the bytes the official SDK sends, replies decoded as the SDK does.

Commands are encoded with centrifuge-python's own codecs (``json.dumps`` per command for JSON,
``ParseDict`` into the real ``client_pb2.Command`` for protobuf) and replies decoded with them
(``MessageToDict`` of ``client_pb2.Reply``): what these tests see is what the SDK sees.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import tracemalloc
from typing import Any

import pytest
from centrifuge.codecs import _JsonCodec, _ProtobufCodec

from tidegate.gateway.auth import encode_hs256
from tidegate.gateway.broker import MemoryBroker
from tidegate.gateway.codes import ReplyError
from tidegate.gateway.config import ChannelOptions, GatewayConfig
from tidegate.gateway.messages import ClientInfo, HistoryResult, Publication
from tidegate.gateway.node import Node
from tidegate.gateway.session import ClientSession
from tidegate.gateway.testing import RecordingTransport

SECRET = "test-secret"
FORMATS = ["json", "protobuf"]


def make_config(**kw: Any) -> GatewayConfig:
    base: dict[str, Any] = dict(
        token_hmac_secret=SECRET,
        channels=ChannelOptions(
            allow_subscribe_for_client=True,
            allow_publish_for_client=True,
            allow_history_for_client=True,
            allow_presence_for_client=True,
            presence=True,
            history_size=10,
            history_ttl_s=300,
            allow_recovery=True,
        ),
        namespaces={
            "chat": ChannelOptions(
                allow_subscribe_for_client=True,
                allow_publish_for_subscriber=True,
                allow_presence_for_subscriber=True,
                allow_history_for_subscriber=True,
                presence=True,
                join_leave=True,
                history_size=3,
                history_ttl_s=300,
                allow_recovery=True,
            ),
            "locked": ChannelOptions(),
            "nohist": ChannelOptions(allow_subscribe_for_client=True),
        },
    )
    base.update(kw)
    return GatewayConfig(**base)


def token(sub: str = "42", ttl: float | None = 3600, **claims: Any) -> str:
    c: dict[str, Any] = {"sub": sub, **claims}
    if ttl is not None:
        c["exp"] = int(time.time() + ttl)
    return encode_hs256(c, SECRET)


class SDKClient:
    """A session plus the SDK's codec on the other side."""

    def __init__(self, node: Node, fmt: str = "json") -> None:
        self.node = node
        self.fmt = fmt
        self.t = RecordingTransport()
        self.s = ClientSession(self.t, node, fmt)
        self.codec: Any = _ProtobufCodec if fmt == "protobuf" else _JsonCodec
        self._id = 0

    # the SDK's payload conventions: JSON values for JSON, base64'd bytes in the dict for pb
    def enc(self, value: Any) -> Any:
        if self.fmt == "protobuf":
            return base64.b64encode(json.dumps(value).encode()).decode()
        return value

    def dec(self, value: Any) -> Any:
        if self.fmt == "protobuf":
            return json.loads(base64.b64decode(value))
        return value

    def raw(self, commands: list[dict[str, Any]]) -> bytes:
        data = self.codec.encode_commands(commands)
        return data.encode() if isinstance(data, str) else data

    def decode(self, frame: bytes) -> list[dict[str, Any]]:
        if self.fmt == "protobuf":
            return list(self.codec.decode_replies(frame))
        return list(self.codec.decode_replies(frame.decode()))

    def replies(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for frame in self.t.take():
            out += self.decode(frame)
        return out

    def send(self, *commands: dict[str, Any]) -> list[dict[str, Any]]:
        self.s.handle_commands(self.raw(list(commands)))
        return self.replies()

    def fire(self, method: str, params: dict[str, Any]) -> None:
        """Send one command without collecting what comes back."""
        self._id += 1
        self.s.handle_commands(self.raw([{"id": self._id, method: params}]))

    def call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self._id += 1
        cmd_id = self._id
        replies = self.send({"id": cmd_id, method: params})
        mine = [r for r in replies if r.get("id") == cmd_id]
        assert len(mine) == 1, replies
        self.pushes = [r for r in replies if r.get("id", 0) == 0]
        return mine[0]

    def connect(self, tok: str | None = None, **params: Any) -> dict[str, Any]:
        p: dict[str, Any] = {"name": "python", **params}
        if tok:
            p["token"] = tok
        return self.call("connect", p)

    def subscribe(self, channel: str, **params: Any) -> dict[str, Any]:
        return self.call("subscribe", {"channel": channel, "flag": 1, **params})

    def publish(self, channel: str, value: Any) -> dict[str, Any]:
        return self.call("publish", {"channel": channel, "data": self.enc(value)})


@pytest.fixture
def node() -> Node:
    return Node(make_config())


def connected(node: Node, fmt: str = "json", user: str = "42", **claims: Any) -> SDKClient:
    c = SDKClient(node, fmt)
    r = c.connect(token(user, **claims))
    assert "connect" in r, r
    return c


# ---- connect ------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_connect_reply_has_what_the_sdk_reads(node: Node, fmt: str) -> None:
    c = SDKClient(node, fmt)
    r = c.connect(token("42", ttl=120, info={"name": "bob"}))
    res = r["connect"]
    assert res["client"] == c.s.client_id
    assert res["version"].startswith("tidegate")
    assert res["ping"] == 25 and res["pong"] is True
    assert res["expires"] is True and 100 <= res["ttl"] <= 120
    assert c.s.connected and c.s.user == "42"
    assert c.t.closed is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_connect_expired_token_is_error_109_not_a_disconnect(node: Node, fmt: str) -> None:
    c = SDKClient(node, fmt)
    r = c.connect(token(ttl=-10))
    assert r["error"]["code"] == 109 and r["error"]["message"] == "token expired"
    assert c.t.closed is None and not c.s.connected
    assert "connect" in c.connect(token())  # the SDK retries with a fresh token


@pytest.mark.parametrize("fmt", FORMATS)
def test_connect_forged_token_disconnects_3500(node: Node, fmt: str) -> None:
    c = SDKClient(node, fmt)
    forged = encode_hs256({"sub": "42"}, "not-the-secret")
    assert c.send({"id": 1, "connect": {"token": forged}}) == []
    assert c.t.closed == (3500, "invalid token")
    assert c.s.closed


def test_connect_alg_none_and_garbage_disconnect_3500(node: Node) -> None:
    for bad in [
        encode_hs256({"sub": "42"}, SECRET, header={"alg": "none"}).rsplit(".", 1)[0] + ".",
        "garbage",
        "a.b",
        "a.b.c.d",
    ]:
        c = SDKClient(node)
        c.send({"id": 1, "connect": {"token": bad}})
        assert c.t.closed == (3500, "invalid token"), bad


def test_connect_without_token(node: Node) -> None:
    c = SDKClient(node)
    assert c.connect()["error"] == {"code": 101, "message": "unauthorized"}
    anon = SDKClient(Node(make_config(allow_anonymous=True)))
    assert "connect" in anon.connect()
    assert anon.s.user == ""


def test_commands_before_connect_and_double_connect_are_bad_requests(node: Node) -> None:
    c = SDKClient(node)
    c.send({"id": 1, "subscribe": {"channel": "news"}})
    assert c.t.closed == (3501, "bad request")
    c = connected(node)
    c.send({"id": 9, "connect": {"token": token()}})
    assert c.t.closed == (3501, "bad request")
    c = SDKClient(node)
    c.send({})  # a pong is no connect either
    assert c.t.closed == (3501, "bad request")


@pytest.mark.parametrize(
    "frame", [b"{bad", b"[1,2]", b'{"id": "x", "ping": {}}', b'{"id":1,"publish":5}', b"\xff"]
)
def test_malformed_json_disconnects_3501(node: Node, frame: bytes) -> None:
    c = connected(node)
    c.s.handle_commands(frame)
    assert c.t.closed == (3501, "bad request")


def test_truncated_protobuf_disconnects_3501(node: Node) -> None:
    c = connected(node, "protobuf")
    c.s.handle_commands(b"\x05\x08")
    assert c.t.closed == (3501, "bad request")


@pytest.mark.parametrize("fmt", FORMATS)
def test_ping_pong(node: Node, fmt: str) -> None:
    c = connected(node, fmt)
    ping = c.s.make_ping()
    assert ping == (b"{}" if fmt == "json" else b"\x00")
    assert c.decode(ping) == [{}]  # the SDK sees a ping: an empty reply
    assert c.send({}) == []  # the SDK's pong: an empty command, answered with nothing
    assert c.t.closed is None


def test_two_commands_in_one_frame_get_one_write(node: Node) -> None:
    c = connected(node)
    c.s.handle_commands(c.raw([{"id": 7, "subscribe": {"channel": "news"}}, {"id": 8, "ping": {}}]))
    frames = c.t.take()
    assert len(frames) == 1
    assert [r["id"] for r in c.decode(frames[0])] == [7, 8]


def test_unknown_method_id_is_104(node: Node) -> None:
    c = connected(node)
    assert c.send({"id": 5})[0]["error"]["code"] == 104


# ---- subscribe ----------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_subscribe_permission_and_namespace_errors(node: Node, fmt: str) -> None:
    c = connected(node, fmt)
    assert c.subscribe("locked:x")["error"] == {"code": 103, "message": "permission denied"}
    assert c.subscribe("nope:x")["error"] == {"code": 102, "message": "unknown channel"}
    assert c.subscribe("$private")["error"]["code"] == 103
    assert c.subscribe("x" * 300)["error"]["code"] == 106
    assert "subscribe" in c.subscribe("news")
    assert c.subscribe("news")["error"]["code"] == 105
    assert c.t.closed is None


def test_anonymous_subscribe_needs_namespace_permission() -> None:
    node = Node(make_config(allow_anonymous=True))
    c = SDKClient(node)
    c.connect()
    assert c.subscribe("news")["error"]["code"] == 103
    node2 = Node(
        make_config(
            allow_anonymous=True, channels=ChannelOptions(allow_subscribe_for_anonymous=True)
        )
    )
    c2 = SDKClient(node2)
    c2.connect()
    assert "subscribe" in c2.subscribe("news")


def test_subscription_tokens(node: Node) -> None:
    c = connected(node, user="42")
    sub_tok = encode_hs256(
        {"sub": "42", "channel": "$vip", "exp": int(time.time()) + 60, "info": {"r": 1}}, SECRET
    )
    r = c.subscribe("$vip", token=sub_tok)["subscribe"]
    assert r["expires"] is True and 50 <= r["ttl"] <= 60
    other_chan = encode_hs256({"sub": "42", "channel": "$other"}, SECRET)
    assert c.subscribe("$x", token=other_chan)["error"]["code"] == 103
    other_user = encode_hs256({"sub": "7", "channel": "$y"}, SECRET)
    assert c.subscribe("$y", token=other_user)["error"]["code"] == 103
    expired = encode_hs256({"sub": "42", "channel": "$z", "exp": 1}, SECRET)
    assert c.subscribe("$z", token=expired)["error"]["code"] == 109
    assert c.t.closed is None
    # a private channel is for its subscribers only, whatever the namespace allows others
    outsider = connected(node, user="7")
    assert outsider.publish("$vip", 1)["error"]["code"] == 103
    assert outsider.call("presence", {"channel": "$vip"})["error"]["code"] == 103
    assert "publish" in c.publish("$vip", 1)
    forged = encode_hs256({"sub": "42", "channel": "$z"}, "wrong")
    c.send({"id": 99, "subscribe": {"channel": "$z", "token": forged}})
    assert c.t.closed == (3500, "invalid token")


def test_protected_namespace_needs_a_token() -> None:
    node = Node(
        make_config(
            namespaces={"p": ChannelOptions(allow_subscribe_for_client=True, protected=True)}
        )
    )
    c = connected(node)
    assert c.subscribe("p:1")["error"]["code"] == 103
    tok = encode_hs256({"sub": "42", "channel": "p:1"}, SECRET)
    assert "subscribe" in c.subscribe("p:1", token=tok)


# ---- publish / fan-out ----------------------------------------------------------------------
def test_publish_fanout_hands_the_identical_bytes_object_to_every_subscriber(node: Node) -> None:
    a, b = connected(node, user="a"), connected(node, user="b")
    a.subscribe("news")
    b.subscribe("news")
    a.t.take(), b.t.take()
    b.fire("publish", {"channel": "news", "data": {"text": "hi"}})
    wa = [w for w in a.t.writes if b'"pub"' in w]
    wb = [w for w in b.t.writes if b'"pub"' in w]
    assert len(wa) == len(wb) == 1
    assert wa[0] is wb[0]  # encoded once, shared
    push = a.decode(wa[0])[0]["push"]
    assert push["channel"] == "news"
    assert push["pub"]["data"] == {"text": "hi"}
    assert push["pub"]["info"]["user"] == "b"
    assert push["pub"]["offset"] == 1


def test_mixed_formats_share_one_encoding_per_format(node: Node) -> None:
    clients = [connected(node, fmt, user=f"u{i}") for i, fmt in enumerate(FORMATS * 2)]
    for c in clients:
        c.subscribe("news")
        c.t.take()
    clients[0].fire("publish", {"channel": "news", "data": clients[0].enc([1, 2, 3])})
    pushes = {c: c.t.writes[0] for c in clients}
    j = [pushes[c] for c in clients if c.fmt == "json"]
    p = [pushes[c] for c in clients if c.fmt == "protobuf"]
    assert j[0] is j[1] and p[0] is p[1] and j[0] is not p[0]
    for c in clients:
        pub = c.decode(pushes[c])[0]["push"]["pub"]
        assert c.dec(pub["data"]) == [1, 2, 3]
        assert int(pub["offset"]) == 1


def test_publication_reaches_subscriber_after_its_subscribe_reply_in_one_frame(node: Node) -> None:
    c = connected(node)
    replies = c.send(
        {"id": 1, "subscribe": {"channel": "news"}},
        {"id": 2, "publish": {"channel": "news", "data": {"n": 1}}},
    )
    kinds = [("id" in r and r["id"]) or "push" for r in replies]
    assert kinds == [1, "push", 2]


@pytest.mark.parametrize("fmt", FORMATS)
def test_publish_permission(node: Node, fmt: str) -> None:
    c = connected(node, fmt)
    assert c.publish("locked:x", 1)["error"]["code"] == 103
    # chat: publish only for subscribers
    assert c.publish("chat:r", 1)["error"]["code"] == 103
    c.subscribe("chat:r")
    assert "publish" in c.publish("chat:r", 1)
    assert c.call("publish", {"channel": "news"})["error"]["code"] == 107  # no data


def test_binary_publication_cannot_reach_a_json_client(node: Node) -> None:
    j = connected(node, "json", user="j")
    p = connected(node, "protobuf", user="p")
    j.subscribe("news")
    p.subscribe("news")
    j.t.take(), p.t.take()
    p.fire("publish", {"channel": "news", "data": base64.b64encode(b"\x00\xff").decode()})
    assert j.t.closed == (3506, "inappropriate protocol")
    got = p.decode([w for w in p.t.writes if len(w) > 5][0])
    assert base64.b64decode(got[0]["push"]["pub"]["data"]) == b"\x00\xff"


def test_protobuf_json_payload_with_newlines_is_safe_for_json_clients(node: Node) -> None:
    j = connected(node, "json", user="j")
    p = connected(node, "protobuf", user="p")
    j.subscribe("news")
    j.t.take()
    p.call("publish", {"channel": "news", "data": base64.b64encode(b'{\n "a": 1\n}').decode()})
    (frame,) = j.t.take()
    assert b"\n" not in frame
    assert j.decode(frame)[0]["push"]["pub"]["data"] == {"a": 1}


# ---- history and recovery -------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_history(node: Node, fmt: str) -> None:
    c = connected(node, fmt)
    for i in range(5):
        c.publish("news", {"n": i})
    h = c.call("history", {"channel": "news", "limit": 3, "reverse": False})["history"]
    assert [c.dec(p["data"])["n"] for p in h["publications"]] == [0, 1, 2]
    assert int(h["offset"]) == 5 and h["epoch"]
    r = c.call("history", {"channel": "news", "limit": 2, "reverse": True})["history"]
    assert [int(p["offset"]) for p in r["publications"]] == [5, 4]
    s = c.call(
        "history",
        {"channel": "news", "limit": 10, "since": {"offset": 3, "epoch": h["epoch"]}},
    )["history"]
    assert [int(p["offset"]) for p in s["publications"]] == [4, 5]
    only_pos = c.call("history", {"channel": "news", "limit": 0})["history"]
    assert "publications" not in only_pos and int(only_pos["offset"]) == 5
    bad = c.call(
        "history", {"channel": "news", "limit": 10, "since": {"offset": 1, "epoch": "nope"}}
    )
    assert bad["error"]["code"] == 112
    assert c.call("history", {"channel": "nohist:x", "limit": 1})["error"]["code"] == 108


@pytest.mark.parametrize("fmt", FORMATS)
def test_recovery_with_offset_and_epoch(node: Node, fmt: str) -> None:
    first = connected(node, fmt)
    r = first.subscribe("chat:room", recoverable=True)["subscribe"]
    assert r["recoverable"] is True and r["positioned"] is True
    epoch, offset = r["epoch"], int(r.get("offset", 0))
    first.publish("chat:room", {"n": 1})
    offset += 1
    first.s.on_transport_closed()  # offline...

    publisher = connected(node, user="p")
    publisher.subscribe("chat:room")
    publisher.publish("chat:room", {"n": 2})
    publisher.publish("chat:room", {"n": 3})

    back = connected(node, fmt)
    rr = back.subscribe("chat:room", recoverable=True, recover=True, offset=offset, epoch=epoch)[
        "subscribe"
    ]
    assert rr["recovered"] is True and rr["was_recovering"] is True
    assert [back.dec(p["data"])["n"] for p in rr["publications"]] == [2, 3]
    assert int(rr["offset"]) == 3 and rr["epoch"] == epoch


def test_recovery_fails_on_wrong_epoch_or_trimmed_history(node: Node) -> None:
    c = connected(node)
    r = c.subscribe("chat:room", recoverable=True)["subscribe"]
    epoch = r["epoch"]
    for i in range(5):  # history_size is 3 in "chat"
        c.publish("chat:room", i)
    other = connected(node)
    wrong = other.subscribe("chat:room", recoverable=True, recover=True, offset=5, epoch="xxx")
    assert wrong["subscribe"]["recovered"] is False if "recovered" in wrong["subscribe"] else True
    assert "publications" not in wrong["subscribe"]
    third = connected(node)
    trimmed = third.subscribe("chat:room", recoverable=True, recover=True, offset=1, epoch=epoch)
    assert trimmed["subscribe"].get("recovered", False) is False
    fourth = connected(node)
    ok = fourth.subscribe("chat:room", recoverable=True, recover=True, offset=2, epoch=epoch)
    assert ok["subscribe"]["recovered"] is True and len(ok["subscribe"]["publications"]) == 3


def test_unrecoverable_position_error_112_when_the_sdk_asks_to_reject(node: Node) -> None:
    c = connected(node)
    r = c.subscribe("chat:room", recoverable=True, recover=True, offset=7, epoch="gone", flag=3)
    assert r["error"] == {"code": 112, "message": "unrecoverable position"}
    assert c.s.channels() == []


def test_server_side_subscriptions_from_the_token_and_recovery_on_connect(node: Node) -> None:
    c = SDKClient(node)
    res = c.connect(token(channels=["news", "bogus:x"]))["connect"]
    assert set(res["subs"]) == {"news"}
    sub = res["subs"]["news"]
    assert sub["recoverable"] is True
    epoch = sub["epoch"]
    pub = connected(node, user="p")
    pub.publish("news", "one")
    assert c.decode(c.t.take()[0])[0]["push"]["pub"]["data"] == "one"
    c.s.on_transport_closed()
    pub.publish("news", "two")
    again = SDKClient(node)
    res2 = again.connect(
        token(channels=["news"]), subs={"news": {"recover": True, "offset": 1, "epoch": epoch}}
    )["connect"]
    news = res2["subs"]["news"]
    assert news["recovered"] is True and [p["data"] for p in news["publications"]] == ["two"]


def test_config_server_side_channels() -> None:
    node = Node(make_config(server_side_channels=("news",)))
    c = SDKClient(node)
    assert "news" in c.connect(token())["connect"]["subs"]


# ---- presence, join/leave -------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_presence_and_stats(node: Node, fmt: str) -> None:
    a1, a2, b = connected(node, fmt, "a"), connected(node, fmt, "a"), connected(node, fmt, "b")
    for c in (a1, a2, b):
        c.subscribe("news")
    p = a1.call("presence", {"channel": "news"})["presence"]["presence"]
    assert set(p) == {a1.s.client_id, a2.s.client_id, b.s.client_id}
    assert p[b.s.client_id]["user"] == "b"
    st = a1.call("presence_stats", {"channel": "news"})["presence_stats"]
    assert st == {"num_clients": 3, "num_users": 2}
    b.s.on_transport_closed()
    st = a1.call("presence_stats", {"channel": "news"})["presence_stats"]
    assert st == {"num_clients": 2, "num_users": 1}
    assert a1.call("presence", {"channel": "nohist:x"})["error"]["code"] == 108
    assert a1.call("presence", {"channel": "chat:x"})["error"]["code"] == 103  # not a subscriber


def test_join_and_leave_pushes(node: Node) -> None:
    watcher = connected(node, user="w")
    watcher.subscribe("chat:room", join_leave=True)
    silent = connected(node, user="s")
    silent.subscribe("chat:room")  # did not ask for join/leave
    watcher.t.take(), silent.t.take()
    newcomer = connected(node, user="n", info={"nick": "N"})
    newcomer.subscribe("chat:room")
    (join,) = watcher.replies()
    assert join["push"]["channel"] == "chat:room"
    assert join["push"]["join"]["info"]["user"] == "n"
    assert join["push"]["join"]["info"]["conn_info"] == {"nick": "N"}
    assert silent.replies() == []
    newcomer.call("unsubscribe", {"channel": "chat:room"})
    (leave,) = watcher.replies()
    assert leave["push"]["leave"]["info"]["client"] == newcomer.s.client_id
    other = connected(node, user="o")
    other.subscribe("chat:room")
    watcher.t.take()
    other.s.disconnect()
    (leave2,) = watcher.replies()
    assert leave2["push"]["leave"]["info"]["user"] == "o"


# ---- rpc / send -------------------------------------------------------------------------
def test_rpc_sync_handler_and_errors() -> None:
    def rpc(session: ClientSession, method: str, data: bytes) -> bytes:
        if method == "fail":
            raise ReplyError(1000, "custom")
        return json.dumps({"method": method, "echo": json.loads(data)}).encode()

    node = Node(make_config(), rpc_handler=rpc)
    c = connected(node)
    r = c.call("rpc", {"method": "sum", "data": [1, 2]})
    assert r["rpc"]["data"] == {"method": "sum", "echo": [1, 2]}
    assert c.call("rpc", {"method": "fail", "data": 1})["error"] == {
        "code": 1000,
        "message": "custom",
    }
    bare = connected(Node(make_config()))
    assert bare.call("rpc", {"method": "x", "data": 1})["error"]["code"] == 108


def test_async_rpc_handler_runs_in_a_task_and_later_frames_wait() -> None:
    async def rpc(session: ClientSession, method: str, data: bytes) -> bytes:
        await asyncio.sleep(0.01)
        return b'"done"'

    async def main() -> None:
        node = Node(make_config(), rpc_handler=rpc)
        c = connected(node)
        c.s.handle_commands(c.raw([{"id": 50, "rpc": {"method": "slow", "data": 1}}]))
        assert c.s.busy
        c.s.handle_commands(c.raw([{"id": 51, "ping": {}}]))  # queued behind the rpc
        assert c.replies() == []
        for _ in range(100):
            await asyncio.sleep(0.005)
            if not c.s.busy:
                break
        assert [r["id"] for r in c.replies()] == [50, 51]
        assert not c.s.busy  # idle again: no task

    asyncio.run(main())


def test_send_handler() -> None:
    got: list[bytes] = []
    node = Node(make_config(), send_handler=lambda s, data: got.append(data))
    c = connected(node)
    assert c.send({"send": {"data": {"hello": 1}}}) == []
    assert got == [b'{"hello":1}']
    bare = connected(Node(make_config()))
    bare.send({"send": {"data": 1}})
    assert bare.t.closed == (3508, "not available")


def test_server_message_push(node: Node) -> None:
    c = connected(node)
    c.s.send_message(b'{"hi":1}')
    assert c.replies() == [{"push": {"message": {"data": {"hi": 1}}}}]


# ---- refresh and deadlines --------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


def test_refresh_and_connection_expiry() -> None:
    clock = Clock()
    node = Node(make_config(), clock=clock)
    c = SDKClient(node)
    exp = int(clock.t) + 60
    c.connect(encode_hs256({"sub": "42", "exp": exp}, SECRET))
    new = encode_hs256({"sub": "42", "exp": exp + 600}, SECRET)
    r = c.call("refresh", {"token": new})["refresh"]
    assert r["expires"] is True and r["client"] == c.s.client_id and r["ttl"] > 600
    clock.t += 600 + 60 + 30  # past the new expiry plus the close delay
    assert c.s.check_deadlines() is False
    assert c.t.closed == (3005, "connection expired")


def test_refresh_errors(node: Node) -> None:
    c = connected(node)
    assert c.call("refresh", {"token": token(ttl=-5)})["error"]["code"] == 109
    c.send({"id": 77, "refresh": {"token": token("someone-else")}})
    assert c.t.closed == (3500, "invalid token")


def test_sub_refresh_and_subscription_expiry() -> None:
    clock = Clock()
    node = Node(make_config(), clock=clock)
    c = connected(node)
    now = int(clock.t)
    tok = encode_hs256({"sub": "42", "channel": "$s", "exp": now + 30}, SECRET)
    c.subscribe("$s", token=tok)
    tok2 = encode_hs256({"sub": "42", "channel": "$s", "exp": now + 90}, SECRET)
    r = c.call("sub_refresh", {"channel": "$s", "token": tok2})["sub_refresh"]
    assert r["expires"] is True and 80 <= r["ttl"] <= 90
    assert c.call("sub_refresh", {"channel": "$nope", "token": tok2})["error"]["code"] == 103
    clock.t += 60
    assert c.s.check_deadlines() and c.replies() == []  # refreshed: still valid
    clock.t += 60
    assert c.s.check_deadlines() is True
    (push,) = c.replies()
    assert push["push"]["unsubscribe"] == {"code": 2501, "reason": "subscription expired"}
    assert c.s.channels() == [] and c.t.closed is None


def test_stale_connection_is_closed_at_the_second_check(node: Node) -> None:
    c = SDKClient(node)
    assert c.s.make_ping() == b"{}"
    assert c.t.closed is None
    c.s.make_ping()
    assert c.t.closed == (3502, "stale")


def test_server_unsubscribe_push(node: Node) -> None:
    c = connected(node)
    c.subscribe("news")
    assert c.s.unsubscribe("news")
    assert c.replies() == [
        {"push": {"channel": "news", "unsubscribe": {"code": 2000, "reason": "server unsubscribe"}}}
    ]
    assert node.hub.num_subscribers("news") == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_server_subscribe_writes_a_subscribe_push(node: Node, fmt: str) -> None:
    c = connected(node, fmt)
    assert asyncio.run(c.s.server_subscribe("news", data=b'{"why": "api"}')) is True
    (reply,) = c.replies()  # as the SDK decodes it: a push, no id
    assert "id" not in reply or not reply["id"]
    push = reply["push"]
    assert push["channel"] == "news"
    sub = push["subscribe"]
    assert sub["recoverable"] is True and sub["positioned"] is True and sub["epoch"]
    assert int(sub.get("offset", 0)) == 0
    assert c.dec(sub["data"]) == {"why": "api"}
    assert c.s.channels() == ["news"] and node.hub.num_subscribers("news") == 1
    assert node.hub.num_pending() == 0
    other = connected(node, user="p")
    other.publish("news", {"n": 1})
    (pub,) = c.replies()
    assert pub["push"]["channel"] == "news" and c.dec(pub["push"]["pub"]["data"]) == {"n": 1}
    assert int(pub["push"]["pub"]["offset"]) == 1
    # already subscribed (server-side or by the client): nothing happens
    assert asyncio.run(c.s.server_subscribe("news")) is False
    c.subscribe("chat:x")
    assert asyncio.run(c.s.server_subscribe("chat:x")) is False
    assert c.replies() == []
    # a client-side subscribe of a server-side channel is "already subscribed"
    assert c.subscribe("news")["error"]["code"] == 105


def test_server_subscribe_without_data_and_with_a_position(node: Node) -> None:
    pub = connected(node, user="p")
    pub.subscribe("chat:room")
    pub.publish("chat:room", "a")
    pub.publish("chat:room", "b")
    c = connected(node)
    assert asyncio.run(c.s.server_subscribe("chat:room")) is True
    (reply,) = c.replies()
    sub = reply["push"]["subscribe"]
    assert sub["offset"] == 2 and "data" not in sub
    assert "publications" not in sub  # a new server-side subscription recovers nothing


def test_server_subscribe_announces_join_and_leave(node: Node) -> None:
    watcher = connected(node, user="w")
    watcher.subscribe("chat:room", join_leave=True)
    watcher.t.take()
    c = connected(node, user="n")
    assert asyncio.run(c.s.server_subscribe("chat:room")) is True
    (join,) = watcher.replies()
    assert join["push"]["join"]["info"]["user"] == "n"
    assert [r["push"]["channel"] for r in c.replies()] == ["chat:room"]  # no join for itself
    presence = watcher.call("presence", {"channel": "chat:room"})["presence"]["presence"]
    assert c.s.client_id in presence
    c.s.disconnect()
    (leave,) = watcher.replies()
    assert leave["push"]["leave"]["info"]["user"] == "n"


def test_server_subscribe_refusals(node: Node) -> None:
    fresh = SDKClient(node)
    assert asyncio.run(fresh.s.server_subscribe("news")) is False  # not connected
    c = connected(node)
    assert asyncio.run(c.s.server_subscribe("news", data=b"\x00binary")) is False  # JSON client
    with pytest.raises(ReplyError) as exc:
        asyncio.run(c.s.server_subscribe("bogus:x"))
    assert exc.value.code == 102
    assert c.t.writes == [] and c.s.channels() == []
    pb = connected(node, "protobuf")
    assert asyncio.run(pb.s.server_subscribe("news", data=b"\x00binary")) is True
    (reply,) = pb.replies()
    assert base64.b64decode(reply["push"]["subscribe"]["data"]) == b"\x00binary"
    limited = Node(make_config(client_channel_limit=1))
    one = connected(limited)
    one.subscribe("news")
    assert asyncio.run(one.s.server_subscribe("chat:x")) is False
    one.s.on_transport_closed()
    assert asyncio.run(one.s.server_subscribe("chat:x")) is False


def test_disconnect_cleans_hub_presence_and_user_index(node: Node) -> None:
    c = connected(node, user="u")
    c.subscribe("news")
    c.subscribe("chat:1")
    assert node.hub.num_subscribers("news") == 1 and node.hub.user_sessions("u") == [c.s]
    c.s.on_transport_closed()
    c.s.on_transport_closed()
    assert node.hub.num_channels() == 0 and node.hub.user_sessions("u") == []
    broker = node.broker
    assert isinstance(broker, MemoryBroker)
    assert broker.presence_store.channels() == 0
    c.s.handle_commands(b"{}")  # ignored after close
    assert c.t.writes == []


def test_hub_server_api_helpers(node: Node) -> None:
    a1, a2, b = connected(node, user="a"), connected(node, user="a"), connected(node, user="b")
    for c in (a1, a2, b):
        c.subscribe("news")
        c.t.take()
    assert node.hub.unsubscribe_user("a", "news") == 2
    assert a1.replies()[0]["push"]["unsubscribe"]["code"] == 2000
    assert node.hub.num_subscribers("news") == 1
    assert node.hub.disconnect_user("a") == 2
    assert a1.t.closed == (3503, "force disconnect") and a2.t.closed == a1.t.closed
    assert node.hub.user_sessions("a") == [] and b.t.closed is None


# ---- a broker that really awaits: the task path ---------------------------------------
class SlowBroker(MemoryBroker):
    """The in-memory broker behind real awaits, like a network broker."""

    inline = False

    async def history(self, channel: str, **kw: Any) -> HistoryResult:
        await asyncio.sleep(0.001)
        return await super().history(channel, **kw)

    async def publish(
        self, channel: str, data: bytes, json_data: bytes | None, **kw: Any
    ) -> Publication:
        await asyncio.sleep(0.001)
        return await super().publish(channel, data, json_data, **kw)

    async def add_presence(self, channel: str, info: ClientInfo) -> None:
        await asyncio.sleep(0.001)
        await super().add_presence(channel, info)


class SuspendingInlineBroker(MemoryBroker):
    """Claims to be inline but suspends: the session must finish the command in a task."""

    async def history(self, channel: str, **kw: Any) -> HistoryResult:
        await asyncio.sleep(0.001)
        return await super().history(channel, **kw)


def test_inline_broker_that_suspends_is_resumed_in_a_task() -> None:
    async def main() -> None:
        node = Node(make_config(), broker=SuspendingInlineBroker())
        c = connected(node)
        c.publish("news", "x")
        c.s.handle_commands(
            c.raw([{"id": 20, "history": {"channel": "news", "limit": 5}}, {"id": 21, "ping": {}}])
        )
        assert c.s.busy
        for _ in range(100):
            await asyncio.sleep(0.002)
            if not c.s.busy:
                break
        replies = c.replies()
        assert [r["id"] for r in replies] == [20, 21]
        assert replies[0]["history"]["publications"][0]["data"] == "x"

    asyncio.run(main())


def test_non_inline_broker_keeps_command_order_and_leaves_no_task() -> None:
    async def main() -> None:
        node = Node(make_config(), broker=SlowBroker())
        c = SDKClient(node)
        c.s.handle_commands(c.raw([{"id": 1, "connect": {"token": token()}}]))
        c.s.handle_commands(
            c.raw(
                [
                    {"id": 2, "subscribe": {"channel": "news"}},
                    {"id": 3, "publish": {"channel": "news", "data": {"x": 1}}},
                ]
            )
        )
        c.s.handle_commands(c.raw([{"id": 4, "history": {"channel": "news", "limit": 5}}]))
        for _ in range(200):
            await asyncio.sleep(0.002)
            if not c.s.busy:
                break
        replies = c.replies()
        ids = [r.get("id", "push") for r in replies]
        assert ids == [1, 2, "push", 3, 4]
        assert replies[-1]["history"]["publications"][0]["data"] == {"x": 1}
        assert not c.s.busy

    asyncio.run(main())


# ---- memory -------------------------------------------------------------------------------
def test_idle_session_memory_budget() -> None:
    """Per-connection bytes of a connected session with one subscription: session object,
    ids, subscription dict, hub set entry, user index entry. Presence off (it costs a dict
    entry per subscriber only where enabled). The WebSocket transport is not included."""
    cfg = make_config(channels=ChannelOptions(allow_subscribe_for_client=True))
    node = Node(cfg)
    n = 5000
    toks = [token(f"user-{i}") for i in range(n)]
    connect = [f'{{"id":1,"connect":{{"token":"{t}"}}}}'.encode() for t in toks]
    subscribe = b'{"id":2,"subscribe":{"channel":"news"}}'
    transports = [RecordingTransport() for _ in range(n)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    sessions = []
    for i in range(n):
        s = ClientSession(transports[i], node, "json")
        s.handle_commands(connect[i])
        s.handle_commands(subscribe)
        sessions.append(s)
    for t in transports:
        t.writes.clear()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    per = (after - before - 8 * n) / n  # minus the test's own list slot
    print(f"per-session bytes: {per:.0f}")
    assert all(not s.busy for s in sessions)
    assert per < 700, per
