"""Sans-I/O HTTP/1.1 request heads and responses: just enough for the WebSocket upgrade and the
small HTTP API that shares its port.

:func:`parse_request_head` turns ``buf[pos:end]`` into a :class:`Request` (or ``None`` while the
head is incomplete) and raises :class:`HttpError` (status, reason) for input that can never be a
valid request. The request body, if any, is the caller's to read: ``request.content_length``
bytes from the returned position. ``Transfer-Encoding`` request bodies are refused (501), which
also closes the CL/TE request-smuggling door.

This code runs once per connection (handshake) or per API request, never per frame, so a
compiled regex over the head is fine here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from http import HTTPStatus
from urllib.parse import parse_qsl

from tidegate.protocol.codec import Buffer

MAX_REQUEST_BYTES = 8192

_PHRASES = {s.value: s.phrase for s in HTTPStatus}
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Control characters other than HTAB, and any CR or LF that is not part of a CRLF pair (a bare
# LF is a line break to some proxies and not to others: a smuggling vector).
_BAD_HEAD_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)|(?<!\r)\n")
_BAD_VALUE_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

Header = tuple[str, str]


class HttpError(Exception):
    """A request that must be answered with ``status`` and the connection closed."""

    def __init__(self, status: int, reason: str, headers: Iterable[Header] = ()) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.headers: tuple[Header, ...] = tuple(headers)


def split_header_list(value: str | None) -> list[str]:
    """The non-empty, stripped elements of a comma-separated header value (``a, b`` → [a, b])."""
    if not value:
        return []
    return [item for item in (part.strip(" \t") for part in value.split(",")) if item]


class Request:
    """One parsed request head. Transient: do not keep it per connection.

    ``headers`` maps lower-cased names to values; repeated headers are joined with ``", "``.
    ``key`` is the ``Sec-WebSocket-Key``, set only once the request passed upgrade validation.
    """

    __slots__ = ("method", "target", "path", "query", "version", "headers", "content_length", "key")

    def __init__(
        self,
        method: str,
        target: str,
        path: str,
        query: str,
        version: str,
        headers: dict[str, str],
        content_length: int = 0,
    ) -> None:
        self.method = method
        self.target = target
        self.path = path
        self.query = query
        self.version = version
        self.headers = headers
        self.content_length = content_length
        self.key: str | None = None

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.target} {self.version}>"

    @property
    def host(self) -> str | None:
        return self.headers.get("host")

    @property
    def origin(self) -> str | None:
        return self.headers.get("origin")

    @property
    def subprotocols(self) -> list[str]:
        """Subprotocols offered in ``Sec-WebSocket-Protocol``, in the client's order."""
        return split_header_list(self.headers.get("sec-websocket-protocol"))

    @property
    def extensions(self) -> list[tuple[str, str]]:
        """Extensions offered in ``Sec-WebSocket-Extensions`` as ``(name, raw_params)`` pairs,
        e.g. ``("permessage-deflate", "client_max_window_bits")``."""
        offers = []
        for item in split_header_list(self.headers.get("sec-websocket-extensions")):
            name, _, params = item.partition(";")
            offers.append((name.strip(" \t").lower(), params.strip(" \t")))
        return offers

    @property
    def keep_alive(self) -> bool:
        """Whether the client expects the connection to stay open after the response."""
        tokens = [t.lower() for t in split_header_list(self.headers.get("connection"))]
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens

    @property
    def params(self) -> dict[str, str]:
        """The query string decoded (last value wins for repeated names)."""
        return dict(parse_qsl(self.query, keep_blank_values=True))


