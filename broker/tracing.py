"""Trace context across the mesh: W3C ``traceparent``/``tracestate`` travel in NATS headers;
spans follow the OpenTelemetry messaging conventions. Off unless configured (``OTEL_*``), and
then every hook is one flag check; a trace the sampler drops makes no span objects on the worker.

Two ways to record: through an SDK ``TracerProvider`` (:func:`enable`: an application's own, or the
tests' in-memory exporter), or the mesh's own recorder exporting OTLP/HTTP directly (:func:`enable_direct`,
what the ``OTEL_*`` variables configure), which costs a few µs a span instead of ~60.
"""

from __future__ import annotations

import atexit
import functools
import logging
import math
import os
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TracerProvider,
    TraceState,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from broker.process_spans import PendingSpan
from broker.span_export import ExportSettings, OtlpExporter
from broker.spans import LightSpan, Recorder, Sampler, SendSpan
from schemas.subjects import parse_infer_subject

__all__ = [
    "configure_from_env", "disable", "enable", "enable_direct", "enabled", "end", "end_requests", "export_counts",
    "flush", "inject", "shutdown", "start_batch", "start_consumer", "start_inference", "start_producer",
]  # fmt: skip

log = logging.getLogger(__name__)

_tracer: trace.Tracer | None = None
_provider: TracerProvider | None = None
_recorder: Recorder | None = None
_exit_hook = False
_parent_decides = False  # the sampler follows a remote parent's sampled flag
# W3C trace context only: the global default also carries baggage, which the mesh does not use
# and which doubles the cost of every inject and extract.
_propagator = TraceContextTextMapPropagator()


def enabled() -> bool:
    return _tracer is not None or _recorder is not None


def enable(provider: TracerProvider) -> None:
    """Trace through ``provider`` (tests pass one with an in-memory exporter)."""
    global _tracer, _provider, _parent_decides, _recorder
    _retire_recorder()
    _tracer, _provider, _recorder = provider.get_tracer("servemesh"), provider, None
    _parent_decides = _sampled_flag_decides(provider)


def enable_direct(settings: ExportSettings, sampler: Sampler, service: str) -> None:
    """Record with the mesh's own recorder and export OTLP/HTTP to ``settings.url``."""
    from importlib.metadata import PackageNotFoundError, version

    from opentelemetry.sdk.resources import Resource

    try:
        release = version("servemesh")
    except PackageNotFoundError:
        release = "0"
    global _tracer, _provider, _recorder
    attributes = dict(Resource.create({"service.name": service}).attributes)  # + OTEL_RESOURCE_ATTRIBUTES
    _retire_recorder()
    exporter = OtlpExporter(settings, attributes, ("servemesh", release))
    _tracer = _provider = None
    _recorder = Recorder(exporter, sampler, _subject_attributes)


def disable() -> None:
    """Stop tracing: the mesh's own exporter sends what it holds and stops; spans still open are dropped."""
    global _tracer, _provider, _recorder
    _retire_recorder()
    _tracer = _provider = _recorder = None


def _retire_recorder() -> None:
    if _recorder is not None:
        _recorder.exporter.shutdown()


def flush() -> None:
    """Export every span finished so far."""
    if _recorder is not None:
        _recorder.exporter.force_flush()
    elif _provider is not None and hasattr(_provider, "force_flush"):
        _provider.force_flush()


def export_counts() -> dict[str, int] | None:
    """Spans exported, dropped (queue full) and failed (given up on) so far by the mesh's own exporter;
    None when it is not the one recording."""
    if _recorder is None:
        return None
    exporter = _recorder.exporter
    return {"exported": exporter.exported, "dropped": exporter.dropped, "failed": exporter.failed}


def shutdown() -> None:
    """Flush spans still buffered for export (at process exit)."""
    if _recorder is not None:
        _recorder.exporter.shutdown()
    if _provider is not None and hasattr(_provider, "shutdown"):
        _provider.shutdown()


def configure_from_env(service: str) -> bool:
    """At a process entry point: export spans over OTLP/HTTP when the standard OTEL_* variables ask for it
    (``SERVEMESH_TRACE_EXPORT=sdk`` exports through the SDK's span processor instead of the mesh's own)."""
    global _exit_hook
    env = os.environ
    if not _exit_hook:
        atexit.register(shutdown)  # what is still queued is sent when the process ends
        _exit_hook = True
    exporter = env.get("OTEL_TRACES_EXPORTER", "")
    endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    disabled = env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
    if disabled or exporter == "none" or not (endpoint or exporter == "otlp"):
        return False
    name = env.get("OTEL_SERVICE_NAME", service)
    if env.get("SERVEMESH_TRACE_EXPORT", "direct") != "sdk":
        enable_direct(ExportSettings.from_env(env), _sampler_from_env(env), name)
        return True
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = SdkProvider(resource=Resource.create({"service.name": name}))  # honours OTEL_TRACES_SAMPLER
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    enable(provider)
    return True


