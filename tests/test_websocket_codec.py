"""The sans-I/O WebSocket codec: handshake, frames, message assembly. No sockets needed.

Interop is checked against the ``websockets`` library's own sans-I/O client protocol.
"""

from __future__ import annotations

import base64
import os
import timeit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

from tidegate.protocol.codec import FrameError, FrameTooLarge
from tidegate.protocol.http11 import HttpError, parse_request_head
from tidegate.protocol.websocket import (
    CLOSE_NO_STATUS,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Binary,
    Close,
    Fragments,
    Frame,
    HandshakeError,
    Ping,
    Pong,
    Text,
    WebSocketFrameCodec,
    accept_key,
    accept_response,
    check_origin,
    encode_binary,
    encode_close,
    encode_frame,
    encode_masked_frame,
    encode_ping,
    encode_pong,
    encode_text,
    feed_frame,
    is_valid_close_code,
    parse_close,
    parse_upgrade_request,
    reject_response,
    select_subprotocol,
    unmask,
)

WS_URI = "ws://gw.example.com:8000/connection/websocket?format=json"
KEY = "dGhlIHNhbXBsZSBub25jZQ=="


# --- helpers -----------------------------------------------------------------------------------


def client(**kwargs: object) -> ClientProtocol:
    return ClientProtocol(parse_uri(WS_URI), **kwargs)  # type: ignore[arg-type]


def handshake_bytes(c: ClientProtocol) -> bytes:
    c.send_request(c.connect())
    return b"".join(c.data_to_send())


def open_client(**kwargs: object) -> ClientProtocol:
    """A websockets client that completed the handshake against our accept_response."""
    c = client(**kwargs)
    data = handshake_bytes(c)
    parsed = parse_upgrade_request(data, 0, len(data))
    assert parsed is not None
    request, _ = parsed
    assert request.key is not None
    c.receive_data(accept_response(request.key))
    assert c.state is State.OPEN
    c.events_received()
    return c


def decode_all(
    data: bytes, codec: WebSocketFrameCodec | None = None, max_message: int = 1 << 20
) -> list[object]:
    """Decode a whole byte stream into events, checking it ends on a frame boundary."""
    codec = codec or WebSocketFrameCodec(1 << 20)
    events: list[object] = []
    state: Fragments | None = None
    pos = 0
    while pos < len(data):
        frame, pos = codec.decode(data, pos, len(data))
        assert frame is not None, "stream ended mid-frame"
        state, event = feed_frame(state, frame, max_message)
        if event is not None:
            events.append(event)
    assert state is None
    return events


def decode_chunks(
    chunks: list[bytes], codec: WebSocketFrameCodec, max_message: int = 1 << 20
) -> tuple[list[object], Fragments | None, int]:
    """Feed chunks the way the engine does: append to a buffer, decode, drop consumed bytes."""
    buf = bytearray()
    events: list[object] = []
    state: Fragments | None = None
    for chunk in chunks:
        buf += chunk
        pos = 0
        while True:
            frame, pos = codec.decode(buf, pos, len(buf))
            if frame is None:
                break
            state, event = feed_frame(state, frame, max_message)
            if event is not None:
                events.append(event)
        del buf[:pos]
    return events, state, len(buf)


def request_bytes(*lines: str, method: str = "GET", target: str = "/connection/websocket") -> bytes:
    head = [f"{method} {target} HTTP/1.1", *lines]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")


GOOD_HEADERS = (
    "Host: gw.example.com",
    "Upgrade: websocket",
    "Connection: Upgrade",
    f"Sec-WebSocket-Key: {KEY}",
    "Sec-WebSocket-Version: 13",
)


def without(name: str, *extra: str) -> tuple[str, ...]:
    return tuple(h for h in GOOD_HEADERS if not h.lower().startswith(name.lower() + ":")) + extra


def close_code_of(exc: pytest.ExceptionInfo[FrameError]) -> int:
    return exc.value.close_code


# --- handshake ---------------------------------------------------------------------------------


