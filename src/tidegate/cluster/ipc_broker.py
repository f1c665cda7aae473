"""The embedded broker of one node: channels shared by all worker processes, no Redis.

Each channel has one **owner** worker: the owner keeps its history (offsets, epoch) and
presence, so a stream's offsets come from one place, and the streams spread over the workers.
The owner is the channel's place on a consistent-hash ring (``cluster.ring``) over the live
workers; every worker builds the same ring from the same member list, so they agree without
asking anyone. Publications travel as one control message to the supervisor, which relays it
to every other worker; each worker fans it out to its own subscribers with the frame encoded
once.

Requests to an owner (publish with history, history, recover, presence) and their replies go
through the supervisor too (``control.TO``). Both ends are our own processes, so messages are
pickled.

Sessions that move between workers (work stealing) miss nothing relayed meanwhile: every relay
carries its origin and a per-worker stamp, and each worker keeps a relay log of what it
delivered (gateway/relaylog.py) from which an imported session gets what the move skipped.
The HTTP API's actions on users' sessions (``subscribe``, ``unsubscribe``, ``disconnect``:
the session commands, :meth:`IpcBroker.register_session_command`) travel the same way, as a
stamped relay that every worker applies the moment it handles it and answers with ``TO``
(:meth:`IpcBroker.call_all`): a session in flight gets the command on import, once, in order
with the publications around it. On boot each worker says hello to every other (the stamps
they stand at), through the same ordered channels, before it lets a session move out.

Workers dying and coming back: the supervisor tells every worker which workers are up
(``control.MEMBERS``) whenever that changes. A dead worker leaves the ring, so its channels
go to their ring successors at once and the other channels stay put; calls that were waiting
on it fail fast (reads and presence updates are sent again to the new owner, a publish is not:
it may have been stored and delivered already). What it held in memory (history, presence)
died with it: the successor starts those streams with a new epoch, so clients that recover
are told to reload instead of being told nothing was missed. When the worker is back (ready),
it takes its share back, empty again; the successor drops what it kept for those channels in
the meantime, so a later failover cannot resurrect a stale stream. A request that reaches a
worker which no longer owns the channel (ring views differ for a moment) is forwarded once
to the owner it sees.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import pickle
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from tidegate import log
from tidegate.cluster.ring import HashRing
from tidegate.engine import control
from tidegate.gateway.broker import Broker, BrokerError, BrokerEventHandler, MemoryBroker
from tidegate.gateway.history import RecoveryResult
from tidegate.gateway.messages import ClientInfo, HistoryResult, Publication
from tidegate.gateway.relaylog import CMD, RelayLog
from tidegate.observe.histogram import Histogram
from tidegate.observe.tracing import PUBLISH_TRACEPARENT, TRACING

if TYPE_CHECKING:
    from tidegate.engine.worker import Worker

_log = log.get("ipc_broker")
REQUEST_TIMEOUT_S = 5.0


class BrokerUnavailable(BrokerError):
    """The channel's owner did not answer in time (it may be restarting)."""


class WorkerGone(BrokerUnavailable):
    """The worker a call went to is down (or died before answering)."""


# The owned stores' methods: the first argument is the channel.
_STORE_METHODS = ("publish", "history", "recover", "remove_history", "add_presence",
                  "remove_presence", "presence", "presence_stats")
# Safe to send again to the new owner when the old one died mid-call. Not publish: the dead
# owner may have stored and delivered it already.
_STORED = frozenset(_STORE_METHODS)
_RETRY_SAFE = _STORED - {"publish"}
# Presence updates: one per subscribe and per unsubscribe, all of a hot channel's going to its
# one owner. They wait in a per-target outbox until the end of the loop turn and go as one
# message (so do the owner's answers), and the owner applies them inline, without a task each.
# 60,000 subscribes to one channel over 27 workers otherwise timed out on the owner (5,584
# established; see bench/results/2026-11-27-ws-60k-presence-batching.json).
_BATCHED = frozenset({"add_presence", "remove_presence"})
_BATCH = b"\x00"  # marks a batch: pickled bodies start with b"\x80"
_BATCH_MAX_BYTES = 256 << 10


def worker_ring(workers: int) -> HashRing[int]:
    """The ring of channel owners every worker starts from: all worker indices."""
    return HashRing(range(workers))


