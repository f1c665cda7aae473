"""Sans-I/O WebSocket (RFC 6455), server side: bytes in, frames/events out, bytes to send out.

Three layers, each usable on its own:

* **Handshake** — :func:`parse_upgrade_request` (on top of :func:`~tidegate.protocol.http11.
  parse_request_head`, so plain HTTP shares the port), :func:`accept_response`,
  :func:`reject_response`, :func:`check_origin`. Extensions (permessage-deflate) are never
  accepted: the 101 response simply does not echo them, which RFC 6455 §9.1 allows.
* **Frames** — :class:`WebSocketFrameCodec` is stateless and shared by every connection, like the
  other codecs: ``decode(buf, pos, end) -> (Frame | None, new_pos)``, refusing an oversized frame
  from its header. Server→client encoders (:func:`encode_text` & co.) build unmasked frames; a
  broadcast is encoded once and the same bytes written to every socket.
* **Messages** — :func:`feed_frame` ``(state, frame, max_message_bytes) -> (state, event)``
  reassembles fragments and validates payloads. ``state`` is ``None`` except while a fragmented
  message is in flight, so an idle connection holds no assembler at all.

Protocol violations raise :class:`~tidegate.protocol.codec.FrameError` with the close code to
send (1002 protocol error, 1007 invalid payload, 1009 too big via ``FrameTooLarge``).

Unmasking XORs the payload and the repeated 4-byte mask as two big ints (``int.from_bytes`` /
``int.to_bytes``, all in C): ~1 µs for a 125-byte payload and ~400 MB/s for 16-64 KiB on the
reference machine, 10-30x a per-byte Python loop (see tests/test_websocket_codec.py).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
from collections.abc import Iterable

from tidegate.protocol.codec import Buffer, FrameError, FrameTooLarge
from tidegate.protocol.http11 import (
    MAX_REQUEST_BYTES,
    Header,
    HttpError,
    Request,
    encode_headers,
    encode_response,
    parse_request_head,
    split_header_list,
)

# --- opcodes -----------------------------------------------------------------------------------
OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

# --- close codes (RFC 6455 §7.4, IANA registry) -------------------------------------------------
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_NO_STATUS = 1005  # reserved: reported for a close frame without a code, never sent
CLOSE_ABNORMAL = 1006  # reserved: connection dropped without a close frame, never sent
CLOSE_INVALID_PAYLOAD = 1007
CLOSE_POLICY_VIOLATION = 1008
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_MANDATORY_EXTENSION = 1010
CLOSE_INTERNAL_ERROR = 1011
CLOSE_SERVICE_RESTART = 1012
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_BAD_GATEWAY = 1014
CLOSE_TLS_HANDSHAKE = 1015  # reserved, never sent
# 3000-3999: registered with IANA (libraries, frameworks); 4000-4999: private use. Centrifugo's
# application close codes (3000-3999 and 4000-4999) live here.
APP_CLOSE_MIN = 3000
APP_CLOSE_MAX = 4999

MAX_CONTROL_PAYLOAD = 125
MAX_CLOSE_REASON_BYTES = MAX_CONTROL_PAYLOAD - 2
DEFAULT_MAX_FRAME_BYTES = 65536
DEFAULT_MAX_MESSAGE_BYTES = 65536

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def is_valid_close_code(code: int) -> bool:
    """Whether ``code`` may appear in a close frame on the wire."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or APP_CLOSE_MIN <= code <= APP_CLOSE_MAX


# --- handshake ---------------------------------------------------------------------------------


class HandshakeError(HttpError):
    """An upgrade request to refuse: answer with ``reject_response(e.status, e.reason,
    extra_headers=e.headers)`` and close."""


def validate_upgrade(request: Request) -> Request:
    """Check ``request`` is a valid RFC 6455 opening handshake; set ``request.key``.

    Raises :class:`HandshakeError`: 405 (not GET), 400 (not HTTP/1.1, bad key), 426 (no
    ``Upgrade: websocket`` / ``Connection: upgrade`` token, or a version other than 13 — the
    error's headers then tell the client what the server speaks).
    """
    headers = request.headers
    if request.method != "GET":
        raise HandshakeError(405, "WebSocket handshake must be a GET", (("Allow", "GET"),))
    if request.version != "HTTP/1.1":
        raise HandshakeError(400, "WebSocket handshake needs HTTP/1.1")
    upgrade_required = (("Upgrade", "websocket"), ("Connection", "Upgrade"))
    upgrade = headers.get("upgrade")
    if not upgrade or "websocket" not in [t.lower() for t in split_header_list(upgrade)]:
        raise HandshakeError(426, "missing or invalid Upgrade: websocket header", upgrade_required)
    connection = headers.get("connection")
    if not connection or "upgrade" not in [t.lower() for t in split_header_list(connection)]:
        raise HandshakeError(426, "missing Connection: upgrade header", upgrade_required)
    if headers.get("sec-websocket-version") != "13":
        raise HandshakeError(
            426, "unsupported Sec-WebSocket-Version", (("Sec-WebSocket-Version", "13"),)
        )
    key = headers.get("sec-websocket-key")
    if key is None:
        raise HandshakeError(400, "missing Sec-WebSocket-Key header")
    try:
        raw = base64.b64decode(key, validate=True) if len(key) == 24 else b""
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 16:
        raise HandshakeError(400, "invalid Sec-WebSocket-Key header")
    request.key = key
    return request


