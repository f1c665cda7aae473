"""TLS for every listener (``wss://`` and the raw TCP port), through the stdlib ``ssl`` module."""

from __future__ import annotations

import ssl

from tidegate.engine.options import EngineOptions


def server_context(opts: EngineOptions) -> ssl.SSLContext | None:
    if not (opts.tls_cert_file and opts.tls_key_file):
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(opts.tls_cert_file, opts.tls_key_file)
    return ctx


def reload(ctx: ssl.SSLContext, opts: EngineOptions) -> None:
    """Replace the context's certificate in place; handshakes from now on present the new one."""
    ctx.load_cert_chain(opts.tls_cert_file, opts.tls_key_file)
