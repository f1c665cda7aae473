"""JSON codec: commands as centrifuge-python / centrifuge-js write them, replies as they read them."""

from __future__ import annotations

import json
from typing import Any

import pytest
from centrifuge.codecs import _JsonCodec
from hypothesis import given, settings
from hypothesis import strategies as st

from tidegate.gateway.codec_json import JSON_CODEC, JsonCodec, NotJSON, json_value
from tidegate.gateway.codes import ProtocolError
from tidegate.gateway.messages import (
    ChannelRequest,
    ClientInfo,
    Command,
    ConnectRequest,
    ConnectResult,
    HistoryRequest,
    Method,
    PingRequest,
    Publication,
    PublishRequest,
    RefreshRequest,
    RPCRequest,
    SendRequest,
    StreamPosition,
    SubRefreshRequest,
    SubscribeRequest,
    SubscribeResult,
)

codec = JSON_CODEC


def lines(data: bytes) -> list[dict[str, Any]]:
    """Decoded the way the SDK does it."""
    return list(_JsonCodec.decode_replies(data.decode()))


def test_commands_as_the_python_sdk_sends_them() -> None:
    frame = _JsonCodec.encode_commands(
        [
            {"id": 1, "connect": {"token": "tok", "data": {"a": 1}, "name": "python"}},
            {"id": 2, "subscribe": {"channel": "chat:1", "recoverable": True, "flag": 1}},
            {
                "id": 3,
                "subscribe": {
                    "channel": "c",
                    "recover": True,
                    "epoch": "ep",
                    "offset": 12,
                    "join_leave": True,
                    "positioned": True,
                    "token": "st",
                    "delta": "fossil",
                    "data": "x",
                    "flag": 3,
                },
            },
            {"id": 4, "publish": {"channel": "c", "data": {"text": "héllo"}}},
            {"id": 5, "unsubscribe": {"channel": "c"}},
            {"id": 6, "presence": {"channel": "c"}},
            {"id": 7, "presence_stats": {"channel": "c"}},
            {"id": 8, "history": {"channel": "c", "limit": 10, "reverse": True}},
            {
                "id": 9,
                "history": {"channel": "c", "limit": 0, "since": {"offset": 3, "epoch": "e"}},
            },
            {"id": 10, "rpc": {"method": "m", "data": [1, 2]}},
            {"send": {"data": "hi"}},
            {"id": 11, "refresh": {"token": "r"}},
            {"id": 12, "sub_refresh": {"channel": "c", "token": "s"}},
            {"id": 13, "ping": {}},
            {},
        ]
    ).encode()
    assert codec.decode_commands(frame) == [
        Command(1, Method.CONNECT, ConnectRequest(token="tok", data=b'{"a":1}', name="python")),
        Command(2, Method.SUBSCRIBE, SubscribeRequest(channel="chat:1", recoverable=True, flag=1)),
        Command(
            3,
            Method.SUBSCRIBE,
            SubscribeRequest(
                channel="c",
                token="st",
                recover=True,
                epoch="ep",
                offset=12,
                data=b'"x"',
                positioned=True,
                join_leave=True,
                delta="fossil",
                flag=3,
            ),
        ),
        Command(4, Method.PUBLISH, PublishRequest("c", '{"text":"héllo"}'.encode())),
        Command(5, Method.UNSUBSCRIBE, ChannelRequest("c")),
        Command(6, Method.PRESENCE, ChannelRequest("c")),
        Command(7, Method.PRESENCE_STATS, ChannelRequest("c")),
        Command(8, Method.HISTORY, HistoryRequest("c", 10, None, True)),
        Command(9, Method.HISTORY, HistoryRequest("c", 0, StreamPosition(3, "e"), False)),
        Command(10, Method.RPC, RPCRequest("m", b"[1,2]")),
        Command(0, Method.SEND, SendRequest(b'"hi"')),
        Command(11, Method.REFRESH, RefreshRequest("r")),
        Command(12, Method.SUB_REFRESH, SubRefreshRequest("c", "s")),
        Command(13, Method.PING, PingRequest()),
        Command(),
    ]


def test_js_style_compact_commands_and_connect_subs() -> None:
    # centrifuge-js: JSON.stringify per command, joined with "\n"
    frame = (
        b'{"id":1,"connect":{"token":"t","subs":{"news":{"recover":true,"offset":"5","epoch":"e"}}}}'
        b'\n{"id":2,"ping":{}}\n'
    )
    cmds = codec.decode_commands(frame)
    assert cmds[0].request == ConnectRequest(
        token="t", subs={"news": SubscribeRequest(recover=True, offset=5, epoch="e")}
    )
    assert cmds[1] == Command(2, Method.PING, PingRequest())


def test_pong_fast_path() -> None:
    assert codec.decode_commands(b"{}") == [Command()]
    assert codec.decode_commands(b'{"id":0}') == [Command()]
    assert codec.ping == b"{}" and lines(codec.ping) == [{}]


