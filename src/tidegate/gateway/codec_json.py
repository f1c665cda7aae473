"""Client protocol v2, JSON format (the default WebSocket subprotocol; text frames).

A frame holds one or more Commands (client -> server) or Replies (server -> client) separated
by ``\\n``. ``bytes`` fields of the protobuf schema (``data``, ``conn_info``, ``chan_info``) are
embedded JSON values, not base64: the server keeps them as compact JSON text and splices them
into its output without re-encoding.

Hot paths: the server ping is the empty reply ``{}``, the client pong the empty command ``{}``;
both are recognised/produced without touching the JSON parser. Publication pushes are built by
byte concatenation once per publication (the hub shares the result between subscribers).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from json.encoder import c_encode_basestring, c_make_encoder  # type: ignore[attr-defined]
from typing import Any

from tidegate.gateway.codes import ProtocolError
from tidegate.gateway.messages import (
    METHOD_NAMES,
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
    Request,
    RPCRequest,
    SendRequest,
    StreamPosition,
    SubRefreshRequest,
    SubscribeRequest,
    SubscribeResult,
)

__all__ = ["JSON_CODEC", "JsonCodec", "NotJSON", "encode_rpc_reply", "json_value", "match_rpc"]

_MAX_UINT32 = (1 << 32) - 1
_MAX_UINT64 = (1 << 64) - 1
_MIN_INT64 = -(1 << 63)
_MAX_INT64 = (1 << 63) - 1

PING = b"{}"
PONG_COMMAND = Command()  # shared, never mutated


class NotJSON(ValueError):
    """A payload that is not a JSON value cannot be sent to a JSON client."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_decoder = json.JSONDecoder(parse_constant=_reject_constant)
_decode = _decoder.decode
# The C scanner behind ``_decode`` without its Python wrapper (two regex calls for the
# surrounding whitespace): ``_scan(text, 0) -> (value, end)`` for a value starting at 0.
_scan = _decoder.scan_once  # type: ignore[attr-defined]
_compact_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_compact = _compact_encoder.encode
# The C encoder behind ``_compact`` for values parsed from JSON (they cannot be cyclic, so no
# marker dict): JSONEncoder.encode builds a new one on every call.
_compact_chunks = c_make_encoder(
    None, _compact_encoder.default, c_encode_basestring, None, ":", ",", False, False, False
)
_quote = json.JSONEncoder(ensure_ascii=True).encode  # str -> JSON string literal (ASCII)


def _s(value: str) -> bytes:
    return _quote(value).encode("ascii")


