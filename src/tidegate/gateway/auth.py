"""JWT (HS256 only) verification for connection and subscription tokens.

Own code on purpose: the only algorithm accepted is HS256 (``alg: none``, RS*/ES* and anything
else are refused before the signature is looked at), signatures are compared with
:func:`hmac.compare_digest`, and base64url is decoded strictly (no padding, no stray
characters). An empty secret verifies nothing.

Errors map onto the client protocol: :class:`TokenExpired` -> error 109 "token expired" (the
SDK fetches a new token and retries); :class:`InvalidToken` -> disconnect 3500 "invalid token"
(the SDK gives up).

Connection token claims: ``sub`` (user id, "" = anonymous), ``exp``, ``nbf``, ``info`` (any JSON:
the connection's ``conn_info``), ``channels`` (server-side subscriptions), ``meta`` (server-only
data, never sent to clients), ``tidegate_priority`` (the connection's eviction class, an integer
0..9 or "protected": see gateway/eviction.py). Subscription token claims: ``sub`` (must equal
the connection's user), ``channel`` (must equal the channel), ``exp``, ``nbf``, ``info``
(``chan_info``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any

from tidegate.gateway.eviction import CLAIM as PRIORITY_CLAIM
from tidegate.gateway.eviction import claim_priority

__all__ = [
    "ConnectToken",
    "InvalidToken",
    "SubscriptionToken",
    "TokenError",
    "TokenExpired",
    "encode_hs256",
    "verify_connect_token",
    "verify_hs256",
    "verify_subscription_token",
]

MAX_TOKEN_BYTES = 16384
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_TO_STD = str.maketrans("-_", "+/")


class TokenError(Exception):
    pass


class InvalidToken(TokenError):
    """Forged, malformed, wrong algorithm, not yet valid, or claims of the wrong type."""


class TokenExpired(TokenError):
    """Well-formed and correctly signed, but ``exp`` has passed."""


def b64url_decode(part: str) -> bytes:
    if len(part) % 4 == 1 or not _B64URL.fullmatch(part):
        raise InvalidToken("bad base64url")
    try:
        raw = base64.b64decode(part.translate(_TO_STD) + "=" * (-len(part) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidToken("bad base64url") from None
    if b64url_encode(raw) != part:  # non-zero unused trailing bits: a second spelling
        raise InvalidToken("non-canonical base64url")
    return raw


def b64url_encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise InvalidToken(f"{what} is not JSON") from None
    if type(value) is not dict:
        raise InvalidToken(f"{what} is not a JSON object")
    return value


def _secret_bytes(secret: str | bytes) -> bytes:
    return secret.encode("utf-8") if isinstance(secret, str) else secret


def encode_hs256(
    claims: dict[str, Any], secret: str | bytes, header: dict[str, Any] | None = None
) -> str:
    """Mint an HS256 token (tests, examples, dev tools)."""
    hdr = header if header is not None else {"alg": "HS256", "typ": "JWT"}
    signing_input = (
        b64url_encode(json.dumps(hdr, separators=(",", ":")).encode())
        + "."
        + b64url_encode(json.dumps(claims, separators=(",", ":")).encode())
    )
    sig = hmac.new(_secret_bytes(secret), signing_input.encode("ascii"), hashlib.sha256).digest()
    return signing_input + "." + b64url_encode(sig)


def _numeric(claims: dict[str, Any], name: str) -> float | None:
    v = claims.get(name)
    if v is None:
        return None
    if type(v) not in (int, float):
        raise InvalidToken(f"{name} must be a number")
    try:
        f = float(v)
    except OverflowError:
        raise InvalidToken(f"{name} is out of range") from None
    if not math.isfinite(f):
        raise InvalidToken(f"{name} must be finite")
    return f


def verify_hs256(
    token: str, secret: str | bytes, now: float | None = None, leeway_s: float = 0.0
) -> dict[str, Any]:
    """The verified claims of ``token``. Raises :class:`InvalidToken` / :class:`TokenExpired`."""
    key = _secret_bytes(secret)
    if not key:
        raise InvalidToken("no token secret configured")
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_BYTES:
        raise InvalidToken("empty or oversized token")
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidToken("a JWT has three parts")
    header_b64, payload_b64, sig_b64 = parts
    header = _json_object(b64url_decode(header_b64), "header")
    if header.get("alg") != "HS256":
        raise InvalidToken("alg must be HS256")
    if "crit" in header:
        raise InvalidToken("unsupported critical header")
    sig = b64url_decode(sig_b64)
    expected = hmac.new(key, f"{header_b64}.{payload_b64}".encode("ascii"), hashlib.sha256).digest()
    if not hmac.compare_digest(sig, expected):
        raise InvalidToken("bad signature")
    claims = _json_object(b64url_decode(payload_b64), "payload")
    if now is None:
        now = time.time()
    nbf = _numeric(claims, "nbf")
    if nbf is not None and now + leeway_s < nbf:
        raise InvalidToken("token not valid yet")
    exp = _numeric(claims, "exp")
    if exp is not None and now - leeway_s >= exp:
        raise TokenExpired("token expired")
    return claims


def _sub(claims: dict[str, Any]) -> str:
    sub = claims.get("sub", "")
    if type(sub) is not str:
        raise InvalidToken("sub must be a string")
    return sub


def _info(claims: dict[str, Any]) -> bytes | None:
    if claims.get("info") is None:
        return None
    return json.dumps(claims["info"], separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _exp(claims: dict[str, Any]) -> int:
    exp = _numeric(claims, "exp")
    return int(exp) if exp is not None else 0


@dataclass(frozen=True, slots=True)
class ConnectToken:
    user: str
    exp: int  # unix seconds; 0 = never expires
    info: bytes | None  # compact JSON of the ``info`` claim
    channels: tuple[str, ...]
    meta: Any
    priority: int = 0  # eviction class (tidegate_priority claim); eviction.PROTECTED = never


@dataclass(frozen=True, slots=True)
class SubscriptionToken:
    user: str
    channel: str
    exp: int
    info: bytes | None


def verify_connect_token(
    token: str, secret: str | bytes, now: float | None = None, leeway_s: float = 0.0
) -> ConnectToken:
    claims = verify_hs256(token, secret, now, leeway_s)
    channels = claims.get("channels", [])
    if channels is None:
        channels = []
    if type(channels) is not list or any(type(c) is not str or not c for c in channels):
        raise InvalidToken("channels must be a list of channel names")
    try:
        priority = claim_priority(claims.get(PRIORITY_CLAIM))
    except ValueError as exc:
        raise InvalidToken(str(exc)) from None
    return ConnectToken(
        user=_sub(claims),
        exp=_exp(claims),
        info=_info(claims),
        channels=tuple(dict.fromkeys(channels)),
        meta=claims.get("meta"),
        priority=priority,
    )


def verify_subscription_token(
    token: str, secret: str | bytes, now: float | None = None, leeway_s: float = 0.0
) -> SubscriptionToken:
    claims = verify_hs256(token, secret, now, leeway_s)
    channel = claims.get("channel")
    if type(channel) is not str or not channel:
        raise InvalidToken("a subscription token needs a channel claim")
    return SubscriptionToken(
        user=_sub(claims), channel=channel, exp=_exp(claims), info=_info(claims)
    )