def parse_upgrade_request(
    buf: Buffer, pos: int, end: int, *, max_request_bytes: int = MAX_REQUEST_BYTES
) -> tuple[Request, int] | None:
    """:func:`parse_request_head` then :func:`validate_upgrade`.

    ``None`` while the head is incomplete; ``(request, new_pos)`` for a valid upgrade (frames
    start at ``new_pos``); raises :class:`HandshakeError` (431 for a head over the limit).
    """
    try:
        parsed = parse_request_head(buf, pos, end, max_request_bytes=max_request_bytes)
    except HttpError as exc:
        raise HandshakeError(exc.status, exc.reason, exc.headers) from None
    if parsed is None:
        return None
    validate_upgrade(parsed[0])
    return parsed


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key`` (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode("ascii")


def accept_response(
    key: str, subprotocol: str | None = None, extra_headers: Iterable[Header] = ()
) -> bytes:
    """The ``101 Switching Protocols`` response for a validated request's ``key``.

    No ``Sec-WebSocket-Extensions`` is sent: offered extensions are declined.
    """
    head = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_key(key).encode("ascii") + b"\r\n"
    )
    headers: list[Header] = [("Sec-WebSocket-Protocol", subprotocol)] if subprotocol else []
    headers.extend(extra_headers)
    if headers:
        head += encode_headers(headers)
    return head + b"\r\n"


def reject_response(
    status: int, reason: str, body: bytes = b"", extra_headers: Iterable[Header] = ()
) -> bytes:
    """An HTTP error response refusing the handshake, with ``Connection: close``.

    ``reason`` becomes the body when ``body`` is empty (the status line keeps the standard
    phrase, so a reason can never inject a header).
    """
    if not body:
        body = reason.encode("utf-8") + b"\n"
    return encode_response(status, body, headers=extra_headers, close=True)


def select_subprotocol(offered: Iterable[str], supported: Iterable[str]) -> str | None:
    """The first subprotocol of the client's ``offered`` list the server ``supported``."""
    supported_set = set(supported)
    for proto in offered:
        if proto in supported_set:
            return proto
    return None


_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-")


def check_origin(origin: str | None, allowed_origins: Iterable[str]) -> bool:
    """Whether a handshake's ``Origin`` is allowed.

    ``allowed_origins`` holds exact origins (``https://app.example.com``), ``*`` (any), or
    patterns with one ``*`` standing for one or more host labels (``https://*.example.com``
    matches ``https://a.example.com`` and ``https://a.b.example.com``, not
    ``https://example.com``). Matching is case-insensitive. A missing ``Origin`` (``None``: a
    non-browser client, which could forge it anyway) is allowed.
    """
    if origin is None:
        return True
    origin = origin.lower()
    for allowed in allowed_origins:
        if allowed == "*":
            return True
        allowed = allowed.lower()
        star = allowed.find("*")
        if star < 0:
            if origin == allowed:
                return True
            continue
        prefix, suffix = allowed[:star], allowed[star + 1 :]
        if (
            len(origin) > len(prefix) + len(suffix)
            and origin.startswith(prefix)
            and origin.endswith(suffix)
        ):
            middle = origin[len(prefix) : len(origin) - len(suffix)]
            # Only host characters: "*" never spans a scheme, port, path or userinfo.
            if _HOST_CHARS.issuperset(middle) and middle[0] != "." and middle[-1] != ".":
                return True
    return False


# --- frames ------------------------------------------------------------------------------------