def test_rfc_accept_key_example() -> None:
    assert accept_key(KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_websockets_client_handshake_parses_and_accepts() -> None:
    c = client(
        origin="https://app.example.com",
        subprotocols=["centrifuge-json", "centrifuge-protobuf"],
        extensions=[ClientPerMessageDeflateFactory()],
    )
    data = handshake_bytes(c)
    parsed = parse_upgrade_request(data, 0, len(data))
    assert parsed is not None
    request, pos = parsed
    assert pos == len(data)
    assert request.method == "GET"
    assert request.path == "/connection/websocket"
    assert request.query == "format=json"
    assert request.params == {"format": "json"}
    assert request.host == "gw.example.com:8000"
    assert request.origin == "https://app.example.com"
    assert request.subprotocols == ["centrifuge-json", "centrifuge-protobuf"]
    assert [name for name, _ in request.extensions] == ["permessage-deflate"]
    assert all(name == name.lower() for name in request.headers)
    assert request.key is not None and len(base64.b64decode(request.key)) == 16

    proto = select_subprotocol(request.subprotocols, ["centrifuge-protobuf"])
    assert proto == "centrifuge-protobuf"
    response = accept_response(request.key, proto, extra_headers=[("X-Node", "w1")])
    assert b"Sec-WebSocket-Extensions" not in response  # offered deflate is declined
    c.receive_data(response)
    assert c.handshake_exc is None
    assert c.state is State.OPEN
    assert c.subprotocol == "centrifuge-protobuf"
    assert c.extensions == []
    (resp,) = c.events_received()
    assert isinstance(resp, Response)
    assert resp.status_code == 101
    assert resp.headers["X-Node"] == "w1"


def test_websockets_client_rejects_wrong_accept() -> None:
    c = client()
    handshake_bytes(c)
    c.receive_data(accept_response(KEY))  # not the key this client sent
    assert c.handshake_exc is not None
    assert c.state is not State.OPEN


def test_websockets_client_sees_reject_status() -> None:
    c = client()
    handshake_bytes(c)
    c.receive_data(reject_response(403, "origin not allowed"))
    assert isinstance(c.handshake_exc, InvalidStatus)
    assert c.handshake_exc.response.status_code == 403
    assert c.handshake_exc.response.body == b"origin not allowed\n"


def test_handshake_split_reads() -> None:
    data = handshake_bytes(client(origin="https://app.example.com"))
    frame = encode_masked_frame(OP_TEXT, b"{}")
    stream = b"junk" + data + frame
    for cut in range(4, 4 + len(data)):
        # Every prefix is incomplete; extra bytes past the end are never looked at.
        assert parse_upgrade_request(stream, 4, cut) is None
    parsed = parse_upgrade_request(bytearray(stream), 4, len(stream))
    assert parsed is not None
    request, pos = parsed
    assert stream[pos:] == frame


def test_handshake_headers_case_and_token_lists() -> None:
    data = request_bytes(
        "HOST: gw",
        "upgrade: WebSocket",
        "connection: keep-alive, Upgrade",
        f"sec-websocket-key: {KEY}",
        "SEC-WEBSOCKET-VERSION: 13",
        "Sec-WebSocket-Protocol: a, b",
        "Sec-WebSocket-Protocol: c",
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits, x-foo",
    )
    parsed = parse_upgrade_request(data, 0, len(data))
    assert parsed is not None
    request = parsed[0]
    assert request.key == KEY
    assert request.subprotocols == ["a", "b", "c"]
    assert request.extensions == [
        ("permessage-deflate", "client_max_window_bits"),
        ("x-foo", ""),
    ]
    assert request.origin is None


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (request_bytes(*GOOD_HEADERS, method="POST"), 405),
        (request_bytes(*GOOD_HEADERS).replace(b"HTTP/1.1", b"HTTP/1.0"), 400),
        (request_bytes(*GOOD_HEADERS).replace(b"HTTP/1.1", b"HTTP/2.0"), 505),
        (request_bytes(*without("Upgrade")), 426),
        (request_bytes(*without("Upgrade", "Upgrade: h2c")), 426),
        (request_bytes(*without("Connection")), 426),
        (request_bytes(*without("Connection", "Connection: keep-alive")), 426),
        (request_bytes(*without("Sec-WebSocket-Version")), 426),
        (request_bytes(*without("Sec-WebSocket-Version", "Sec-WebSocket-Version: 8")), 426),
        (request_bytes(*without("Sec-WebSocket-Key")), 400),
        (
            request_bytes(
                *without("Sec-WebSocket-Key", "Sec-WebSocket-Key: not base64!!!!!!!!!!!")
            ),
            400,
        ),
        (request_bytes(*without("Sec-WebSocket-Key", "Sec-WebSocket-Key: " + "A" * 23 + "=")), 400),
        (
            request_bytes(
                *without(
                    "Sec-WebSocket-Key",
                    "Sec-WebSocket-Key: " + base64.b64encode(b"x" * 15).decode(),
                )
            ),
            400,
        ),
        (request_bytes(*GOOD_HEADERS, f"Sec-WebSocket-Key: {KEY}"), 400),  # duplicated
        (request_bytes(*without("Host")), 400),
        (request_bytes(*GOOD_HEADERS, "Host: other"), 400),
        (request_bytes(*GOOD_HEADERS, "X-Big: " + "a" * 9000), 431),
        (request_bytes(*GOOD_HEADERS).replace(b" HTTP/1.1\r\n", b"\r\n", 1), 400),
        (request_bytes(*GOOD_HEADERS, "no colon here"), 400),
        (request_bytes(*GOOD_HEADERS, "X-Spaced : 1"), 400),
        (request_bytes(*GOOD_HEADERS, "X-Fold: a", " continued"), 400),
        (request_bytes(*GOOD_HEADERS, "X-Lf: a\nInjected: 1"), 400),
        (request_bytes(*GOOD_HEADERS, "X-Nul: a\x00b"), 400),
        (request_bytes(*GOOD_HEADERS, "Transfer-Encoding: chunked"), 501),
    ],
)
def test_bad_handshakes(data: bytes, status: int) -> None:
    with pytest.raises(HandshakeError) as exc:
        parse_upgrade_request(data, 0, len(data))
    assert exc.value.status == status
    response = reject_response(exc.value.status, exc.value.reason, extra_headers=exc.value.headers)
    assert response.startswith(f"HTTP/1.1 {status} ".encode())
    assert b"\r\nConnection: close\r\n" in response


