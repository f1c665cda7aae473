"""The gateway on the engine: WebSocket + HTTP API on one port, raw TCP on another.

Glue only: HTTP/WebSocket parsing is in ``protocol/``, the client protocol in ``gateway/``,
sockets and loops in ``engine/``.
"""
