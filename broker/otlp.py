"""OTLP/HTTP export of the mesh's own spans: the protobuf written directly (no message objects), from one
background thread that sends batches of spans as ``ExportTraceServiceRequest`` bodies."""

from __future__ import annotations

import gzip
import http.client
import logging
import struct
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

__all__ = ["ExportSettings", "OtlpExporter", "encode_attributes", "encode_request", "encode_span", "varint"]

log = logging.getLogger(__name__)

_VARINTS = [bytes([n]) for n in range(128)]
_TIMES = struct.Struct("<BQBQ")  # fields 7 and 8 of a Span: start and end, fixed64 nanoseconds
_DOUBLE = struct.Struct("<d")
_SPAN_FLAGS = {False: b"\x85\x01" + struct.pack("<I", 0x100), True: b"\x85\x01" + struct.pack("<I", 0x300)}
# Status{} (unset) and flags, together: what a span that did not fail ends with.
_OK_TAIL = {remote: b"\x7a\x00" + flags for remote, flags in _SPAN_FLAGS.items()}
_LINK_FLAGS = b"\x35" + struct.pack("<I", 0x100)
_RETRYABLE = {429, 502, 503, 504}


def varint(n: int) -> bytes:
    if n < 128:
        return _VARINTS[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _delimited(tag: bytes, body: bytes) -> bytes:
    return tag + varint(len(body)) + body


def _any_value(value: Any) -> bytes:
    """An ``AnyValue``: bool, int, float, str (anything else as its str)."""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return b"\x21" + _DOUBLE.pack(value)
    return _delimited(b"\x0a", str(value).encode())


_KEYS: dict[str, bytes] = {}


def encode_attributes(attributes: Iterable[tuple[str, Any]], tag: bytes = b"\x4a") -> bytes:
    """Repeated ``KeyValue`` fields (tag 9 of a Span by default; 1 of a Resource). Short strings and
    floats, what the request path's spans carry, take a shortcut: every length fits one byte."""
    out = []
    for key, value in attributes:
        k = _KEYS.get(key)
        if k is None:
            k = _KEYS[key] = _delimited(b"\x0a", key.encode())
        kind = type(value)
        if kind is str:
            v = value.encode()
            n = len(v)
            if len(k) + n < 120:  # KeyValue{key, value: AnyValue{string_value}}
                out.append(tag + bytes((len(k) + n + 4,)) + k + bytes((0x12, n + 2, 0x0A, n)) + v)
                continue
        elif kind is float and len(k) < 110:  # AnyValue{double_value}: 9 bytes
            out.append(tag + bytes((len(k) + 11,)) + k + b"\x12\x09\x21" + _DOUBLE.pack(value))
            continue
        out.append(_delimited(tag, k + _delimited(b"\x12", _any_value(value))))
    return b"".join(out)


def span_shape(name: str, kind: int, attributes: Mapping[str, Any]) -> bytes:
    """What spans of one kind about one subject share: name, kind and fixed attributes, encoded once."""
    return _delimited(b"\x2a", name.encode()) + b"\x30" + varint(kind) + encode_attributes(attributes.items())


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
        body += _delimited(b"\x1a", span.trace_state.encode())
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
        status = _delimited(b"\x12", span.error.encode()) + b"\x18\x02"
        body += _delimited(b"\x7a", status) + _SPAN_FLAGS[span.remote_parent]
    return _delimited(b"\x12", body)


def encode_request(resource: bytes, scope: bytes, spans: Sequence[bytes]) -> bytes:
    """An ``ExportTraceServiceRequest``: one resource, one instrumentation scope, encoded ``spans``."""
    scope_spans = _delimited(b"\x12", _delimited(b"\x0a", scope) + b"".join(spans))
    return _delimited(b"\x0a", _delimited(b"\x0a", resource) + scope_spans)


@dataclass(frozen=True, slots=True)
class ExportSettings:
    """Where and how spans go: the standard ``OTEL_EXPORTER_OTLP_*`` and ``OTEL_BSP_*`` values."""

    url: str = "http://localhost:4318/v1/traces"
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 10.0
    gzip: bool = False
    ca_file: str | None = None
    max_queue: int = 2048
    batch_size: int = 512
    delay_s: float = 5.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ExportSettings:
        """The standard variables, the ``_TRACES_`` form first (timeouts in seconds, as the Python SDK reads them)."""

        def pick(name: str) -> str | None:
            return env.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}") or env.get(f"OTEL_EXPORTER_OTLP_{name}") or None

        url = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        if not url:
            url = (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "http://localhost:4318").rstrip("/") + "/v1/traces"
        headers = {}
        for item in (pick("HEADERS") or "").split(","):
            name, sep, value = item.partition("=")
            if sep and name.strip():
                headers[unquote(name.strip())] = unquote(value.strip())
        return cls(
            url=url, headers=headers, timeout_s=float(pick("TIMEOUT") or 10), gzip=pick("COMPRESSION") == "gzip",
            ca_file=pick("CERTIFICATE"), max_queue=int(env.get("OTEL_BSP_MAX_QUEUE_SIZE") or 2048),
            batch_size=int(env.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE") or 512),
            delay_s=float(env.get("OTEL_BSP_SCHEDULE_DELAY") or 5000) / 1000,
        )  # fmt: skip


class OtlpExporter:
    """Encoded spans queue here (bounded: beyond ``max_queue`` they are dropped and counted); a thread
    posts them every ``delay_s``, or as soon as a batch is full. Spans are encoded as they end, by the
    caller: bytes, unlike span objects, cost the garbage collector nothing while they wait."""

    def __init__(self, settings: ExportSettings, resource: Mapping[str, Any], scope: tuple[str, str]) -> None:
        self.settings = settings
        self._resource = encode_attributes(resource.items(), tag=b"\x0a")
        self._scope = _delimited(b"\x0a", scope[0].encode()) + _delimited(b"\x12", scope[1].encode())
        self._queue: deque[bytes] = deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # one export at a time: the thread's, or a flush's
        self._stopping = False
        self._conn: http.client.HTTPConnection | None = None
        self.exported = self.dropped = self.failed = 0
        self._thread = threading.Thread(target=self._run, name="servemesh-otlp", daemon=True)
        self._thread.start()

    def submit(self, span: bytes) -> None:
        """Queue one span, as :func:`encode_span` wrote it."""
        queue = self._queue
        if len(queue) >= self.settings.max_queue:
            self.dropped += 1
            return
        queue.append(span)
        if len(queue) == self.settings.batch_size:
            self._wake.set()

    def submit_many(self, spans: list[bytes]) -> None:
        queue, settings = self._queue, self.settings
        room = settings.max_queue - len(queue)
        if room < len(spans):
            self.dropped += len(spans) - max(room, 0)
            spans = spans[: max(room, 0)]
        before = len(queue)
        queue.extend(spans)
        if before < settings.batch_size <= len(queue):
            self._wake.set()

    def force_flush(self) -> None:
        with self._lock:
            self._drain()

    def shutdown(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=self.settings.timeout_s + 1)
        self.force_flush()
        if self._conn is not None:
            self._conn.close()
        if self.dropped:
            log.warning("tracing: %d spans dropped (export queue full)", self.dropped)

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self.settings.delay_s)
            self._wake.clear()
            with self._lock:
                self._drain()

    def _drain(self) -> None:
        queue, size = self._queue, self.settings.batch_size
        while queue:
            spans = [queue.popleft() for _ in range(min(size, len(queue)))]
            body = encode_request(self._resource, self._scope, spans)
            if self._post(body):
                self.exported += len(spans)
            else:
                self.failed += len(spans)

    def _post(self, body: bytes) -> bool:
        """Send one request, retrying what the spec calls retryable until the timeout; False if given up."""
        s = self.settings
        headers = {"Content-Type": "application/x-protobuf", **s.headers}
        if s.gzip:
            body, headers["Content-Encoding"] = gzip.compress(body), "gzip"
        deadline, backoff = time.monotonic() + s.timeout_s, 0.5
        parts = urlsplit(s.url)
        while True:
            try:
                conn = self._connection(parts.scheme, parts.netloc)
                conn.request("POST", parts.path or "/v1/traces", body, headers)
                response = conn.getresponse()
                response.read()
                if 200 <= response.status < 300:
                    return True
                error = f"HTTP {response.status}"
                retry = response.status in _RETRYABLE
            except (OSError, http.client.HTTPException) as exc:
                error, retry = f"{type(exc).__name__}: {exc}", True
                self._conn = None
            if not retry or time.monotonic() + backoff > deadline or self._stopping:
                log.warning("tracing: export to %s failed (%s); %s", s.url, error, "giving up on the batch")
                return False
            time.sleep(backoff)
            backoff *= 2

    def _connection(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        if self._conn is None:
            if scheme == "https":
                import ssl

                context = ssl.create_default_context(cafile=self.settings.ca_file)
                self._conn = http.client.HTTPSConnection(netloc, timeout=self.settings.timeout_s, context=context)
            else:
                self._conn = http.client.HTTPConnection(netloc, timeout=self.settings.timeout_s)
        return self._conn