def test_version_mismatch_tells_supported_version() -> None:
    data = request_bytes(*without("Sec-WebSocket-Version", "Sec-WebSocket-Version: 8"))
    with pytest.raises(HandshakeError) as exc:
        parse_upgrade_request(data, 0, len(data))
    assert ("Sec-WebSocket-Version", "13") in exc.value.headers
    response = reject_response(426, exc.value.reason, extra_headers=exc.value.headers)
    assert b"\r\nSec-WebSocket-Version: 13\r\n" in response


def test_oversized_head_refused_before_it_ends() -> None:
    data = b"GET / HTTP/1.1\r\nX: " + b"a" * 100
    assert parse_upgrade_request(data, 0, len(data), max_request_bytes=200) is None
    data += b"a" * 100  # still no blank line, now at the limit
    with pytest.raises(HandshakeError) as exc:
        parse_upgrade_request(data, 0, len(data), max_request_bytes=200)
    assert exc.value.status == 431


def test_head_exactly_at_limit_is_accepted() -> None:
    data = request_bytes(*GOOD_HEADERS)
    assert parse_upgrade_request(data, 0, len(data), max_request_bytes=len(data)) is not None
    with pytest.raises(HandshakeError):
        parse_upgrade_request(data, 0, len(data), max_request_bytes=len(data) - 1)


def test_reject_response_shape() -> None:
    response = reject_response(400, "bad\r\nInjected: yes")
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 400 Bad Request"
    assert b"Injected" not in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert reject_response(503, "x", b"busy").endswith(b"\r\n\r\nbusy")


