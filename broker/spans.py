"""The mesh's own span recorder: each span of the request path is a few slots, its name, kind and fixed
attributes encoded once per subject, the sampling decided as the SDK's samplers would; finished spans go
to an :class:`~broker.span_export.OtlpExporter`. A few µs a span, where the SDK with its exporter takes ~60."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN, TraceState

from broker.otlp import MESSAGE_ID, QUEUE_WAIT, RequestRecord, encode_span, is_request_span, request_record, span_shape
from broker.span_export import OtlpExporter

__all__ = ["LightSpan", "Recorder", "Sampler"]

PRODUCER, CONSUMER, INTERNAL = 4, 5, 1  # OTLP's SpanKind numbers
_RATIO_LIMIT = 1 << 64
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_TRACEPARENT_00 = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_NO_TRACE, _NO_SPAN = bytes(16), bytes(8)
_Attrs = list[tuple[str, Any]]


class Sampler:
    """``OTEL_TRACES_SAMPLER`` semantics: ``always_on``, ``always_off``, ``traceidratio`` (the lower 64 bits
    of the trace id against the ratio, as the SDK does), each optionally ``parentbased_``: then a span with
    a parent is sampled exactly when its parent was."""

    NAMES = ("always_on", "always_off", "traceidratio")

    def __init__(self, name: str = "parentbased_always_on", ratio: float = 1.0) -> None:
        self.parent_based = name.startswith("parentbased_")
        root = name.removeprefix("parentbased_")
        if root not in self.NAMES:
            raise ValueError(f"unknown sampler {name!r}")
        bound = {"always_on": _RATIO_LIMIT, "always_off": 0}.get(root, round(min(max(ratio, 0.0), 1.0) * _RATIO_LIMIT))
        self._bound = bound
        self.always = bound == _RATIO_LIMIT  # every root is sampled: no need to look at the trace id
        self.name = name

    def root(self, trace_id: int) -> bool:
        return trace_id & (_RATIO_LIMIT - 1) < self._bound

    def child(self, parent_sampled: bool, trace_id: int) -> bool:
        return parent_sampled if self.parent_based else self.root(trace_id)


class LightSpan:
    """A span being recorded: ids as the bytes OTLP carries, times in ns since the epoch."""

    __slots__ = ("attrs", "end", "error", "links", "parent_id", "remote_parent", "shape", "span_id", "start",
                 "trace_id", "trace_state")  # fmt: skip

    def __init__(
        self, trace_id: bytes, span_id: bytes, parent_id: bytes | None, shape: bytes, attrs: _Attrs | None
    ) -> None:
        self.trace_id, self.span_id, self.parent_id = trace_id, span_id, parent_id
        self.remote_parent = False
        self.trace_state: str | None = None
        self.shape = shape
        self.start, self.end = time.time_ns(), 0
        self.attrs = attrs
        self.links: list[tuple[bytes, bytes]] | None = None
        self.error: str | None = None

    def traceparent(self) -> str:
        return f"00-{self.trace_id.hex()}-{self.span_id.hex()}-01"


# Span and trace ids; all zeros (invalid) has a chance of 2^-64 a span, which the SDK's generator ignores too.
_random_bytes = random.randbytes


class Recorder:
    """Starts, ends and hands over the mesh's spans (client send, worker process, batch, inference)."""

    def __init__(
        self, exporter: OtlpExporter, sampler: Sampler, subject_attributes: Callable[[str], Mapping[str, Any]]
    ) -> None:
        self.exporter, self.sampler = exporter, sampler
        self._subject_attributes = subject_attributes
        self._shapes: dict[tuple[str, ...], bytes] = {}
        self._send_shapes: dict[str, bytes] = {}
        self._process_shapes: dict[tuple[str, str], bytes] = {}

    def _shape(self, key: tuple[str, ...], build: Callable[[], bytes]) -> bytes:
        shape = self._shapes.get(key)
        if shape is None:
            shape = self._shapes[key] = build()
        return shape

    def producer(self, subject: str, request_id: str, headers: MutableMapping[str, str]) -> LightSpan | None:
        """The client's send span; the parent is the caller's current span, if it has one. A dropped trace
        still sends its context, marked not sampled, so that the worker drops it too."""
        caller = trace.get_current_span()
        ids = _random_bytes(24)
        parent = None if caller is INVALID_SPAN else caller.get_span_context()
        if parent is not None and not parent.is_valid:
            parent = None
        if parent is None:  # a new trace: its ids and traceparent straight from the random bytes
            trace_id, span_id, parent_id = ids[:16], ids[16:], None
            sampled = self.sampler.always or self.sampler.root(int.from_bytes(ids[8:16], "big"))
            hexed = ids.hex()
            headers["traceparent"] = f"00-{hexed[:32]}-{hexed[32:]}-{'01' if sampled else '00'}"
        else:
            trace_id, parent_id = parent.trace_id.to_bytes(16, "big"), parent.span_id.to_bytes(8, "big")
            sampled = self.sampler.child(parent.trace_flags.sampled, parent.trace_id)
            span_id = ids[16:]
            headers["traceparent"] = f"00-{trace_id.hex()}-{span_id.hex()}-{'01' if sampled else '00'}"
            if parent.trace_state:
                headers["tracestate"] = parent.trace_state.to_header()
        if not sampled:
            return None
        shape = self._send_shapes.get(subject)
        if shape is None:
            attrs = {**self._subject_attributes(subject), "messaging.operation.type": "send"}
            shape = self._send_shapes[subject] = span_shape(f"send {attrs['mesh.model']}", PRODUCER, attrs)
        span = LightSpan(trace_id, span_id, parent_id, shape, [(MESSAGE_ID, request_id)])
        if parent is not None:
            span.remote_parent = parent.is_remote
            if parent.trace_state:
                span.trace_state = parent.trace_state.to_header()
        return span

    def consumer(
        self, headers: Mapping[str, str], subject: str, request_id: str | None, worker: str
    ) -> LightSpan | None:
        """The worker's span for one request, a child of the ``traceparent`` it came with (a new trace
        when it came with none or a malformed one)."""
        parent = _read_traceparent(headers.get("traceparent"))
        if parent is None:
            trace_id, parent_id = _random_bytes(16), None
            sampled = self.sampler.always or self.sampler.root(int.from_bytes(trace_id[8:], "big"))
        else:
            trace_id, parent_id, parent_sampled = parent
            if self.sampler.parent_based:
                sampled = parent_sampled
            else:
                sampled = self.sampler.always or self.sampler.root(int.from_bytes(trace_id[8:], "big"))
        if not sampled:
            return None
        shape = self._process_shapes.get((subject, worker))
        if shape is None:
            attrs = {**self._subject_attributes(subject), "messaging.operation.type": "process", "mesh.worker": worker}
            shape = span_shape(f"process {attrs['mesh.model']}", CONSUMER, attrs)
            self._process_shapes[(subject, worker)] = shape
        span = LightSpan(
            trace_id, _random_bytes(8), parent_id, shape, [(MESSAGE_ID, request_id)] if request_id else None
        )
        if parent_id is not None:
            span.remote_parent = True
            raw_state = headers.get("tracestate")
            if raw_state:
                span.trace_state = _trace_state(raw_state)
        return span

    def batch(self, model: str, version: str, requests: Iterable[Any], worker: str) -> LightSpan | None:
        """One span per batch, linked to every recorded request span, a child of the first (see tracing)."""
        spans = [s for s in requests if isinstance(s, LightSpan)]
        if not spans:
            return None

        def build() -> bytes:
            attrs = {"messaging.system": "nats", "mesh.model": model, "mesh.version": version, "mesh.worker": worker}
            return span_shape(f"batch {model}", INTERNAL, attrs)

        first = spans[0]
        span = LightSpan(first.trace_id, _random_bytes(8), first.span_id,
                         self._shape(("batch", model, version, worker), build),
                         [("messaging.batch.message_count", len(spans))])  # fmt: skip
        span.trace_state = first.trace_state
        span.links = [(s.trace_id, s.span_id) for s in spans]
        return span

    def inference(self, batch: LightSpan, model: str, rows: int) -> LightSpan:
        shape = self._shape(("infer", model), lambda: span_shape(f"infer {model}", INTERNAL, {"mesh.model": model}))
        span = LightSpan(batch.trace_id, _random_bytes(8), batch.span_id, shape, [("mesh.rows", rows)])
        span.trace_state = batch.trace_state
        return span

    def end(self, span: LightSpan, error: BaseException | None, attributes: Mapping[str, Any]) -> None:
        if span.end:
            return  # ended already
        span.end = time.time_ns()
        if attributes or error is not None:
            attrs = span.attrs if span.attrs is not None else []
            attrs.extend(attributes.items())
            span.attrs = attrs
            if error is not None:
                _failed(span, attrs, error)
        # A request's span waits for the exporter as a record, to be written with its like in bulk.
        self.exporter.submit(request_record(span) if is_request_span(span) else encode_span(span))

    def end_requests(self, requests: Iterable[tuple[Any, BaseException | None, float]]) -> list[tuple[Any, Any, float]]:
        """End the spans of a batch's requests at once, each with its queue wait: one call for the batch.
        Returns the requests whose spans are not this recorder's (tracing was switched meanwhile)."""
        now, out, others = time.time_ns(), list[bytes | RequestRecord](), []
        for request in requests:
            span, error, queue_ms = request
            if type(span) is not LightSpan:
                others.append(request)
                continue
            if span.end:
                continue
            span.end = now
            attrs = span.attrs if span.attrs is not None else []
            attrs.append((QUEUE_WAIT, queue_ms))
            span.attrs = attrs
            if error is not None:
                _failed(span, attrs, error)
                out.append(encode_span(span))
            else:
                out.append(request_record(span) if is_request_span(span) else encode_span(span))
        self.exporter.submit_many(out)
        return others


