"""Traces of the mesh, through the OpenTelemetry SDK, in the messaging conventions' span model:

- the client's ``send <model>`` span (PRODUCER) for each request, its W3C context in the request's
  headers (``traceparent``/``tracestate``, the SDK's propagator);
- on the worker, one ``process <model>`` span (CONSUMER) per batch, linked to the context of every
  sampled request it carried (link attributes: message id, queue wait), a child of the first one so
  that a parent-based sampler keeps it whenever one of its requests is kept; the model's
  ``infer <model>`` span under it; a request refused before it joins a batch gets a ``process``
  span of its own, failed;
- a pipeline's next stage as a ``send`` of its own under the batch's ``process`` span.

Off unless the standard ``OTEL_*`` variables configure it (:func:`configure_from_env`), or a
provider is given (:func:`enable`); off, every hook is one flag check. Sampling is the SDK's
(``OTEL_TRACES_SAMPLER``), export its ``BatchSpanProcessor`` with the OTLP exporter (http/protobuf,
or gRPC with ``OTEL_EXPORTER_OTLP_PROTOCOL=grpc``).
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import (
    INVALID_SPAN_CONTEXT,
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from schemas.subjects import parse_infer_subject

__all__ = [
    "NO_CONTEXT", "configure_from_env", "disable", "enable", "enabled", "end", "export_counts", "flush", "inject",
    "remote", "request_failed", "shutdown", "start_infer", "start_process", "start_send",
]  # fmt: skip

log = logging.getLogger(__name__)

# W3C trace context only (the global default also carries baggage, which the mesh does not use).
_propagator = TraceContextTextMapPropagator()
_tracer: trace.Tracer | None = None
_provider: Any = None
_counter: _Counting | None = None
_exit_hook = False

Request = tuple[SpanContext, str | None, float]  # a request's context, message id, queue wait (ms)
NO_CONTEXT: SpanContext = INVALID_SPAN_CONTEXT  # a request that came without a trace context


class _Counting(SpanExporter):
    """The OTLP exporter, with what it exported and failed to export counted (for /metrics)."""

    def __init__(self, inner: SpanExporter) -> None:
        self._inner = inner
        self.exported = 0
        self.failed = 0

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        result = self._inner.export(spans)
        if result is SpanExportResult.SUCCESS:
            self.exported += len(spans)
        else:
            self.failed += len(spans)
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return bool(self._inner.force_flush(timeout_millis))


def enabled() -> bool:
    return _tracer is not None


def enable(provider: Any) -> None:
    """Trace through ``provider`` (an application's own, or the tests' with an in-memory exporter)."""
    global _tracer, _provider
    _tracer, _provider = provider.get_tracer("servemesh"), provider


def disable() -> None:
    global _tracer, _provider, _counter
    _tracer = _provider = _counter = None


def flush() -> None:
    if _provider is not None and hasattr(_provider, "force_flush"):
        _provider.force_flush()


def shutdown() -> None:
    """Export what is still buffered (at process exit)."""
    if _provider is not None and hasattr(_provider, "shutdown"):
        _provider.shutdown()


def export_counts() -> dict[str, int] | None:
    """Spans exported and failed so far by the exporter :func:`configure_from_env` made (else None)."""
    return None if _counter is None else {"exported": _counter.exported, "failed": _counter.failed}


def _exporter() -> SpanExporter:
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", ""))
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def configure_from_env(service: str) -> bool:
    """At a process entry point: export spans over OTLP when the standard variables ask for it
    (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_TRACES_EXPORTER=otlp``; ``OTEL_SDK_DISABLED`` turns it off)."""
    global _exit_hook, _counter
    env = os.environ
    exporter = env.get("OTEL_TRACES_EXPORTER", "")
    endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or exporter == "none":
        return False
    if not (endpoint or exporter == "otlp"):
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", service)}))
    _counter = _Counting(_exporter())
    provider.add_span_processor(BatchSpanProcessor(_counter))  # OTEL_BSP_* settings apply
    enable(provider)
    if not _exit_hook:
        atexit.register(shutdown)  # what is still queued is sent when the process ends
        _exit_hook = True
    return True


@functools.lru_cache(maxsize=1024)
def _subject_attributes(subject: str) -> dict[str, Any]:
    """The attributes every span about ``subject`` carries (callers copy)."""
    model, version, priority = parse_infer_subject(subject)
    return {"messaging.system": "nats", "messaging.destination.name": subject, "mesh.model": model,
            "mesh.version": version, "mesh.priority": priority}  # fmt: skip


def start_send(
    subject: str, request_id: str, headers: MutableMapping[str, str], parent: Span | None = None
) -> Span | None:
    """The send span (PRODUCER) of a request to ``subject``, its context put in ``headers``: a child of
    the caller's current span, or of ``parent`` (a pipeline stage's process span)."""
    if _tracer is None:
        return None
    attrs = {**_subject_attributes(subject), "messaging.operation.type": "send", "messaging.message.id": request_id}
    context = trace.set_span_in_context(parent) if parent is not None else None
    span = _tracer.start_span(f"send {attrs['mesh.model']}", context=context, kind=SpanKind.PRODUCER,
                              attributes=attrs)  # fmt: skip
    _propagator.inject(headers, context=trace.set_span_in_context(span))
    return span if span.is_recording() else None


def remote(headers: Mapping[str, str]) -> SpanContext | None:
    """The trace context a request came with (None: none, or tracing is off)."""
    if _tracer is None or "traceparent" not in headers:
        return None
    context = trace.get_current_span(_propagator.extract(headers)).get_span_context()
    return context if context.is_valid else None


def start_process(model: str, version: str, worker: str, requests: Sequence[Request]) -> Span | None:
    """The batch's process span (CONSUMER), linked to each sampled request; None when tracing is off, or
    when requests came with trace contexts and none was sampled. Requests that came with none (their
    clients trace nothing) get a trace of the worker's own, as the sampler decides."""
    if _tracer is None:
        return None
    traced = [r for r in requests if r[0].is_valid]
    sampled = [r for r in traced if r[0].trace_flags.sampled]
    if traced and not sampled:  # their traces were dropped where they began: no span here either
        return None
    links = [Link(ctx, {"messaging.message.id": rid or "", "mesh.queue_wait_ms": wait}) for ctx, rid, wait in sampled]
    parent = trace.set_span_in_context(NonRecordingSpan(sampled[0][0])) if sampled else None
    attrs: dict[str, Any] = {
        "messaging.system": "nats", "messaging.operation.type": "process", "mesh.model": model,
        "mesh.version": version, "mesh.worker": worker, "messaging.batch.message_count": len(requests),
    }  # fmt: skip
    span = _tracer.start_span(f"process {model}", context=parent, kind=SpanKind.CONSUMER, links=links,
                              attributes=attrs)  # fmt: skip
    return span if span.is_recording() else None