def test_accept_response_refuses_header_injection() -> None:
    with pytest.raises(ValueError):
        accept_response(KEY, extra_headers=[("X-A", "1\r\nSet-Cookie: x")])
    with pytest.raises(ValueError):
        accept_response(KEY, subprotocol="a\r\nb")


@pytest.mark.parametrize(
    ("origin", "allowed", "ok"),
    [
        (None, [], True),
        ("https://app.example.com", ["https://app.example.com"], True),
        ("https://APP.example.com", ["https://app.example.com"], True),
        ("http://app.example.com", ["https://app.example.com"], False),
        ("https://evil.com", ["*"], True),
        ("https://a.example.com", ["https://*.example.com"], True),
        ("https://a.b.example.com", ["https://*.example.com"], True),
        ("https://example.com", ["https://*.example.com"], False),
        ("https://.example.com", ["https://*.example.com"], False),
        ("https://evil.com/.example.com", ["https://*.example.com"], False),
        ("https://evil.com:1@x.example.com", ["https://*.example.com"], False),
        ("http://a.example.com", ["https://*.example.com"], False),
        ("https://a.example.com:8443", ["https://*.example.com"], False),
        ("https://a.example.com:8443", ["https://*.example.com:8443"], True),
        ("http://localhost:3000", ["http://localhost:*"], True),
        ("null", ["https://*.example.com"], False),
        ("https://evil.com", ["https://app.example.com", "https://*.example.org"], False),
    ],
)
def test_check_origin(origin: str | None, allowed: list[str], ok: bool) -> None:
    assert check_origin(origin, allowed) is ok


def test_select_subprotocol_keeps_client_order() -> None:
    assert select_subprotocol(["b", "a"], ["a", "b"]) == "b"
    assert select_subprotocol(["x"], ["a"]) is None
    assert select_subprotocol([], ["a"]) is None


# --- plain HTTP on the same port -----------------------------------------------------------------


