"""Per-channel publication history: a bounded ring (size + TTL) with stream positions.

Each channel with history is a *stream*: publications get increasing ``offset`` s (1, 2, ...)
within an ``epoch`` (a random string naming this incarnation of the stream: when the stream is
lost - process restart, idle past ``meta_ttl_s`` - a new epoch tells clients their offsets
mean nothing any more). Only the last ``size`` publications younger than ``ttl_s`` are kept.

Recovery (a client coming back with the ``(offset, epoch)`` it last saw) succeeds when the epoch
matches and every publication after that offset is still in the ring; otherwise the client is
told "not recovered" and must reload its state.

No timers: expired publications are dropped lazily when the stream is touched, and idle streams
by :meth:`HistoryStore.prune`, which the owner calls periodically.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Callable

from tidegate.gateway.messages import ClientInfo, HistoryResult, Publication

__all__ = ["HistoryStore", "RecoveryResult", "Stream", "Unrecoverable"]


class Unrecoverable(Exception):
    """A ``since`` position this stream cannot continue from (error 112)."""


def new_epoch() -> str:
    return secrets.token_urlsafe(6)


class RecoveryResult:
    __slots__ = ("publications", "recovered", "epoch", "offset")

    def __init__(self, publications: list[Publication], recovered: bool, epoch: str, offset: int):
        self.publications = publications
        self.recovered = recovered
        self.epoch = epoch
        self.offset = offset


class Stream:
    __slots__ = ("epoch", "offset", "pubs", "ttl_ms", "touched_ms")

    def __init__(self, size: int, ttl_s: float, now_ms: int, epoch: str | None = None) -> None:
        self.epoch = epoch or new_epoch()
        self.offset = 0  # offset of the newest publication ever added (the stream top)
        self.pubs: deque[Publication] = deque(maxlen=max(1, size))
        self.ttl_ms = int(ttl_s * 1000)
        self.touched_ms = now_ms

    def resize(self, size: int, ttl_s: float) -> None:
        size = max(1, size)
        if self.pubs.maxlen != size:
            self.pubs = deque(self.pubs, maxlen=size)
        self.ttl_ms = int(ttl_s * 1000)

    def expire(self, now_ms: int) -> None:
        pubs = self.pubs
        cutoff = now_ms - self.ttl_ms
        while pubs and pubs[0].time_ms <= cutoff:
            pubs.popleft()

    def add(
        self,
        data: bytes,
        json_data: bytes | None,
        info: ClientInfo | None,
        tags: dict[str, str] | None,
        now_ms: int,
    ) -> Publication:
        self.offset += 1
        pub = Publication(data, json_data, self.offset, info, tags, now_ms)
        self.pubs.append(pub)
        self.touched_ms = now_ms
        return pub

    def get(
        self,
        limit: int,
        since: tuple[int, str] | None,
        reverse: bool,
        now_ms: int,
    ) -> list[Publication]:
        """Publications after ``since`` (or all), oldest first unless ``reverse``.

        ``limit`` < 0: no limit; 0: none (just the position). With ``reverse`` and ``since``,
        the publications *before* ``since.offset``, newest first. Raises :class:`Unrecoverable`
        when ``since`` does not belong to this stream or points at trimmed publications.
        """
        self.expire(now_ms)
        self.touched_ms = now_ms
        if limit == 0:
            if since is not None:
                self._check_since(since)
            return []
        pubs = self.pubs
        if since is None:
            items = list(reversed(pubs)) if reverse else list(pubs)
        else:
            self._check_since(since)
            offset = since[0]
            if reverse:
                items = [p for p in reversed(pubs) if p.offset < offset]
            else:
                first = pubs[0].offset if pubs else self.offset + 1
                if offset + 1 < first:
                    raise Unrecoverable("publications after this offset were trimmed")
                items = list(pubs)[offset + 1 - first :] if pubs else []
        if limit > 0:
            items = items[:limit]
        return items

    def _check_since(self, since: tuple[int, str]) -> None:
        offset, epoch = since
        if epoch != self.epoch or offset > self.offset:
            raise Unrecoverable("position not in this stream")

    def recover(self, since_offset: int, epoch: str, max_pubs: int, now_ms: int) -> RecoveryResult:
        """Publications after ``since_offset`` if the client can continue from there."""
        self.expire(now_ms)
        self.touched_ms = now_ms
        if epoch != self.epoch or since_offset > self.offset:
            return RecoveryResult([], False, self.epoch, self.offset)
        missed = self.offset - since_offset
        if missed == 0:
            return RecoveryResult([], True, self.epoch, self.offset)
        pubs = self.pubs
        if missed > len(pubs) or missed > max_pubs:
            return RecoveryResult([], False, self.epoch, self.offset)
        items = list(pubs)[len(pubs) - missed :]
        return RecoveryResult(items, True, self.epoch, self.offset)


class HistoryStore:
    """Streams of one process (the in-memory broker's history)."""

    __slots__ = ("streams", "meta_ttl_ms", "clock")

    def __init__(
        self, meta_ttl_s: float = 30 * 24 * 3600.0, clock: Callable[[], float] = time.time
    ):
        self.streams: dict[str, Stream] = {}
        self.meta_ttl_ms = int(meta_ttl_s * 1000)
        self.clock = clock

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def stream(self, channel: str, size: int, ttl_s: float) -> Stream:
        s = self.streams.get(channel)
        now_ms = self._now_ms()
        if s is None:
            s = self.streams[channel] = Stream(size, ttl_s, now_ms)
        elif now_ms - s.touched_ms > self.meta_ttl_ms:
            s = self.streams[channel] = Stream(size, ttl_s, now_ms)  # a new incarnation
        else:
            s.resize(size, ttl_s)
        return s

    def add(
        self,
        channel: str,
        data: bytes,
        json_data: bytes | None,
        *,
        size: int,
        ttl_s: float,
        info: ClientInfo | None = None,
        tags: dict[str, str] | None = None,
    ) -> Publication:
        return self.stream(channel, size, ttl_s).add(data, json_data, info, tags, self._now_ms())

    def history(
        self,
        channel: str,
        *,
        size: int,
        ttl_s: float,
        limit: int = -1,
        since: tuple[int, str] | None = None,
        reverse: bool = False,
    ) -> HistoryResult:
        s = self.stream(channel, size, ttl_s)
        pubs = s.get(limit, since, reverse, self._now_ms())
        return HistoryResult(pubs, s.epoch, s.offset)

    def recover(
        self,
        channel: str,
        since_offset: int,
        epoch: str,
        *,
        size: int,
        ttl_s: float,
        max_pubs: int,
    ) -> RecoveryResult:
        s = self.stream(channel, size, ttl_s)
        return s.recover(since_offset, epoch, max_pubs, self._now_ms())

    def remove(self, channel: str) -> None:
        self.streams.pop(channel, None)

    def prune(self) -> int:
        """Drop expired publications everywhere and streams idle past the meta TTL."""
        now_ms = self._now_ms()
        dead = []
        for channel, s in self.streams.items():
            s.expire(now_ms)
            if now_ms - s.touched_ms > self.meta_ttl_ms:
                dead.append(channel)
        for channel in dead:
            del self.streams[channel]
        return len(dead)
