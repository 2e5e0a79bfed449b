"""An OTLP/HTTP trace receiver for tests: decodes each export with the official protobuf classes and
gives the spans back as the SDK's ``ReadableSpan``, so that spans exported by other processes are
checked as spans recorded in-process are. It can be told to answer with errors first."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from telemetry import tracing

__all__ = ["Receiver", "receiving", "to_readable"]


def _value(value: AnyValue) -> object:
    return getattr(value, value.WhichOneof("value") or "string_value")


def _context(trace_id: bytes, span_id: bytes, remote: bool = False, state: str = "") -> SpanContext:
    return SpanContext(
        int.from_bytes(trace_id, "big"), int.from_bytes(span_id, "big"), is_remote=remote,
        trace_flags=TraceFlags(TraceFlags.SAMPLED), trace_state=TraceState.from_header([state]) if state else None,
    )  # fmt: skip


def to_readable(span: PbSpan, resource: Resource) -> ReadableSpan:
    """An exported span as the SDK would hold it (kinds, status and flags mapped back)."""
    parent = None
    if span.parent_span_id:
        parent = _context(span.trace_id, span.parent_span_id, remote=bool(span.flags & 0x200))
    status = Status(StatusCode(span.status.code), span.status.message or None) if span.status.code else Status()
    return ReadableSpan(
        name=span.name,
        context=_context(span.trace_id, span.span_id, state=span.trace_state),
        parent=parent,
        resource=resource,
        attributes={kv.key: _value(kv.value) for kv in span.attributes},
        links=[Link(_context(link.trace_id, link.span_id), {kv.key: _value(kv.value) for kv in link.attributes})
               for link in span.links],
        kind=SpanKind(span.kind - 1),
        status=status,
        start_time=span.start_time_unix_nano,
        end_time=span.end_time_unix_nano,
    )


class Receiver:
    """What arrived: every decoded request, in order; ``fail_with`` statuses are answered first, one per request."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.headers: list[dict[str, str]] = []
        self.fail_with: list[int] = []
        self.hold: threading.Event | None = None  # set: each answer waits for it (a slow collector)
        self.attempts = 0
        self.url = ""
        self.flush: Callable[[], None] = tracing.flush  # what exports the spans still queued

    def get_finished_spans(self) -> list[ReadableSpan]:
        """Every span exported so far (spans still queued in the recorder are flushed first)."""
        self.flush()
        spans = []
        for request in self.requests:
            for resource_spans in request.resource_spans:
                resource = Resource({kv.key: _value(kv.value) for kv in resource_spans.resource.attributes})
                for scope_spans in resource_spans.scope_spans:
                    spans += [to_readable(s, resource) for s in scope_spans.spans]
        return spans


@contextmanager
def receiving() -> Iterator[Receiver]:
    receiver = Receiver()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            receiver.attempts += 1
            if receiver.hold is not None:
                receiver.hold.wait(10)
            status = receiver.fail_with.pop(0) if receiver.fail_with else 200
            if status == 200:
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver.requests.append(ExportTraceServiceRequest.FromString(body))
                receiver.headers.append(dict(self.headers))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
