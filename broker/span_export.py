"""Export of the mesh's own spans over OTLP/HTTP: encoded spans wait in a bounded queue, and one background
thread posts them as ``ExportTraceServiceRequest`` bodies every ``delay_s``, or as soon as a batch is full.
Nothing here can fail a request: a collector that is down, slow or refusing costs the spans, counted."""

from __future__ import annotations

import gzip
import http.client
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from broker.otlp import (
    ColumnSource,
    RequestRecord,
    SpanData,
    delimited,
    encode_attributes,
    encode_queued,
    encode_request,
    utf8,
)

__all__ = ["ExportSettings", "OtlpExporter"]

log = logging.getLogger(__name__)

_RETRYABLE = {429, 502, 503, 504}
_N = TypeVar("_N", int, float)


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
        """The standard variables, the ``_TRACES_`` form first (timeouts in seconds, as the Python SDK reads
        them). A value the SDK would refuse is logged and its default used, as the SDK does."""

        def pick(name: str) -> str | None:
            return env.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}") or env.get(f"OTEL_EXPORTER_OTLP_{name}") or None

        url = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        if not url:
            url = (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "http://localhost:4318").rstrip("/") + "/v1/traces"
        headers = {}
        for item in (pick("HEADERS") or "").split(","):
            name, sep, value = item.partition("=")
            name, value = unquote(name.strip()), unquote(value.strip())
            if sep and name and _header_ok(name) and _header_ok(value):
                headers[name] = value
            elif sep:
                log.warning("tracing: ignoring OTLP header %r: not a valid HTTP header", name)
        max_queue = _number(env, "OTEL_BSP_MAX_QUEUE_SIZE", int, 2048, lambda n: n > 0)
        return cls(
            url=url, headers=headers, gzip=pick("COMPRESSION") == "gzip", ca_file=pick("CERTIFICATE"),
            timeout_s=_number({"OTEL_EXPORTER_OTLP_TIMEOUT": pick("TIMEOUT") or ""}, "OTEL_EXPORTER_OTLP_TIMEOUT",
                              float, 10.0, lambda t: t > 0),
            max_queue=max_queue,
            batch_size=_number(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", int, min(512, max_queue),
                               lambda n: 0 < n <= max_queue),
            delay_s=_number(env, "OTEL_BSP_SCHEDULE_DELAY", float, 5000.0, lambda ms: ms > 0) / 1000,
        )  # fmt: skip


def _number(env: Mapping[str, str], name: str, kind: Callable[[str], _N], default: _N, ok: Callable[[_N], bool]) -> _N:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or (isinstance(value, float) and math.isnan(value)) or not ok(value):
        log.warning("tracing: %s=%r is not valid here; using %s", name, raw, default)
        return default
    return value


def _header_ok(text: str) -> bool:
    return text.isprintable() and text.isascii()


