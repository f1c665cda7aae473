"""OpenTelemetry traces, off by default: the hot path asks one boolean, exporters live here.

Spans: ``ws.connect`` (upgrade to connect reply) with children ``ws.handshake`` and
``client.connect`` (token check, server-side subscriptions); ``api.<method>`` for server API
calls, continuing the caller's trace from its ``traceparent`` header; ``publish`` and
``deliver`` (per worker, linked through the relayed publication) for publish-to-delivery.

Configure with ``tracing_exporter`` = ``none`` | ``console`` | ``otlp`` (the OTLP/HTTP
exporter honours ``OTEL_EXPORTER_OTLP_ENDPOINT`` and the other ``OTEL_EXPORTER_OTLP_*``
variables) and ``tracing_sample_ratio``.

Memory (18,000 WebSocket connections on one worker, 1% sampling, 2026-11-27,
``bench/observability_overhead.py``): the spans are not what tracing costs. A sampled connect's
three spans live ~1 s, until the batch export, and nothing of them stays: from 9,000 to 18,000
connections a connection adds 1,984 B traced, 1,966 B untraced, 1,944 B with everything off.
A traced worker pays once instead, at boot: the SDK, protobuf and the exporter's HTTP client
(several MB of RSS), and ~2 MB of heap: the untraced worker has that much left free by its
imports, which its first connections fill without growing, while the traced one has filled it
with the SDK (malloc's free bytes after a worker's imports, in one process: 2.3 MB untraced,
0.4 MB traced). The bench's "marginal bytes per connection" (held minus boot, over the
connections) counts that. What the first span and the first export would import late is
imported in :meth:`_Tracing.setup`, so it is part of the worker's boot (and of its
``gc.freeze()``), not of its connections.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from tidegate import log

_log = log.get("tracing")


class _Tracing:
    __slots__ = ("enabled", "tracer", "_propagator", "_provider", "sample_ratio")

    def __init__(self) -> None:
        self.enabled = False
        self.sample_ratio = 1.0
        self.tracer: Any = None
        self._propagator: Any = None
        self._provider: Any = None

    def setup(self, exporter: str, sample_ratio: float = 1.0, service: str = "tidegate",
              worker: int = 0) -> None:
        """Call once per worker process, after fork (the batch exporter runs a thread)."""
        if exporter in ("", "none"):
            self.enabled = False
            return
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SimpleSpanProcessor,
        )
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        resource = Resource.create({"service.name": service, "tidegate.worker": worker})
        # Roots are sampled by sample_root() before any span exists (an unsampled connect then
        # costs one random() instead of three SDK span starts, measured ~+30% of a connect's
        # CPU at ratio 0.01); the SDK keeps the parent's decision for everything else.
        self.sample_ratio = sample_ratio
        provider = TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_ON))
        if exporter == "console":
            one_line = ConsoleSpanExporter(formatter=lambda span: span.to_json(indent=None) + "\n")
            provider.add_span_processor(SimpleSpanProcessor(one_line))
        elif exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            # Export every second in small batches: finished spans wait in the queue until then
            # (a few KB each; at 1% sampling of ~2,000 connects/s that is ~60 spans, and the
            # queue bounds it at 1,024 while the collector is slow or down).
            provider.add_span_processor(BatchSpanProcessor(
                OTLPSpanExporter(), max_queue_size=1024, schedule_delay_millis=1000,
                max_export_batch_size=256))
        else:
            raise ValueError(f"tracing_exporter must be none, console or otlp, not {exporter!r}")
        self._provider = provider
        self.tracer = provider.get_tracer("tidegate")
        self._propagator = TraceContextTextMapPropagator()
        _warm_up(exporter, resource)
        self.enabled = True

    def use_provider(self, provider: Any) -> None:
        """Tests: send spans to a provider of their own (an in-memory exporter)."""
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._provider = provider
        self.tracer = provider.get_tracer("tidegate")
        self._propagator = TraceContextTextMapPropagator()
        self.enabled = True

    def sample_root(self) -> bool:
        """Whether a new trace (no caller's context) is recorded: ``tracing_sample_ratio``."""
        return self.enabled and (self.sample_ratio >= 1.0 or random.random() < self.sample_ratio)

    def context_from(self, traceparent: str | None) -> Any:
        if not traceparent:
            return None
        return self._propagator.extract({"traceparent": traceparent})

    def traceparent(self, span: Any) -> str | None:
        """The W3C header value naming ``span``, to carry across processes."""
        from opentelemetry import trace

        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=trace.set_span_in_context(span))
        return carrier.get("traceparent")

    def start(self, name: str, parent: Any = None, **attrs: Any) -> Any:
        """Start a span (end it yourself); ``parent`` is a span or an extracted context."""
        from opentelemetry import trace

        ctx = trace.set_span_in_context(parent) if _is_span(parent) else parent
        return self.tracer.start_span(name, context=ctx, attributes=attrs or None)

    @contextmanager
    def span(self, name: str, parent: Any = None, **attrs: Any) -> Iterator[Any]:
        s = self.start(name, parent, **attrs)
        try:
            yield s
        finally:
            s.end()

    def shutdown(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()


def _warm_up(exporter: str, resource: Any) -> None:
    """Import at boot what the first span and the first export would import on the way."""
    if exporter != "otlp":
        return
    "localhost".encode("idna")  # socket.getaddrinfo's codec: encodings.idna, unicodedata
    if "requests" in sys.modules:
        import netrc  # noqa: F401 - requests looks for credentials at the first request
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import SpanContext, TraceFlags

    ctx = SpanContext(1, 1, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    encode_spans([ReadableSpan("warm-up", ctx, resource=resource)]).SerializePartialToString()


def _is_span(obj: Any) -> bool:
    return obj is not None and hasattr(obj, "get_span_context")


TRACING = _Tracing()
# The trace a publication belongs to, carried from the API call to every worker's delivery.
PUBLISH_TRACEPARENT: ContextVar[str | None] = ContextVar("publish_traceparent", default=None)