class Frame:
    """One decoded frame: ``payload`` is already unmasked."""

    __slots__ = ("fin", "opcode", "payload", "rsv1")

    def __init__(self, fin: bool, opcode: int, payload: bytes, rsv1: bool = False) -> None:
        self.fin = fin
        self.opcode = opcode
        self.payload = payload
        self.rsv1 = rsv1

    def __repr__(self) -> str:
        return f"Frame(fin={self.fin}, opcode={self.opcode}, payload={self.payload!r:.60})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frame):
            return NotImplemented
        return (self.fin, self.opcode, self.payload, self.rsv1) == (
            other.fin,
            other.opcode,
            other.payload,
            other.rsv1,
        )

    __hash__ = None  # type: ignore[assignment]


# Indexed by opcode (low nibble of byte 0): 0, 1, 2, 8, 9, 10 are defined.
_KNOWN_OPCODE = tuple(op in (0, 1, 2, 8, 9, 10) for op in range(16))


def unmask(mask: Buffer, data: Buffer) -> bytes:
    """XOR ``data`` with the 4-byte ``mask`` repeated: as two big ints, so the loop runs in C."""
    n = len(data)
    if not n:
        return b""
    # Little-endian: byte i of data lines up with byte i of the repeated mask; the mask's
    # excess bytes past n are the high ones, cut off by the AND.
    m = int.from_bytes(mask * ((n + 3) >> 2), "little") & ((1 << (n << 3)) - 1)
    return (int.from_bytes(data, "little") ^ m).to_bytes(n, "little")


# For unmask_at: the 4-byte mask repeated over n bytes is ``mask_int * _REPEAT[n] & _LOW[n]``
# (a base-2**32 repunit spreads it without carries), so small frames skip building the
# repeated mask as bytes. Tables up to the 2-byte-header limit of a short frame.
_REPEAT = UNMASK_REPEAT = tuple(
    ((1 << (32 * ((n + 3) >> 2))) - 1) // 0xFFFFFFFF for n in range(126)
)
_LOW = UNMASK_LOW = tuple((1 << (8 * n)) - 1 for n in range(126))


def unmask_at(buf: Buffer, start: int, stop: int) -> bytes:
    """The unmasked payload ``buf[start:stop]`` of a masked frame whose 4-byte mask key sits
    just before it, at ``buf[start-4:start]`` (same result as :func:`unmask`)."""
    n = stop - start
    if n >= 126:
        return unmask(bytes(buf[start - 4 : start]), buf[start:stop])
    m = int.from_bytes(buf[start - 4 : start], "little") * _REPEAT[n] & _LOW[n]
    return (int.from_bytes(buf[start:stop], "little") ^ m).to_bytes(n, "little")


class WebSocketFrameCodec:
    """Stateless frame decoder/encoder shared by every connection of a worker.

    Follows the :class:`~tidegate.protocol.codec.Codec` shape except that :meth:`decode` yields a
    :class:`Frame` rather than bare bytes. ``require_mask=True`` is the server side (client
    frames must be masked); ``False`` accepts masked and unmasked frames (a client, tests).
    ``allow_rsv1`` is for a future permessage-deflate; RSV2/RSV3 are always refused.
    ``encode`` frames a payload as ``encode_opcode`` (text by default: Centrifugo's JSON).
    """

    __slots__ = ("max_frame_bytes", "require_mask", "allow_rsv1", "encode_opcode")

    def __init__(
        self,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        require_mask: bool = True,
        *,
        allow_rsv1: bool = False,
        encode_opcode: int = OP_TEXT,
    ) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.require_mask = require_mask
        self.allow_rsv1 = allow_rsv1
        self.encode_opcode = encode_opcode

    def decode(self, buf: Buffer, pos: int, end: int) -> tuple[Frame | None, int]:
        """Decode one frame at ``pos``: ``(frame, new_pos)``, or ``(None, pos)`` if incomplete.

        Every header check (reserved bits, opcode, control-frame rules, mask, length) happens
        as soon as the header bytes are present, before the body arrives.
        """
        avail = end - pos
        if avail < 2:
            return None, pos
        b0 = buf[pos]
        b1 = buf[pos + 1]
        if b0 & 0x70 and (b0 & 0x30 or not self.allow_rsv1):
            raise FrameError("reserved_bits", f"RSV bits {(b0 >> 4) & 7:03b} without extension")
        opcode = b0 & 0x0F
        if not _KNOWN_OPCODE[opcode]:
            raise FrameError("unknown_opcode", f"opcode {opcode}")
        n = b1 & 0x7F
        if opcode & 0x8:
            if not b0 & 0x80:
                raise FrameError("fragmented_control", f"opcode {opcode} without FIN")
            if n > MAX_CONTROL_PAYLOAD:
                raise FrameError("control_too_long", f"opcode {opcode} with {n}+ bytes")
        masked = b1 & 0x80
        if not masked and self.require_mask:
            raise FrameError("unmasked_frame", "client frames must be masked")
        if n < 126:
            start = pos + 2
        elif n == 126:
            if avail < 4:
                return None, pos
            n = (buf[pos + 2] << 8) | buf[pos + 3]
            start = pos + 4
        else:
            if avail < 10:
                return None, pos
            n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
            if n >> 63:
                raise FrameError("invalid_length", "64-bit length with the top bit set")
            start = pos + 10
        if n > self.max_frame_bytes:
            raise FrameTooLarge(n, self.max_frame_bytes)
        if masked:
            stop = start + 4 + n
            if stop > end:
                return None, pos
            payload = unmask_at(buf, start + 4, stop)
        else:
            stop = start + n
            if stop > end:
                return None, pos
            payload = bytes(buf[start:stop])
        return Frame(b0 >= 0x80, opcode, payload, bool(b0 & 0x40)), stop

    def encode(self, payload: bytes) -> bytes:
        """Frame ``payload`` as one ``encode_opcode`` frame, refusing it over ``max_frame_bytes``
        like the other codecs. The free ``encode_*`` functions have no limit."""
        if len(payload) > self.max_frame_bytes:
            raise FrameTooLarge(len(payload), self.max_frame_bytes)
        return encode_frame(self.encode_opcode, payload)