@pytest.mark.parametrize(
    "frame",
    [
        b"{",
        b"null",
        b"[]",
        b'"str"',
        b"\n\n",
        b"",
        b'{"id":-1,"ping":{}}',
        b'{"id":4294967296,"ping":{}}',
        b'{"id":true,"ping":{}}',
        b'{"id":1,"ping":{},"publish":{}}',
        b'{"id":1,"subscribe":[]}',
        b'{"id":1,"subscribe":{"channel":5}}',
        b'{"id":1,"subscribe":{"recover":"yes"}}',
        b'{"id":1,"publish":{"channel":"c","data":NaN}}',
        b'{"id":1,"history":{"channel":"c","limit":1.5}}',
        b'{"id":1,"ping":{}}\n{oops',
        b"\xff\xfe",
        b'{"id":1,"publish":{"channel":"c","data":"\\ud800"}}',
    ],
)
def test_malformed_commands(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        codec.decode_commands(frame)


@given(st.binary(max_size=100) | st.text(max_size=100).map(str.encode))
def test_garbage_raises_only_protocol_errors(data: bytes) -> None:
    try:
        codec.decode_commands(data)
    except ProtocolError:
        pass


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None)
@given(value=json_values, channel=st.text(), user=st.text(), offset=st.integers(0, 2**64 - 1))
def test_publication_push_roundtrip(value: Any, channel: str, user: str, offset: int) -> None:
    data = json.dumps(value, indent=1).encode()  # newlines: must be compacted
    jd = json_value(data)
    assert jd is not None and b"\n" not in jd
    info = ClientInfo(user, "c1", b'{"x":1}', None)
    out = codec.encode_publication(channel, Publication(data, jd, offset, info, {"k": "v"}))
    assert b"\n" not in out
    (reply,) = lines(out)
    pub = reply["push"]["pub"]
    assert reply["push"]["channel"] == channel
    assert pub["data"] == value
    assert pub.get("offset", 0) == offset
    assert pub["info"] == {
        "client": "c1",
        "conn_info": {"x": 1},
        **({"user": user} if user else {}),
    }
    assert pub["tags"] == {"k": "v"}


def test_json_value() -> None:
    raw = b'{"a":1}'
    assert json_value(raw) is raw  # no copy in the common case
    assert json_value(b"\x00\xff") is None
    assert json_value(b"nope") is None
    assert json_value(b"NaN") is None
    assert json_value(b'{\n"a": 1}') == b'{"a":1}'


def test_binary_publication_is_not_json() -> None:
    with pytest.raises(NotJSON):
        codec.encode_publication("c", Publication(b"\x00", None))


def test_reply_encodings_read_back_as_the_sdk_reads_them() -> None:
    sub = SubscribeResult(
        expires=True,
        ttl=30,
        recoverable=True,
        epoch="ep",
        publications=[Publication(b"1", b"1", 4)],
        recovered=True,
        offset=4,
        positioned=True,
        was_recovering=True,
    )
    connect = ConnectResult(
        client="c", version="v", expires=True, ttl=9, subs={"news": sub}, ping=25, pong=True
    )
    frame = codec.join(
        [
            codec.encode_connect(1, connect),
            codec.encode_subscribe(2, SubscribeResult()),
            codec.encode_error(3, 103, "permission denied"),
            codec.encode_error(4, 100, "internal server error", True),
            codec.encode_empty_result(5, Method.PUBLISH),
            codec.encode_presence(6, {"c": ClientInfo("u", "c")}),
            codec.encode_presence_stats(7, 2, 1),
            codec.encode_history(8, [], "ep", 0),
            codec.encode_rpc(9, b'{"ok":true}'),
            codec.encode_refresh(10, "c", "v", True, 60),
            codec.encode_sub_refresh(11, False, 0),
            codec.encode_unsubscribe("news", 2000, "server unsubscribe"),
            codec.encode_join("news", ClientInfo("u", "c")),
            codec.encode_leave("news", ClientInfo("", "c")),
            codec.encode_message(b"[1]"),
            codec.encode_disconnect(3001, "shutdown", True),
            codec.encode_subscribe_push("news", SubscribeResult(recoverable=True, offset=2)),
        ]
    )
    got = lines(frame)
    assert got[0] == {
        "id": 1,
        "connect": {
            "client": "c",
            "version": "v",
            "expires": True,
            "ttl": 9,
            "ping": 25,
            "pong": True,
            "subs": {
                "news": {
                    "expires": True,
                    "ttl": 30,
                    "recoverable": True,
                    "epoch": "ep",
                    "publications": [{"data": 1, "offset": 4}],
                    "recovered": True,
                    "offset": 4,
                    "positioned": True,
                    "was_recovering": True,
                }
            },
        },
    }
    assert got[1:] == [
        {"id": 2, "subscribe": {}},
        {"id": 3, "error": {"code": 103, "message": "permission denied"}},
        {"id": 4, "error": {"code": 100, "message": "internal server error", "temporary": True}},
        {"id": 5, "publish": {}},
        {"id": 6, "presence": {"presence": {"c": {"client": "c", "user": "u"}}}},
        {"id": 7, "presence_stats": {"num_clients": 2, "num_users": 1}},
        {"id": 8, "history": {"epoch": "ep"}},
        {"id": 9, "rpc": {"data": {"ok": True}}},
        {"id": 10, "refresh": {"client": "c", "version": "v", "expires": True, "ttl": 60}},
        {"id": 11, "sub_refresh": {}},
        {
            "push": {
                "channel": "news",
                "unsubscribe": {"code": 2000, "reason": "server unsubscribe"},
            }
        },
        {"push": {"channel": "news", "join": {"info": {"client": "c", "user": "u"}}}},
        {"push": {"channel": "news", "leave": {"info": {"client": "c"}}}},
        {"push": {"message": {"data": [1]}}},
        {"push": {"disconnect": {"code": 3001, "reason": "shutdown", "reconnect": True}}},
        {"push": {"channel": "news", "subscribe": {"recoverable": True, "offset": 2}}},
    ]


def test_non_json_payloads_are_refused_in_replies() -> None:
    with pytest.raises(NotJSON):
        codec.encode_rpc(1, b"\x00")
    with pytest.raises(NotJSON):
        codec.encode_message(b"{\n}")


def test_codec_properties() -> None:
    assert not JsonCodec.binary and JsonCodec.name == "json"
    assert codec.join([b"a"]) == b"a" and codec.join([b"a", b"b"]) == b"a\nb"