def start_infer(process: Span | None, model: str, rows: int) -> Span | None:
    """The model's own computation, a child of its batch's process span."""
    if _tracer is None or process is None:
        return None
    context = trace.set_span_in_context(process)
    return _tracer.start_span(f"infer {model}", context=context, attributes={"mesh.model": model, "mesh.rows": rows})


def request_failed(
    span: Span | None, request_id: str | None, error: BaseException, context: SpanContext | None = None,
    subject: str | None = None, worker: str | None = None,
) -> None:  # fmt: skip
    """A request answered with an error: an event on its batch's ``span``; or, for one refused before
    it joined a batch, a failed process span of its own under its ``context`` (if sampled)."""
    if _tracer is None:
        return
    status = int(getattr(error, "status", 500))
    if span is not None:
        span.add_event("request failed", {"messaging.message.id": request_id or "", "mesh.status": status,
                                          "exception.message": str(error)})  # fmt: skip
        return
    if context is None or not context.trace_flags.sampled or subject is None:
        return
    attrs = {**_subject_attributes(subject), "messaging.operation.type": "process", "mesh.worker": worker or "",
             "messaging.message.id": request_id or ""}  # fmt: skip
    alone = _tracer.start_span(f"process {attrs['mesh.model']}", context=trace.set_span_in_context(
        NonRecordingSpan(context)), kind=SpanKind.CONSUMER, attributes=attrs)  # fmt: skip
    end(alone, error)


def inject(incoming: Mapping[str, str], headers: MutableMapping[str, str]) -> None:
    """Carry a request's own context on (a pipeline's next stage with no span made here: its trace was
    not sampled, so the next stage drops it too)."""
    if _tracer is not None:
        for name in ("traceparent", "tracestate"):
            if name in incoming:
                headers[name] = incoming[name]


def end(span: Span | None, error: BaseException | None = None, **attributes: Any) -> None:
    if span is None:
        return
    if attributes:
        span.set_attributes(attributes)
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, str(error)))
        status = getattr(error, "status", None)
        if status is not None:
            span.set_attribute("mesh.status", int(status))
    span.end()
