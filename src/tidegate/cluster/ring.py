"""A consistent-hash ring with virtual nodes and bounded loads. Sans-I/O: no sockets, no clock.

Who uses which lookup:

* :meth:`HashRing.owner` (plain ring lookup) when every process must name the same member for a
  key **without sharing any state** but the member list: a channel's owner worker (the
  embedded broker, ``cluster.ipc_broker``), a user's node in cluster mode
  (:func:`node_for_user`). Adding or removing one of n members moves only the keys that
  member gains or loses (about 1/n of them); a removed member's keys go to its ring
  successors, the other keys stay where they were.
* :meth:`HashRing.owner_bounded` / :meth:`HashRing.assign` (consistent hashing with bounded
  loads, Mirrokni, Thorup and Zadimoghaddam 2018) when **one decider knows every member's
  load**: placing users or connections on workers from the supervisor, or a coordinator
  assigning a batch of keys and publishing the table. A key goes to the first member
  clockwise whose load is below ``ceil(c * mean)``, so no member ever exceeds that cap,
  while most keys still land on their plain owner. Two processes only agree on bounded
  placements when they agree on the loads, which is why channels do not use it.

Hashing is blake2b with an 8-byte digest: stable across processes and runs (Python's ``hash()`` of
a ``str`` is salted per process and would give every worker a different ring). A member is
hashed by ``str(member)``: ``1`` and ``"1"`` are the same point set, so keep one type.

Cost (2-core machine shared with other work, Python 3.11, 8 members x 128 virtual nodes; best
and worst of three runs of ``python -m tidegate.cluster.ring``): ``owner()`` of a key seen
before 0.11-0.17 us (a dict hit: the channels a worker publishes to repeat; the
``crc32 % workers`` it replaced cost 0.12-0.30 us in the same runs), of a new key 1.3-2.6 us
(blake2b 0.6-1.0 us, then a bisect over the 1,024 cached sorted points); ``add``/``remove``
rebuild the points in 1.3-2.5 ms.
"""

from __future__ import annotations

import json
import math
from bisect import bisect_right
from collections.abc import Hashable, Iterable, Mapping, Sequence
from functools import lru_cache
from hashlib import blake2b
from typing import Generic, TypeVar

__all__ = [
    "EmptyRingError",
    "HashRing",
    "VNODES",
    "connect_redirect_data",
    "hash64",
    "node_for_user",
    "redirect_hint",
]

M = TypeVar("M", bound=Hashable)
VNODES = 128  # points per member: load spread within about +-10% for a handful of members
# Remembered key -> owner answers (at most ~2 MB); cleared whole when full or on change.
_CACHE_MAX = 16384


class EmptyRingError(LookupError):
    """A lookup on a ring without members."""


def _digest(key: str | bytes) -> bytes:
    # 8 big-endian bytes sort like the 64-bit number they spell: the ring bisects on them
    # directly, which saves the int conversion on the lookup path.
    return blake2b(key.encode() if isinstance(key, str) else key, digest_size=8).digest()


def hash64(key: str | bytes) -> int:
    """A stable 64-bit hash (the same in every process, run and machine)."""
    return int.from_bytes(_digest(key), "big")