# --- server→client encoders (unmasked) ---------------------------------------------------------

_H16 = struct.Struct("!BBH")
_H64 = struct.Struct("!BBQ")
# Prebuilt 2-byte headers for the common short FIN frames: a table lookup and one concatenation.
_SMALL_TEXT = tuple(bytes((0x80 | OP_TEXT, n)) for n in range(126))
TEXT_HEADERS = _SMALL_TEXT  # TEXT_HEADERS[n]: the header of a FIN text frame of n < 126 bytes
_SMALL_BINARY = tuple(bytes((0x80 | OP_BINARY, n)) for n in range(126))


def encode_frame(opcode: int, payload: Buffer, fin: bool = True, rsv1: bool = False) -> bytes:
    """One unmasked (server→client) frame. ``payload`` is sent as is."""
    n = len(payload)
    b0 = opcode | (0x80 if fin else 0) | (0x40 if rsv1 else 0)
    if n < 126:
        return bytes((b0, n)) + payload
    if n < 65536:
        return _H16.pack(b0, 126, n) + payload
    return _H64.pack(b0, 127, n) + payload


def encode_text(data: str | Buffer) -> bytes:
    """A FIN text frame. ``bytes`` are trusted to be UTF-8 (not re-validated: a broadcast's
    payload comes from the server)."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    n = len(payload)
    if n < 126:
        return _SMALL_TEXT[n] + payload
    return encode_frame(OP_TEXT, payload)


def encode_binary(data: Buffer) -> bytes:
    n = len(data)
    if n < 126:
        return _SMALL_BINARY[n] + data
    return encode_frame(OP_BINARY, data)


def _control_payload(data: str | Buffer) -> Buffer:
    payload = data.encode("utf-8") if isinstance(data, str) else data
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise ValueError(f"control frame payload of {len(payload)} bytes > 125")
    return payload


def encode_ping(data: str | Buffer = b"") -> bytes:
    return encode_frame(OP_PING, _control_payload(data))


def encode_pong(data: str | Buffer = b"") -> bytes:
    return encode_frame(OP_PONG, _control_payload(data))


def encode_close(code: int | None = CLOSE_NORMAL, reason: str = "") -> bytes:
    """A close frame. ``code=None`` sends an empty close (the reply to a close without code).

    A reason longer than 123 UTF-8 bytes is truncated at a character boundary rather than
    refused, so a close can always be sent.
    """
    if code is None:
        return encode_frame(OP_CLOSE, b"")
    if not is_valid_close_code(code):
        raise ValueError(f"close code {code} may not be sent")
    raw = reason.encode("utf-8")
    if len(raw) > MAX_CLOSE_REASON_BYTES:
        raw = raw[:MAX_CLOSE_REASON_BYTES].decode("utf-8", "ignore").encode("utf-8")
    return encode_frame(OP_CLOSE, code.to_bytes(2, "big") + raw)


def encode_masked_frame(
    opcode: int,
    payload: Buffer,
    fin: bool = True,
    mask: bytes | None = None,
    rsv1: bool = False,
) -> bytes:
    """One masked (client→server) frame, for a client or load generator; random mask by default."""
    if mask is None:
        mask = os.urandom(4)
    n = len(payload)
    b0 = opcode | (0x80 if fin else 0) | (0x40 if rsv1 else 0)
    if n < 126:
        head = bytes((b0, 0x80 | n))
    elif n < 65536:
        head = _H16.pack(b0, 0x80 | 126, n)
    else:
        head = _H64.pack(b0, 0x80 | 127, n)
    return head + mask + unmask(mask, payload)


# --- messages ----------------------------------------------------------------------------------


class Text:
    """A complete text message: ``text`` (validated UTF-8, decoded) and its ``raw`` bytes."""

    __slots__ = ("text", "raw")

    def __init__(self, text: str, raw: bytes) -> None:
        self.text = text
        self.raw = raw

    def __repr__(self) -> str:
        return f"Text({self.text!r:.60})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Text) and other.raw == self.raw

    __hash__ = None  # type: ignore[assignment]


class _BytesEvent:
    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.data!r:.60})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _BytesEvent) and type(other) is type(self) and other.data == self.data
        )

    __hash__ = None  # type: ignore[assignment]


class Binary(_BytesEvent):
    """A complete binary message."""

    __slots__ = ()


class Ping(_BytesEvent):
    """A ping: answer with ``encode_pong(event.data)``."""

    __slots__ = ()


class Pong(_BytesEvent):
    __slots__ = ()


class Close:
    """A close frame. ``code`` is :data:`CLOSE_NO_STATUS` (1005) when the frame had none; reply
    with ``encode_close(None)`` then, else ``encode_close(event.code)``."""

    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str = "") -> None:
        self.code = code
        self.reason = reason

    def __repr__(self) -> str:
        return f"Close({self.code}, {self.reason!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Close) and (other.code, other.reason) == (self.code, self.reason)

    __hash__ = None  # type: ignore[assignment]


Event = Text | Binary | Ping | Pong | Close


class Fragments:
    """A fragmented message in flight: exists only between its first and its FIN frame."""

    __slots__ = ("opcode", "parts", "size")

    def __init__(self, opcode: int, first: bytes) -> None:
        self.opcode = opcode
        self.parts = [first]
        self.size = len(first)


def parse_close(payload: bytes) -> Close:
    """Validate a close frame's payload: no code, or a valid code and a UTF-8 reason."""
    n = len(payload)
    if not n:
        return Close(CLOSE_NO_STATUS)
    if n == 1:
        raise FrameError("invalid_close", "1-byte close payload")
    code = (payload[0] << 8) | payload[1]
    if not is_valid_close_code(code):
        raise FrameError("invalid_close_code", f"close code {code}")
    try:
        reason = payload[2:].decode("utf-8") if n > 2 else ""
    except UnicodeDecodeError:
        raise FrameError("invalid_utf8", "close reason", close_code=CLOSE_INVALID_PAYLOAD) from None
    return Close(code, reason)


