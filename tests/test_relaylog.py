"""The relay log (gateway/relaylog.py), sans-I/O: stamps, the cut, the ring, catching up,
overflow, hellos. Worker 0 plays the victim, 1 the thief, 2 a third worker publishing."""

from __future__ import annotations

from typing import Any

from tidegate.gateway.messages import Publication
from tidegate.gateway.relaylog import CMD, DEAD, JOIN, PUB, Entry, RelayLog


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def pub(n: int, size: int = 1) -> Publication:
    return Publication(b"x" * size, None, 0, None, None, n)


def logs(n: int = 3, **kw: Any) -> list[RelayLog]:
    """Workers whose hellos went round: each knows where the others' stamps start."""
    out = [RelayLog(i, start=1000 * (i + 1), **kw) for i in range(n)]
    for a in out:
        for b in out:
            a.hello(b.index, b.top)
    return out


def send(origin: RelayLog, *to: RelayLog, key: str = "ch", kind: str = PUB, obj: Any = None) -> int:
    """``origin`` relays one message (and delivers it itself); ``to`` handle it at once."""
    stamp = origin.stamp()
    obj = pub(stamp) if obj is None and kind == PUB else obj
    for w in (origin, *to):
        w.add(origin.index, stamp, kind, key, obj)
    return stamp


def stamps(entries: list[Entry] | None) -> list[tuple[int, int]]:
    assert entries is not None
    return [(e[0], e[1]) for e in entries]


def test_after_the_cut_in_the_order_handled() -> None:
    v, t, o = logs()
    send(v, t, o)
    send(o, v, t)
    send(t, v, o)
    cut = v.cut()
    assert cut == {0: v.top, 1: t.top, 2: o.top}
    assert not t.behind(cut) and t.since(cut) == []
    # After the export: the victim goes on, the thief handles these before the import.
    a = send(v, t, o)
    b = send(o, t)  # (the victim has not handled this one yet: irrelevant)
    c = send(t, o)  # the thief's own
    d = send(o, t)
    got = t.since(cut)
    assert stamps(got) == [(0, a), (2, b), (1, c), (2, d)]
    assert got is not None and all(e[2] == PUB and e[3] == "ch" for e in got)


def test_a_thief_behind_the_cut_waits_then_replays_only_what_the_session_missed() -> None:
    v, t, o = logs()
    x1 = send(v)  # the victim delivered these; the thief has not handled them yet
    y1 = send(o, v)
    cut = v.cut()
    x2 = send(v)  # after the export
    calls: list[list[Entry] | None] = []
    assert t.behind(cut)
    assert t.resume(cut, calls.append) is False and t.waiting and t.waited == 1
    t.resume(cut, calls.append)  # a second session of the same hand-over: one group
    assert len(t._waiting) == 1
    # The relays come in, in each origin's order; the wait ends once both are reached.
    for origin, stamp in ((0, x1), (2, y1)):
        assert not calls
        t.add(origin, stamp, PUB, "ch", pub(stamp))
        t.release()
    assert len(calls) == 2 and calls[0] == calls[1] == []  # nothing after the cut yet
    assert not t.waiting
    # Handled while waiting, after the cut: replayed (here, x2 came in after the release).
    assert stamps(t.since(cut)) == []
    t.add(0, x2, PUB, "ch", pub(x2))
    assert stamps(t.since(cut)) == [(0, x2)]


def test_what_arrives_while_waiting_is_in_the_replay_and_what_the_session_had_is_not() -> None:
    v, t, o = logs()
    x1 = send(v)
    cut = v.cut()
    x2 = send(v)
    own = send(t, v)
    got: list[list[Entry] | None] = []
    t.resume(cut, got.append)
    t.add(0, x1, PUB, "ch", pub(x1))  # the session had it
    t.add(0, x2, PUB, "ch", pub(x2))  # it did not
    assert not got  # (release not called: the broker calls it after delivering)
    t.release()
    assert [stamps(g) for g in got] == [[(1, own), (0, x2)]]