def _sampler_from_env(env: Mapping[str, str]) -> Sampler:
    """``OTEL_TRACES_SAMPLER`` and its argument, read as the SDK reads them: a name it does not know, or a
    ratio outside [0, 1], is logged and the default used instead of stopping the process."""
    name = (env.get("OTEL_TRACES_SAMPLER") or "parentbased_always_on").strip().lower()
    try:
        ratio = float(env.get("OTEL_TRACES_SAMPLER_ARG") or 1.0)
    except ValueError:
        ratio = math.nan
    if not 0.0 <= ratio <= 1.0:  # NaN too
        log.warning("tracing: OTEL_TRACES_SAMPLER_ARG=%r is not a ratio in [0, 1]; using 1.0",
                    env.get("OTEL_TRACES_SAMPLER_ARG"))  # fmt: skip
        ratio = 1.0
    try:
        return Sampler(name, ratio)
    except ValueError:
        log.warning("tracing: OTEL_TRACES_SAMPLER=%r is not supported; using parentbased_always_on", name)
        return Sampler("parentbased_always_on")


@functools.lru_cache(maxsize=1024)
def _subject_attributes(subject: str) -> dict[str, Any]:
    """The attributes every span about ``subject`` carries, built once per subject (callers copy)."""
    model, version, priority = parse_infer_subject(subject)
    return {
        "messaging.system": "nats", "messaging.destination.name": subject,
        "mesh.model": model, "mesh.version": version, "mesh.priority": priority,
    }  # fmt: skip


def _attributes(subject: str, request_id: str | None, **extra: Any) -> dict[str, Any]:
    attrs = {**_subject_attributes(subject), **extra}
    if request_id:
        attrs["messaging.message.id"] = request_id
    return attrs


def _sampled_flag_decides(provider: TracerProvider) -> bool:
    """True when ``provider`` samples a span with a remote parent exactly as the parent was sampled (the
    SDK's default and every ``parentbased_*`` sampler): then a request whose traceparent says "not
    sampled" needs no span object at all."""
    sampler = getattr(provider, "sampler", None)
    description = sampler.get_description() if sampler is not None else ""
    return description.startswith("ParentBased{") and (
        "remoteParentSampled:AlwaysOnSampler,remoteParentNotSampled:AlwaysOffSampler" in description
    )


def _not_sampled(traceparent: str | None) -> bool:
    """A version-00 ``traceparent`` whose flags say the trace was not sampled."""
    if traceparent is None or len(traceparent) != 55 or not traceparent.startswith("00-"):
        return False
    try:
        return not int(traceparent[53:], 16) & 1
    except ValueError:
        return False


def _parent_context(headers: Mapping[str, str]) -> Context:
    """The remote parent in ``headers``: a well-formed version-00 ``traceparent`` read directly (the
    propagator's regex and checks cost ~4 µs a request), anything else through the propagator."""
    traceparent = headers.get("traceparent")
    if (
        traceparent is not None and len(traceparent) == 55 and traceparent.startswith("00-")
        and traceparent[35] == traceparent[52] == "-" and traceparent[3:].islower()
    ):  # fmt: skip
        try:  # bytes.fromhex, unlike int(..., 16), refuses signs and underscores
            trace_id, span_id = bytes.fromhex(traceparent[3:35]), bytes.fromhex(traceparent[36:52])
            flags = bytes.fromhex(traceparent[53:])
        except ValueError:
            trace_id = span_id = flags = b""
        if len(trace_id) == 16 and len(span_id) == 8 and len(flags) == 1 and any(trace_id) and any(span_id):
            raw_state = headers.get("tracestate")
            state = TraceState.from_header([raw_state]) if raw_state else None
            context = SpanContext(
                int.from_bytes(trace_id, "big"), int.from_bytes(span_id, "big"), is_remote=True,
                trace_flags=TraceFlags(flags[0]), trace_state=state,
            )  # fmt: skip
            return trace.set_span_in_context(NonRecordingSpan(context))
    return _propagator.extract(headers)


def _write_context(span: Span, headers: MutableMapping[str, str]) -> None:
    """W3C ``traceparent`` (and ``tracestate``) of ``span``, as the propagator would write them."""
    ctx = span.get_span_context()
    headers["traceparent"] = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"
    if ctx.trace_state:
        headers["tracestate"] = ctx.trace_state.to_header()


def start_producer(
    subject: str, request_id: str, headers: MutableMapping[str, str]
) -> Span | LightSpan | SendSpan | None:
    """The client's send span (PRODUCER); its context goes into ``headers`` for the worker. A trace the
    sampler drops still sends its context (so the worker drops it too) and returns None."""
    if _recorder is not None:
        return _recorder.producer(subject, request_id, headers)
    if _tracer is None:
        return None
    attrs = _attributes(subject, request_id, **{"messaging.operation.type": "send"})
    span = _tracer.start_span(f"send {attrs['mesh.model']}", kind=SpanKind.PRODUCER, attributes=attrs)
    _write_context(span, headers)
    return span if span.is_recording() else None


