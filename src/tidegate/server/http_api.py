"""Centrifugo's server HTTP API: ``POST /api/<method>`` with a JSON body and ``X-API-Key``.

Request and response shapes are Centrifugo's (v5), so the ``cent`` client works unchanged:
``{"result": {...}}`` on success, ``{"error": {"code": N, "message": "..."}}`` for an API
error (HTTP 200), HTTP 401 for a missing or wrong key, 400 for a body that is not JSON.
Actions on users' connections (subscribe, unsubscribe, disconnect) and node-wide counts run on
every worker of the node. The actions are session commands (``SESSION_COMMANDS``): the
embedded broker relays them in order with the publications, so a session that moves between
workers meanwhile gets them on arrival (cluster/ipc_broker.py, gateway/relaylog.py).
"""

from __future__ import annotations

import base64
import fnmatch
import hmac
import inspect
import json
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any

from tidegate import __version__, log
from tidegate.gateway import codes
from tidegate.gateway.codec_json import json_value
from tidegate.gateway.codes import Disconnect, ReplyError
from tidegate.gateway.history import Unrecoverable
from tidegate.gateway.messages import ClientInfo, Publication
from tidegate.gateway.node import Node, Resume
from tidegate.observe.tracing import PUBLISH_TRACEPARENT, TRACING

if TYPE_CHECKING:
    from tidegate.gateway.session import ClientSession

_log = log.get("api")
CallAll = Callable[..., Awaitable[list[Any]]]

ERROR_UNKNOWN_CHANNEL = 102
ERROR_METHOD_NOT_FOUND = 104
ERROR_BAD_REQUEST = 107
ERROR_NOT_AVAILABLE = 108
ERROR_UNRECOVERABLE = 112