def test_plain_http_post_with_body_and_pipelining() -> None:
    body = b'{"channel":"news"}'
    first = (
        b"POST /api/publish?x=1&y= HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    second = b"GET /health HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
    stream = bytearray(b"\r\n" + first + second)
    parsed = parse_request_head(stream, 0, len(stream))
    assert parsed is not None
    request, pos = parsed
    assert (request.method, request.path, request.query) == ("POST", "/api/publish", "x=1&y=")
    assert request.params == {"x": "1", "y": ""}
    assert request.content_length == len(body)
    assert request.key is None
    assert request.keep_alive
    assert stream[pos : pos + request.content_length] == body
    parsed = parse_request_head(stream, pos + request.content_length, len(stream))
    assert parsed is not None
    request, pos = parsed
    assert request.path == "/health" and request.content_length == 0 and not request.keep_alive
    assert pos == len(stream)


def test_plain_http_absolute_form_and_http10() -> None:
    data = b"GET http://gw:8000/metrics?a=b HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    parsed = parse_request_head(data, 0, len(data))
    assert parsed is not None
    request = parsed[0]
    assert (request.path, request.query, request.version) == ("/metrics", "a=b", "HTTP/1.0")
    assert request.keep_alive
    data = b"GET / HTTP/1.0\r\n\r\n"
    parsed = parse_request_head(data, 0, len(data))
    assert parsed is not None and not parsed[0].keep_alive


@pytest.mark.parametrize(
    ("header", "status"),
    [
        ("Content-Length: -1", 400),
        ("Content-Length: 1 2", 400),
        ("Content-Length: \u00b2", 400),
        ("Content-Length: 0x10", 400),
        ("Content-Length: 99999999999999999999", 400),
        ("Content-Length: 5\r\nContent-Length: 5", 400),
        ("Content-Length: 2000", 413),
        ("Transfer-Encoding: chunked", 501),
    ],
)
def test_plain_http_bad_bodies(header: str, status: int) -> None:
    data = f"POST /api HTTP/1.1\r\nHost: gw\r\n{header}\r\n\r\n".encode("latin-1")
    with pytest.raises(HttpError) as exc:
        parse_request_head(data, 0, len(data), max_body_bytes=1000)
    assert exc.value.status == status


def test_crlf_flood_counts_toward_the_limit() -> None:
    data = b"\r\n" * 600
    with pytest.raises(HttpError) as exc:
        parse_request_head(data, 0, len(data), max_request_bytes=1000)
    assert exc.value.status == 431


# --- frames: interop with websockets -----------------------------------------------------------


def test_websockets_client_frames_decode() -> None:
    c = open_client()
    c.send_text("héllo".encode())
    c.send_binary(b"\x00\xff" * 40000)  # 64-bit length
    c.send_binary(b"b" * 300)  # 16-bit length
    c.send_text(b"frag", fin=False)
    c.send_ping(b"in-between")
    c.send_continuation("mented ✓".encode(), fin=False)
    c.send_continuation(b"", fin=True)
    c.send_pong(b"pong-data")
    c.send_text(b"")
    c.send_close(1000, "bye ✓")
    data = b"".join(c.data_to_send())
    assert decode_all(data) == [
        Text("héllo", "héllo".encode()),
        Binary(b"\x00\xff" * 40000),
        Binary(b"b" * 300),
        Ping(b"in-between"),
        Text("fragmented ✓", "fragmented ✓".encode()),
        Pong(b"pong-data"),
        Text("", b""),
        Close(1000, "bye ✓"),
    ]


def test_websockets_client_empty_close_and_app_codes() -> None:
    c = open_client()
    c.send_close()
    assert decode_all(b"".join(c.data_to_send())) == [Close(CLOSE_NO_STATUS, "")]
    c = open_client()
    c.send_close(3501, "insufficient state")
    assert decode_all(b"".join(c.data_to_send())) == [Close(3501, "insufficient state")]


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 200_000])
def test_server_frames_decode_in_websockets_client(size: int) -> None:
    c = open_client(max_size=None)
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    text = "é" * (size // 2)
    c.receive_data(encode_binary(payload))
    c.receive_data(encode_text(text))
    c.receive_data(encode_text(text.encode()))
    c.receive_data(encode_frame(OP_TEXT, b"fr", fin=False))
    c.receive_data(encode_ping(b"p" * min(size, 125)))
    c.receive_data(encode_frame(OP_CONTINUATION, b"ag", fin=True))
    c.receive_data(encode_pong(b""))
    frames = c.events_received()
    assert all(isinstance(f, WsFrame) for f in frames)
    assert c.parser_exc is None
    assert [(f.opcode, f.data, f.fin) for f in frames] == [  # type: ignore[union-attr]
        (Opcode.BINARY, payload, True),
        (Opcode.TEXT, text.encode(), True),
        (Opcode.TEXT, text.encode(), True),
        (Opcode.TEXT, b"fr", False),
        (Opcode.PING, b"p" * min(size, 125), True),
        (Opcode.CONT, b"ag", True),
        (Opcode.PONG, b"", True),
    ]


def test_server_close_decodes_in_websockets_client() -> None:
    c = open_client()
    c.receive_data(encode_close(4000, "custom"))
    (frame,) = c.events_received()
    assert isinstance(frame, WsFrame) and frame.opcode is Opcode.CLOSE
    assert c.close_rcvd is not None
    assert (c.close_rcvd.code, c.close_rcvd.reason) == (4000, "custom")


# --- frames: property tests --------------------------------------------------------------------


@given(st.binary(min_size=4, max_size=4), st.binary(max_size=2000))
def test_unmask_matches_bytewise_xor(mask: bytes, data: bytes) -> None:
    expected = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    assert unmask(mask, data) == expected
    assert unmask(bytearray(mask), bytearray(data)) == expected
    assert unmask(mask, expected) == data


message_strategy = st.one_of(
    st.tuples(st.just(OP_TEXT), st.text(max_size=300)),
    st.tuples(st.just(OP_BINARY), st.binary(max_size=300)),
    st.tuples(st.sampled_from([OP_PING, OP_PONG]), st.binary(max_size=125)),
)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(message_strategy, max_size=8), st.data())
def test_roundtrip_masked_fragmented_random_splits(
    messages: list[tuple[int, str | bytes]], data: st.DataObject
) -> None:
    stream = bytearray()
    expected: list[object] = []
    for opcode, content in messages:
        raw = content.encode("utf-8") if isinstance(content, str) else content
        if opcode in (OP_PING, OP_PONG):
            stream += encode_masked_frame(
                opcode, raw, mask=data.draw(st.binary(min_size=4, max_size=4))
            )
            expected.append(Ping(raw) if opcode == OP_PING else Pong(raw))
            continue
        # Fragment anywhere, even inside a UTF-8 sequence; pings may sit between fragments.
        cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=4)))
        parts = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
        pings = []
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            stream += encode_masked_frame(
                opcode if i == 0 else OP_CONTINUATION,
                part,
                fin=last,
                mask=data.draw(st.binary(min_size=4, max_size=4)),
            )
            if not last and data.draw(st.booleans()):
                stream += encode_masked_frame(OP_PING, b"%d" % i)
                pings.append(Ping(b"%d" % i))
        expected.extend(pings)
        expected.append(Text(str(content), raw) if opcode == OP_TEXT else Binary(raw))
    splits = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    chunks = [bytes(stream[a:b]) for a, b in zip([0, *splits], [*splits, len(stream)], strict=True)]
    events, state, leftover = decode_chunks(chunks, WebSocketFrameCodec(4096))
    assert events == expected
    assert state is None
    assert leftover == 0