def start_consumer(
    headers: Mapping[str, str], subject: str, request_id: str | None, worker: str, forwarded: bool = False
) -> Span | LightSpan | PendingSpan | None:
    """The worker's span for one request (CONSUMER), a child of the client's send span; None (and no
    work) for a request whose trace was not sampled. ``forwarded``: the request goes on to a pipeline's
    next stage, which joins its trace (:func:`inject`)."""
    if _recorder is not None:
        return _recorder.consumer(headers, subject, request_id, worker, forwarded)
    if _tracer is None:
        return None
    if _parent_decides and _not_sampled(headers.get("traceparent")):
        return None
    parent = _parent_context(headers)
    attrs = _attributes(subject, request_id, **{"messaging.operation.type": "process", "mesh.worker": worker})
    span = _tracer.start_span(
        f"process {attrs['mesh.model']}", context=parent, kind=SpanKind.CONSUMER, attributes=attrs
    )
    return span if span.is_recording() else None


def start_batch(
    model: str, version: str, requests: Iterable[Span | LightSpan | PendingSpan | None], worker: str
) -> Span | LightSpan | None:
    """One span per batch, linked to the span of every sampled request it carried; None when it carried none.

    It is a child of its first sampled request's span, so that a parent-based sampler records it
    whenever one of its requests is recorded; every other request reaches it through its link.
    """
    if _recorder is not None:
        return _recorder.batch(model, version, requests, worker)
    if _tracer is None:
        return None
    spans = [span for span in requests if isinstance(span, Span)]
    if not spans:
        return None
    links = [Link(span.get_span_context()) for span in spans]
    attrs: dict[str, Any] = {"messaging.system": "nats", "messaging.batch.message_count": len(links),
             "mesh.model": model, "mesh.version": version, "mesh.worker": worker}  # fmt: skip
    context = trace.set_span_in_context(spans[0])
    return _tracer.start_span(f"batch {model}", context=context, links=links, attributes=attrs)


def start_inference(batch: Span | LightSpan | None, model: str, rows: int) -> Span | LightSpan | None:
    """The model's own computation, a child of its batch span."""
    if isinstance(batch, LightSpan):
        return _recorder.inference(batch, model, rows) if _recorder is not None else None
    if _tracer is None or batch is None:
        return None
    context = trace.set_span_in_context(batch)
    return _tracer.start_span(f"infer {model}", context=context, attributes={"mesh.model": model, "mesh.rows": rows})


def inject(
    span: Span | LightSpan | PendingSpan | None,
    headers: MutableMapping[str, str],
    incoming: Mapping[str, str] | None = None,
) -> None:
    """Put ``span``'s context in ``headers`` (a pipeline stage forwarding to the next); without a span
    (a trace not sampled), pass on the context the request came with, so later stages drop it too."""
    if isinstance(span, LightSpan):
        headers["traceparent"] = span.traceparent()
        if span.trace_state:
            headers["tracestate"] = span.trace_state
    elif isinstance(span, Span):
        _write_context(span, headers)
    elif incoming is not None and enabled():  # (a pending span is never forwarded: see start_consumer)
        for name in ("traceparent", "tracestate"):
            if name in incoming:
                headers[name] = incoming[name]


def end_requests(
    batch: Span | LightSpan | None,
    spans: Sequence[Span | LightSpan | PendingSpan | None],
    waits: Sequence[float],
    errors: Mapping[int, BaseException],
) -> None:
    """End the worker's spans of ``batch``'s requests (None: a request not traced), each with its queue wait
    (``mesh.queue_wait_ms``), those in ``errors`` (by position) failed with their error."""
    rest: Iterable[int] = range(len(spans))
    if _recorder is not None:
        try:
            rest = _recorder.end_requests(batch, spans, waits, errors)  # what is left: spans of an SDK provider
        except Exception:  # tracing must never fail the requests it watches
            log.warning("tracing: could not record a batch's spans", exc_info=True)
            return
    for i in rest:
        span = spans[i]
        if isinstance(span, Span):  # else tracing was turned off while the span was open: dropped
            end(span, errors.get(i), **{"mesh.queue_wait_ms": waits[i]})


def end(
    span: Span | LightSpan | PendingSpan | SendSpan | None, error: BaseException | None = None, **attributes: Any
) -> None:
    if span is None:
        return
    if isinstance(span, (LightSpan, tuple, list)):
        if _recorder is not None:  # else tracing was turned off while the span was open: dropped
            try:
                _recorder.end(span, error, attributes)
            except Exception:  # tracing must never fail the request it watches
                log.warning("tracing: could not record a span", exc_info=True)
        return
    if attributes:
        span.set_attributes(attributes)
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, str(error)))
        status = getattr(error, "status", None)
        if status is not None:
            span.set_attribute("mesh.status", int(status))
    span.end()