def _message(opcode: int, payload: bytes) -> Text | Binary:
    if opcode == OP_TEXT:
        try:
            return Text(payload.decode("utf-8"), payload)
        except UnicodeDecodeError:
            raise FrameError(
                "invalid_utf8", "text message", close_code=CLOSE_INVALID_PAYLOAD
            ) from None
    return Binary(payload)


def feed_frame(
    state: Fragments | None, frame: Frame, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> tuple[Fragments | None, Event | None]:
    """Advance a connection's message state by one frame: ``(new_state, event_or_None)``.

    ``state`` is ``None`` unless a fragmented message is in flight; control frames may be
    interleaved with its fragments and leave it untouched. Raises :class:`FrameError` 1002 for
    out-of-order continuation/data frames and bad close frames, 1007 for invalid UTF-8, and
    :class:`FrameTooLarge` (1009) once a message's size across fragments passes
    ``max_message_bytes``.
    """
    opcode = frame.opcode
    payload = frame.payload
    if opcode & 0x8:
        if opcode == OP_PING:
            return state, Ping(payload)
        if opcode == OP_PONG:
            return state, Pong(payload)
        return state, parse_close(payload)
    if opcode:  # text or binary: starts a message
        if state is not None:
            raise FrameError(
                "expected_continuation", f"opcode {opcode} inside a fragmented message"
            )
        if len(payload) > max_message_bytes:
            raise FrameTooLarge(len(payload), max_message_bytes)
        if frame.fin:
            return None, _message(opcode, payload)
        return Fragments(opcode, payload), None
    if state is None:
        raise FrameError("unexpected_continuation", "continuation frame without a message")
    size = state.size + len(payload)
    if size > max_message_bytes:
        raise FrameTooLarge(size, max_message_bytes)
    state.parts.append(payload)
    state.size = size
    if not frame.fin:
        return state, None
    return None, _message(state.opcode, b"".join(state.parts))