class ApiError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _err(code: int, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


def _raw_json(data: bytes | None) -> Any:
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None


def client_info_json(info: ClientInfo | None) -> dict[str, Any] | None:
    if info is None:
        return None
    out: dict[str, Any] = {"client": info.client, "user": info.user}
    if info.conn_info is not None:
        out["conn_info"] = _raw_json(info.conn_info)
    if info.chan_info is not None:
        out["chan_info"] = _raw_json(info.chan_info)
    return out


def publication_json(pub: Publication) -> dict[str, Any]:
    out: dict[str, Any] = {"offset": pub.offset}
    if pub.json_data is not None:
        out["data"] = _raw_json(pub.json_data)
    else:
        out["b64data"] = base64.b64encode(pub.data).decode()
    if pub.tags:
        out["tags"] = pub.tags
    if pub.info is not None:
        out["info"] = client_info_json(pub.info)
    return out


class HttpApi:
    def __init__(self, node: Node, call_all: CallAll | None = None, node_name: str = "") -> None:
        self.node = node
        self.api_key = node.config.api_key
        self._call_all = call_all
        self.started = time.time()
        self.node_name = node_name or "tidegate"
        self.requests: dict[str, int] = {}
        self.methods: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            "publish": self.publish,
            "broadcast": self.broadcast,
            "subscribe": self.subscribe,
            "unsubscribe": self.unsubscribe,
            "disconnect": self.disconnect,
            "presence": self.presence,
            "presence_stats": self.presence_stats,
            "history": self.history,
            "history_remove": self.history_remove,
            "channels": self.channels,
            "info": self.info,
            "debug_leaks": self.debug_leaks,
            "debug_trace": self.debug_trace,
        }

    async def _everywhere(self, name: str, *args: Any) -> list[Any]:
        if self._call_all is None:
            fn = LOCAL_SERVICES.get(name, api_info)
            result = fn(self.node, *args)
            return [await result if inspect.isawaitable(result) else result]
        results = await self._call_all(name, *args)
        return [r for r in results if not isinstance(r, BaseException)]

    def _count(self, what: str) -> None:
        self.requests[what] = self.requests.get(what, 0) + 1

    # ---- the HTTP entry point ------------------------------------------------------------
    async def handle(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, bytes]:
        if not self._authorized(headers):
            self._count("unauthorized")
            return 401, b'{"error":{"code":101,"message":"unauthorized"}}'
        name = path[len("/api/") :] if path.startswith("/api/") else ""
        if method != "POST" or not name:
            self._count("not_found")
            return 404, b'{"error":{"code":104,"message":"method not found"}}'
        try:
            params = json.loads(body or b"{}")
            if not isinstance(params, dict):
                raise ValueError("body is not a JSON object")
        except ValueError:
            self._count("bad_json")
            return 400, _err(ERROR_BAD_REQUEST, "bad request: body is not a JSON object")
        fn = self.methods.get(name)
        if fn is None:
            self._count("method_not_found")
            return 200, _err(ERROR_METHOD_NOT_FOUND, "method not found")
        traceparent = headers.get("traceparent") if TRACING.enabled else None
        if not traceparent and not TRACING.sample_root():  # a caller's trace is always followed
            return await self._call(name, fn, params)
        parent = TRACING.context_from(traceparent)
        with TRACING.span(f"api.{name}", parent, **_span_attrs(params)) as span:
            token = PUBLISH_TRACEPARENT.set(TRACING.traceparent(span))
            try:
                status, body = await self._call(name, fn, params)
            finally:
                PUBLISH_TRACEPARENT.reset(token)
            span.set_attribute("http.status_code", status)
            return status, body

    async def _call(self, name: str, fn: Any, params: dict[str, Any]) -> tuple[int, bytes]:
        try:
            result = await fn(params)
        except ApiError as exc:
            self._count(f"error_{exc.code}")
            return 200, _err(exc.code, exc.message)
        except ReplyError as exc:
            self._count(f"error_{exc.code}")
            return 200, _err(exc.code, str(exc))
        except Exception:
            _log.exception("API call failed", extra={"method": name})
            self._count("internal")
            return 200, _err(100, "internal server error")
        self._count(name)
        return 200, json.dumps({"result": result}, separators=(",", ":")).encode()

    def _authorized(self, headers: Mapping[str, str]) -> bool:
        if not self.api_key:
            return False  # no key configured: the API is off
        given = headers.get("x-api-key", "")
        if not given:
            auth = headers.get("authorization", "")
            scheme, _, value = auth.partition(" ")
            if scheme.lower() == "apikey":
                given = value.strip()
        return bool(given) and hmac.compare_digest(given.encode(), self.api_key.encode())

    # ---- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _str(params: dict[str, Any], key: str, required: bool = True) -> str:
        v = params.get(key, "")
        if not isinstance(v, str) or (required and not v):
            raise ApiError(ERROR_BAD_REQUEST, f"bad request: {key} required")
        return v

    def _payload(self, params: dict[str, Any]) -> tuple[bytes, bytes | None]:
        if "b64data" in params and params["b64data"]:
            try:
                raw = base64.b64decode(self._str(params, "b64data"), validate=True)
            except ValueError:
                raise ApiError(ERROR_BAD_REQUEST, "bad request: b64data") from None
            return raw, json_value(raw)
        if "data" not in params:
            raise ApiError(ERROR_BAD_REQUEST, "bad request: data required")
        data = json.dumps(params["data"], separators=(",", ":"), ensure_ascii=False).encode()
        return data, data

    def _options(self, channel: str) -> Any:
        opts = self.node.config.channel_options(channel)
        if opts is None:
            raise ApiError(ERROR_UNKNOWN_CHANNEL, "unknown channel")
        return opts

    async def _publish_one(self, channel: str, data: bytes, json_data: bytes | None,
                           params: dict[str, Any]) -> dict[str, Any]:
        opts = self._options(channel)
        tags = params.get("tags") or None
        if params.get("skip_history"):
            await self.node.broker.publish(channel, data, json_data, tags=tags)
            return {}
        pub = await self.node.hub.publish(channel, data, tags=tags, json_data=json_data)
        if not opts.history_enabled:
            return {}
        top = await self.node.broker.history(
            channel, history_size=opts.history_size, history_ttl_s=opts.history_ttl_s, limit=0
        )
        return {"offset": pub.offset, "epoch": top.epoch}

    # ---- methods ---------------------------------------------------------------------------
    async def publish(self, params: dict[str, Any]) -> dict[str, Any]:
        data, json_data = self._payload(params)
        return await self._publish_one(self._str(params, "channel"), data, json_data, params)

    async def broadcast(self, params: dict[str, Any]) -> dict[str, Any]:
        channels = params.get("channels")
        if not isinstance(channels, list) or not channels:
            raise ApiError(ERROR_BAD_REQUEST, "bad request: channels required")
        data, json_data = self._payload(params)
        responses: list[dict[str, Any]] = []
        for ch in channels:
            try:
                if not isinstance(ch, str) or not ch:
                    raise ApiError(ERROR_BAD_REQUEST, "bad request: channel")
                responses.append({"result": await self._publish_one(ch, data, json_data, params)})
            except ApiError as exc:
                responses.append({"error": {"code": exc.code, "message": exc.message}})
        return {"responses": responses}

    async def subscribe(self, params: dict[str, Any]) -> dict[str, Any]:
        user, channel = self._str(params, "user"), self._str(params, "channel")
        self._options(channel)
        await self._everywhere("api_subscribe", user, params.get("client") or "", channel)
        return {}

    async def unsubscribe(self, params: dict[str, Any]) -> dict[str, Any]:
        user, channel = self._str(params, "user"), self._str(params, "channel")
        await self._everywhere("api_unsubscribe", user, params.get("client") or "", channel)
        return {}

    async def disconnect(self, params: dict[str, Any]) -> dict[str, Any]:
        user = self._str(params, "user")
        d = params.get("disconnect") or {}
        code = int(d.get("code", codes.DISCONNECT_FORCE_NO_RECONNECT.code))
        reason = str(d.get("reason", codes.DISCONNECT_FORCE_NO_RECONNECT.reason))
        whitelist = params.get("whitelist") or []
        await self._everywhere("api_disconnect", user, params.get("client") or "", code, reason,
                               list(whitelist))
        return {}

    async def presence(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = self._str(params, "channel")
        if not self._options(channel).presence:
            raise ApiError(ERROR_NOT_AVAILABLE, "not available")
        entries = await self.node.broker.presence(channel)
        return {"presence": {k: client_info_json(v) for k, v in entries.items()}}

    async def presence_stats(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = self._str(params, "channel")
        if not self._options(channel).presence:
            raise ApiError(ERROR_NOT_AVAILABLE, "not available")
        clients, users = await self.node.broker.presence_stats(channel)
        return {"num_clients": clients, "num_users": users}

    async def history(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = self._str(params, "channel")
        opts = self._options(channel)
        if not opts.history_enabled:
            raise ApiError(ERROR_NOT_AVAILABLE, "not available")
        since = params.get("since")
        since_pos = None
        if isinstance(since, dict):
            since_pos = (int(since.get("offset", 0)), str(since.get("epoch", "")))
        limit = params.get("limit")
        try:
            res = await self.node.broker.history(
                channel,
                history_size=opts.history_size,
                history_ttl_s=opts.history_ttl_s,
                limit=-1 if limit is None else int(limit) if int(limit) > 0 else 0,
                since=since_pos,
                reverse=bool(params.get("reverse")),
            )
        except Unrecoverable:
            raise ApiError(ERROR_UNRECOVERABLE, "unrecoverable position") from None
        return {
            "publications": [publication_json(p) for p in res.publications],
            "offset": res.offset,
            "epoch": res.epoch,
        }

    async def history_remove(self, params: dict[str, Any]) -> dict[str, Any]:
        await self.node.broker.remove_history(self._str(params, "channel"))
        return {}

    async def channels(self, params: dict[str, Any]) -> dict[str, Any]:
        pattern = params.get("pattern") or ""
        merged: dict[str, int] = {}
        for counts in await self._everywhere("api_channels"):
            for ch, n in counts.items():
                merged[ch] = merged.get(ch, 0) + n
        if pattern:
            merged = {k: v for k, v in merged.items() if fnmatch.fnmatchcase(k, pattern)}
        return {"channels": {k: {"num_clients": v} for k, v in sorted(merged.items())}}

    async def debug_leaks(self, params: dict[str, Any]) -> dict[str, Any]:
        """Every worker's leak report: long-lived tasks with their creation site, silent
        connections past their heartbeat deadline."""
        return {"workers": await self._everywhere("debug_leaks")}

    async def debug_trace(self, params: dict[str, Any]) -> dict[str, Any]:
        """Every worker's lifecycle events since ``since_us`` (CLOCK_MONOTONIC µs)."""
        since = int(params.get("since_us", 0))
        limit = int(params.get("limit", 50_000))
        return {"workers": await self._everywhere("debug_trace", since, limit)}

    async def info(self, params: dict[str, Any]) -> dict[str, Any]:
        totals = {"num_clients": 0, "num_users": 0, "num_subs": 0}
        channels: set[str] = set()
        for part in await self._everywhere("api_info"):
            for k in totals:
                totals[k] += part[k]
            channels.update(part["channels"])
        node = {
            "uid": self.node_name,
            "name": self.node_name,
            "version": f"tidegate {__version__}",
            "num_channels": len(channels),
            "uptime": int(time.time() - self.started),
            **totals,
        }
        return {"nodes": [node]}


def _span_attrs(params: dict[str, Any]) -> dict[str, Any]:
    ch = params.get("channel")
    return {"tidegate.channel": ch} if isinstance(ch, str) else {}


# ---- what each worker does for the node-wide API calls ------------------------------------
# Session commands take (user, client, *args) and act on this worker's sessions of that user
# (of that client only, if given); each has a per-session form, which a session that moved
# between workers meanwhile gets on arrival (SESSION_COMMANDS). Applying one twice to a
# session changes nothing: it is disconnected, unsubscribed or subscribed already.
def _sessions(node: Node, user: str, client: str) -> list[Any]:
    out = node.hub.user_sessions(user)
    return [s for s in out if not client or s.client_id == client]


def unsubscribe_session(s: ClientSession, channel: str) -> int:
    return int(s.unsubscribe(channel))


def disconnect_session(s: ClientSession, code: int, reason: str, whitelist: list[str]) -> int:
    if s.client_id in whitelist:
        return 0
    s.disconnect(Disconnect(code, reason))
    return 1


def subscribe_session(s: ClientSession, channel: str) -> Coroutine[Any, Any, bool]:
    return s.server_subscribe(channel)


def api_unsubscribe(node: Node, user: str, client: str, channel: str) -> int:
    return sum(unsubscribe_session(s, channel) for s in _sessions(node, user, client))


def api_disconnect(node: Node, user: str, client: str, code: int, reason: str,
                   whitelist: list[str]) -> int:
    return sum(disconnect_session(s, code, reason, whitelist)
               for s in _sessions(node, user, client))


def api_subscribe(node: Node, user: str, client: str, channel: str) -> Awaitable[int]:
    # Each session's subscribe starts now, up to its first wait: it is registered (pending)
    # at the moment this worker handles the command, so it cannot move out unsubscribed.
    started = [_start(subscribe_session(s, channel)) for s in _sessions(node, user, client)]

    async def run() -> int:
        n = 0
        for first in started:
            n += bool(await first if isinstance(first, Resume) else first)
        return n

    return run()


def _start(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` up to its first suspension: its result, or a Resume to await the rest."""
    try:
        first = coro.send(None)
    except StopIteration as stop:
        return stop.value
    return Resume(coro, first)


def api_channels(node: Node) -> dict[str, int]:
    return {ch: len(subs) for ch, subs in node.hub._subs.items()}


def api_info(node: Node, num_clients: int = 0) -> dict[str, Any]:
    hub = node.hub
    return {
        "num_clients": num_clients,
        "num_users": hub.num_users(),
        "num_subs": sum(len(s) for s in hub._subs.values()),
        "channels": list(hub._subs),
    }


LOCAL_SERVICES: dict[str, Callable[..., Any]] = {
    "api_subscribe": api_subscribe,
    "api_unsubscribe": api_unsubscribe,
    "api_disconnect": api_disconnect,
    "api_channels": api_channels,
}
SESSION_COMMANDS: dict[str, Callable[..., Any]] = {
    "api_subscribe": subscribe_session,
    "api_unsubscribe": unsubscribe_session,
    "api_disconnect": disconnect_session,
}