def json_value(data: bytes) -> bytes | None:
    """``data`` as an embeddable, newline-free JSON value, or None if it is not JSON.

    Returns ``data`` itself (same object) in the common case: valid JSON without a newline.
    """
    try:
        value = _decode(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    if b"\n" in data or b"\r" in data:
        return _compact(value).encode("utf-8")
    return data


# ---- decoding --------------------------------------------------------------------------
def _bad(what: str) -> ProtocolError:
    return ProtocolError(what)


def _str(d: dict[str, Any], key: str) -> str:
    v = d.get(key)
    if v is None:
        return ""
    if type(v) is not str:
        raise _bad(f"{key} must be a string")
    return v


def _bool(d: dict[str, Any], key: str) -> bool:
    v = d.get(key)
    if v is None:
        return False
    if type(v) is not bool:
        raise _bad(f"{key} must be a boolean")
    return v


def _int(d: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = d.get(key)
    if v is None:
        return 0
    if type(v) is str:  # protobuf's JSON mapping writes 64-bit integers as strings
        try:
            v = int(v)
        except ValueError:
            raise _bad(f"{key} must be an integer") from None
    if type(v) is not int or not lo <= v <= hi:
        raise _bad(f"{key} must be an integer in [{lo}, {hi}]")
    return v


def _data(d: dict[str, Any], key: str) -> bytes:
    v = d.get(key)
    if v is None:
        return b""
    try:
        return "".join(_compact_chunks(v, 0)).encode("utf-8")
    except (ValueError, UnicodeEncodeError):
        raise _bad(f"{key} is not valid JSON text") from None


def _obj(v: Any, key: str) -> dict[str, Any]:
    if v is None:
        return {}
    if type(v) is not dict:
        raise _bad(f"{key} must be an object")
    return v


def _subscribe_request(d: dict[str, Any]) -> SubscribeRequest:
    return SubscribeRequest(
        channel=_str(d, "channel"),
        token=_str(d, "token"),
        recover=_bool(d, "recover"),
        epoch=_str(d, "epoch"),
        offset=_int(d, "offset", 0, _MAX_UINT64),
        data=_data(d, "data"),
        positioned=_bool(d, "positioned"),
        recoverable=_bool(d, "recoverable"),
        join_leave=_bool(d, "join_leave"),
        delta=_str(d, "delta"),
        flag=_int(d, "flag", _MIN_INT64, _MAX_INT64),
    )


def _connect_request(d: dict[str, Any]) -> ConnectRequest:
    subs: dict[str, SubscribeRequest] = {}
    for ch, sd in _obj(d.get("subs"), "subs").items():
        subs[ch] = _subscribe_request(_obj(sd, "subs"))
    return ConnectRequest(
        token=_str(d, "token"),
        data=_data(d, "data"),
        subs=subs,
        name=_str(d, "name"),
        version=_str(d, "version"),
    )


def _history_request(d: dict[str, Any]) -> HistoryRequest:
    since = None
    if d.get("since") is not None:
        sd = _obj(d["since"], "since")
        since = StreamPosition(_int(sd, "offset", 0, _MAX_UINT64), _str(sd, "epoch"))
    return HistoryRequest(
        channel=_str(d, "channel"),
        limit=_int(d, "limit", -(1 << 31), (1 << 31) - 1),
        since=since,
        reverse=_bool(d, "reverse"),
    )


# method key -> (Method, parser of its params object). A dict: Enum attribute access is slow.
_PARSERS: dict[str, tuple[Method, Callable[[dict[str, Any]], Request]]] = {
    "connect": (Method.CONNECT, _connect_request),
    "subscribe": (Method.SUBSCRIBE, _subscribe_request),
    "unsubscribe": (Method.UNSUBSCRIBE, lambda d: ChannelRequest(_str(d, "channel"))),
    "publish": (Method.PUBLISH, lambda d: PublishRequest(_str(d, "channel"), _data(d, "data"))),
    "presence": (Method.PRESENCE, lambda d: ChannelRequest(_str(d, "channel"))),
    "presence_stats": (Method.PRESENCE_STATS, lambda d: ChannelRequest(_str(d, "channel"))),
    "history": (Method.HISTORY, _history_request),
    "ping": (Method.PING, lambda d: PingRequest()),
    "send": (Method.SEND, lambda d: SendRequest(_data(d, "data"))),
    "rpc": (Method.RPC, lambda d: RPCRequest(_str(d, "method"), _data(d, "data"))),
    "refresh": (Method.REFRESH, lambda d: RefreshRequest(_str(d, "token"))),
    "sub_refresh": (
        Method.SUB_REFRESH,
        lambda d: SubRefreshRequest(_str(d, "channel"), _str(d, "token")),
    ),
}


def _command(obj: Any) -> Command:
    if type(obj) is not dict:
        raise _bad("a command must be a JSON object")
    if not obj:
        return PONG_COMMAND
    cmd_id = 0
    found: tuple[Method, Callable[[dict[str, Any]], Request]] | None = None
    params: Any = None
    for key, value in obj.items():
        if key == "id":
            cmd_id = _int(obj, "id", 0, _MAX_UINT32)
            continue
        entry = _PARSERS.get(key)
        if entry is None:
            continue  # unknown fields are ignored, as protobuf's JSON mapping does
        if found is not None:
            raise _bad("a command must hold one request")
        found, params = entry, value
    if found is None:
        return PONG_COMMAND if cmd_id == 0 else Command(cmd_id, None, None)
    method, parse = found
    return Command(cmd_id, method, parse(_obj(params, "request")))


# ---- the RPC fast path ---------------------------------------------------------------------
# A frame holding one compact RPC command - ``{"id":N,"rpc":{"method":"m","data":D}}`` (Go SDK,
# protobuf JSON field order) or ``{"rpc":{"method":"m","data":D},"id":N}`` (centrifuge-js) - is
# recognised by one regular expression instead of json.loads + Command/RPCRequest objects +
# re-encoding ``data``. It only matches when ``data``'s bytes are already exactly what the
# generic path produces (the compact re-encoding of the parsed value), so both paths hand the
# handler the same bytes: ASCII, no whitespace, strings without escapes, integers only (no
# "-0", at most 18 digits), objects/arrays at most two levels deep, no duplicate keys (checked
# in match_rpc). Anything else - floats, escapes, other commands, batches - takes the generic
# path.
_F_STR = rb'"[^"\\\x00-\x1f\x80-\xff]*+"'
_F_SCALAR = _F_STR + rb"|0|-?[1-9][0-9]{0,17}|true|false|null"


def _f_container(item: bytes) -> bytes:
    member = _F_STR + rb":(?:" + item + rb")"
    obj = rb"\{(?:" + member + rb"(?:," + member + rb")*)?\}"
    arr = rb"\[(?:(?:" + item + rb")(?:,(?:" + item + rb"))*)?\]"
    return obj + rb"|" + arr


_F_INNER = _F_SCALAR + rb"|" + _f_container(_F_SCALAR)
_F_DATA = rb"(" + _F_SCALAR + rb"|" + _f_container(_F_INNER) + rb")"
_F_METHOD = rb'(?:"method":"([^"\\\x00-\x1f\x80-\xff]*+)",)?'
_F_ID = rb"([1-9][0-9]{0,8})"  # below 10**9, so within uint32 (larger ids: the generic path)
_RPC_ID_FIRST = re.compile(
    rb'\{"id":' + _F_ID + rb',"rpc":\{' + _F_METHOD + rb'"data":' + _F_DATA + rb"\}\}"
).fullmatch
_RPC_ID_LAST = re.compile(
    rb'\{"rpc":\{' + _F_METHOD + rb'"data":' + _F_DATA + rb'\},"id":' + _F_ID + rb"\}"
).fullmatch
_STRINGS = re.compile(rb'"([^"]*)"(:?)').findall


def match_rpc(payload: bytes) -> tuple[bytes, str, bytes] | None:
    """``(id digits, method, data)`` of a frame holding exactly one compact ``rpc`` command
    whose ``data`` needs no re-encoding; None when the generic path must decode the frame.

    Agrees with ``decode_commands`` on what it accepts (a ``data`` of ``null`` is ``b""``).
    """
    m = _RPC_ID_FIRST(payload)
    if m is not None:
        cmd_id, method, data = m.groups()
    else:
        m = _RPC_ID_LAST(payload)
        if m is None:
            return None
        method, data, cmd_id = m.groups()
    if data.count(b'":') > 1:
        # Strings hold no quote, so each match is one whole string, and one followed by a
        # colon is a key. Equal keys anywhere (even in different objects): the generic path.
        keys = [s for s, colon in _STRINGS(data) if colon]
        if len(set(keys)) != len(keys):
            return None
    elif data == b"null":
        data = b""
    return cmd_id, (method.decode("ascii") if method else ""), data


def encode_rpc_reply(id_digits: bytes, data: bytes) -> bytes:
    """``encode_rpc`` for ``data`` already known to be newline-free JSON (no second parse) and
    the command id as its decimal digits."""
    if not data:
        return b'{"id":%s,"rpc":{}}' % id_digits
    return b'{"id":%s,"rpc":{"data":%s}}' % (id_digits, data)


# ---- encoding helpers --------------------------------------------------------------------
def _info(info: ClientInfo) -> bytes:
    out = [b'{"client":', _s(info.client)]
    if info.user:
        out += (b',"user":', _s(info.user))
    if info.conn_info:
        out += (b',"conn_info":', info.conn_info)
    if info.chan_info:
        out += (b',"chan_info":', info.chan_info)
    out.append(b"}")
    return b"".join(out)


def _pub(pub: Publication) -> bytes:
    data = pub.json_data
    if data is None:
        raise NotJSON("publication data is not JSON")
    out = [b'{"data":', data]
    if pub.info is not None:
        out += (b',"info":', _info(pub.info))
    if pub.offset:
        out += (b',"offset":', str(pub.offset).encode())
    if pub.tags:
        out += (b',"tags":', _compact(pub.tags).encode("utf-8"))
    out.append(b"}")
    return b"".join(out)


def _pubs(pubs: list[Publication]) -> bytes:
    return b"[" + b",".join([_pub(p) for p in pubs]) + b"]"


def _checked(data: bytes) -> bytes:
    if json_value(data) is not data:
        raise NotJSON("payload is not newline-free JSON")
    return data


def _sub_result(r: SubscribeResult) -> bytes:
    out: list[bytes] = []
    if r.expires:
        out.append(b'"expires":true')
    if r.ttl:
        out.append(b'"ttl":%d' % r.ttl)
    if r.recoverable:
        out.append(b'"recoverable":true')
    if r.epoch:
        out.append(b'"epoch":' + _s(r.epoch))
    if r.publications:
        out.append(b'"publications":' + _pubs(r.publications))
    if r.recovered:
        out.append(b'"recovered":true')
    if r.offset:
        out.append(b'"offset":%d' % r.offset)
    if r.positioned:
        out.append(b'"positioned":true')
    if r.data:
        out.append(b'"data":' + _checked(r.data))
    if r.was_recovering:
        out.append(b'"was_recovering":true')
    return b"{" + b",".join(out) + b"}"


_RESULT_KEYS = {m: METHOD_NAMES[m].encode() for m in Method}


class JsonCodec:
    """Stateless; one shared instance (:data:`JSON_CODEC`) serves every JSON connection."""

    __slots__ = ()

    name = "json"
    binary = False  # WebSocket text frames
    ping = PING  # the server's ping: an empty reply
    pong = PING  # the client's pong: an empty command (same bytes)

    # ---- client -> server
    def decode_commands(self, data: bytes) -> list[Command]:
        """All commands of one frame. Raises :class:`ProtocolError` on any malformed line."""
        if data == PING:
            return [PONG_COMMAND]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad("frame is not UTF-8") from None
        commands = []
        for line in text.split("\n"):
            line = line.strip()
            if not line:
                continue
            if line == "{}":
                commands.append(PONG_COMMAND)
                continue
            try:
                obj, stop = _scan(line, 0)  # stripped: no JSON whitespace around the value
                if stop != len(line):
                    raise ValueError("extra data")
            except (StopIteration, ValueError):
                try:
                    obj = _decode(line)  # fails too, with the decoder's message
                except ValueError as exc:
                    raise _bad(f"malformed JSON: {exc}") from None
            commands.append(_command(obj))
        if not commands:
            raise _bad("empty frame")
        return commands

    # ---- framing
    def join(self, frames: list[bytes]) -> bytes:
        return frames[0] if len(frames) == 1 else b"\n".join(frames)

    # ---- replies
    def encode_error(self, cmd_id: int, code: int, message: str, temporary: bool = False) -> bytes:
        tail = b',"temporary":true}}' if temporary else b"}}"
        return b'{"id":%d,"error":{"code":%d,"message":%s%s' % (cmd_id, code, _s(message), tail)

    def encode_empty_result(self, cmd_id: int, method: Method) -> bytes:
        """unsubscribe / publish / ping results carry no fields."""
        return b'{"id":%d,"%s":{}}' % (cmd_id, _RESULT_KEYS[method])

    def encode_connect(self, cmd_id: int, r: ConnectResult) -> bytes:
        out = [b'"client":' + _s(r.client)]
        if r.version:
            out.append(b'"version":' + _s(r.version))
        if r.expires:
            out.append(b'"expires":true')
        if r.ttl:
            out.append(b'"ttl":%d' % r.ttl)
        if r.data:
            out.append(b'"data":' + _checked(r.data))
        if r.subs:
            subs = b",".join([_s(ch) + b":" + _sub_result(sr) for ch, sr in r.subs.items()])
            out.append(b'"subs":{' + subs + b"}")
        if r.ping:
            out.append(b'"ping":%d' % r.ping)
        if r.pong:
            out.append(b'"pong":true')
        if r.session:
            out.append(b'"session":' + _s(r.session))
        if r.node:
            out.append(b'"node":' + _s(r.node))
        return b'{"id":%d,"connect":{%s}}' % (cmd_id, b",".join(out))

    def encode_subscribe(self, cmd_id: int, r: SubscribeResult) -> bytes:
        return b'{"id":%d,"subscribe":%s}' % (cmd_id, _sub_result(r))

    def encode_presence(self, cmd_id: int, presence: dict[str, ClientInfo]) -> bytes:
        items = b",".join([_s(k) + b":" + _info(v) for k, v in presence.items()])
        return b'{"id":%d,"presence":{"presence":{%s}}}' % (cmd_id, items)

    def encode_presence_stats(self, cmd_id: int, num_clients: int, num_users: int) -> bytes:
        return b'{"id":%d,"presence_stats":{"num_clients":%d,"num_users":%d}}' % (
            cmd_id,
            num_clients,
            num_users,
        )

    def encode_history(
        self, cmd_id: int, pubs: list[Publication], epoch: str, offset: int
    ) -> bytes:
        out = []
        if pubs:
            out.append(b'"publications":' + _pubs(pubs))
        if epoch:
            out.append(b'"epoch":' + _s(epoch))
        if offset:
            out.append(b'"offset":%d' % offset)
        return b'{"id":%d,"history":{%s}}' % (cmd_id, b",".join(out))

    def encode_rpc(self, cmd_id: int, data: bytes) -> bytes:
        if not data:
            return b'{"id":%d,"rpc":{}}' % cmd_id
        return b'{"id":%d,"rpc":{"data":%s}}' % (cmd_id, _checked(data))

    def encode_refresh(
        self, cmd_id: int, client: str, version: str, expires: bool, ttl: int
    ) -> bytes:
        out = [b'"client":' + _s(client)]
        if version:
            out.append(b'"version":' + _s(version))
        if expires:
            out.append(b'"expires":true,"ttl":%d' % ttl)
        return b'{"id":%d,"refresh":{%s}}' % (cmd_id, b",".join(out))

    def encode_sub_refresh(self, cmd_id: int, expires: bool, ttl: int) -> bytes:
        if not expires:
            return b'{"id":%d,"sub_refresh":{}}' % cmd_id
        return b'{"id":%d,"sub_refresh":{"expires":true,"ttl":%d}}' % (cmd_id, ttl)

    # ---- pushes
    def encode_publication(self, channel: str, pub: Publication) -> bytes:
        """Raises :class:`NotJSON` when the payload is binary."""
        return b'{"push":{"channel":%s,"pub":%s}}' % (_s(channel), _pub(pub))

    def encode_join(self, channel: str, info: ClientInfo) -> bytes:
        return b'{"push":{"channel":%s,"join":{"info":%s}}}' % (_s(channel), _info(info))

    def encode_leave(self, channel: str, info: ClientInfo) -> bytes:
        return b'{"push":{"channel":%s,"leave":{"info":%s}}}' % (_s(channel), _info(info))

    def encode_unsubscribe(self, channel: str, code: int, reason: str) -> bytes:
        return b'{"push":{"channel":%s,"unsubscribe":{"code":%d,"reason":%s}}}' % (
            _s(channel),
            code,
            _s(reason),
        )

    def encode_subscribe_push(self, channel: str, r: SubscribeResult) -> bytes:
        return b'{"push":{"channel":%s,"subscribe":%s}}' % (_s(channel), _sub_result(r))

    def encode_message(self, data: bytes) -> bytes:
        return b'{"push":{"message":{"data":%s}}}' % _checked(data)

    def encode_disconnect(self, code: int, reason: str, reconnect: bool) -> bytes:
        tail = b',"reconnect":true}}}' if reconnect else b"}}}"
        return b'{"push":{"disconnect":{"code":%d,"reason":%s%s' % (code, _s(reason), tail)


JSON_CODEC = JsonCodec()