class OtlpExporter:
    """Ended spans queue here (bounded: beyond ``max_queue`` they are dropped and counted); a thread posts
    them every ``delay_s``, or as soon as a batch is full. A span comes encoded, or as the record of a request's
    span (:func:`~broker.otlp.request_record`), or among a batch's request spans (a
    :class:`~broker.otlp.ColumnSource`, queued once per span), which the thread writes with their like, many
    at a time; or as a span to encode there (a batch span whose links are written on export)."""

    def __init__(self, settings: ExportSettings, resource: Mapping[str, Any], scope: tuple[str, str]) -> None:
        self.settings = settings
        self._resource = encode_attributes(resource.items(), tag=b"\x0a")
        self._scope = delimited(b"\x0a", utf8(scope[0])) + delimited(b"\x12", utf8(scope[1]))
        self._queue: deque[bytes | RequestRecord | ColumnSource | SpanData] = deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # one export at a time: the thread's, or a flush's
        self._stopping = False
        self._give_up_at = math.inf  # once stopping: what is not sent by then is counted failed
        self._conn: http.client.HTTPConnection | None = None
        self.exported = self.dropped = self.failed = 0
        self._thread = threading.Thread(target=self._run, name="servemesh-otlp", daemon=True)
        self._thread.start()

    def submit(self, span: bytes | RequestRecord | SpanData) -> None:
        """Queue one span: as :func:`~broker.otlp.encode_span` wrote it, a request span's record, or a span to
        be written on export."""
        queue = self._queue
        if len(queue) >= self.settings.max_queue:
            self.dropped += 1
            return
        queue.append(span)
        if len(queue) == self.settings.batch_size:
            self._wake.set()

    def submit_many(self, spans: list[bytes | RequestRecord]) -> None:
        queue, settings = self._queue, self.settings
        room = settings.max_queue - len(queue)
        if room < len(spans):
            self.dropped += len(spans) - max(room, 0)
            spans = spans[: max(room, 0)]
        before = len(queue)
        queue.extend(spans)
        if before < settings.batch_size <= len(queue):
            self._wake.set()

    def submit_columns(self, columns: ColumnSource) -> None:
        """Queue request spans written as columns: each span takes its place in the queue, as if it came alone."""
        queue, settings = self._queue, self.settings
        room, n = settings.max_queue - len(queue), len(columns)
        if room < n:
            self.dropped += n - max(room, 0)
            if room <= 0:
                return
            columns, n = columns.take(room), room  # the rest is not written
        before = len(queue)
        queue.extend(repeat(columns, n))
        if before < settings.batch_size <= len(queue):
            self._wake.set()

    def force_flush(self, timeout_s: float | None = None) -> bool:
        """Send everything queued; False if the thread's export did not let go within ``timeout_s``."""
        if not self._lock.acquire(timeout=-1 if timeout_s is None else max(0.0, timeout_s)):
            return False
        try:
            self._drain()
        finally:
            self._lock.release()
        return True

    def shutdown(self) -> None:
        """Send what is queued and stop, within about ``timeout_s`` however the collector behaves."""
        if self._stopping:
            return
        self._give_up_at = time.monotonic() + self.settings.timeout_s
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=self.settings.timeout_s)
        if not self.force_flush(self._give_up_at - time.monotonic()):
            log.warning("tracing: gave up on %d spans at shutdown (the collector is not answering)", len(self._queue))
        if self._conn is not None:
            self._conn.close()
        if self.dropped or self.failed:
            log.warning("tracing: %d spans dropped (export queue full), %d not accepted by the collector",
                        self.dropped, self.failed)  # fmt: skip

    def _run(self) -> None:
        while not self._stopping:
            full = self._wake.wait(self.settings.delay_s)
            self._wake.clear()
            with self._lock:
                # Woken by a full batch: full batches only. What arrived while they were posted waits to
                # fill the next one (a post costs about the same for 20 spans as for 500), or for the delay.
                self._drain(whole_batches=full and not self._stopping)

    def _drain(self, whole_batches: bool = False) -> None:
        queue, size = self._queue, self.settings.batch_size
        while len(queue) >= (size if whole_batches else 1):
            if time.monotonic() > self._give_up_at:
                self.failed += len(queue)
                queue.clear()
                return
            spans = [queue.popleft() for _ in range(min(size, len(queue)))]
            encoded = [span for span in spans if type(span) is bytes]
            if len(encoded) < len(spans):
                encoded += encode_queued([span for span in spans if type(span) is not bytes])  # type: ignore[misc]
            if self._post(encode_request(self._resource, self._scope, encoded)):
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
        target = (parts.path or "/v1/traces") + (f"?{parts.query}" if parts.query else "")
        while True:
            try:
                conn = self._connection(parts.scheme, parts.netloc)
                conn.request("POST", target, body, headers)
                response = conn.getresponse()
                response.read()
                if 200 <= response.status < 300:
                    return True
                error = f"HTTP {response.status}"
                retry = response.status in _RETRYABLE
            except (OSError, http.client.HTTPException) as exc:
                error, retry = f"{type(exc).__name__}: {exc}", True
                self._conn = None
            except Exception as exc:  # e.g. a header http.client refuses: this batch is lost, not the thread
                error, retry = f"{type(exc).__name__}: {exc}", False
                self._conn = None
            if not retry or time.monotonic() + backoff > min(deadline, self._give_up_at) or self._stopping:
                log.warning("tracing: export to %s failed (%s); giving up on the batch", s.url, error)
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
