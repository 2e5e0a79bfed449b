"""OTLP protobuf for the mesh's own spans, written directly (no message objects): attributes, spans and
``ExportTraceServiceRequest`` bodies, the same messages the SDK's encoder writes. Text that cannot be
UTF-8 (lone surrogates) is written with replacement characters rather than failing a request."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

__all__ = [
    "MESSAGE_ID", "QUEUE_WAIT", "RequestRecord", "delimited", "encode_attributes", "encode_request",
    "encode_request_spans", "encode_span", "is_request_span", "request_record", "span_shape", "utf8", "varint",
]  # fmt: skip

_VARINTS = [bytes([n]) for n in range(128)]
_TIMES = struct.Struct("<BQBQ")  # fields 7 and 8 of a Span: start and end, fixed64 nanoseconds
_DOUBLE = struct.Struct("<d")
_SPAN_FLAGS = {False: b"\x85\x01" + struct.pack("<I", 0x100), True: b"\x85\x01" + struct.pack("<I", 0x300)}
# Status{} (unset) and flags, together: what a span that did not fail ends with.
_OK_TAIL = {remote: b"\x7a\x00" + flags for remote, flags in _SPAN_FLAGS.items()}
# Link{trace_id, span_id, flags: a local span}, as a bytes %-format of the two ids.
_LINK = b"\x6a\x21\x0a\x10%b\x12\x08%b\x35" + struct.pack("<I", 0x100).replace(b"%", b"%%")
MESSAGE_ID, QUEUE_WAIT = "messaging.message.id", "mesh.queue_wait_ms"


def utf8(text: str) -> bytes:
    return text.encode("utf-8", "replace")


def varint(n: int) -> bytes:
    if n < 128:
        return _VARINTS[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def delimited(tag: bytes, body: bytes) -> bytes:
    return tag + varint(len(body)) + body


def _any_value(value: Any) -> bytes:
    """An ``AnyValue``: bool, int, float, str (anything else as its str)."""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return b"\x21" + _DOUBLE.pack(value)
    return delimited(b"\x0a", utf8(str(value)))


_KEYS: dict[str, bytes] = {}


def encode_attributes(attributes: Iterable[tuple[str, Any]], tag: bytes = b"\x4a") -> bytes:
    """Repeated ``KeyValue`` fields (tag 9 of a Span by default; 1 of a Resource). Short strings and
    floats, what the request path's spans carry, take a shortcut: every length fits one byte."""
    out = []
    for key, value in attributes:
        k = _KEYS.get(key)
        if k is None:
            k = _KEYS[key] = delimited(b"\x0a", utf8(key))
        kind = type(value)
        if kind is str:
            v = utf8(value)
            n = len(v)
            if len(k) + n < 120:  # KeyValue{key, value: AnyValue{string_value}}
                out.append(tag + bytes((len(k) + n + 4,)) + k + bytes((0x12, n + 2, 0x0A, n)) + v)
                continue
        elif kind is float and len(k) < 110:  # AnyValue{double_value}: 9 bytes
            out.append(tag + bytes((len(k) + 11,)) + k + b"\x12\x09\x21" + _DOUBLE.pack(value))
            continue
        out.append(delimited(tag, k + delimited(b"\x12", _any_value(value))))
    return b"".join(out)


def span_shape(name: str, kind: int, attributes: Mapping[str, Any]) -> bytes:
    """What spans of one kind about one subject share: name, kind and fixed attributes, encoded once."""
    return delimited(b"\x2a", utf8(name)) + b"\x30" + varint(kind) + encode_attributes(attributes.items())


class SpanData(Protocol):
    trace_id: bytes
    span_id: bytes
    parent_id: bytes | None
    remote_parent: bool
    trace_state: str | None
    shape: bytes
    start: int
    end: int
    attrs: list[tuple[str, Any]] | None
    links: list[tuple[bytes, bytes]] | None
    error: str | None


def encode_span(span: SpanData) -> bytes:
    """One ``Span`` as field 2 of a ``ScopeSpans``."""
    body = b"\x0a\x10" + span.trace_id + b"\x12\x08" + span.span_id
    if span.trace_state:
        body += delimited(b"\x1a", utf8(span.trace_state))
    if span.parent_id is not None:
        body += b"\x22\x08" + span.parent_id
    body += span.shape + _TIMES.pack(0x39, span.start, 0x41, span.end)
    if span.attrs:
        body += encode_attributes(span.attrs)
    if span.links:
        body += b"".join([_LINK % link for link in span.links])
    if span.error is None:
        body += _OK_TAIL[span.remote_parent]
    else:  # Status{message, code=ERROR}
        status = delimited(b"\x12", utf8(span.error)) + b"\x18\x02"
        body += delimited(b"\x7a", status) + _SPAN_FLAGS[span.remote_parent]
    return delimited(b"\x12", body)


def encode_request(resource: bytes, scope: bytes, spans: Sequence[bytes]) -> bytes:
    """An ``ExportTraceServiceRequest``: one resource, one instrumentation scope, encoded ``spans``."""
    scope_spans = delimited(b"\x12", delimited(b"\x0a", scope) + b"".join(spans))
    return delimited(b"\x0a", delimited(b"\x0a", resource) + scope_spans)