def test_overflow_by_entries_bytes_or_age_is_insufficient_state() -> None:
    clock = Clock()
    v, t, _ = logs(max_entries=4, max_bytes=100, max_age_s=2.0, clock=clock)
    cut = v.cut()
    for _ in range(4):
        send(v, t)
    assert len(stamps(t.since(cut))) == 4  # exactly full: still reaches back
    send(v, t)
    assert t.since(cut) is None and t.insufficient == 1
    assert len(t.ring) == 4 and t.gone[0] == cut[0] + 1

    v, t, _ = logs(max_bytes=100, clock=clock)
    cut = v.cut()
    send(v, t, obj=pub(0, 60))
    assert t.bytes == 60 and len(stamps(t.since(cut))) == 1
    send(v, t, obj=pub(0, 60))  # 120 bytes: the first goes
    assert t.bytes == 60 and t.since(cut) is None

    v, t, _ = logs(clock=clock)
    cut = v.cut()
    send(v, t)
    assert len(stamps(t.since(cut))) == 1
    clock.t += 2.5
    send(v, t)  # the first is too old now
    assert len(t.ring) == 1 and t.since(cut) is None
    assert stamps(t.since(v.cut())) == []  # (a later cut is served)


def test_a_wait_that_outlasts_the_ring_gives_up() -> None:
    clock = Clock()
    v, t, _ = logs(clock=clock)
    armed: list[float] = []
    t.schedule = armed.append
    send(v)
    cut = v.cut()
    got: list[list[Entry] | None] = []
    t.resume(cut, got.append)
    t.resume({**cut, 2: cut[2]}, got.append)
    assert armed == [2.0]  # one timer for all waits
    clock.t += 1.0
    assert t.expire() == 1.0 and not got
    clock.t += 1.0
    assert t.expire() is None and got == [None, None] and t.insufficient == 2


def test_hellos_say_where_each_origin_starts() -> None:
    v, t = RelayLog(0, start=1000), RelayLog(1, start=5000)
    send(v)  # before the thief could hear it: never reaches it
    assert v.cut() == {0: 1001}
    assert t.behind(v.cut())  # never heard of worker 0: its hello is on the way
    t.hello(0, v.top)
    v.hello(1, t.top)
    assert not t.behind(v.cut()) and t.base[0] == t.gone[0] == 1001
    assert t.since(v.cut()) == []
    # A cut from before what the thief could hear: it cannot tell, so 3010.
    assert t.since({0: 1000}) is None
    # A first message does the same as a hello.
    w = RelayLog(2, start=9000)
    w.add(0, 1002, PUB, "ch", pub(1))
    assert w.base[0] == w.gone[0] == 1001 and w.seen[0] == 1002


def test_a_victim_that_never_heard_an_origin_delivered_nothing_of_it() -> None:
    v, t, o = logs()
    del v.seen[2]  # (as if worker 2 were born after v's cut: its hello not handled by v)
    cut = v.cut()
    assert 2 not in cut
    b = send(o, t)
    assert stamps(t.since(cut)) == [(2, b)]  # from where the thief's knowledge starts


def test_a_dead_origin_holds_nothing_up() -> None:
    v, t = RelayLog(0, start=1000), RelayLog(1, start=5000)
    v.hello(2, 7000)  # the victim heard worker 2 before it died; the thief never did
    t.hello(0, v.top)
    v.hello(1, t.top)
    cut = v.cut()
    assert t.behind(cut)
    t.hello_failed(2)
    assert t.seen[2] == DEAD and 2 not in t.cut()
    assert not t.behind(cut) and t.since(cut) == []
    t.hello(2, 9000)  # a new process in that slot: heard from now on
    assert t.seen[2] == t.base[2] == 9000


def test_a_restarted_origin_stamps_above_its_predecessor() -> None:
    v, t, o = logs()
    send(o, v, t)
    old = o.top
    o2 = RelayLog(2, start=old + 10_000)  # the same slot, a new process
    for w in (v, t):
        w.hello(2, o2.top)
        assert w.seen[2] == o2.top and w.gone.get(2, -1) < old  # nothing was lost
    cut = v.cut()
    b = send(o2, t)
    assert stamps(t.since(cut)) == [(2, b)]


def test_session_commands_are_entries_like_publications() -> None:
    v, t, _ = logs()
    cut = v.cut()
    send(v, t, kind=CMD, key="api_disconnect", obj=("alice", "", 3000, "bye", []))
    send(v, t, kind=JOIN, obj=object())
    got = t.since(cut)
    assert [e[2] for e in got or []] == [CMD, JOIN]
    assert t.bytes == 0  # only publications count as payload
