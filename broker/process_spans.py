"""A worker's spans for the requests of a batch, kept as plain tuples: a request's span is the ``traceparent``
it came with, its message id, the time it arrived and its shape. A batch draws the span ids of all its
requests at once; the export thread reads their trace and parent ids and writes them as columns."""

from __future__ import annotations

import random
from collections.abc import Sequence

from broker.otlp import RequestColumns, encode_links

__all__ = ["BatchIds", "EndedSpans", "PendingSpan", "usual_traceparent"]

# A request's span on the worker (CONSUMER) whose traceparent is a valid, sampled version 00 and that came
# with no tracestate and a message id, the usual request: (traceparent, message id, start, shape).
PendingSpan = tuple[str, str, int, bytes]


def usual_traceparent(value: str) -> bool:
    """A version-00 traceparent (checked by the caller's pattern) whose ids are not all zeros."""
    return value[3:35] != _NO_TRACE and value[36:52] != _NO_SPAN


_NO_TRACE, _NO_SPAN = "0" * 32, "0" * 16


class BatchIds:
    """The span ids of a batch's pending request spans (row i: the i-th span), drawn at once."""

    __slots__ = ("_rows", "_trace_ids", "ended_at", "span_ids", "spans")

    def __init__(self, spans: list[PendingSpan]) -> None:
        self.spans = spans
        self.span_ids = random.randbytes(8 * len(spans))
        self.ended_at = 0  # when its spans ended (once)
        self._trace_ids: bytes | None = None
        self._rows: dict[int, int] | None = None

    def span_id(self, span: PendingSpan) -> bytes:
        row = self.row(span)
        return self.span_ids[8 * row : 8 * row + 8]

    def row(self, span: PendingSpan) -> int:
        if self._rows is None:
            self._rows = {id(s): row for row, s in enumerate(self.spans)}
        return self._rows[id(span)]

    def trace_ids(self) -> bytes:
        if self._trace_ids is None:
            self._trace_ids = bytes.fromhex("".join([s[0][3:35] for s in self.spans]))
        return self._trace_ids

    def links(self) -> bytes:
        """Links to every request span of the batch, as encode_span writes them."""
        return encode_links(self.trace_ids(), self.span_ids)

    def ended(self, waits: list[float], end: int, rows: list[int] | None = None) -> EndedSpans:
        """The spans (``rows`` of them, else all) ended at ``end``, with their queue waits."""
        self.ended_at = end
        return EndedSpans(self, waits, end, rows)


class EndedSpans:
    """A batch's request spans, ended: what the exporter queues once per span and takes in slices, each
    written as columns."""

    __slots__ = ("end", "ids", "rows", "taken", "waits")

    def __init__(self, ids: BatchIds, waits: list[float], end: int, rows: list[int] | None) -> None:
        self.ids, self.waits, self.end, self.rows, self.taken = ids, waits, end, rows, 0

    def __len__(self) -> int:
        return len(self.waits)

    def take(self, count: int) -> RequestColumns:
        a, b = self.taken, min(self.taken + count, len(self))
        self.taken = b
        ids, rows = self.ids, self.rows
        if rows is None:
            spans: Sequence[PendingSpan] = ids.spans[a:b] if a or b < len(ids.spans) else ids.spans
            span_ids = ids.span_ids[8 * a : 8 * b]
        else:
            spans = [ids.spans[row] for row in rows[a:b]]
            span_ids = b"".join([ids.span_ids[8 * row : 8 * row + 8] for row in rows[a:b]])
        parents = [s[0] for s in spans]
        trace_ids = ids.trace_ids() if spans is ids.spans else bytes.fromhex("".join([p[3:35] for p in parents]))
        return RequestColumns(
            [s[3] for s in spans], True, trace_ids, span_ids, bytes.fromhex("".join([p[36:52] for p in parents])),
            [s[2] for s in spans], [self.end] * len(spans), [s[1] for s in spans], self.waits[a:b],
        )  # fmt: skip
