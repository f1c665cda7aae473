"""Property tests for the length-prefixed and line codecs: any split of a stream decodes the same."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tidegate.protocol.codec import FrameTooLarge
from tidegate.protocol.length_prefixed import LengthPrefixedCodec
from tidegate.protocol.line import LineCodec


def decode_stream(codec, chunks: list[bytes]) -> list[bytes]:
    """Feed chunks as the engine does: leftover bytes + new bytes, decode every whole frame."""
    out: list[bytes] = []
    pending = b""
    for chunk in chunks:
        buf = pending + chunk
        pos = 0
        while True:
            frame, pos = codec.decode(buf, pos, len(buf))
            if frame is None:
                break
            out.append(frame)
        pending = buf[pos:]
    assert pending == b""
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points + [len(data)]:
        pieces.append(data[last:p])
        last = p
    return pieces


@given(st.lists(st.binary(max_size=300), max_size=20), st.lists(st.integers(0, 10_000), max_size=12))
def test_length_prefixed_round_trip_any_split(payloads, cuts):
    codec = LengthPrefixedCodec(max_frame_bytes=300)
    stream = b"".join(codec.encode(p) for p in payloads)
    assert decode_stream(codec, split(stream, cuts)) == payloads


@given(st.lists(st.binary(max_size=200).filter(lambda b: b"\n" not in b and not b.endswith(b"\r")),
                max_size=20), st.lists(st.integers(0, 10_000), max_size=12))
def test_line_round_trip_any_split(lines, cuts):
    codec = LineCodec(max_frame_bytes=200)
    stream = b"".join(codec.encode(line) for line in lines)
    assert decode_stream(codec, split(stream, cuts)) == lines


@pytest.mark.parametrize("codec", [LengthPrefixedCodec(max_frame_bytes=64), LineCodec(64)],
                         ids=["length-prefixed", "line"])
@given(data=st.binary(max_size=2000))
def test_garbage_never_crashes(codec, data):
    """Any bytes: whole frames within the limit, a wait for more, or FrameTooLarge; nothing else."""
    pos = 0
    try:
        while True:
            frame, pos = codec.decode(data, pos, len(data))
            if frame is None:
                break
            assert len(frame) <= 64
    except FrameTooLarge as exc:
        assert exc.size > 64 and exc.close_code == 1009


def test_oversized_length_refused_from_header_alone():
    codec = LengthPrefixedCodec(max_frame_bytes=1024)
    with pytest.raises(FrameTooLarge):
        codec.decode((1025).to_bytes(4, "big"), 0, 4)


def test_line_without_newline_refused_past_limit():
    codec = LineCodec(max_frame_bytes=10)
    assert codec.decode(b"x" * 11, 0, 11) == (None, 0)  # no newline yet: wait for more
    with pytest.raises(FrameTooLarge):
        codec.decode(b"x" * 20, 0, 20)
    assert codec.decode(b"abc\r\nrest", 0, 9) == (b"abc", 5)