def parse_request_head(
    buf: Buffer,
    pos: int,
    end: int,
    *,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    max_body_bytes: int | None = None,
) -> tuple[Request, int] | None:
    """Parse one request head from ``buf[pos:end]``.

    Returns ``None`` while the head is incomplete (no blank line yet), else ``(request,
    new_pos)`` with ``new_pos`` just past the blank line, where the body (if any) starts.
    Raises :class:`HttpError`: 431 for a head over ``max_request_bytes`` (known as soon as that
    many bytes arrived without a blank line), 400 for malformed input, 413 for a
    ``Content-Length`` over ``max_body_bytes``, 501 for ``Transfer-Encoding``, 505 for an HTTP
    version other than 1.0/1.1.
    """
    start = pos
    # RFC 9112 §2.2: ignore empty lines before the request line (left after a previous body).
    while end - pos >= 2 and buf[pos] == 13 and buf[pos + 1] == 10:
        pos += 2
    # The skipped CRLFs count toward the limit, so a CRLF flood cannot grow the buffer forever.
    limit = min(end, start + max_request_bytes)
    idx = buf.find(b"\r\n\r\n", pos, limit)
    if idx < 0:
        if end - start >= max_request_bytes:
            raise HttpError(431, "request head too large")
        return None
    head = buf[pos:idx].decode("latin-1")
    if _BAD_HEAD_CHARS.search(head):
        raise HttpError(400, "invalid character in request head")
    lines = head.split("\r\n")

    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise HttpError(400, "malformed method")
    if version != "HTTP/1.1" and version != "HTTP/1.0":
        if version.startswith("HTTP/"):
            raise HttpError(505, "HTTP version not supported")
        raise HttpError(400, "malformed request line")
    path, query = _split_target(method, target)

    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        # A token right up to the colon: no obs-fold continuation lines, no "Name :".
        if not colon or not _TOKEN.fullmatch(name):
            raise HttpError(400, "malformed header line")
        name = name.lower()
        value = value.strip(" \t")
        if name in headers:
            if name == "host":
                raise HttpError(400, "duplicate Host header")
            headers[name] = headers[name] + ", " + value
        else:
            headers[name] = value

    if version == "HTTP/1.1" and "host" not in headers:
        raise HttpError(400, "missing Host header")
    if "transfer-encoding" in headers:
        raise HttpError(501, "Transfer-Encoding not supported; send Content-Length")
    content_length = 0
    cl = headers.get("content-length")
    if cl is not None:
        # isascii() first: str.isdigit() accepts "²" and other non-ASCII digits.
        if not (cl.isascii() and cl.isdigit()) or len(cl) > 18:
            raise HttpError(400, "invalid Content-Length")
        content_length = int(cl)
        if max_body_bytes is not None and content_length > max_body_bytes:
            raise HttpError(413, f"body of {content_length} bytes > limit {max_body_bytes}")
    request = Request(method, target, path, query, version, headers, content_length)
    return request, idx + 4


def _split_target(method: str, target: str) -> tuple[str, str]:
    if target.startswith("/"):
        path, _, query = target.partition("?")
        return path, query
    if target == "*" and method == "OPTIONS":
        return "*", ""
    scheme_end = target.find("://")
    if scheme_end > 0:  # absolute-form, e.g. from a forward proxy
        slash = target.find("/", scheme_end + 3)
        if slash < 0:
            return "/", ""
        path, _, query = target[slash:].partition("?")
        return path, query
    raise HttpError(400, "malformed request target")


def encode_headers(headers: Iterable[Header]) -> bytes:
    """``Name: value\\r\\n`` lines; refuses names or values that could inject a header."""
    out = []
    for name, value in headers:
        if not _TOKEN.fullmatch(name) or _BAD_VALUE_CHARS.search(value):
            raise ValueError(f"invalid header {name!r}: {value!r}")
        out.append(f"{name}: {value}\r\n")
    return "".join(out).encode("latin-1")


def encode_response(
    status: int,
    body: bytes = b"",
    *,
    content_type: str | None = "text/plain; charset=utf-8",
    headers: Iterable[Header] = (),
    close: bool = False,
) -> bytes:
    """The bytes of a complete HTTP/1.1 response with a ``Content-Length`` body."""
    phrase = _PHRASES.get(status, "Unknown")
    head = [f"HTTP/1.1 {status} {phrase}\r\n"]
    if content_type is not None and (body or status >= 400):
        head.append(f"Content-Type: {content_type}\r\n")
    head.append(f"Content-Length: {len(body)}\r\n")
    if close:
        head.append("Connection: close\r\n")
    return "".join(head).encode("latin-1") + encode_headers(headers) + b"\r\n" + body


def error_response(error: HttpError, body: bytes | None = None) -> bytes:
    """The response for an :class:`HttpError` (its reason as the body), closing the connection."""
    if body is None:
        body = error.reason.encode("utf-8") + b"\n"
    return encode_response(error.status, body, headers=error.headers, close=True)