@given(
    st.sampled_from([OP_TEXT, OP_BINARY, OP_CONTINUATION]),
    st.sampled_from([0, 1, 125, 126, 127, 65535, 65536, 70000]),
    st.booleans(),
)
def test_server_encoder_roundtrip_through_decoder(opcode: int, size: int, fin: bool) -> None:
    payload = os.urandom(size)
    data = encode_frame(opcode, payload, fin=fin)
    codec = WebSocketFrameCodec(1 << 20, require_mask=False)
    assert codec.decode(data, 0, len(data)) == (Frame(fin, opcode, payload), len(data))
    # Every strict prefix is incomplete, and never an error.
    for cut in (0, 1, 2, 3, 9, len(data) - 1):
        if 0 <= cut < len(data):
            assert codec.decode(data, 0, cut) == (None, 0)


def test_decode_at_offset_in_bytearray() -> None:
    frame = encode_masked_frame(OP_BINARY, b"payload", mask=b"\x01\x02\x03\x04")
    buf = bytearray(b"xx" + frame + b"yy")
    codec = WebSocketFrameCodec(100)
    got, pos = codec.decode(buf, 2, len(buf))
    assert got == Frame(True, OP_BINARY, b"payload")
    assert isinstance(got.payload, bytes)
    assert buf[pos:] == b"yy"
    assert codec.decode(buf, 2, len(buf) - 3) == (None, 2)


# --- frames: protocol errors -------------------------------------------------------------------


def masked_header(b0: int, length_byte: int, ext: bytes = b"") -> bytes:
    return bytes((b0, 0x80 | length_byte)) + ext + b"\x00\x00\x00\x00"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (masked_header(0x81 | 0x40, 0), "reserved_bits"),  # RSV1 without permessage-deflate
        (masked_header(0x81 | 0x20, 0), "reserved_bits"),
        (masked_header(0x81 | 0x10, 0), "reserved_bits"),
        *[(masked_header(0x80 | op, 0), "unknown_opcode") for op in (3, 4, 5, 6, 7, 11, 15)],
        (masked_header(0x89, 126, b"\x00\x7e"), "control_too_long"),
        (masked_header(0x88, 127, bytes(8)), "control_too_long"),
        (masked_header(0x09, 1), "fragmented_control"),
        (masked_header(0x0A, 0), "fragmented_control"),
        (masked_header(0x08, 2), "fragmented_control"),
        (bytes((0x81, 5)) + b"hello", "unmasked_frame"),
        (masked_header(0x82, 127, b"\x80" + bytes(7)), "invalid_length"),
    ],
)
def test_bad_frames_are_1002(data: bytes, reason: str) -> None:
    codec = WebSocketFrameCodec(1 << 20)
    with pytest.raises(FrameError) as exc:
        codec.decode(data, 0, len(data))
    assert exc.value.reason == reason
    assert close_code_of(exc) == 1002