def _failed(span: LightSpan, attrs: _Attrs, error: BaseException) -> None:
    """Status ERROR with the error's message, and its status code as ``mesh.status`` when it has one."""
    span.error = str(error)
    status = getattr(error, "status", None)
    if status is not None:
        attrs.append(("mesh.status", int(status)))


_STATES: dict[str, str | None] = {}


def _trace_state(raw: str) -> str | None:
    """A ``tracestate`` as the W3C propagator keeps it (normalised; None if it is not valid), remembered:
    a mesh sees the same few over and over."""
    state = _STATES.get(raw, "")
    if state == "":
        if len(_STATES) >= 256:
            _STATES.clear()
        state = _STATES[raw] = TraceState.from_header([raw]).to_header() or None
    return state


def _read_traceparent(value: str | None) -> tuple[bytes, bytes, bool] | None:
    """(trace id, parent span id, sampled) of a valid ``traceparent``, read as the W3C propagator reads
    it (a later version's extra fields are allowed, version 00's are not), else None."""
    if value is None:
        return None
    if _TRACEPARENT_00.fullmatch(value) is not None:  # the usual case, its digits checked at once
        ids = bytes.fromhex(value[3:35] + value[36:52])
        trace_id, span_id = ids[:16], ids[16:]
        if trace_id == _NO_TRACE or span_id == _NO_SPAN:
            return None
        return trace_id, span_id, value[54] in "13579bdf"  # the flags' lowest bit: sampled
    match = _TRACEPARENT.fullmatch(value.strip(" \t"))
    if match is None:
        return None
    version, trace_hex, span_hex, flags_hex, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    trace_id, span_id = bytes.fromhex(trace_hex), bytes.fromhex(span_hex)
    if trace_id == _NO_TRACE or span_id == _NO_SPAN:
        return None
    return trace_id, span_id, bool(int(flags_hex, 16) & 1)
