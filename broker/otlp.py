"""OTLP protobuf for the mesh's own spans, written directly (no message objects): attributes, spans and
``ExportTraceServiceRequest`` bodies, the same messages the SDK's encoder writes. Text that cannot be
UTF-8 (lone surrogates) is written with replacement characters rather than failing a request."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

__all__ = [
    "MESSAGE_ID", "QUEUE_WAIT", "ColumnSource", "Links", "RequestColumns", "RequestRecord", "delimited",
    "encode_attributes", "encode_links", "encode_queued", "encode_request", "encode_request_spans", "encode_span",
    "request_record", "span_shape", "utf8", "varint",
]  # fmt: skip

_VARINTS = [bytes([n]) for n in range(128)]
_TIMES = struct.Struct("<BQBQ")  # fields 7 and 8 of a Span: start and end, fixed64 nanoseconds
_DOUBLE = struct.Struct("<d")
_SPAN_FLAGS = {False: b"\x85\x01" + struct.pack("<I", 0x100), True: b"\x85\x01" + struct.pack("<I", 0x300)}
# Status{} (unset) and flags, together: what a span that did not fail ends with.
_OK_TAIL = {remote: b"\x7a\x00" + flags for remote, flags in _SPAN_FLAGS.items()}
# Link{trace_id, span_id, flags: a local span}, as a bytes %-format of the two ids; and with zero ids, as the
# template of many links written at once, the ids at bytes 4 and 22.
_LINK = b"\x6a\x21\x0a\x10%b\x12\x08%b\x35" + struct.pack("<I", 0x100).replace(b"%", b"%%")
_LINKS = np.frombuffer(
    b"\x6a\x21\x0a\x10" + bytes(16) + b"\x12\x08" + bytes(8) + b"\x35" + struct.pack("<I", 0x100), np.uint8
)
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


class Links(Protocol):
    """A span's links, written when the span is (many spans' links are written at once)."""

    def links(self) -> bytes: ...


class ColumnSource(Protocol):
    """Request spans an exporter queues once per span, taken in slices as it writes them."""

    def __len__(self) -> int: ...

    def take(self, count: int) -> RequestColumns: ...


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
    links: list[tuple[bytes, bytes]] | Links | None
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
        links = span.links
        body += b"".join([_LINK % link for link in links]) if type(links) is list else links.links()  # type: ignore[union-attr]
    if span.error is None:
        body += _OK_TAIL[span.remote_parent]
    else:  # Status{message, code=ERROR}
        status = delimited(b"\x12", utf8(span.error)) + b"\x18\x02"
        body += delimited(b"\x7a", status) + _SPAN_FLAGS[span.remote_parent]
    return delimited(b"\x12", body)


def encode_links(trace_ids: bytes, span_ids: bytes) -> bytes:
    """Links to the spans whose ids are joined in ``trace_ids`` (16 bytes each) and ``span_ids`` (8 each), as
    encode_span writes a span's links."""
    return _fill(_LINKS, len(span_ids) // 8, [(4, trace_ids, 16), (22, span_ids, 8)])


_Column = tuple[int, bytes | np.ndarray[Any, Any], int]  # where it goes, the values joined, width of one


def _fill(template: np.ndarray[Any, Any], n: int, columns: list[_Column]) -> bytes:
    """``n`` copies of ``template``, each with its own bytes at the columns' places: (offset, the n values
    joined, width of one)."""
    rows = np.empty((n, len(template)), np.uint8)
    rows[:] = template
    for at, data, width in columns:
        column = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else data.view(np.uint8)
        rows[:, at : at + width] = column.reshape(n, width)
    return rows.tobytes()


def encode_request(resource: bytes, scope: bytes, spans: Sequence[bytes]) -> bytes:
    """An ``ExportTraceServiceRequest``: one resource, one instrumentation scope, encoded ``spans``."""
    resource, scope = delimited(b"\x0a", resource), delimited(b"\x0a", scope)
    scope_spans = len(scope) + sum(map(len, spans))
    head = b"\x12" + varint(scope_spans)  # the spans are copied once, into the body
    return b"".join([b"\x0a", varint(len(resource) + len(head) + scope_spans), resource, head, scope, *spans])


# What an ended request span leaves for the exporter: shape, remote parent, trace id, span id, parent id,
# start, end, message id, queue wait. A plain tuple of plain values, which the garbage collector stops
# looking at once it has seen it (a span object, its attribute list and their tuples, kept queued until
# exported, made it collect several times as often).
RequestRecord = tuple[bytes, bool, bytes, bytes, bytes | None, int, int, str, float | None]


def request_record(span: SpanData) -> RequestRecord | None:
    """The record of a request's span as it usually ends (the client's send, the worker's process): no trace
    state, links or error, and as attributes only its message id, then perhaps its queue wait. None for any
    other span. :func:`encode_request_spans` writes such spans many at a time, from their records."""
    attrs = span.attrs
    if span.trace_state is not None or span.links or span.error is not None or not attrs or len(attrs) > 2:
        return None
    message_id, wait = attrs[0][1], None
    if attrs[0][0] != MESSAGE_ID or type(message_id) is not str:
        return None
    if len(attrs) == 2:
        if attrs[1][0] != QUEUE_WAIT or type(attrs[1][1]) is not float:
            return None
        wait = attrs[1][1]
    return (span.shape, span.remote_parent, span.trace_id, span.span_id, span.parent_id, span.start, span.end,
            message_id, wait)  # fmt: skip


class RequestColumns:
    """Request spans column by column: per span its shape, start, end, message id and queue wait (or no queue
    waits), the ids of all joined (16, 8 and 8 bytes a span; no parent ids when none has a parent). A worker
    ends a batch's spans as one of these; an exporter queues it once per span and writes it in slices
    (:meth:`take`). Plain, not a dataclass: two are equal only when they are the same."""

    __slots__ = ("ends", "message_ids", "parent_ids", "remote", "shapes", "span_ids", "starts", "taken",
                 "trace_ids", "waits")  # fmt: skip

    def __init__(
        self, shapes: list[bytes], remote: bool, trace_ids: bytes, span_ids: bytes, parent_ids: bytes | None,
        starts: list[int], ends: list[int], message_ids: list[str], waits: list[float] | None,
    ) -> None:  # fmt: skip
        self.shapes, self.remote, self.starts, self.ends = shapes, remote, starts, ends
        self.trace_ids, self.span_ids, self.parent_ids = trace_ids, span_ids, parent_ids
        self.message_ids, self.waits = message_ids, waits
        self.taken = 0

    def __len__(self) -> int:
        return len(self.starts)

    def take(self, count: int) -> RequestColumns:
        """The next ``count`` spans not taken yet."""
        a, b = self.taken, self.taken + count
        self.taken = b
        if a == 0 and b >= len(self):
            return self
        parents = self.parent_ids[8 * a : 8 * b] if self.parent_ids is not None else None
        waits = self.waits[a:b] if self.waits is not None else None
        return RequestColumns(
            self.shapes[a:b], self.remote, self.trace_ids[16 * a : 16 * b], self.span_ids[8 * a : 8 * b], parents,
            self.starts[a:b], self.ends[a:b], self.message_ids[a:b], waits,
        )  # fmt: skip

    @staticmethod
    def joined(parts: list[RequestColumns]) -> RequestColumns:
        """Columns of one layout, one after the other."""
        first = parts[0]
        parents = b"".join([p.parent_ids for p in parts]) if first.parent_ids is not None else None  # type: ignore[misc]
        waits = [w for p in parts for w in p.waits] if first.waits is not None else None  # type: ignore[union-attr]
        return RequestColumns(
            [s for p in parts for s in p.shapes], first.remote, b"".join([p.trace_ids for p in parts]),
            b"".join([p.span_ids for p in parts]), parents, [t for p in parts for t in p.starts],
            [t for p in parts for t in p.ends], [i for p in parts for i in p.message_ids], waits,
        )  # fmt: skip

    def records(self) -> list[RequestRecord]:
        t, s, p, w = self.trace_ids, self.span_ids, self.parent_ids, self.waits
        return [(self.shapes[i], self.remote, t[16 * i : 16 * i + 16], s[8 * i : 8 * i + 8],
                 p[8 * i : 8 * i + 8] if p is not None else None, self.starts[i], self.ends[i], self.message_ids[i],
                 w[i] if w is not None else None) for i in range(len(self))]  # fmt: skip


class _Ended:
    """A request record as span data, for :func:`encode_span`."""

    trace_state: str | None = None
    links: list[tuple[bytes, bytes]] | Links | None = None
    error: str | None = None

    def __init__(self, record: RequestRecord) -> None:
        self.shape, self.remote_parent, self.trace_id, self.span_id, self.parent_id, self.start, self.end = record[:7]
        attrs: list[tuple[str, Any]] = [(MESSAGE_ID, record[7])]
        if record[8] is not None:
            attrs.append((QUEUE_WAIT, record[8]))
        self.attrs: list[tuple[str, Any]] | None = attrs


def encode_queued(items: Sequence[RequestRecord | ColumnSource | SpanData]) -> list[bytes]:
    """What an exporter holds, written: request span records; column sources once for each of their spans
    queued (a run of the same source is that many of its spans, taken in order); other spans as they are."""
    records = [item for item in items if type(item) is tuple]
    out = encode_request_spans(records) if records else []
    if len(records) == len(items):
        return out
    same: dict[tuple[bytes, bool, bool, bool, int], list[RequestColumns]] = {}  # by layout: written together
    others = [item for item in items if type(item) is not tuple]
    for source, run in itertools.groupby(others):
        take = getattr(source, "take", None)  # a column source, or else a span
        if take is None:
            out += [encode_span(span) for span in run]  # type: ignore[arg-type]
            continue
        taken: RequestColumns = take(len(list(run)))
        shapes, lengths = taken.shapes, set(map(len, taken.message_ids))
        if len(lengths) > 1 or shapes.count(shapes[0]) < len(shapes):  # several layouts: record by record
            out += encode_request_spans(taken.records())
            continue
        key = (shapes[0], taken.remote, taken.parent_ids is not None, taken.waits is not None, lengths.pop())
        same.setdefault(key, []).append(taken)
    for key, group in same.items():
        out += _layout(key).write(group[0] if len(group) == 1 else RequestColumns.joined(group))
    return out


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
        columns = RequestColumns(
            [key[0]] * len(group), key[1], b"".join([r[2] for r in group]), b"".join([r[3] for r in group]),
            b"".join([r[4] for r in group]) if key[2] else None,  # type: ignore[misc]
            [r[5] for r in group], [r[6] for r in group], [r[7] for r in group],
            [r[8] for r in group] if key[3] else None,  # type: ignore[misc]
        )  # fmt: skip
        out += _layout(key).write(columns)
    return out


def _layout(key: tuple[bytes, bool, bool, bool, int]) -> _RequestLayout:
    layout = _LAYOUTS.get(key)
    if layout is None:
        if len(_LAYOUTS) >= 1024:
            _LAYOUTS.clear()
        layout = _LAYOUTS[key] = _RequestLayout(*key)
    return layout


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

    def write(self, columns: RequestColumns) -> list[bytes]:
        n, width = len(columns), self.id_length
        ids = "".join(columns.message_ids).encode("utf-8", "replace")
        if len(ids) != n * width:  # not all ASCII: byte lengths differ from character lengths
            return [encode_span(_Ended(record)) for record in columns.records()]
        filled: list[_Column] = [
            (self.trace, columns.trace_ids, 16), (self.span, columns.span_ids, 8),
            (self.start, np.array(columns.starts, "<u8"), 8), (self.end, np.array(columns.ends, "<u8"), 8),
        ]  # fmt: skip
        if self.parent is not None:
            assert columns.parent_ids is not None
            filled.append((self.parent, columns.parent_ids, 8))
        if width:
            filled.append((self.message_id, ids, width))
        if self.wait is not None:
            filled.append((self.wait, np.array(columns.waits, "<f8"), 8))
        return [_fill(self.template, n, filled)]


_LAYOUTS: dict[tuple[bytes, bool, bool, bool, int], _RequestLayout] = {}