class IpcBroker(Broker):
    # Sessions run broker calls synchronously until one really waits (a remote owner), and
    # only then in a task: nothing here needs a current task (no asyncio.timeout).
    inline = True

    def __init__(self, index: int, workers: int, history_meta_ttl_s: float = 30 * 24 * 3600.0):
        self.index = index
        self.workers = workers
        # What this worker owns lives in an in-process broker; its deliveries go everywhere.
        self.local = MemoryBroker(history_meta_ttl_s)
        self.local.register(_Deliver(self))
        self._handler: BrokerEventHandler | None = None
        self._worker: Worker | None = None
        self._rids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future[Any], int]] = {}  # rid: (reply, target)
        self.publish_latency = Histogram()  # publish() until the owner has stored it
        self.errors = 0
        # Live workers only: until the supervisor says otherwise, all of them.
        self.ring: HashRing[int] = worker_ring(workers)
        self.ring_changes = 0
        self.rerouted = 0  # calls sent on to the new owner (retried or forwarded)
        self.dropped_channels = 0  # channels whose state left with their ownership
        # Callables other workers may run here by name: the owned stores' methods, plus what
        # the node registers (API actions on local sessions, per-worker counts).
        self._services: dict[str, Callable[..., Any]] = {
            name: getattr(self.local, name) for name in _STORE_METHODS
        }
        # One worker relays nothing: nothing to log, no session ever moves.
        self.relay_log = RelayLog(index) if workers > 1 else None
        self._wait_timer: asyncio.TimerHandle | None = None
        if self.relay_log is not None:
            self._services["relay_hello"] = self._on_hello
        # Presence updates applied inline at the owner (see _BATCHED): the store's own calls.
        store = self.local.presence_store
        self._inline: dict[str, Callable[..., Any]] = {
            "add_presence": store.add, "remove_presence": store.remove}
        # Messages to each worker waiting for the end of this loop turn: (body, rid or None).
        self._outbox: dict[int, list[tuple[bytes, int | None]]] = {}
        self.batches_sent = 0
        self.batched_messages = 0

    def attach(self, worker: Worker) -> None:
        """Start receiving: called in the worker once its control channel is up."""
        self._worker = worker
        worker.on_control(control.RELAY, self._on_relay)
        worker.on_control(control.TO, self._on_direct)
        worker.on_control(control.MEMBERS, self._on_members)
        if self.relay_log is not None:
            self.relay_log.schedule = self._arm_wait_timer
            # A window widened on purpose (fault injection) is still one the log must cover.
            self.relay_log.max_age_s += worker.opts.steal_adopt_delay_ms / 1000
            self._hello()

    def register(self, handler: BrokerEventHandler) -> None:
        self._handler = handler

    def stats(self) -> dict[str, Any]:
        return {
            "broker_publish_seconds": self.publish_latency.snapshot(),
            "broker_errors_total": self.errors,
            "broker_ring_members": sorted(self.ring.members),  # a list: not a metric
            "broker_ring_changes_total": self.ring_changes,
            "broker_rerouted_total": self.rerouted,
            "broker_dropped_channels_total": self.dropped_channels,
            "broker_batches_sent_total": self.batches_sent,
            "broker_batched_messages_total": self.batched_messages,
            **(self.relay_log.stats() if self.relay_log is not None else {}),
        }

    # ---- membership -------------------------------------------------------------------
    def owner(self, channel: str) -> int:
        """The live worker that owns ``channel`` (the ring never runs empty: see set_members)."""
        return self.ring.owner(channel)

    def _on_members(self, body: bytes) -> None:
        self.set_members(int(x) for x in body.split(b",") if x)

    def set_members(self, live: Iterable[int]) -> None:
        """The workers that are up now. Channels of the ones that left go to their ring
        successors; calls waiting on those fail at once (WorkerGone) instead of timing out;
        state for channels this worker no longer owns is dropped."""
        members = sorted({i for i in live if 0 <= i < self.workers}) or [self.index]
        if not self.ring.set_members(members):
            return
        self.ring_changes += 1
        for fut, target in list(self._pending.values()):
            if target not in self.ring and not fut.done():
                fut.set_exception(WorkerGone(f"worker {target} went away"))
        dropped = self._drop_unowned()
        _log.info("channel owners changed",
                  extra={"members": members, "dropped_channels": dropped})

    def _drop_unowned(self) -> int:
        """Forget history and presence of channels owned elsewhere now (handed back to a
        returning worker): kept, they could come back stale in a later failover."""
        history, presence = self.local.history_store, self.local.presence_store
        gone = {c for c in (*history.streams, *presence.names()) if self.owner(c) != self.index}
        for channel in gone:
            history.remove(channel)
            presence.drop(channel)
        self.dropped_channels += len(gone)
        return len(gone)

    # ---- the relay log: hellos, waiting sessions ------------------------------------------
    def _hello(self) -> None:
        """Tell every other worker where our stamps stand, and ask where theirs do (see
        gateway/relaylog.py). Sent now, before anything we relay: each reaches its target
        ahead of our first relay there."""
        log, w = self.relay_log, self._worker
        assert log is not None and w is not None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        futs = []
        msg: tuple[Any, ...]
        for target in range(self.workers):
            if target == self.index:
                continue
            rid = next(self._rids)
            fut: asyncio.Future[Any] = loop.create_future()
            self._pending[rid] = (fut, target)
            msg = (rid, self.index, "relay_hello", (self.index, log.top), {}, None, 0)
            body = pickle.dumps(msg, pickle.HIGHEST_PROTOCOL)
            if not self._send_to(target, body):
                fut.set_exception(BrokerUnavailable(f"cannot reach worker {target}"))
            fut.add_done_callback(functools.partial(self._helloed, rid, target))
            futs.append(fut)
        log.ready = False
        timer = loop.call_later(REQUEST_TIMEOUT_S, _expire_all, futs, "relay_hello")
        asked = set(futs)

        def answered(fut: asyncio.Future[Any]) -> None:
            asked.discard(fut)
            if not asked:
                timer.cancel()
                log.ready = True

        for fut in futs:
            fut.add_done_callback(answered)

    def _helloed(self, rid: int, target: int, fut: asyncio.Future[Any]) -> None:
        self._pending.pop(rid, None)
        log = self.relay_log
        assert log is not None
        if fut.cancelled() or fut.exception() is not None:
            log.hello_failed(target)  # down (or unreachable): it will send nothing more
        else:
            log.hello(target, fut.result())
        log.release()

    def _on_hello(self, origin: int, top: int) -> int:
        log = self.relay_log
        assert log is not None
        log.hello(origin, top)
        log.release()
        return log.top  # the reply goes after every relay we sent before it

    def _arm_wait_timer(self, delay: float) -> None:
        if self._wait_timer is None:
            loop = asyncio.get_running_loop()
            self._wait_timer = loop.call_later(delay, self._expire_waits)

    def _expire_waits(self) -> None:
        self._wait_timer = None
        assert self.relay_log is not None
        delay = self.relay_log.expire()
        if delay is not None:
            self._arm_wait_timer(delay)

    # ---- sending ----------------------------------------------------------------------
    def _relay(self, msg: tuple[Any, ...]) -> bool:
        if self._worker is not None and self.workers > 1:
            body = pickle.dumps(msg, pickle.HIGHEST_PROTOCOL)
            self._flush()  # what this worker sent before goes before
            return self._worker.send_control(control.RELAY, body)
        return False

    def _send_to(self, target: int, body: bytes, rid: int | None = None,
                 batch: bool = False) -> bool:
        """Send ``body`` to worker ``target`` through the supervisor: at once, or with
        ``batch`` at the end of this loop turn with the others waiting for it. Either way in
        the order sent: an immediate message first sends what waits."""
        w = self._worker
        if w is None:
            return False
        if batch:  # a channel that turns out to be down fails the call at the flush
            if not self._outbox:
                asyncio.get_running_loop().call_soon(self._flush)
            self._outbox.setdefault(target, []).append((body, rid))
            return True
        self._flush()
        return w.send_control(control.TO, target.to_bytes(2, "big") + body)

    def _flush(self) -> None:
        """Send every outbox: one message per target (or per _BATCH_MAX_BYTES)."""
        if not self._outbox or self._worker is None:
            return
        outbox, self._outbox = self._outbox, {}
        for target, items in outbox.items():
            head = target.to_bytes(2, "big")
            start = 0
            while start < len(items):
                end, size = start, 0
                while end < len(items) and (end == start or size < _BATCH_MAX_BYTES):
                    size += len(items[end][0])
                    end += 1
                chunk = items[start:end]
                if len(chunk) == 1:
                    data = chunk[0][0]
                else:
                    data = _BATCH + pickle.dumps([b for b, _ in chunk], pickle.HIGHEST_PROTOCOL)
                    self.batches_sent += 1
                    self.batched_messages += len(chunk)
                if not self._worker.send_control(control.TO, head + data):
                    for _, rid in chunk:
                        fut = self._pending.get(rid, (None, 0))[0] if rid is not None else None
                        if fut is not None and not fut.done():
                            fut.set_exception(BrokerUnavailable(f"cannot reach worker {target}"))
                start = end

    def _deliver_everywhere(self, kind: str, channel: str, obj: Any) -> None:
        tp = PUBLISH_TRACEPARENT.get()
        log = self.relay_log
        if log is not None:
            stamp = log.stamp()
            # Relay first: the other workers fan out while this one does, not after it.
            self._relay((kind, channel, obj, tp, self.index, stamp))
            log.add(self.index, stamp, kind, channel, obj)
        self._deliver_here(kind, channel, obj, tp)

    def _deliver_here(self, kind: str, channel: str, obj: Any, tp: str | None = None) -> None:
        h = self._handler
        if h is None:
            return
        if kind == "pub":
            if tp is not None and TRACING.enabled:
                parent = TRACING.context_from(tp)
                with TRACING.span("deliver", parent, **{"tidegate.channel": channel,
                                                        "tidegate.worker": self.index}):
                    h.handle_publication(channel, obj)
                return
            h.handle_publication(channel, obj)
        elif kind == "join":
            h.handle_join(channel, obj)
        else:
            h.handle_leave(channel, obj)

    def register_service(self, name: str, fn: Callable[..., Any]) -> None:
        """Let any worker run ``fn`` here through :meth:`call` / :meth:`call_all`."""
        self._services[name] = fn

    def register_session_command(self, name: str, on_session: Callable[..., Any]) -> None:
        """Make service ``name`` (registered too: ``fn(user, client, *args)``, acting on this
        worker's sessions of that user) a session command: :meth:`call_all` stamps and relays
        it, and a session that moves meanwhile gets ``on_session(session, *args)`` on import."""
        if self.relay_log is not None:
            self.relay_log.commands[name] = on_session

    async def _call(self, channel: str, method: str, *args: Any, **kw: Any) -> Any:
        """Run a store method on the channel's owner, here or over IPC."""
        try:
            return await self.call(self.owner(channel), method, channel, *args, **kw)
        except WorkerGone:
            if method not in _RETRY_SAFE:
                raise
            self.rerouted += 1  # the owner died mid-call: ask its successor
            return await self.call(self.owner(channel), method, channel, *args, **kw)

    async def call(self, target: int, name: str, *args: Any, **kw: Any) -> Any:
        """Run service ``name`` on worker ``target`` and return its result (or raise its error)."""
        if target == self.index or self._worker is None:
            return await _result(self._services[name](*args, **kw))
        return await self._call_remote(target, name, args, kw, 0)

    async def _call_remote(self, target: int, name: str, args: Any, kw: Any, hops: int) -> Any:
        try:
            if target not in self.ring:
                raise WorkerGone(f"worker {target} is down")
            return await self._remote(target, name, args, kw, hops)
        except Exception:
            self.errors += 1
            raise

    async def _remote(self, target: int, name: str, args: Any, kw: Any, hops: int) -> Any:
        assert self._worker is not None
        rid = next(self._rids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = (fut, target)
        msg = (rid, self.index, name, args, kw, PUBLISH_TRACEPARENT.get(), hops)
        body = pickle.dumps(msg, pickle.HIGHEST_PROTOCOL)
        loop = asyncio.get_running_loop()
        timer = loop.call_later(REQUEST_TIMEOUT_S, _expire, fut, f"worker {target}: {name}")
        try:
            if not self._send_to(target, body, rid, batch=name in _BATCHED):
                raise BrokerUnavailable(f"cannot reach worker {target}")
            return await fut
        finally:
            timer.cancel()
            self._pending.pop(rid, None)

    async def call_all(self, name: str, *args: Any, **kw: Any) -> list[Any]:
        """Run service ``name`` on every worker; results in worker order (errors included)."""
        log = self.relay_log
        if log is not None and name in log.commands and self._worker is not None and not kw:
            return await self._command_all(log, name, args)
        coros = [self.call(i, name, *args, **kw) for i in range(self.workers)]
        return list(await asyncio.gather(*coros, return_exceptions=True))

    async def _command_all(self, log: RelayLog, name: str, args: tuple[Any, ...]) -> list[Any]:
        """A session command: one stamped relay, applied here at once and by every other
        worker the moment it handles it (see the module doc); each live one answers."""
        loop = asyncio.get_running_loop()
        futs: dict[int, asyncio.Future[Any]] = {}
        rids: dict[int, int] = {}
        for target in range(self.workers):
            if target != self.index and target in self.ring:
                rid = next(self._rids)
                futs[target] = loop.create_future()
                self._pending[rid] = (futs[target], target)
                rids[target] = rid
        stamp = log.stamp()
        sent = self._relay((CMD, name, (args, rids), PUBLISH_TRACEPARENT.get(), self.index, stamp))
        log.add(self.index, stamp, CMD, name, args)
        here: Any
        try:
            here = self._services[name](*args)
            if inspect.isawaitable(here):  # its rest runs while the others answer
                here = asyncio.ensure_future(here)
        except Exception as exc:
            here = exc
        if not sent:
            for fut in futs.values():
                fut.set_exception(BrokerUnavailable("cannot relay"))
        timer = loop.call_later(REQUEST_TIMEOUT_S, _expire_all, list(futs.values()), name)
        out: list[Any] = []
        try:
            for i in range(self.workers):
                try:
                    if i == self.index:
                        if isinstance(here, Exception):
                            raise here
                        out.append(await _result(here))
                    elif i in futs:
                        out.append(await futs[i])
                    else:
                        raise WorkerGone(f"worker {i} is down")
                except Exception as exc:
                    if i != self.index:
                        self.errors += 1
                    out.append(exc)
        finally:
            timer.cancel()
            for rid in rids.values():
                self._pending.pop(rid, None)
        return out

    # ---- receiving --------------------------------------------------------------------
    def _on_relay(self, body: bytes) -> None:
        kind, channel, obj, tp, origin, stamp = pickle.loads(body)
        log = self.relay_log
        if kind == CMD:
            self._run_command(origin, stamp, channel, obj, tp)
        else:
            if log is not None:
                log.add(origin, stamp, kind, channel, obj)
            self._deliver_here(kind, channel, obj, tp)
        if log is not None and log.waiting:  # after delivery: the log then has this one too
            log.release()

    def _run_command(self, origin: int, stamp: int, name: str, payload: Any,
                     tp: str | None) -> None:
        """A session command another worker relayed: applied now (its stamp is handled now),
        answered when done if its sender waits for us."""
        args, rids = payload
        if self.relay_log is not None:
            self.relay_log.add(origin, stamp, CMD, name, args)
        token = PUBLISH_TRACEPARENT.set(tp)
        try:
            value = self._services[name](*args)
            ok = True
        except Exception as exc:
            value, ok = exc, False
        finally:
            PUBLISH_TRACEPARENT.reset(token)
        rid = rids.get(self.index)
        if ok and inspect.isawaitable(value):
            asyncio.get_running_loop().create_task(self._finish_command(origin, rid, value, tp))
        elif rid is not None:
            self._answer(origin, (rid, None, ok, value))

    async def _finish_command(self, origin: int, rid: int | None, aw: Any, tp: str | None) -> None:
        PUBLISH_TRACEPARENT.set(tp)
        try:
            reply = (rid, None, True, await aw)
        except Exception as exc:
            reply = (rid, None, False, exc)
        if rid is not None:
            self._answer(origin, reply)

    def _answer(self, origin: int, reply: tuple[Any, ...], batch: bool = False) -> None:
        if self._worker is not None:
            data = pickle.dumps(reply, pickle.HIGHEST_PROTOCOL)
            self._send_to(origin, data, batch=batch)

    def _on_direct(self, body: bytes) -> None:
        if body[:1] == _BATCH:
            for one in pickle.loads(body[1:]):
                self._on_direct_one(one)
        else:
            self._on_direct_one(body)

    def _on_direct_one(self, body: bytes) -> None:
        msg = pickle.loads(body)
        if msg[1] is None:  # a reply: (rid, None, ok, value)
            fut = self._pending.get(msg[0], (None, 0))[0]
            if fut is not None and not fut.done():
                if msg[2]:
                    fut.set_result(msg[3])
                else:
                    fut.set_exception(msg[3])
            return
        rid, origin, name, args, kw, _tp, hops = msg
        inline = self._inline.get(name)
        if inline is not None and (hops or self.owner(args[0]) == self.index):
            try:
                reply: tuple[Any, ...] = (rid, None, True, inline(*args, **kw))
            except Exception as exc:
                reply = (rid, None, False, exc)
            self._answer(origin, reply, batch=True)
            return
        asyncio.get_running_loop().create_task(self._serve(msg))

    async def _serve(self, msg: tuple[Any, ...]) -> None:
        rid, origin, name, args, kw, tp, hops = msg
        PUBLISH_TRACEPARENT.set(tp)  # this task's own context: delivery joins the caller's trace
        try:
            owner = self.owner(args[0]) if name in _STORED else None
            if owner is not None and owner != self.index and hops == 0:
                # The caller's ring differs from ours for a moment: the owner we see serves it
                # (once; the next hop serves whatever it thinks, so views cannot ping-pong).
                self.rerouted += 1
                value = await self._call_remote(owner, name, args, kw, hops + 1)
            else:
                value = await _result(self._services[name](*args, **kw))
            reply = (rid, None, True, value)
        except Exception as exc:  # the caller gets the same exception (e.g. Unrecoverable)
            reply = (rid, None, False, exc)
        self._answer(origin, reply)

    # ---- Broker -------------------------------------------------------------------------
    async def publish(
        self,
        channel: str,
        data: bytes,
        json_data: bytes | None,
        *,
        info: ClientInfo | None = None,
        tags: dict[str, str] | None = None,
        history_size: int = 0,
        history_ttl_s: float = 0.0,
    ) -> Publication:
        kw = dict(info=info, tags=tags, history_size=history_size, history_ttl_s=history_ttl_s)
        t0 = time.perf_counter()
        try:
            if history_size > 0 and history_ttl_s > 0:
                pub: Publication = await self._call(channel, "publish", data, json_data, **kw)
                return pub
            # No stream: no owner needed, deliver from here.
            return await self.local.publish(channel, data, json_data, **kw)  # type: ignore[arg-type]
        finally:
            self.publish_latency.observe(time.perf_counter() - t0)

    async def publish_join(self, channel: str, info: ClientInfo) -> None:
        self._deliver_everywhere("join", channel, info)

    async def publish_leave(self, channel: str, info: ClientInfo) -> None:
        self._deliver_everywhere("leave", channel, info)

    async def subscribe(self, channel: str) -> None:
        return None  # every worker receives every relay; the hub drops what it has no use for

    async def unsubscribe(self, channel: str) -> None:
        return None

    async def history(self, channel: str, **kw: Any) -> HistoryResult:
        result: HistoryResult = await self._call(channel, "history", **kw)
        return result

    async def recover(self, channel: str, since_offset: int, epoch: str, **kw: Any) -> RecoveryResult:
        result: RecoveryResult = await self._call(channel, "recover", since_offset, epoch, **kw)
        return result

    async def remove_history(self, channel: str) -> None:
        await self._call(channel, "remove_history")

    async def add_presence(self, channel: str, info: ClientInfo) -> None:
        await self._call(channel, "add_presence", info)

    async def remove_presence(self, channel: str, client: str) -> None:
        await self._call(channel, "remove_presence", client)

    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        result: dict[str, ClientInfo] = await self._call(channel, "presence")
        return result

    async def presence_stats(self, channel: str) -> tuple[int, int]:
        result: tuple[int, int] = await self._call(channel, "presence_stats")
        return result


def _expire(fut: asyncio.Future[Any], what: str) -> None:
    if not fut.done():
        fut.set_exception(BrokerUnavailable(f"no answer in {REQUEST_TIMEOUT_S:g} s from {what}"))


def _expire_all(futs: list[asyncio.Future[Any]], what: str) -> None:
    for fut in futs:
        _expire(fut, what)


async def _result(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class _Deliver:
    """The local store's event handler: what the owner stores is delivered on every worker."""

    __slots__ = ("broker",)

    def __init__(self, broker: IpcBroker) -> None:
        self.broker = broker

    def handle_publication(self, channel: str, pub: Publication) -> None:
        self.broker._deliver_everywhere("pub", channel, pub)

    def handle_join(self, channel: str, info: ClientInfo) -> None:
        self.broker._deliver_everywhere("join", channel, info)

    def handle_leave(self, channel: str, info: ClientInfo) -> None:
        self.broker._deliver_everywhere("leave", channel, info)