def test_header_errors_need_no_body() -> None:
    codec = WebSocketFrameCodec(1 << 20)
    for data in (bytes((0x81, 0x05)), bytes((0x89, 0xFE)), bytes((0xC1, 0x85))):
        with pytest.raises(FrameError):
            codec.decode(data, 0, 2)  # just the two first bytes


def test_rsv1_allowed_only_with_extension() -> None:
    data = encode_masked_frame(OP_TEXT, b"x", rsv1=True)
    frame, _ = WebSocketFrameCodec(100, allow_rsv1=True).decode(data, 0, len(data))
    assert frame is not None and frame.rsv1
    with pytest.raises(FrameError):
        WebSocketFrameCodec(100, allow_rsv1=True).decode(b"\xa1\x80" + bytes(4), 0, 6)  # RSV2


@pytest.mark.parametrize(
    "header",
    [
        bytes((0x82, 0x80 | 126)) + (1001).to_bytes(2, "big"),
        bytes((0x82, 0x80 | 127)) + (1 << 40).to_bytes(8, "big"),
        bytes((0x82, 0x80 | 101)),
    ],
)
def test_oversized_frame_refused_from_header_alone(header: bytes) -> None:
    codec = WebSocketFrameCodec(100)
    with pytest.raises(FrameTooLarge) as exc:
        codec.decode(header, 0, len(header))  # no mask key, no body yet
    assert exc.value.close_code == 1009
    assert exc.value.limit == 100


def test_frame_at_the_limit_is_fine() -> None:
    codec = WebSocketFrameCodec(100)
    data = encode_masked_frame(OP_BINARY, b"x" * 100)
    assert codec.decode(data, 0, len(data))[0] == Frame(True, OP_BINARY, b"x" * 100)


def test_codec_encode_follows_codec_contract() -> None:
    codec = WebSocketFrameCodec(10)
    assert codec.encode(b"{}") == encode_text(b"{}")
    assert WebSocketFrameCodec(10, encode_opcode=OP_BINARY).encode(b"\x00") == encode_binary(
        b"\x00"
    )
    with pytest.raises(FrameTooLarge):
        codec.encode(b"x" * 11)


# --- message assembly --------------------------------------------------------------------------


def test_state_is_none_unless_mid_message() -> None:
    state, event = feed_frame(None, Frame(True, OP_TEXT, b"hi"))
    assert state is None and event == Text("hi", b"hi")
    state, event = feed_frame(None, Frame(False, OP_BINARY, b"a"))
    assert isinstance(state, Fragments) and event is None
    state2, event = feed_frame(state, Frame(True, OP_PING, b"p"))
    assert state2 is state and event == Ping(b"p")
    state, event = feed_frame(state, Frame(True, OP_CONTINUATION, b"b"))
    assert state is None and event == Binary(b"ab")


def test_utf8_split_across_fragments_is_valid() -> None:
    raw = "€".encode()
    state, _ = feed_frame(None, Frame(False, OP_TEXT, raw[:1]))
    state, _ = feed_frame(state, Frame(False, OP_CONTINUATION, raw[1:2]))
    state, event = feed_frame(state, Frame(True, OP_CONTINUATION, raw[2:]))
    assert event == Text("€", raw)


@pytest.mark.parametrize(
    "raw",
    [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"ok\xe2\x82", b"\x80"],
)
def test_invalid_utf8_is_1007(raw: bytes) -> None:
    with pytest.raises(FrameError) as exc:
        feed_frame(None, Frame(True, OP_TEXT, raw))
    assert close_code_of(exc) == 1007
    state, _ = feed_frame(None, Frame(False, OP_TEXT, b"a"))
    with pytest.raises(FrameError) as exc:
        feed_frame(state, Frame(True, OP_CONTINUATION, raw))
    assert close_code_of(exc) == 1007


