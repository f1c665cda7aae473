"""The hand-written protobuf codec against the real client_pb2 of the centrifuge-python wheel.

Commands: encoded by protobuf (as the SDK does) -> decoded by ours, and ours -> parsed by
protobuf. Replies/pushes: encoded by ours -> parsed by protobuf, compared with the message
protobuf itself builds from the same values.
"""

from __future__ import annotations

from typing import Any

import centrifuge.protocol.client_pb2 as pb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidegate.gateway.codec_protobuf import (
    PROTOBUF_CODEC,
    PROTOBUF_SUBPROTOCOL,
    ProtobufCodec,
    decode_fields,
    read_varint,
    varint,
)
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

codec = PROTOBUF_CODEC

text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=20)
blob = st.binary(max_size=40)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)


def frame(msg: Any) -> bytes:
    raw = msg.SerializeToString()
    return varint(len(raw)) + raw


def unframe(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        size, pos = read_varint(data, pos, len(data))
        out.append(data[pos : pos + size])
        pos += size
    return out


def parse_reply(data: bytes) -> Any:
    (raw,) = unframe(data)
    return pb.Reply.FromString(raw)


# ---- command strategies: (pb2 Command, our Command) ---------------------------------------
@st.composite
def subscribe_requests(draw: Any) -> tuple[Any, SubscribeRequest]:
    ours = SubscribeRequest(
        channel=draw(text),
        token=draw(text),
        recover=draw(st.booleans()),
        epoch=draw(text),
        offset=draw(u64),
        data=draw(blob),
        positioned=draw(st.booleans()),
        recoverable=draw(st.booleans()),
        join_leave=draw(st.booleans()),
        delta=draw(text),
        flag=draw(i64),
    )
    theirs = pb.SubscribeRequest(
        channel=ours.channel,
        token=ours.token,
        recover=ours.recover,
        epoch=ours.epoch,
        offset=ours.offset,
        data=ours.data,
        positioned=ours.positioned,
        recoverable=ours.recoverable,
        join_leave=ours.join_leave,
        delta=ours.delta,
        flag=ours.flag,
    )
    return theirs, ours


@st.composite
def commands(draw: Any) -> tuple[Any, Command]:
    cmd_id = draw(u32)
    kind = draw(st.sampled_from(list(Method)))
    c = pb.Command(id=cmd_id)
    req: Any
    if kind is Method.CONNECT:
        subs = draw(st.dictionaries(text, subscribe_requests(), max_size=3))
        req = ConnectRequest(
            token=draw(text),
            data=draw(blob),
            subs={k: v[1] for k, v in subs.items()},
            name=draw(text),
            version=draw(text),
        )
        c.connect.token, c.connect.data = req.token, req.data
        c.connect.name, c.connect.version = req.name, req.version
        for k, v in subs.items():
            c.connect.subs[k].CopyFrom(v[0])
        c.connect.headers["x"] = "ignored"
    elif kind is Method.SUBSCRIBE:
        theirs, req = draw(subscribe_requests())
        c.subscribe.CopyFrom(theirs)
    elif kind in (Method.UNSUBSCRIBE, Method.PRESENCE, Method.PRESENCE_STATS):
        req = ChannelRequest(draw(text))
        field = {Method.UNSUBSCRIBE: c.unsubscribe, Method.PRESENCE: c.presence}.get(
            kind, c.presence_stats
        )
        field.channel = req.channel
        field.SetInParent()
    elif kind is Method.PUBLISH:
        req = PublishRequest(draw(text), draw(blob))
        c.publish.channel, c.publish.data = req.channel, req.data
        c.publish.SetInParent()
    elif kind is Method.HISTORY:
        since = draw(st.none() | st.builds(StreamPosition, u64, text))
        req = HistoryRequest(draw(text), draw(i32), since, draw(st.booleans()))
        c.history.channel, c.history.limit, c.history.reverse = req.channel, req.limit, req.reverse
        if since is not None:
            c.history.since.offset, c.history.since.epoch = since.offset, since.epoch
            c.history.since.SetInParent()
        c.history.SetInParent()
    elif kind is Method.PING:
        req = PingRequest()
        c.ping.SetInParent()
    elif kind is Method.SEND:
        req = SendRequest(draw(blob))
        c.send.data = req.data
        c.send.SetInParent()
    elif kind is Method.RPC:
        req = RPCRequest(draw(text), draw(blob))
        c.rpc.method, c.rpc.data = req.method, req.data
        c.rpc.SetInParent()
    elif kind is Method.REFRESH:
        req = RefreshRequest(draw(text))
        c.refresh.token = req.token
        c.refresh.SetInParent()
    else:
        req = SubRefreshRequest(draw(text), draw(text))
        c.sub_refresh.channel, c.sub_refresh.token = req.channel, req.token
        c.sub_refresh.SetInParent()
    return c, Command(cmd_id, kind, req)


@settings(max_examples=300, deadline=None)
@given(st.lists(commands(), min_size=1, max_size=4))
def test_commands_encoded_by_protobuf_decode_with_ours(cmds: list[tuple[Any, Command]]) -> None:
    data = b"".join(frame(theirs) for theirs, _ in cmds)
    assert codec.decode_commands(data) == [ours for _, ours in cmds]


@settings(max_examples=300, deadline=None)
@given(commands())
def test_commands_encoded_by_ours_parse_with_protobuf(cmd: tuple[Any, Command]) -> None:
    theirs, ours = cmd
    (raw,) = unframe(codec.encode_command(ours))
    parsed = pb.Command.FromString(raw)
    if ours.method is Method.CONNECT:
        theirs.connect.ClearField("headers")
    assert parsed == theirs


def test_sdk_style_commands_via_parsedict() -> None:
    """Exactly what centrifuge-python's _ProtobufCodec produces (ParseDict of its dicts)."""
    from centrifuge.codecs import _ProtobufCodec

    data = _ProtobufCodec.encode_commands(
        [
            {"id": 1, "connect": {"token": "t", "name": "python"}},
            {"id": 2, "subscribe": {"channel": "chat:1", "recoverable": True, "flag": 1}},
            {"id": 3, "history": {"channel": "c", "limit": -1, "reverse": False}},
            {},
        ]
    )
    cmds = codec.decode_commands(data)
    assert cmds[0] == Command(1, Method.CONNECT, ConnectRequest(token="t", name="python"))
    assert cmds[1] == Command(
        2, Method.SUBSCRIBE, SubscribeRequest(channel="chat:1", recoverable=True, flag=1)
    )
    assert cmds[2] == Command(3, Method.HISTORY, HistoryRequest(channel="c", limit=-1))
    assert cmds[3] == Command()  # pong


def test_ping_and_pong_fast_paths() -> None:
    assert codec.ping == b"\x00"
    assert parse_reply(codec.ping) == pb.Reply()
    assert codec.decode_commands(b"\x00") == [Command()]
    assert PROTOBUF_SUBPROTOCOL == "centrifuge-protobuf" and ProtobufCodec.binary


@given(st.binary(max_size=200))
def test_garbage_raises_only_protocol_errors(data: bytes) -> None:
    try:
        codec.decode_commands(data)
    except ProtocolError:
        pass


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x05\x08\x01",
        b"\x02\x0a\x05",
        b"\x01\x80",
        b"\x03\x0b\x00\x00",
        b"\x0b" + b"\xff" * 11,
    ],
)
def test_malformed_frames(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        codec.decode_commands(data)


def test_two_requests_in_one_command_is_an_error() -> None:
    c = pb.Command(id=1)
    c.ping.SetInParent()
    c.publish.channel = "x"
    with pytest.raises(ProtocolError):
        codec.decode_commands(frame(c))


def test_unknown_fields_are_skipped() -> None:
    raw = pb.Command(id=3, ping=pb.PingRequest()).SerializeToString()
    raw += varint(99 << 3 | 0) + b"\x01"  # field 99, varint
    raw += varint(20 << 3 | 5) + b"\x00\x00\x00\x00"  # field 20, fixed32
    raw += varint(21 << 3 | 1) + b"\x00" * 8  # field 21, fixed64
    assert codec.decode_commands(varint(len(raw)) + raw) == [Command(3, Method.PING, PingRequest())]


@given(st.integers(0, 2**64 - 1))
def test_varint_roundtrip(n: int) -> None:
    enc = varint(n)
    assert read_varint(enc, 0, len(enc)) == (n, len(enc))
    assert list(decode_fields(b"\x08" + enc)) == [(1, 0, n)]


# ---- replies and pushes: ours -> protobuf ---------------------------------------------
infos = st.builds(ClientInfo, text, text, st.none() | blob, st.none() | blob)
pubs = st.builds(
    Publication,
    data=blob,
    json_data=st.none(),
    offset=u64,
    info=st.none() | infos,
    tags=st.none() | st.dictionaries(text, text, max_size=3),
)


def pb_info(i: ClientInfo) -> Any:
    return pb.ClientInfo(
        user=i.user, client=i.client, conn_info=i.conn_info or b"", chan_info=i.chan_info or b""
    )


def pb_pub(p: Publication) -> Any:
    m = pb.Publication(data=p.data, offset=p.offset)
    if p.info is not None:
        m.info.CopyFrom(pb_info(p.info))
    for k, v in (p.tags or {}).items():
        m.tags[k] = v
    return m


sub_results = st.builds(
    SubscribeResult,
    expires=st.booleans(),
    ttl=u32,
    recoverable=st.booleans(),
    epoch=text,
    publications=st.lists(pubs, max_size=3),
    recovered=st.booleans(),
    offset=u64,
    positioned=st.booleans(),
    data=blob,
    was_recovering=st.booleans(),
)


def pb_sub_result(r: SubscribeResult) -> Any:
    return pb.SubscribeResult(
        expires=r.expires,
        ttl=r.ttl,
        recoverable=r.recoverable,
        epoch=r.epoch,
        publications=[pb_pub(p) for p in r.publications],
        recovered=r.recovered,
        offset=r.offset,
        positioned=r.positioned,
        data=r.data,
        was_recovering=r.was_recovering,
    )


@settings(max_examples=200, deadline=None)
@given(
    cmd_id=u32,
    r=st.builds(
        ConnectResult,
        client=text,
        version=text,
        expires=st.booleans(),
        ttl=u32,
        data=blob,
        subs=st.dictionaries(text, sub_results, max_size=2),
        ping=u32,
        pong=st.booleans(),
        session=text,
        node=text,
    ),
)
def test_connect_reply(cmd_id: int, r: ConnectResult) -> None:
    expected = pb.Reply(id=cmd_id)
    c = expected.connect
    c.client, c.version, c.expires, c.ttl, c.data = r.client, r.version, r.expires, r.ttl, r.data
    c.ping, c.pong, c.session, c.node = r.ping, r.pong, r.session, r.node
    for k, v in r.subs.items():
        c.subs[k].CopyFrom(pb_sub_result(v))
    c.SetInParent()
    assert parse_reply(codec.encode_connect(cmd_id, r)) == expected


@settings(max_examples=200, deadline=None)
@given(cmd_id=u32, r=sub_results)
def test_subscribe_reply(cmd_id: int, r: SubscribeResult) -> None:
    expected = pb.Reply(id=cmd_id, subscribe=pb_sub_result(r))
    assert parse_reply(codec.encode_subscribe(cmd_id, r)) == expected


@settings(max_examples=200, deadline=None)
@given(cmd_id=u32, ps=st.lists(pubs, max_size=4), epoch=text, offset=u64)
def test_history_reply(cmd_id: int, ps: list[Publication], epoch: str, offset: int) -> None:
    expected = pb.Reply(
        id=cmd_id,
        history=pb.HistoryResult(publications=[pb_pub(p) for p in ps], epoch=epoch, offset=offset),
    )
    assert parse_reply(codec.encode_history(cmd_id, ps, epoch, offset)) == expected


@settings(max_examples=100, deadline=None)
@given(cmd_id=u32, presence=st.dictionaries(text, infos, max_size=4), n=u32, m=u32)
def test_presence_replies(cmd_id: int, presence: dict[str, ClientInfo], n: int, m: int) -> None:
    expected = pb.Reply(id=cmd_id)
    for k, v in presence.items():
        expected.presence.presence[k].CopyFrom(pb_info(v))
    expected.presence.SetInParent()
    assert parse_reply(codec.encode_presence(cmd_id, presence)) == expected
    stats = pb.Reply(id=cmd_id, presence_stats=pb.PresenceStatsResult(num_clients=n, num_users=m))
    assert parse_reply(codec.encode_presence_stats(cmd_id, n, m)) == stats


@settings(max_examples=100, deadline=None)
@given(cmd_id=u32, code=u32, message=text, temporary=st.booleans(), data=blob, ttl=u32)
def test_small_replies(
    cmd_id: int, code: int, message: str, temporary: bool, data: bytes, ttl: int
) -> None:
    assert parse_reply(codec.encode_error(cmd_id, code, message, temporary)) == pb.Reply(
        id=cmd_id, error=pb.Error(code=code, message=message, temporary=temporary)
    )
    assert parse_reply(codec.encode_rpc(cmd_id, data)) == pb.Reply(
        id=cmd_id, rpc=pb.RPCResult(data=data)
    )
    assert parse_reply(codec.encode_refresh(cmd_id, message, "v", True, ttl)) == pb.Reply(
        id=cmd_id, refresh=pb.RefreshResult(client=message, version="v", expires=True, ttl=ttl)
    )
    assert parse_reply(codec.encode_sub_refresh(cmd_id, bool(ttl), ttl)) == pb.Reply(
        id=cmd_id, sub_refresh=pb.SubRefreshResult(expires=bool(ttl), ttl=ttl)
    )
    for method, field in [
        (Method.PUBLISH, "publish"),
        (Method.UNSUBSCRIBE, "unsubscribe"),
        (Method.PING, "ping"),
    ]:
        r = parse_reply(codec.encode_empty_result(cmd_id, method))
        assert r.HasField(field) and r.id == cmd_id  # present even though empty


@settings(max_examples=200, deadline=None)
@given(channel=text, pub=pubs, info=infos, code=u32, reason=text, data=blob, flag=st.booleans())
def test_pushes(
    channel: str,
    pub: Publication,
    info: ClientInfo,
    code: int,
    reason: str,
    data: bytes,
    flag: bool,
) -> None:
    def push(**kw: Any) -> Any:
        return pb.Reply(push=pb.Push(**kw))

    assert parse_reply(codec.encode_publication(channel, pub)) == push(
        channel=channel, pub=pb_pub(pub)
    )
    assert parse_reply(codec.encode_join(channel, info)) == push(
        channel=channel, join=pb.Join(info=pb_info(info))
    )
    assert parse_reply(codec.encode_leave(channel, info)) == push(
        channel=channel, leave=pb.Leave(info=pb_info(info))
    )
    assert parse_reply(codec.encode_unsubscribe(channel, code, reason)) == push(
        channel=channel, unsubscribe=pb.Unsubscribe(code=code, reason=reason)
    )
    assert parse_reply(codec.encode_message(data)) == push(message=pb.Message(data=data))
    assert parse_reply(codec.encode_disconnect(code, reason, flag)) == push(
        disconnect=pb.Disconnect(code=code, reason=reason, reconnect=flag)
    )
    r = SubscribeResult(recoverable=flag, epoch=reason, offset=code, positioned=flag, data=data)
    assert parse_reply(codec.encode_subscribe_push(channel, r)) == push(
        channel=channel,
        subscribe=pb.Subscribe(
            recoverable=flag, epoch=reason, offset=code, positioned=flag, data=data
        ),
    )


def test_join_concatenates_frames() -> None:
    a = codec.encode_empty_result(1, Method.PING)
    b = codec.encode_empty_result(2, Method.PUBLISH)
    assert [pb.Reply.FromString(x).id for x in unframe(codec.join([a, b]))] == [1, 2]
