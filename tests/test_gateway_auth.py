"""JWT HS256 verification: good tokens, expired ones, and every way to forge or break one."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidegate.gateway.auth import (
    InvalidToken,
    TokenError,
    TokenExpired,
    b64url_decode,
    encode_hs256,
    verify_connect_token,
    verify_hs256,
    verify_subscription_token,
)

SECRET = "s3cret"


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def hand_made(header: Any, claims: Any, secret: str = SECRET, sig: bytes | None = None) -> str:
    h = b64(json.dumps(header).encode())
    p = b64(json.dumps(claims).encode())
    if sig is None:
        sig = hmac.new(secret.encode(), f"{h}.{p}".encode(), hashlib.sha256).digest()
    return f"{h}.{p}.{b64(sig)}"


def test_jwt_io_reference_token() -> None:
    # the HS256 example token published on jwt.io: interoperates with other JWT libraries
    tok = (
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9."
        "eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ."
        "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
    )
    claims = verify_hs256(tok, "your-256-bit-secret")
    assert claims == {"sub": "1234567890", "name": "John Doe", "iat": 1516239022}
    with pytest.raises(InvalidToken):
        verify_hs256(tok, "another-secret")


def test_connect_token_claims() -> None:
    exp = int(time.time()) + 60
    tok = encode_hs256(
        {
            "sub": "42",
            "exp": exp,
            "info": {"name": "Ann"},
            "channels": ["a", "b", "a"],
            "meta": [1],
        },
        SECRET,
    )
    ct = verify_connect_token(tok, SECRET)
    assert ct.user == "42" and ct.exp == exp
    assert ct.info == b'{"name":"Ann"}'
    assert ct.channels == ("a", "b") and ct.meta == [1]
    anon = verify_connect_token(encode_hs256({}, SECRET), SECRET)
    assert anon.user == "" and anon.exp == 0 and anon.info is None and anon.channels == ()


def test_subscription_token_claims() -> None:
    st_ = verify_subscription_token(
        encode_hs256({"sub": "42", "channel": "$c", "info": "x"}, SECRET), SECRET
    )
    assert (st_.user, st_.channel, st_.exp, st_.info) == ("42", "$c", 0, b'"x"')
    with pytest.raises(InvalidToken):
        verify_subscription_token(encode_hs256({"sub": "42"}, SECRET), SECRET)


def test_expiry_and_not_before() -> None:
    now = 1_000_000.0
    with pytest.raises(TokenExpired):
        verify_hs256(encode_hs256({"exp": now}, SECRET), SECRET, now=now)
    assert verify_hs256(encode_hs256({"exp": now + 1}, SECRET), SECRET, now=now)
    assert verify_hs256(encode_hs256({"exp": now - 1}, SECRET), SECRET, now=now, leeway_s=5)
    with pytest.raises(InvalidToken):
        verify_hs256(encode_hs256({"nbf": now + 10}, SECRET), SECRET, now=now)
    assert verify_hs256(encode_hs256({"nbf": now - 10}, SECRET), SECRET, now=now)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "a.b",
        "a.b.c.d",
        "...",
        hand_made({"alg": "none"}, {"sub": "1"}).rsplit(".", 1)[0] + ".",
        hand_made({"alg": "none"}, {"sub": "1"}),
        hand_made({"alg": "HS512"}, {"sub": "1"}),
        hand_made({"alg": "RS256"}, {"sub": "1"}),
        hand_made({"typ": "JWT"}, {"sub": "1"}),  # no alg
        hand_made(["HS256"], {"sub": "1"}),
        hand_made({"alg": "HS256", "crit": ["exp"]}, {"sub": "1"}),
        hand_made({"alg": "HS256"}, {"sub": "1"}, secret="wrong"),
        hand_made({"alg": "HS256"}, {"sub": "1"}, sig=b""),
        hand_made({"alg": "HS256"}, ["not", "an", "object"]),
        hand_made({"alg": "HS256"}, {"exp": "tomorrow"}),
        hand_made({"alg": "HS256"}, {"exp": 10**400}),
        encode_hs256({"sub": "1"}, SECRET) + "=",
        encode_hs256({"sub": "1"}, SECRET).replace("-", "+").replace("_", "/") + "+/",
        "eyJhbGciOiJIUzI1NiJ9.!!!!.abc",
        "x" * 20000,
    ],
)
def test_bad_tokens_are_invalid(token: str) -> None:
    with pytest.raises(InvalidToken):
        verify_hs256(token, SECRET)


def test_claim_types() -> None:
    with pytest.raises(InvalidToken):
        verify_connect_token(encode_hs256({"sub": 42}, SECRET), SECRET)
    with pytest.raises(InvalidToken):
        verify_connect_token(encode_hs256({"channels": "news"}, SECRET), SECRET)
    with pytest.raises(InvalidToken):
        verify_connect_token(encode_hs256({"channels": [""]}, SECRET), SECRET)


def test_empty_secret_verifies_nothing() -> None:
    tok = encode_hs256({"sub": "1"}, "")
    with pytest.raises(InvalidToken):
        verify_hs256(tok, "")


def test_strict_base64url() -> None:
    assert b64url_decode("YQ") == b"a"
    for bad in ["YQ==", "Y", "Y Q", "YQ\n", "+/", "YR"]:  # "YR": non-canonical "a"
        with pytest.raises(InvalidToken):
            b64url_decode(bad)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_string_is_refused_cleanly(token: str) -> None:
    try:
        verify_hs256(token, SECRET)
    except TokenError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    claims=st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=4),
    pos=st.integers(min_value=0),
    char=st.sampled_from("AQgw-_"),
)
def test_tampering_with_any_character_is_detected(
    claims: dict[str, Any], pos: int, char: str
) -> None:
    claims.pop("exp", None)
    claims.pop("nbf", None)
    tok = encode_hs256(claims, SECRET)
    assert verify_hs256(tok, SECRET) == claims
    i = pos % len(tok)
    if tok[i] == "." or tok[i] == char:
        return
    forged = tok[:i] + char + tok[i + 1 :]
    with pytest.raises(InvalidToken):
        verify_hs256(forged, SECRET)
