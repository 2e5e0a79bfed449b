"""OTLP protobuf for the mesh's own spans, written directly (no message objects): attributes, spans and
``ExportTraceServiceRequest`` bodies, the same messages the SDK's encoder writes. Text that cannot be
UTF-8 (lone surrogates) is written with replacement characters rather than failing a request."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

__all__ = [
    "MESSAGE_ID", "QUEUE_WAIT", "RequestSpanFormat", "delimited", "encode_attributes", "encode_request", "encode_span",
    "span_shape", "utf8", "varint",
]  # fmt: skip

_VARINTS = [bytes([n]) for n in range(128)]
_TIMES = struct.Struct("<BQBQ")  # fields 7 and 8 of a Span: start and end, fixed64 nanoseconds
_DOUBLE = struct.Struct("<d")
_SPAN_FLAGS = {False: b"\x85\x01" + struct.pack("<I", 0x100), True: b"\x85\x01" + struct.pack("<I", 0x300)}
# Status{} (unset) and flags, together: what a span that did not fail ends with.
_OK_TAIL = {remote: b"\x7a\x00" + flags for remote, flags in _SPAN_FLAGS.items()}
_LINK_FLAGS = b"\x35" + struct.pack("<I", 0x100)
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
    if span.links:  # Link{trace_id, span_id, flags: a local span}
        body += b"".join([b"\x6a\x21\x0a\x10" + t + b"\x12\x08" + s + _LINK_FLAGS for t, s in span.links])
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


def _literal(data: bytes) -> bytes:
    return data.replace(b"%", b"%%")


class RequestSpanFormat:
    """A request's span (the client's send, the worker's process) as one bytes %-format: between the spans
    of one shape only the ids, times, message id and queue wait differ. :meth:`encode` writes what
    :func:`encode_span` writes, in less than half the time, for a span without trace state, links or
    error whose only attributes are its message id (under 100 bytes) and, with ``queue_wait``, its queue
    wait; for any other it returns None."""

    def __init__(self, shape: bytes, remote: bool, queue_wait: bool) -> None:
        key = delimited(b"\x0a", utf8(MESSAGE_ID))
        tail = _OK_TAIL[remote]
        # Span{trace_id, span_id, [parent_span_id], shape, times, KeyValue{message id, string}, [queue wait], tail}
        parts = [b"\x12%b\x0a\x10%b\x12\x08%b%b", _literal(shape), b"%b\x4a%c", _literal(key), b"\x12%c\x0a%c%b"]
        fixed = 18 + 10 + len(shape) + _TIMES.size + 2 + len(key) + 4 + len(tail)  # all but parent and message id
        if queue_wait:
            wait_key = delimited(b"\x0a", utf8(QUEUE_WAIT))
            parts += [bytes((0x4A, len(wait_key) + 11)), _literal(wait_key), b"\x12\x09\x21%b"]
            fixed += 2 + len(wait_key) + 11
        parts.append(_literal(tail))
        self._format, self._fixed, self._key_len = b"".join(parts), fixed, len(key)
        self._queue_wait = queue_wait

    def encode(self, span: SpanData, message_id: str, queue_ms: float | None = None) -> bytes | None:
        value = message_id.encode("utf-8", "replace")
        n = len(value)
        if n > 100 or (queue_ms is not None) != self._queue_wait:
            return None  # lengths past one byte, or another shape of attributes: encode_span's work
        parent = b"" if span.parent_id is None else b"\x22\x08" + span.parent_id
        size = varint(self._fixed + len(parent) + n)
        times = _TIMES.pack(0x39, span.start, 0x41, span.end)
        args = (size, span.trace_id, span.span_id, parent, times, self._key_len + n + 4, n + 2, n, value)
        return self._format % (args if queue_ms is None else (*args, _DOUBLE.pack(queue_ms)))