def is_request_span(span: SpanData) -> bool:
    """A request's span as it usually ends (the client's send, the worker's process): no trace state, links or
    error, and as attributes only its message id, then perhaps its queue wait. :func:`encode_request_spans`
    writes such spans many at a time, from their :func:`request_record`."""
    attrs = span.attrs
    if span.trace_state is not None or span.links or span.error is not None or not attrs or len(attrs) > 2:
        return False
    if attrs[0][0] != MESSAGE_ID or type(attrs[0][1]) is not str:
        return False
    return len(attrs) == 1 or (attrs[1][0] == QUEUE_WAIT and type(attrs[1][1]) is float)


# What an ended request span leaves for the exporter: shape, remote parent, trace id, span id, parent id,
# start, end, message id, queue wait. A plain tuple of plain values, which the garbage collector stops
# looking at once it has seen it (a span object, its attribute list and their tuples, kept queued until
# exported, made it collect several times as often).
RequestRecord = tuple[bytes, bool, bytes, bytes, bytes | None, int, int, str, float | None]


def request_record(span: SpanData) -> RequestRecord:
    """The record of a request span (:func:`is_request_span`)."""
    attrs = span.attrs
    assert attrs is not None
    wait = attrs[1][1] if len(attrs) == 2 else None
    return (span.shape, span.remote_parent, span.trace_id, span.span_id, span.parent_id, span.start, span.end,
            attrs[0][1], wait)  # fmt: skip


class _Ended:
    """A request record as span data, for :func:`encode_span`."""

    trace_state: str | None = None
    links: list[tuple[bytes, bytes]] | None = None
    error: str | None = None

    def __init__(self, record: RequestRecord) -> None:
        self.shape, self.remote_parent, self.trace_id, self.span_id, self.parent_id, self.start, self.end = record[:7]
        attrs: list[tuple[str, Any]] = [(MESSAGE_ID, record[7])]
        if record[8] is not None:
            attrs.append((QUEUE_WAIT, record[8]))
        self.attrs: list[tuple[str, Any]] | None = attrs


def encode_request_spans(records: Iterable[RequestRecord]) -> list[bytes]:
    """What :func:`encode_span` writes for each span of ``records``, in a few bytes objects. Spans that differ
    only in ids, times, message id and queue wait have the same layout when their message ids are as long:
    each such group is written at once, column by column, from one template."""
    groups: dict[tuple[bytes, bool, bool, bool, int], list[RequestRecord]] = {}
    for record in records:
        key = (record[0], record[1], record[4] is not None, record[8] is not None, len(record[7]))
        group = groups.get(key)
        if group is None:
            groups[key] = [record]
        else:
            group.append(record)
    out = []
    for key, group in groups.items():
        layout = _LAYOUTS.get(key)
        if layout is None:
            if len(_LAYOUTS) >= 1024:
                _LAYOUTS.clear()
            layout = _LAYOUTS[key] = _RequestLayout(*key)
        out.extend(layout.write(group))
    return out


class _RequestLayout:
    """Where ids, times, message id and queue wait fall in the bytes of request spans of one shape, parent kind
    and message id length (see encode_request_spans)."""

    def __init__(self, shape: bytes, remote: bool, parent: bool, queue_wait: bool, id_length: int) -> None:
        head = b"\x0a\x10" + bytes(16) + b"\x12\x08" + bytes(8) + (b"\x22\x08" + bytes(8) if parent else b"")
        message_id = encode_attributes([(MESSAGE_ID, "\0" * id_length)])
        wait = encode_attributes([(QUEUE_WAIT, 0.0)]) if queue_wait else b""
        body = head + shape + _TIMES.pack(0x39, 0, 0x41, 0) + message_id + wait + _OK_TAIL[remote]
        prefix = b"\x12" + varint(len(body))
        self.template = np.frombuffer(prefix + body, np.uint8)
        at = len(prefix)
        self.trace, self.span, self.parent = at + 2, at + 20, at + 30 if parent else None
        times = at + len(head) + len(shape)
        self.start, self.end = times + 1, times + 10
        self.message_id = times + _TIMES.size + len(message_id) - id_length
        self.wait = times + _TIMES.size + len(message_id) + len(wait) - 8 if wait else None
        self.id_length = id_length

    def write(self, group: list[RequestRecord]) -> list[bytes]:
        n, width = len(group), self.id_length
        ids = "".join([record[7] for record in group]).encode("utf-8", "replace")
        if len(ids) != n * width:  # not all ASCII: byte lengths differ from character lengths
            return [encode_span(_Ended(record)) for record in group]
        rows = np.empty((n, len(self.template)), np.uint8)
        rows[:] = self.template

        def put(at: int, data: bytes | np.ndarray[Any, Any], size: int) -> None:
            column = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else data.view(np.uint8)
            rows[:, at : at + size] = column.reshape(n, size)

        put(self.trace, b"".join([record[2] for record in group]), 16)
        put(self.span, b"".join([record[3] for record in group]), 8)
        if self.parent is not None:
            put(self.parent, b"".join([record[4] for record in group]), 8)  # type: ignore[misc]
        put(self.start, np.array([record[5] for record in group], "<u8"), 8)
        put(self.end, np.array([record[6] for record in group], "<u8"), 8)
        if width:
            put(self.message_id, ids, width)
        if self.wait is not None:
            put(self.wait, np.array([record[8] for record in group], "<f8"), 8)
        return [rows.tobytes()]


_LAYOUTS: dict[tuple[bytes, bool, bool, bool, int], _RequestLayout] = {}
