"""The consistent-hash ring (cluster.ring): properties over generated member sets and keys."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidegate.cluster.ring import (
    EmptyRingError,
    HashRing,
    connect_redirect_data,
    hash64,
    node_for_user,
    redirect_hint,
)
from tidegate.gateway.codec_json import JSON_CODEC
from tidegate.gateway.messages import ConnectResult

KEYS = [f"channel-{i}" for i in range(2000)]
member_names = st.text(min_size=1, max_size=12)
member_sets = st.lists(member_names, min_size=1, max_size=12, unique=True)
# Spread statistics over 2,000 keys: fixed examples, so a rare unlucky draw cannot flake.
stable = settings(derandomize=True, max_examples=60, deadline=None)


def owners(ring: HashRing[str]) -> list[str]:
    return [ring.owner(k) for k in KEYS]


@stable
@given(member_sets, member_names)
def test_adding_a_member_moves_only_its_share_and_only_to_it(members, new):
    if new in members:
        return
    ring = HashRing(members)
    before = owners(ring)
    ring.add(new)
    after = owners(ring)
    moved = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert all(after[i] == new for i in moved)  # nobody else's keys shuffled
    share = len(KEYS) / (len(members) + 1)
    assert 0.5 * share <= len(moved) <= 1.75 * share  # about 1/n of the keys


@stable
@given(member_sets.filter(lambda m: len(m) >= 2), st.data())
def test_removing_a_member_moves_only_its_keys_to_the_others(members, data):
    gone = data.draw(st.sampled_from(members))
    ring = HashRing(members)
    before = owners(ring)
    ring.remove(gone)
    after = owners(ring)
    for a, b in zip(before, after, strict=True):
        assert b != gone  # a dead member's keys are re-owned, none left behind
        assert a == b or a == gone  # and the other keys stay put
    moved = sum(a != b for a, b in zip(before, after, strict=True))
    share = len(KEYS) / len(members)
    assert 0.5 * share <= moved <= 1.75 * share


@given(member_sets, st.lists(st.text(max_size=40), min_size=1, max_size=50))
def test_two_independent_rings_agree(members, keys):
    # Two processes: built separately, members listed in a different order.
    a, b = HashRing(members), HashRing(list(reversed(members)))
    assert [a.owner(k) for k in keys] == [b.owner(k) for k in keys]
    assert [a.owners(k, 3) for k in keys] == [b.owners(k, 3) for k in keys]


def test_the_hash_is_the_same_in_another_process():
    # Python's own str hash is salted per process; the ring's must not be.
    code = "from tidegate.cluster.ring import HashRing, hash64; " \
           "print(hash64('news'), HashRing(range(5)).owner('news'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"PYTHONHASHSEED": "random"}).stdout.split()
    assert out == [str(hash64("news")), str(HashRing(range(5)).owner("news"))]


@given(member_sets, st.data())
def test_lookups_return_a_live_member(members, data):
    ring = HashRing(members)
    dead = data.draw(st.lists(st.sampled_from(members), max_size=len(members) - 1, unique=True))
    for m in dead:
        ring.remove(m)
    live = set(members) - set(dead)
    for key in data.draw(st.lists(st.text(max_size=20), min_size=1, max_size=30)):
        assert ring.owner(key) in live
        succ = ring.owners(key, len(members))
        assert succ[0] == ring.owner(key) and set(succ) == live and len(succ) == len(live)


@given(member_sets, st.text(max_size=20))
def test_successors_take_over_in_order(members, key):
    ring = HashRing(members)
    chain = ring.owners(key, len(members))
    for i in range(len(chain) - 1):  # the owner dies: the next in the chain owns the key
        ring.remove(chain[i])
        assert ring.owner(key) == chain[i + 1]


@given(member_sets, st.lists(st.text(max_size=20), max_size=300, unique=True),
       st.sampled_from([1.0, 1.1, 1.25, 2.0]))
def test_bounded_loads_cap_every_member(members, keys, c):
    ring = HashRing(members)
    placed = ring.assign(keys, c)
    assert set(placed) == set(keys) and set(placed.values()) <= set(members)
    cap = math.ceil(c * len(keys) / len(members))
    loads = {m: list(placed.values()).count(m) for m in members}
    assert max(loads.values()) <= cap
    # Deterministic: another instance, keys given in another order, same placement.
    assert HashRing(list(reversed(members))).assign(list(reversed(keys)), c) == placed


@given(member_sets, st.lists(st.text(max_size=20), max_size=200), st.sampled_from([1.0, 1.25]))
def test_bounded_loads_one_at_a_time(members, keys, c):
    ring = HashRing(members)
    loads: dict[str, int] = {}
    for i, key in enumerate(keys):
        m = ring.owner_bounded(key, loads, c)
        loads[m] = loads.get(m, 0) + 1
        assert max(loads.values()) <= math.ceil(c * (i + 1) / len(members))


def test_bounded_loads_keep_most_keys_on_their_plain_owner():
    ring = HashRing(range(8))
    placed = ring.assign(KEYS, 1.25)
    same = sum(placed[k] == ring.owner(k) for k in KEYS)
    assert same > 0.7 * len(KEYS)


def test_an_empty_ring_says_so():
    ring: HashRing[int] = HashRing()
    with pytest.raises(EmptyRingError, match="no members"):
        ring.owner("news")
    with pytest.raises(EmptyRingError):
        ring.assign(["a"])
    assert ring.owners("news", 3) == []
    ring.add(1)
    ring.remove(1)
    with pytest.raises(LookupError):  # EmptyRingError is a LookupError
        ring.owner("news")


def test_bad_arguments():
    with pytest.raises(ValueError):
        HashRing([1], vnodes=0)
    with pytest.raises(ValueError):
        HashRing([1]).assign(["a"], c=0.9)  # below 1 some keys would have nowhere to go
    assert not HashRing([1]).add(1) and not HashRing([1]).remove(2)


def test_membership_changes_invalidate_cached_answers():
    ring = HashRing(["a", "b", "c"])
    owner = ring.owner("news")  # cached now
    ring.remove(owner)
    assert ring.owner("news") != owner
    ring.add(owner)
    assert ring.owner("news") == owner
    assert not ring.set_members(["c", "b", "a"])  # same set: nothing moves


# ---- cluster mode (b): which node a user belongs to ------------------------------------------
def test_user_placement_and_the_redirect_hint_in_a_connect_reply():
    nodes = ["node-a", "node-b", "node-c"]
    home = node_for_user("alice", nodes)
    assert home in nodes and node_for_user("alice", list(reversed(nodes))) == home
    elsewhere = next(n for n in nodes if n != home)
    assert redirect_hint("alice", home, nodes) is None  # landed on the right node
    assert redirect_hint("alice", elsewhere, nodes) == home
    assert redirect_hint("", elsewhere, nodes) is None  # anonymous: anywhere is fine
    # Losing a node moves only its users.
    users = [f"user{i}" for i in range(500)]
    lost = nodes[0]
    for u in users:
        before = node_for_user(u, nodes)
        after = node_for_user(u, nodes[1:])
        assert after == before or before == lost
    # The hint rides in the connect reply's data: a normal, successful connect for the SDKs.
    data = connect_redirect_data(home, f"wss://{home}.example/connection/websocket")
    reply = json.loads(JSON_CODEC.encode_connect(1, ConnectResult(client="c1", data=data)))
    assert reply["connect"]["data"]["redirect"] == {
        "node": home, "url": f"wss://{home}.example/connection/websocket"}