def test_invalid_utf8_binary_is_fine() -> None:
    assert feed_frame(None, Frame(True, OP_BINARY, b"\xff"))[1] == Binary(b"\xff")


def test_continuation_without_message_is_1002() -> None:
    with pytest.raises(FrameError) as exc:
        feed_frame(None, Frame(True, OP_CONTINUATION, b"x"))
    assert close_code_of(exc) == 1002


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
def test_new_message_during_fragmented_one_is_1002(opcode: int) -> None:
    state, _ = feed_frame(None, Frame(False, OP_TEXT, b"x"))
    with pytest.raises(FrameError) as exc:
        feed_frame(state, Frame(True, opcode, b"y"))
    assert close_code_of(exc) == 1002


def test_message_size_across_fragments_is_1009() -> None:
    state, _ = feed_frame(None, Frame(False, OP_BINARY, b"x" * 60), 100)
    state, _ = feed_frame(state, Frame(False, OP_CONTINUATION, b"x" * 40), 100)
    with pytest.raises(FrameTooLarge) as exc:
        feed_frame(state, Frame(True, OP_CONTINUATION, b"x"), 100)
    assert close_code_of(exc) == 1009
    with pytest.raises(FrameTooLarge):
        feed_frame(None, Frame(True, OP_TEXT, b"x" * 101), 100)


def test_message_size_limit_through_the_stream() -> None:
    c = open_client()
    c.send_binary(b"x" * 3000, fin=False)
    c.send_continuation(b"x" * 3000, fin=True)
    data = b"".join(c.data_to_send())
    with pytest.raises(FrameTooLarge):
        decode_chunks([data], WebSocketFrameCodec(4096), max_message=5000)


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535])
def test_invalid_close_codes_are_1002(code: int) -> None:
    assert not is_valid_close_code(code)
    with pytest.raises(FrameError) as exc:
        parse_close(code.to_bytes(2, "big"))
    assert close_code_of(exc) == 1002
    with pytest.raises(ValueError):
        encode_close(code)


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011, 1014, 3000, 4999])
def test_valid_close_codes(code: int) -> None:
    assert feed_frame(None, Frame(True, OP_CLOSE, code.to_bytes(2, "big") + b"r"))[1] == Close(
        code, "r"
    )


def test_close_payload_errors() -> None:
    with pytest.raises(FrameError) as exc:
        parse_close(b"\x03")
    assert close_code_of(exc) == 1002
    with pytest.raises(FrameError) as exc:
        parse_close(b"\x03\xe8\xff")
    assert close_code_of(exc) == 1007
    assert parse_close(b"") == Close(CLOSE_NO_STATUS, "")


def test_encode_close_variants() -> None:
    assert encode_close(None) == b"\x88\x00"
    assert encode_close() == b"\x88\x02\x03\xe8"
    long = encode_close(1000, "é" * 100)  # 200 bytes of reason: cut at a character boundary
    assert len(long) <= 2 + 125
    frame, _ = WebSocketFrameCodec(200, require_mask=False).decode(long, 0, len(long))
    assert frame is not None
    assert parse_close(frame.payload) == Close(1000, "é" * 61)


def test_control_payload_limit_on_encode() -> None:
    assert encode_ping(b"x" * 125)[:2] == b"\x89\x7d"
    with pytest.raises(ValueError):
        encode_ping(b"x" * 126)
    with pytest.raises(ValueError):
        encode_pong("x" * 126)


# --- speed -------------------------------------------------------------------------------------


def test_int_xor_unmask_beats_a_python_loop() -> None:
    mask, data = os.urandom(4), os.urandom(4096)

    def loop() -> bytes:
        return bytes(b ^ mask[i & 3] for i, b in enumerate(data))

    fast = min(timeit.repeat(lambda: unmask(mask, data), number=200, repeat=5)) / 200
    slow = min(timeit.repeat(loop, number=20, repeat=3)) / 20
    print(f"unmask 4 KiB: int-xor {fast * 1e6:.1f} us, loop {slow * 1e6:.1f} us")
    assert fast * 3 < slow
