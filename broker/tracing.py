"""Trace context across the mesh: W3C ``traceparent``/``tracestate`` travel in NATS headers;
spans follow the OpenTelemetry messaging conventions. Off unless configured (``OTEL_*``), and
then every hook is one flag check."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from schemas.subjects import parse_infer_subject

__all__ = [
    "configure_from_env", "disable", "enable", "enabled", "end", "inject", "shutdown", "start_batch", "start_consumer",
    "start_inference", "start_producer",
]  # fmt: skip

_tracer: trace.Tracer | None = None
_provider: TracerProvider | None = None
# W3C trace context only: the global default also carries baggage, which the mesh does not use
# and which doubles the cost of every inject and extract.
_propagator = TraceContextTextMapPropagator()


def enabled() -> bool:
    return _tracer is not None


def enable(provider: TracerProvider) -> None:
    """Trace through ``provider`` (tests pass one with an in-memory exporter)."""
    global _tracer, _provider
    _tracer, _provider = provider.get_tracer("servemesh"), provider


def disable() -> None:
    global _tracer, _provider
    _tracer = _provider = None


def shutdown() -> None:
    """Flush spans still buffered for export (at process exit)."""
    if _provider is not None and hasattr(_provider, "shutdown"):
        _provider.shutdown()


def configure_from_env(service: str) -> bool:
    """At a process entry point: export spans over OTLP when the standard OTEL_* variables ask for it."""
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "")
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if exporter == "none" or not (endpoint or exporter == "otlp"):
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service)})
    provider = SdkProvider(resource=resource)  # honours OTEL_TRACES_SAMPLER and its argument
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    enable(provider)
    return True


def _attributes(subject: str, request_id: str | None) -> dict[str, Any]:
    model, version, priority = parse_infer_subject(subject)
    attrs: dict[str, Any] = {
        "messaging.system": "nats", "messaging.destination.name": subject,
        "mesh.model": model, "mesh.version": version, "mesh.priority": priority,
    }  # fmt: skip
    if request_id:
        attrs["messaging.message.id"] = request_id
    return attrs


def start_producer(subject: str, request_id: str, headers: MutableMapping[str, str]) -> Span | None:
    """The client's send span (PRODUCER); its context goes into ``headers`` for the worker."""
    if _tracer is None:
        return None
    attrs = _attributes(subject, request_id) | {"messaging.operation.type": "send"}
    span = _tracer.start_span(f"send {attrs['mesh.model']}", kind=SpanKind.PRODUCER, attributes=attrs)
    _propagator.inject(headers, context=trace.set_span_in_context(span))
    return span


def start_consumer(headers: Mapping[str, str], subject: str, request_id: str | None, worker: str) -> Span | None:
    """The worker's span for one request (CONSUMER), a child of the client's send span."""
    if _tracer is None:
        return None
    parent: Context = _propagator.extract(headers)
    attrs = _attributes(subject, request_id) | {"messaging.operation.type": "process", "mesh.worker": worker}
    return _tracer.start_span(
        f"process {attrs['mesh.model']}", context=parent, kind=SpanKind.CONSUMER, attributes=attrs
    )


def start_batch(model: str, version: str, requests: Iterable[Span | None], worker: str) -> Span | None:
    """One span per batch, linked to the span of every request it carried."""
    if _tracer is None:
        return None
    links = [Link(span.get_span_context()) for span in requests if span is not None]
    attrs: dict[str, Any] = {"messaging.system": "nats", "messaging.batch.message_count": len(links),
             "mesh.model": model, "mesh.version": version, "mesh.worker": worker}  # fmt: skip
    # A batch is its own root: it serves many traces, each tied to it by a link.
    return _tracer.start_span(f"batch {model}", context=Context(), links=links, attributes=attrs)


def start_inference(batch: Span | None, model: str, rows: int) -> Span | None:
    """The model's own computation, a child of its batch span."""
    if _tracer is None or batch is None:
        return None
    context = trace.set_span_in_context(batch)
    return _tracer.start_span(f"infer {model}", context=context, attributes={"mesh.model": model, "mesh.rows": rows})


def inject(span: Span | None, headers: MutableMapping[str, str]) -> None:
    """Put ``span``'s context in ``headers`` (a pipeline stage forwarding to the next)."""
    if span is not None:
        _propagator.inject(headers, context=trace.set_span_in_context(span))


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
