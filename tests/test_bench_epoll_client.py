"""The raw bench client on a bare epoll (``tidegate.bench.epoll_client``), against real sockets.

The server side of each test is a plain listening socket on loopback driven by the test, so the
test decides exactly what the client sees: the hello's PONG or silence, split frames, a server
PING, a bad length, a close. End-to-end runs (both client loops) are in ``test_bench.py``.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tidegate.bench.client import ClientConfig, walk_frames
from tidegate.bench.epoll_client import FREE, HELLO, OPEN, EpollRawClient
from tidegate.protocol.heartbeat import DATA, PING, PONG


def frame(kind: int, body: bytes) -> bytes:
    return (1 + len(body)).to_bytes(4, "big") + bytes((kind,)) + body


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    s.settimeout(5)
    yield s
    s.close()


def make_client(listener: socket.socket, **kw: object) -> EpollRawClient:
    port = listener.getsockname()[1]
    config = ClientConfig(index=0, host="127.0.0.1", port=port, sources=["127.0.0.2"],
                          connections=int(kw.pop("connections", 1)),  # type: ignore[call-overload]
                          **kw)  # type: ignore[arg-type]
    return EpollRawClient(config)


def read_exactly(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        assert chunk, "closed"
        out += chunk
    return out


def poll_until(client: EpollRawClient, done: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:  # type: ignore[operator]
        client._poll_once(0.05)
    assert done(), "condition not reached"  # type: ignore[operator]


def establish(client: EpollRawClient, listener: socket.socket, n: int = 1
              ) -> list[tuple[int, socket.socket]]:
    """``n`` connects, each answered by the server: [(client fd, server socket)]."""
    pairs = []
    for _ in range(n):
        client._connect()
        server, _ = listener.accept()
        server.settimeout(5)
        hello = read_exactly(server, 13)
        assert hello[4] == PING
        server.sendall(frame(PONG, hello[5:]))
        pairs.append(server)
    poll_until(client, lambda: client.stats.established == n)
    fds = [fd for fd in range(client.top) if client.state[fd] == OPEN]
    return list(zip(fds, pairs, strict=True))


def test_a_connect_counts_once_the_server_answered_the_hello(listener: socket.socket) -> None:
    client = make_client(listener, connections=2)
    client._connect()
    server, _ = listener.accept()
    hello = read_exactly(server, 13)
    fd = next(fd for fd in range(client.top) if client.state[fd] == HELLO)
    client._poll_once(0.05)
    assert client.stats.established == 0 and client.stats.open == 0  # no answer yet
    assert client.pending == {fd}  # it holds a place in the connect window
    server.sendall(frame(PONG, hello[5:]))
    poll_until(client, lambda: client.stats.established == 1)
    stats = client.stats
    assert stats.open == 1 and stats.confirmed == 1 and stats.hello_sent == 1
    assert stats.hello_rtt_us.count == 1 and stats.connect_us.count == 1
    assert client.state[fd] == OPEN and not client.pending
    server.close()


def test_pings_are_answered_and_measured_and_unanswered_ones_missed(
        listener: socket.socket) -> None:
    client = make_client(listener, connections=2, ping_interval_s=1.0, tick_s=0.5)
    (fd1, s1), (fd2, s2) = establish(client, listener, 2)
    nb = client.wheel.nbuckets
    for slot in range(nb):
        client._ping_bucket(slot, nb)
    stats = client.stats
    assert stats.pings_sent == 2 and stats.outstanding == 2
    ping = read_exactly(s1, 13)
    assert ping[4] == PING and int.from_bytes(ping[5:], "big") == client.sent[fd1]
    s1.sendall(frame(PONG, ping[5:]))
    poll_until(client, lambda: stats.pongs == 1)
    assert stats.rtt_connect_phase_us.count == 1 and client.sent[fd1] == 0
    # s2 never answers: its next ping finds the last one outstanding, a missed heartbeat.
    read_exactly(s2, 13)
    for slot in range(nb):
        client._ping_bucket(slot, nb)
    assert stats.missed == 1 and stats.pings_sent == 4 and stats.outstanding == 2
    # A pong that is not the one we wait for (an old token) is late, not an RTT sample.
    s1.sendall(frame(PONG, (1).to_bytes(8, "big")))
    poll_until(client, lambda: stats.late_pongs == 1)
    assert stats.pongs == 1
    assert client._expire_all() == 2 and stats.outstanding == 0 and stats.missed == 3


def test_server_pings_and_data_across_split_reads(listener: socket.socket) -> None:
    client = make_client(listener)
    [(fd, server)] = establish(client, listener)
    data = frame(PING, b"tok") + frame(DATA, b"x" * 20) + frame(PING, b"2")
    for i in range(len(data)):  # one byte at a time: every read is a piece of a frame
        server.sendall(data[i : i + 1])
        client._poll_once(0.05)
    poll_until(client, lambda: client.stats.server_pings == 2)
    pongs = frame(PONG, b"tok") + frame(PONG, b"2")
    assert read_exactly(server, len(pongs)) == pongs
    assert client.stats.data_frames == 1 and client.stats.protocol_errors == 0
    assert fd not in client.rbuf  # nothing left over


def test_the_servers_close_is_unexpected_with_its_reason(listener: socket.socket) -> None:
    client = make_client(listener, connections=2)
    (fd1, s1), (fd2, s2) = establish(client, listener, 2)
    s1.close()  # FIN
    s2.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    s2.close()  # RST
    poll_until(client, lambda: client.stats.open == 0)
    assert client.stats.unexpected_close_reasons == {"eof": 1, "ECONNRESET": 1}
    assert client.state[fd1] == client.state[fd2] == FREE


def test_a_bad_frame_length_is_a_protocol_error_and_our_close(listener: socket.socket) -> None:
    client = make_client(listener)
    [(fd, server)] = establish(client, listener)
    server.sendall(b"\xff\xff\xff\xff\x02")
    poll_until(client, lambda: client.stats.open == 0)
    assert client.stats.protocol_errors == 1
    assert client.stats.errors == {"protocol_bad_frame_length": 1}
    assert client.stats.unexpected_closes == 0  # we closed it
    with pytest.raises(ConnectionResetError):
        server.recv(16)


def test_a_refusal_before_the_hello_is_answered_is_a_failed_connect(
        listener: socket.socket) -> None:
    client = make_client(listener)
    client._connect()
    server, _ = listener.accept()
    server.close()  # what a worker at capacity does
    poll_until(client, lambda: client.stats.failed == 1)
    assert client.stats.errors == {"ECONNRESET": 1}
    assert client.stats.open == 0 and client.stats.unexpected_closes == 0 and not client.pending


def test_nobody_listening_and_timeouts_are_failed_connects(listener: socket.socket) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    client = make_client(listener, connections=2, connect_timeout_s=0.1)
    client.addr = ("127.0.0.1", closed_port)
    client._connect()
    poll_until(client, lambda: client.stats.failed == 1)
    assert client.stats.errors == {"ECONNREFUSED": 1}
    # Accepted but never answered: the watchdog gives up after connect_timeout_s.
    client.addr = listener.getsockname()
    client._connect()
    silent, _ = listener.accept()
    client._watchdog(time.monotonic_ns() + 1_000_000_000)
    assert client.stats.failed == 2 and client.stats.errors["timeout"] == 1
    assert not client.pending
    silent.close()


def test_a_refused_connect_is_tried_again_and_counts_once_established(
        listener: socket.socket) -> None:
    """--connect-retries: the server refuses the first attempt (a worker at capacity) and
    answers the second; the connection is established, the refusal is a retry, not an error."""
    client = make_client(listener, connect_retries=1)
    client._connect()
    server, _ = listener.accept()
    server.close()
    poll_until(client, lambda: bool(client.retry))
    assert client.retry == [(0, 1)] and client.stats.retried == {"ECONNRESET": 1}
    assert client.stats.failed == 0 and not client.stats.errors
    establish(client, listener)  # the next _connect takes the retry: the same connection
    assert client.stats.established == 1 and client.stats.attempted == 2
    assert client.next_index == 1 and not client.retry


def test_a_connect_fails_once_its_retries_are_used_up(listener: socket.socket) -> None:
    client = make_client(listener, connect_retries=2, connect_timeout_s=0.1)
    for _attempt in range(3):
        client._connect()
        silent, _ = listener.accept()
        client._watchdog(time.monotonic_ns() + 1_000_000_000)
        silent.close()
    assert client.stats.retried == {"timeout": 2}
    assert client.stats.failed == 1 and client.stats.errors == {"timeout": 1}
    assert not client.retry and not client.pending and client.stats.attempted == 3


def test_closing_at_the_end_is_expected(listener: socket.socket) -> None:
    client = make_client(listener, connections=3)
    pairs = establish(client, listener, 3)
    for fd, _ in pairs:
        client._close(fd)
    assert client.stats.open == 0 and client.stats.unexpected_closes == 0
    for _, server in pairs:
        with pytest.raises(ConnectionResetError):  # close_mode rst: no TIME_WAIT left behind
            server.recv(16)


@given(st.lists(st.tuples(st.sampled_from([PING, PONG, DATA, 7]), st.binary(max_size=40)),
                max_size=6), st.integers(min_value=0, max_value=300))
def test_walk_frames_finds_the_whole_frames_of_any_prefix(
        frames: list[tuple[int, bytes]], cut: int) -> None:
    data = b"".join(frame(kind, body) for kind, body in frames)
    prefix = data[:cut]
    found, consumed = walk_frames(prefix)
    ends = []
    pos = 0
    for _, body in frames:
        pos += 5 + len(body)
        ends.append(pos)
    whole = [end for end in ends if end <= len(prefix)]
    assert len(found) == len(whole)
    assert consumed == (whole[-1] if whole else 0)
    for (kind, start, end), (want_kind, body) in zip(found, frames, strict=False):
        assert kind == want_kind and prefix[start:end] == body


def test_walk_frames_rejects_bad_lengths() -> None:
    with pytest.raises(ValueError):
        walk_frames(b"\0\0\0\0\x01")
    with pytest.raises(ValueError):
        walk_frames(b"\x7f\0\0\0\x01")
