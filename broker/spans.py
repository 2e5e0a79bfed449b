"""The mesh's own span recorder: each span of the request path is a few slots, its name, kind and fixed
attributes encoded once per subject, the sampling decided as the SDK's samplers would; finished spans go
to an :class:`~broker.span_export.OtlpExporter`. A few µs a span, where the SDK with its exporter takes ~60."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN, TraceState

from broker.otlp import (
    MESSAGE_ID,
    QUEUE_WAIT,
    Links,
    RequestRecord,
    encode_span,
    request_record,
    span_shape,
)
from broker.process_spans import BatchIds, PendingSpan, usual_traceparent
from broker.span_export import OtlpExporter

__all__ = ["LightSpan", "Recorder", "Sampler", "SendSpan"]

PRODUCER, CONSUMER, INTERNAL = 4, 5, 1  # OTLP's SpanKind numbers
_RATIO_LIMIT = 1 << 64
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_TRACEPARENT_00 = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_NO_TRACE, _NO_SPAN = bytes(16), bytes(8)
_SAMPLED_FLAGS = "13579bdf"  # trace flags whose lowest bit, sampled, is set
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

    __slots__ = ("attrs", "end", "error", "links", "parent_id", "remote_parent", "requests", "shape", "span_id",
                 "start", "trace_id", "trace_state")  # fmt: skip

    def __init__(
        self, trace_id: bytes, span_id: bytes, parent_id: bytes | None, shape: bytes, attrs: _Attrs | None
    ) -> None:
        self.trace_id, self.span_id, self.parent_id = trace_id, span_id, parent_id
        self.remote_parent = False
        self.trace_state: str | None = None
        self.shape = shape
        self.start, self.end = time.time_ns(), 0
        self.attrs = attrs
        self.links: list[tuple[bytes, bytes]] | Links | None = None
        self.error: str | None = None
        self.requests: BatchIds | None = None  # a batch's span: its pending request spans and their ids

    def traceparent(self) -> str:
        return f"00-{self.trace_id.hex()}-{self.span_id.hex()}-01"


# A client's send span with no parent, the usual: [its trace and span ids (24 random bytes), message id, start
# (None once ended), shape]. A plain list, not a span object, unless it ends otherwise than as usual (see
# Recorder.end).
SendSpan = list[Any]

# Span and trace ids; all zeros (invalid) has a chance of 2^-64 a span, which the SDK's generator ignores too.
_random_bytes = random.randbytes


def _context_reader() -> Callable[[], bool]:
    """Whether the current OpenTelemetry context holds a span, asked for every request a client sends: read
    from the API's context variable when the API keeps the context in one (its default), one call where
    ``trace.get_current_span`` takes five; else through the API."""
    try:
        from opentelemetry.context import _RUNTIME_CONTEXT
        from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
        from opentelemetry.trace.propagation import _SPAN_KEY
    except ImportError:  # another release of the API
        return lambda: trace.get_current_span() is not INVALID_SPAN
    if type(_RUNTIME_CONTEXT) is not ContextVarsRuntimeContext:
        return lambda: trace.get_current_span() is not INVALID_SPAN
    current = _RUNTIME_CONTEXT._current_context.get
    return lambda: _SPAN_KEY in current()


_caller_has_span = _context_reader()


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

    def producer(self, subject: str, request_id: str, headers: MutableMapping[str, str]) -> LightSpan | SendSpan | None:
        """The client's send span; the parent is the caller's current span, if it has one (else, the usual,
        the span is a plain tuple: :data:`SendSpan`). A dropped trace still sends its context, marked not
        sampled, so that the worker drops it too."""
        ids = _random_bytes(24)
        parent = None
        if _caller_has_span():  # else the usual: a new trace, with no span to ask for its context
            caller = trace.get_current_span()
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
        if parent is None:
            return [ids, request_id, time.time_ns(), shape]
        span = LightSpan(trace_id, span_id, parent_id, shape, [(MESSAGE_ID, request_id)])
        span.remote_parent = parent.is_remote
        if parent.trace_state:
            span.trace_state = parent.trace_state.to_header()
        return span

    def consumer(
        self, headers: Mapping[str, str], subject: str, request_id: str | None, worker: str, forwarded: bool = False
    ) -> LightSpan | PendingSpan | None:
        """The worker's span for one request, a child of the ``traceparent`` it came with (a new trace
        when it came with none or a malformed one). The usual request's span is a tuple until its batch
        ends (:mod:`broker.process_spans`); one whose context goes on to a pipeline's next stage
        (``forwarded``) is a span object at once."""
        value = headers.get("traceparent")
        sampler = self.sampler
        if (
            value is not None and request_id and not forwarded and (sampler.parent_based or sampler.always)
            and _TRACEPARENT_00.fullmatch(value) is not None and usual_traceparent(value)
            and not headers.get("tracestate")
        ):  # fmt: skip
            if sampler.parent_based and value[54] not in _SAMPLED_FLAGS:
                return None
            shape = self._process_shapes.get((subject, worker)) or self._process_shape(subject, worker)
            return (value, request_id, time.time_ns(), shape)
        parent = _read_traceparent(value)
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
        shape = self._process_shape(subject, worker)
        span = LightSpan(
            trace_id, _random_bytes(8), parent_id, shape, [(MESSAGE_ID, request_id)] if request_id else None
        )
        if parent_id is not None:
            span.remote_parent = True
            raw_state = headers.get("tracestate")
            if raw_state:
                span.trace_state = _trace_state(raw_state)
        return span

    def _process_shape(self, subject: str, worker: str) -> bytes:
        shape = self._process_shapes.get((subject, worker))
        if shape is None:
            attrs = {**self._subject_attributes(subject), "messaging.operation.type": "process", "mesh.worker": worker}
            shape = span_shape(f"process {attrs['mesh.model']}", CONSUMER, attrs)
            self._process_shapes[(subject, worker)] = shape
        return shape

    def batch(self, model: str, version: str, requests: Iterable[Any], worker: str) -> LightSpan | None:
        """One span per batch, linked to every recorded request span, a child of the first (see tracing)."""
        spans = [s for s in requests if type(s) is tuple or type(s) is LightSpan]
        if not spans:
            return None
        pending: list[PendingSpan] = [s for s in spans if type(s) is tuple]
        ids = BatchIds(pending) if pending else None

        def build() -> bytes:
            attrs = {"messaging.system": "nats", "mesh.model": model, "mesh.version": version, "mesh.worker": worker}
            return span_shape(f"batch {model}", INTERNAL, attrs)

        first = spans[0]
        if isinstance(first, LightSpan):
            trace_id, parent_id, trace_state = first.trace_id, first.span_id, first.trace_state
        else:
            assert ids is not None
            trace_id, parent_id, trace_state = bytes.fromhex(first[0][3:35]), ids.span_ids[:8], None
        span = LightSpan(trace_id, _random_bytes(8), parent_id, self._shape(("batch", model, version, worker), build),
                         [("messaging.batch.message_count", len(spans))])  # fmt: skip
        span.trace_state, span.requests = trace_state, ids
        if ids is not None and len(pending) == len(spans):  # the usual batch: links written on export
            span.links = ids
        else:
            span.links = [_ids_of(s, ids) for s in spans]
        return span

    def inference(self, batch: LightSpan, model: str, rows: int) -> LightSpan:
        shape = self._shape(("infer", model), lambda: span_shape(f"infer {model}", INTERNAL, {"mesh.model": model}))
        span = LightSpan(batch.trace_id, _random_bytes(8), batch.span_id, shape, [("mesh.rows", rows)])
        span.trace_state = batch.trace_state
        return span

    def end(
        self, span: LightSpan | PendingSpan | SendSpan, error: BaseException | None, attributes: Mapping[str, Any]
    ) -> None:
        if type(span) is list:  # a client's send span
            ids, message_id, start, shape = span
            if start is None:
                return  # ended already
            if error is None and not attributes:  # as it usually ends: its record
                span[2], end = None, time.time_ns()
                self.exporter.submit((shape, False, ids[:16], ids[16:], None, start, end, message_id, None))
                return
            span = _sent(span)
        elif type(span) is tuple:  # a worker's request span, ended before (or without) a batch
            span = _alone(span, _random_bytes(8))
        assert type(span) is LightSpan
        if span.end:
            return  # ended already
        span.end = time.time_ns()
        if attributes or error is not None:
            attrs = span.attrs if span.attrs is not None else []
            attrs.extend(attributes.items())
            span.attrs = attrs
            if error is not None:
                _failed(span, attrs, error)
        # A request's span waits for the exporter as a record, to be written with its like in bulk; a batch's
        # span with its links still to write is written there too.
        record = request_record(span)
        if record is not None:
            self.exporter.submit(record)
        else:
            self.exporter.submit(span if type(span.links) is BatchIds else encode_span(span))

    def end_requests(
        self, batch: Any, spans: Sequence[Any], waits: Sequence[float], errors: Mapping[int, BaseException]
    ) -> list[int]:
        """End the spans of ``batch``'s requests at once (``None``: a request not traced), each with its queue
        wait, those in ``errors`` (by position) failed. Returns where the spans are not this recorder's (tracing
        was switched meanwhile)."""
        now = time.time_ns()
        ids: BatchIds | None = batch.requests if type(batch) is LightSpan else None
        if ids is not None and ids.ended_at:
            return []  # ended already
        if ids is not None and not errors and len(spans) == len(ids.spans):
            # The usual batch: every request's span pending with it; the export thread writes them.
            self.exporter.submit_columns(ids.ended(list(waits), now))
            return []
        out: list[bytes | RequestRecord] = []
        others: list[int] = []
        rows: list[int] = []
        for i, span in enumerate(spans):
            if type(span) is tuple:
                if ids is not None and i not in errors:
                    rows.append(ids.row(span))
                    continue
                span = _alone(span, ids.span_id(span) if ids is not None else _random_bytes(8))
            elif type(span) is list:
                span = _sent(span)
            elif type(span) is not LightSpan:
                if span is not None:
                    others.append(i)
                continue
            if span.end:
                continue
            span.end = now
            attrs = span.attrs if span.attrs is not None else []
            attrs.append((QUEUE_WAIT, waits[i]))
            span.attrs = attrs
            error = errors.get(i)
            if error is not None:
                _failed(span, attrs, error)
            out.append(request_record(span) or encode_span(span))
        if out:
            self.exporter.submit_many(out)
        if rows:
            assert ids is not None
            kept = [waits[i] for i, span in enumerate(spans) if type(span) is tuple and i not in errors]
            self.exporter.submit_columns(ids.ended(kept, now, rows))
        elif ids is not None:
            ids.ended_at = now
        return others


def _alone(span: PendingSpan, span_id: bytes) -> LightSpan:
    """A request's pending span as a span object, to end apart from its batch."""
    value, message_id, start, shape = span
    light = LightSpan(
        bytes.fromhex(value[3:35]), span_id, bytes.fromhex(value[36:52]), shape, [(MESSAGE_ID, message_id)]
    )
    light.start, light.remote_parent = start, True
    return light


def _sent(span: SendSpan) -> LightSpan:
    """A client's send span as a span object, to end otherwise than as usual (ended already if so)."""
    ids, message_id, start, shape = span
    light = LightSpan(ids[:16], ids[16:], None, shape, [(MESSAGE_ID, message_id)])
    light.start, light.end = start or 0, 0 if start is not None else 1
    span[2] = None
    return light


def _ids_of(span: LightSpan | PendingSpan, ids: BatchIds | None) -> tuple[bytes, bytes]:
    """(trace id, span id) of a request's span, for a link."""
    if type(span) is LightSpan:
        return span.trace_id, span.span_id
    assert ids is not None and type(span) is tuple
    return bytes.fromhex(span[0][3:35]), ids.span_id(span)


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