class HashRing(Generic[M]):
    """Members on a 64-bit circle, ``vnodes`` points each; a key belongs to the first point
    clockwise from its hash."""

    __slots__ = ("vnodes", "_members", "_points", "_owners", "_cache")

    def __init__(self, members: Iterable[M] = (), *, vnodes: int = VNODES) -> None:
        if vnodes < 1:
            raise ValueError("vnodes must be >= 1")
        self.vnodes = vnodes
        self._members: dict[M, None] = dict.fromkeys(members)
        self._points: list[bytes] = []  # sorted 64-bit digests
        self._owners: list[M] = []  # _owners[i] holds _points[i]
        self._cache: dict[str | bytes, M] = {}
        self._rebuild()

    # ---- membership -----------------------------------------------------------------------
    @property
    def members(self) -> tuple[M, ...]:
        return tuple(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, member: object) -> bool:
        return member in self._members

    def add(self, member: M) -> bool:
        """Add a member; False if it was already there."""
        if member in self._members:
            return False
        self._members[member] = None
        self._rebuild()
        return True

    def remove(self, member: M) -> bool:
        """Remove a member (its keys go to their successors); False if it was not there."""
        if member not in self._members:
            return False
        del self._members[member]
        self._rebuild()
        return True

    def set_members(self, members: Iterable[M]) -> bool:
        """Make the membership exactly ``members``; False if nothing changed."""
        new = dict.fromkeys(members)
        if new.keys() == self._members.keys():
            return False
        self._members = new
        self._rebuild()
        return True

    def _rebuild(self) -> None:
        # Ties between two members' points (2^-64 odds) break by the member's name, so every
        # process sorts them the same way.
        pts = sorted(
            (_digest(f"{m}\x00{i}"), str(m), m) for m in self._members for i in range(self.vnodes)
        )
        self._points = [p for p, _, _ in pts]
        self._owners = [m for _, _, m in pts]
        self._cache = {}

    # ---- plain lookup -----------------------------------------------------------------------
    def owner(self, key: str | bytes) -> M:
        """The member owning ``key``. Raises :class:`EmptyRingError` on an empty ring."""
        m = self._cache.get(key)
        if m is None:
            m = self._owners[self._index(_digest(key))]
            if len(self._cache) >= _CACHE_MAX:
                self._cache = {}
            self._cache[key] = m
        return m

    def owners(self, key: str | bytes, n: int) -> list[M]:
        """Up to ``n`` distinct members in ring order from ``key``'s owner: the owner first,
        then the members that take the key over if the ones before them go away."""
        want = min(n, len(self._members))
        out: list[M] = []
        if want <= 0:
            return out
        start, owners, size = self._index(_digest(key)), self._owners, len(self._owners)
        for step in range(size):
            m = owners[(start + step) % size]
            if m not in out:
                out.append(m)
                if len(out) == want:
                    break
        return out

    def _index(self, h: bytes) -> int:
        if not self._points:
            raise EmptyRingError("the hash ring has no members")
        i = bisect_right(self._points, h)
        return 0 if i == len(self._points) else i

    # ---- bounded loads ----------------------------------------------------------------------
    def capacity(self, total: int, c: float) -> int:
        """The most keys one member may hold when ``total`` keys are placed: ceil(c * mean)."""
        if c < 1.0:
            raise ValueError("load factor c must be >= 1")
        if not self._members:
            raise EmptyRingError("the hash ring has no members")
        return math.ceil(c * total / len(self._members))

    def owner_bounded(self, key: str | bytes, loads: Mapping[M, int], c: float = 1.25) -> M:
        """Where to place one more key given the members' current ``loads`` (missing = 0): the
        first member clockwise from the key's hash whose load is below ceil(c * mean), the
        mean counting this key. Deterministic in (key, members, loads)."""
        total = sum(loads.get(m, 0) for m in self._members)
        return self._first_below(_digest(key), self.capacity(total + 1, c), loads)

    def assign(self, keys: Iterable[str], c: float = 1.25) -> dict[str, M]:
        """Place a batch of keys with bounded loads: no member gets more than
        ceil(c * len(keys) / members). The answer depends only on the key set and the
        members (keys are placed in hash order, not in the order given)."""
        ordered = sorted({(_digest(k), k) for k in keys})
        cap = self.capacity(len(ordered), c)
        loads: dict[M, int] = dict.fromkeys(self._members, 0)
        out: dict[str, M] = {}
        for h, k in ordered:
            m = self._first_below(h, cap, loads)
            loads[m] += 1
            out[k] = m
        return out

    def _first_below(self, h: bytes, cap: int, loads: Mapping[M, int]) -> M:
        start, owners, size = self._index(h), self._owners, len(self._owners)
        for step in range(size):
            m = owners[(start + step) % size]
            if loads.get(m, 0) < cap:
                return m
        # cap * members >= c * total >= total, so some member is below cap unless the loads
        # given already exceed the total they were counted into.
        raise ValueError("every member is at capacity")


# ---- cluster mode: which node a user belongs to ---------------------------------------------
@lru_cache(maxsize=8)
def _node_ring(nodes: tuple[str, ...], vnodes: int) -> HashRing[str]:
    return HashRing(nodes, vnodes=vnodes)


def node_for_user(user: str, nodes: Sequence[str], *, vnodes: int = VNODES) -> str:
    """The node ``user`` belongs to. Every node computes the same answer from the same node
    list (in any order), with no shared load state: a plain ring lookup, not bounded loads."""
    return _node_ring(tuple(sorted(nodes)), vnodes).owner(user)


def redirect_hint(user: str, this_node: str, nodes: Sequence[str]) -> str | None:
    """The node a client of ``user`` connected to ``this_node`` should go to, or None when it
    is already there. Anonymous users (``""``) belong anywhere: never redirected."""
    if not user or not nodes:
        return None
    target = node_for_user(user, nodes)
    return None if target == this_node else target


def connect_redirect_data(node: str, url: str = "") -> bytes:
    """The connect reply's ``data`` carrying a redirect hint (JSON, valid for both codecs).

    The reply stays a successful connect, so the official SDKs keep working; a client that
    knows the hint reconnects to ``url`` (or the address it maps ``node`` to).
    """
    hint = {"node": node, "url": url} if url else {"node": node}
    return json.dumps({"redirect": hint}, separators=(",", ":")).encode()


def _bench() -> None:  # pragma: no cover - prints the figures quoted in the docstring
    import timeit

    ring: HashRing[int] = HashRing(range(8))
    keys = [f"channel-{i}" for i in range(20_000)]
    n = len(keys)

    def best(fn: object, number: int) -> float:  # the least disturbed of 5 runs, per call
        return min(timeit.repeat(fn, number=number, repeat=5)) / number  # type: ignore[arg-type]

    def cold() -> None:
        ring._cache = {}
        for k in keys:
            ring.owner(k)

    new_key = best(cold, 1) * 1 / n
    ring.owner("channel-7")
    cached = best(lambda: ring.owner("channel-7"), n)
    h = best(lambda: _digest("channel-7"), n)
    rebuild = best(ring._rebuild, 5)
    print(f"8 members x {ring.vnodes} points: owner of a new key {new_key * 1e6:.2f} us, "
          f"of a cached key {cached * 1e6:.3f} us (blake2b alone {h * 1e6:.2f} us); "
          f"add/remove (rebuild) {rebuild * 1e3:.2f} ms")


if __name__ == "__main__":  # pragma: no cover
    _bench()
