"""History rings (size + TTL, offsets, epochs, recovery) and presence."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidegate.gateway.history import HistoryStore, Unrecoverable
from tidegate.gateway.messages import ClientInfo
from tidegate.gateway.presence import PresenceStore


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def store(meta_ttl_s: float = 3600) -> tuple[HistoryStore, Clock]:
    clock = Clock()
    return HistoryStore(meta_ttl_s, clock), clock


def add(h: HistoryStore, ch: str, n: int, size: int = 3, ttl: float = 60) -> list[int]:
    return [h.add(ch, str(i).encode(), None, size=size, ttl_s=ttl).offset for i in range(n)]


def test_offsets_increase_and_ring_keeps_the_last_n() -> None:
    h, _ = store()
    assert add(h, "a", 5) == [1, 2, 3, 4, 5]
    res = h.history("a", size=3, ttl_s=60)
    assert [p.offset for p in res.publications] == [3, 4, 5]
    assert res.offset == 5 and res.epoch
    assert add(h, "b", 1) == [1]  # per channel
    assert h.history("b", size=3, ttl_s=60).epoch != res.epoch


def test_ttl_expires_publications_but_not_the_position() -> None:
    h, clock = store()
    add(h, "a", 2)
    clock.t += 61
    res = h.history("a", size=3, ttl_s=60)
    assert res.publications == [] and res.offset == 2
    assert h.recover("a", 2, res.epoch, size=3, ttl_s=60, max_pubs=100).recovered
    assert not h.recover("a", 1, res.epoch, size=3, ttl_s=60, max_pubs=100).recovered


def test_limit_since_reverse() -> None:
    h, _ = store()
    add(h, "a", 3, size=10)
    ep = h.history("a", size=10, ttl_s=60).epoch

    def offs(**kw: object) -> list[int]:
        return [p.offset for p in h.history("a", size=10, ttl_s=60, **kw).publications]

    assert offs(limit=2) == [1, 2]
    assert offs(limit=2, reverse=True) == [3, 2]
    assert offs(limit=0) == []
    assert offs(since=(1, ep)) == [2, 3]
    assert offs(since=(3, ep)) == []
    assert offs(since=(3, ep), reverse=True) == [2, 1]
    for bad in [(1, "other"), (9, ep)]:
        with pytest.raises(Unrecoverable):
            h.history("a", size=10, ttl_s=60, since=bad)
    add(h, "b", 5, size=2)
    epb = h.history("b", size=2, ttl_s=60).epoch
    with pytest.raises(Unrecoverable):
        h.history("b", size=2, ttl_s=60, since=(1, epb))  # 2 and 3 were trimmed


def test_recover_cases() -> None:
    h, _ = store()
    add(h, "a", 5, size=3)
    ep = h.history("a", size=3, ttl_s=60).epoch
    r = h.recover("a", 3, ep, size=3, ttl_s=60, max_pubs=100)
    assert r.recovered and [p.offset for p in r.publications] == [4, 5] and r.offset == 5
    assert h.recover("a", 5, ep, size=3, ttl_s=60, max_pubs=100).publications == []
    assert not h.recover("a", 1, ep, size=3, ttl_s=60, max_pubs=100).recovered  # trimmed
    assert not h.recover("a", 4, "x", size=3, ttl_s=60, max_pubs=100).recovered  # epoch
    assert not h.recover("a", 6, ep, size=3, ttl_s=60, max_pubs=100).recovered  # future
    assert not h.recover("a", 2, ep, size=3, ttl_s=60, max_pubs=2).recovered  # over the cap


def test_idle_streams_get_a_new_epoch_and_prune_drops_them() -> None:
    h, clock = store(meta_ttl_s=100)
    add(h, "a", 1)
    ep = h.history("a", size=3, ttl_s=60).epoch
    clock.t += 50
    assert h.history("a", size=3, ttl_s=60).epoch == ep  # touched: stays
    clock.t += 101
    assert h.prune() == 1 and "a" not in h.streams
    add(h, "a", 1)
    assert h.history("a", size=3, ttl_s=60).epoch != ep


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(st.one_of(st.just("pub"), st.floats(0, 30)), max_size=40),
    size=st.integers(1, 8),
    since=st.integers(0, 45),
)
def test_recovery_is_exact(ops: list[object], size: int, since: int) -> None:
    """recovered <=> every publication after ``since`` is still retained (by size and TTL),
    and then exactly those come back, in order."""
    h, clock = store()
    ttl = 60.0
    times: dict[int, float] = {}
    top = 0
    for op in ops:
        if op == "pub":
            top = h.add("c", b"x", None, size=size, ttl_s=ttl).offset
            times[top] = clock.t
        else:
            assert isinstance(op, float)
            clock.t += op
    ep = h.history("c", size=size, ttl_s=ttl, limit=0).epoch
    r = h.recover("c", since, ep, size=size, ttl_s=ttl, max_pubs=1000)
    now_ms = int(clock.t * 1000)  # the store works in whole milliseconds
    alive = {o for o, t in times.items() if o > top - size and int(t * 1000) > now_ms - 60_000}
    wanted = list(range(since + 1, top + 1))
    should = since <= top and all(o in alive for o in wanted)
    assert r.recovered == should
    if should:
        assert [p.offset for p in r.publications] == wanted


def test_presence_store() -> None:
    p = PresenceStore()
    p.add("c", ClientInfo("u1", "a"))
    p.add("c", ClientInfo("u1", "b"))
    p.add("c", ClientInfo("u2", "c"))
    p.add("c", ClientInfo("u2", "c"))  # same client again: no double count
    assert p.stats("c") == (3, 2)
    assert set(p.get("c")) == {"a", "b", "c"}
    p.remove("c", "a")
    assert p.stats("c") == (2, 2)
    p.remove("c", "b")
    p.remove("c", "zzz")
    assert p.stats("c") == (1, 1)
    p.remove("c", "c")
    assert p.stats("c") == (0, 0) and p.get("c") == {} and p.channels() == 0
    p.add("d", ClientInfo("u", "x"))
    p.add("d", ClientInfo("v", "x"))  # the client's user changed: counts follow
    assert p.stats("d") == (1, 1)
