"""The mesh's own span recorder against the OpenTelemetry SDK: the same spans encode to the same OTLP
messages as the SDK's encoder writes, the samplers decide alike, the ``traceparent`` reader agrees with
the W3C propagator, and the exporter retries, drops and compresses as the OTLP spec asks."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, TraceIdRatioBased
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from broker import tracing
from broker.otlp import (
    RequestRecord,
    encode_request,
    encode_request_spans,
    encode_span,
    request_record,
    span_shape,
)
from broker.span_export import ExportSettings, OtlpExporter
from broker.spans import CONSUMER, INTERNAL, PRODUCER, LightSpan, Sampler, _read_traceparent
from schemas.errors import BadInput
from tests.otlp_receiver import receiving
from tests.unit.test_trace_context import CASES

T, S, P = bytes(range(1, 17)), bytes(range(21, 29)), bytes(range(31, 39))
KINDS = {PRODUCER: SpanKind.PRODUCER, CONSUMER: SpanKind.CONSUMER, INTERNAL: SpanKind.INTERNAL}


def _pair(
    kind: int, fixed: dict[str, Any], extra: list[tuple[str, Any]], *, parent: bytes | None = None,
    remote: bool = False, state: str | None = None, links: list[tuple[bytes, bytes]] | None = None,
    error: str | None = None,
) -> tuple[LightSpan, ReadableSpan]:  # fmt: skip
    """One span, as our recorder holds it and as the SDK would."""
    light = LightSpan(T, S, parent, span_shape("op name", kind, fixed), list(extra) or None)
    light.start, light.end = 1_700_000_000_123_456_789, 1_700_000_000_223_456_789
    light.remote_parent, light.trace_state, light.links, light.error = remote, state, links, error

    def context(trace_id: bytes, span_id: bytes, is_remote: bool = False) -> SpanContext:
        trace_state = TraceState.from_header([state]) if state else None
        return SpanContext(int.from_bytes(trace_id), int.from_bytes(span_id), is_remote, TraceFlags(1), trace_state)

    sdk = ReadableSpan(
        name="op name", context=context(T, S), parent=context(T, parent, remote) if parent else None,
        resource=Resource({}), attributes={**fixed, **dict(extra)}, kind=KINDS[kind],
        links=[Link(context(t, s)) for t, s in links or []],
        status=Status(StatusCode.ERROR, error) if error is not None else Status(),
        start_time=light.start, end_time=light.end,
    )  # fmt: skip
    return light, sdk


FIXED = {"messaging.system": "nats", "mesh.model": "iris", "mesh.priority": "normal"}
SPANS = {
    "root producer": dict(kind=PRODUCER, fixed=FIXED, extra=[("messaging.message.id", "k3Xq9Zt1")]),
    "consumer, remote parent, tracestate": dict(
        kind=CONSUMER, fixed=FIXED, extra=[("mesh.queue_wait_ms", 1.25)], parent=P, remote=True, state="a=1,b=2"
    ),
    "batch with links": dict(
        kind=INTERNAL, fixed={"mesh.worker": "w-1"}, extra=[("messaging.batch.message_count", 2)], parent=P,
        links=[(T, P), (bytes(range(41, 57)), bytes(range(61, 69)))],
    ),
    "failed": dict(kind=CONSUMER, fixed=FIXED, extra=[("mesh.status", 400)], parent=P, remote=True, error="bad dtype"),
    "every attribute type": dict(
        kind=INTERNAL, fixed={"b": True, "f": False, "neg": -3, "big": 2**62, "pi": 3.5, "ü": "ĉ≠"},
        extra=[("long", "x" * 300), ("long key " * 20, 1.0), ("zero", 0.0)],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(SPANS))
def test_spans_encode_as_the_sdk_encodes_them(case: str) -> None:
    light, sdk = _pair(**SPANS[case])  # type: ignore[arg-type]
    ours = ExportTraceServiceRequest.FromString(encode_request(b"", b"", [encode_span(light)]))
    theirs = encode_spans([sdk])
    assert ours.resource_spans[0].scope_spans[0].spans[0] == theirs.resource_spans[0].scope_spans[0].spans[0]


def test_a_request_carries_its_resource_and_scope() -> None:
    from broker.otlp import encode_attributes

    light, _ = _pair(**SPANS["root producer"])  # type: ignore[arg-type]
    resource = encode_attributes({"service.name": "servemesh-worker", "pid": 7}.items(), tag=b"\x0a")
    scope = b"\x0a\x09servemesh\x12\x050.1.0"
    request = ExportTraceServiceRequest.FromString(encode_request(resource, scope, [encode_span(light)] * 3))
    (resource_spans,) = request.resource_spans
    assert {kv.key: kv.value for kv in resource_spans.resource.attributes}["service.name"].string_value == (
        "servemesh-worker"
    )
    (scope_spans,) = resource_spans.scope_spans
    assert (scope_spans.scope.name, scope_spans.scope.version) == ("servemesh", "0.1.0")
    assert len(scope_spans.spans) == 3


@pytest.mark.parametrize(
    ("name", "sdk"),
    [
        ("always_on", ALWAYS_ON), ("always_off", ALWAYS_OFF), ("traceidratio", TraceIdRatioBased(0.3)),
        ("parentbased_always_on", ParentBased(ALWAYS_ON)), ("parentbased_always_off", ParentBased(ALWAYS_OFF)),
        ("parentbased_traceidratio", ParentBased(TraceIdRatioBased(0.3))),
    ],
)  # fmt: skip
def test_samplers_decide_as_the_sdks(name: str, sdk: Any) -> None:
    ours = Sampler(name, 0.3)
    rng = random.Random(7)
    for _ in range(2000):
        trace_id = rng.getrandbits(128)
        assert ours.root(trace_id) == sdk.should_sample(None, trace_id, "x").decision.is_sampled()
        for sampled in (True, False):
            parent = SpanContext(trace_id, 1, True, TraceFlags(int(sampled)))
            context = set_span_in_context(NonRecordingSpan(parent))
            expected = sdk.should_sample(context, trace_id, "x").decision.is_sampled()
            assert ours.child(sampled, trace_id) == expected


def test_an_unknown_sampler_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown sampler"):
        Sampler("sometimes")


@pytest.mark.parametrize("headers", CASES)
def test_traceparent_read_as_the_propagator_reads_it(headers: dict[str, str]) -> None:
    theirs = TraceContextTextMapPropagator().extract(headers)
    from opentelemetry import trace

    context = trace.get_current_span(theirs).get_span_context()
    ours = _read_traceparent(headers.get("traceparent"))
    if not context.is_valid:
        assert ours is None
    else:
        assert ours == (context.trace_id.to_bytes(16), context.span_id.to_bytes(8), context.trace_flags.sampled)


def test_export_retries_a_busy_collector_then_delivers() -> None:
    light, _ = _pair(**SPANS["root producer"])  # type: ignore[arg-type]
    with receiving() as receiver:
        receiver.fail_with = [503, 429]
        exporter = OtlpExporter(
            ExportSettings(url=receiver.url, delay_s=60, timeout_s=5), {"service.name": "t"}, ("s", "1")
        )
        exporter.submit(encode_span(light))
        exporter.force_flush()
        exporter.shutdown()
    assert receiver.attempts == 3 and exporter.exported == 1 and exporter.failed == 0
    assert receiver.requests[0].resource_spans[0].scope_spans[0].spans[0].span_id == S


def test_export_gives_up_on_a_refused_batch_and_goes_on() -> None:
    light, _ = _pair(**SPANS["root producer"])  # type: ignore[arg-type]
    with receiving() as receiver:
        receiver.fail_with = [400]
        exporter = OtlpExporter(ExportSettings(url=receiver.url, delay_s=60), {}, ("s", "1"))
        exporter.submit(encode_span(light))
        exporter.force_flush()  # refused: not retried
        exporter.submit(encode_span(light))
        exporter.force_flush()
        exporter.shutdown()
    assert receiver.attempts == 2 and exporter.failed == 1 and exporter.exported == 1


def test_a_full_queue_drops_and_counts() -> None:
    light, _ = _pair(**SPANS["root producer"])  # type: ignore[arg-type]
    with receiving() as receiver:
        settings = ExportSettings(url=receiver.url, delay_s=60, max_queue=10, batch_size=1000)
        exporter = OtlpExporter(settings, {}, ("s", "1"))
        for _ in range(25):
            exporter.submit(encode_span(light))
        exporter.shutdown()
    assert exporter.dropped == 15 and exporter.exported == 10
    assert sum(len(r.resource_spans[0].scope_spans[0].spans) for r in receiver.requests) == 10


def test_a_full_batch_is_sent_without_waiting_for_the_delay() -> None:
    light, _ = _pair(**SPANS["root producer"])  # type: ignore[arg-type]
    with receiving() as receiver:
        exporter = OtlpExporter(ExportSettings(url=receiver.url, delay_s=60, batch_size=4), {}, ("s", "1"))
        for _ in range(4):
            exporter.submit(encode_span(light))
        deadline = time.monotonic() + 5
        while not receiver.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        exporter.shutdown()
    assert len(receiver.requests[0].resource_spans[0].scope_spans[0].spans) == 4


def test_spans_that_arrive_during_a_post_wait_to_fill_the_next_batch() -> None:
    """Woken by a full batch, the export thread posts whole batches: the few spans that came in while
    the collector was answering wait for the next batch (or the delay), not posted as a batch of their own."""
    import threading

    light, _ = _pair(**SPANS["root producer"])  # type: ignore[arg-type]
    with receiving() as receiver:
        receiver.hold = threading.Event()
        exporter = OtlpExporter(ExportSettings(url=receiver.url, delay_s=60, batch_size=4), {}, ("s", "1"))
        for _ in range(4):
            exporter.submit(encode_span(light))
        _until(lambda: receiver.attempts == 1)  # the first batch is being posted
        for _ in range(2):
            exporter.submit(encode_span(light))
        receiver.hold.set()
        _until(lambda: exporter.exported == 4)
        time.sleep(0.3)
        assert len(receiver.requests) == 1 and exporter.exported == 4  # the two wait
        for _ in range(2):
            exporter.submit(encode_span(light))
        _until(lambda: len(receiver.requests) == 2)
        exporter.shutdown()
    assert [len(r.resource_spans[0].scope_spans[0].spans) for r in receiver.requests] == [4, 4]
    assert exporter.exported == 8


def _until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_settings_from_the_standard_variables() -> None:
    settings = ExportSettings.from_env(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/", "OTEL_EXPORTER_OTLP_HEADERS": "api-key=a%20b, x=1",
            "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "gzip", "OTEL_EXPORTER_OTLP_TIMEOUT": "3",
            "OTEL_BSP_SCHEDULE_DELAY": "250", "OTEL_BSP_MAX_QUEUE_SIZE": "100", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "50",
        }
    )  # fmt: skip
    assert settings.url == "http://collector:4318/v1/traces"
    assert dict(settings.headers) == {"api-key": "a b", "x": "1"}
    assert settings.gzip and settings.timeout_s == 3 and settings.delay_s == 0.25
    assert (settings.max_queue, settings.batch_size) == (100, 50)
    traces_url = ExportSettings.from_env({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://c:1/custom"}).url
    assert traces_url == "https://c:1/custom"  # used as given


def test_compressed_export_with_headers() -> None:
    light, _ = _pair(**SPANS["failed"])  # type: ignore[arg-type]
    with receiving() as receiver:
        settings = ExportSettings(url=receiver.url, delay_s=60, gzip=True, headers={"api-key": "secret"})
        exporter = OtlpExporter(settings, {}, ("s", "1"))
        exporter.submit(encode_span(light))
        exporter.shutdown()
    assert receiver.headers[0]["Content-Encoding"] == "gzip" and receiver.headers[0]["api-key"] == "secret"
    (span,) = receiver.requests[0].resource_spans[0].scope_spans[0].spans
    assert span.status.message == "bad dtype" and span.status.code == 2


def test_configured_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "SERVEMESH_TRACE_EXPORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    try:
        assert tracing.configure_from_env("svc")
        recorder = tracing._recorder
        assert recorder is not None and recorder.sampler.name == "traceidratio" and not recorder.sampler.parent_based
        tracing.disable()
        monkeypatch.setenv("SERVEMESH_TRACE_EXPORT", "sdk")
        assert tracing.configure_from_env("svc")
        assert tracing._recorder is None and tracing._provider is not None
        tracing.disable()
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
        assert not tracing.configure_from_env("svc") and not tracing.enabled()
    finally:
        tracing.shutdown()
        tracing.disable()


def test_ending_twice_exports_once_and_errors_carry_their_status() -> None:
    with receiving() as receiver:
        tracing.enable_direct(ExportSettings(url=receiver.url, delay_s=60), Sampler(), "t")
        try:
            headers: dict[str, str] = {}
            span = tracing.start_producer("mesh.infer.iris.1.high", "r1", headers)
            plain = tracing.start_producer("mesh.infer.iris.1.high", "r2", {})
            assert span is not None and plain is not None
            tracing.end(span, BadInput("wrong dtype"))
            tracing.end(span)
            tracing.end(plain)
            tracing.end(plain, BadInput("late"))
            tracing.flush()
        finally:
            tracing.shutdown()
            tracing.disable()
    exported, ended = sorted(
        receiver.get_finished_spans(), key=lambda s: str((s.attributes or {})["messaging.message.id"])
    )
    assert ended.status.status_code == StatusCode.UNSET
    assert exported.status.status_code == StatusCode.ERROR and exported.status.description == "wrong dtype"
    assert (exported.attributes or {})["mesh.status"] == 400
    assert headers["traceparent"] == f"00-{exported.context.trace_id:032x}-{exported.context.span_id:016x}-01"


def test_a_collector_that_is_down_costs_the_spans_only() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1/traces"
    light, _ = _pair(**SPANS["root producer"])  # type: ignore[arg-type]
    exporter = OtlpExporter(ExportSettings(url=url, delay_s=60, timeout_s=0.5), {}, ("s", "1"))
    started = time.monotonic()
    exporter.submit(encode_span(light))
    exporter.force_flush()
    exporter.shutdown()
    assert exporter.failed == 1 and exporter.exported == 0
    assert time.monotonic() - started < 5


def test_tracestate_is_forwarded_as_the_propagator_would_keep_it() -> None:
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with receiving() as receiver:
        tracing.enable_direct(ExportSettings(url=receiver.url, delay_s=60), Sampler(), "t")
        try:
            forwarded = []
            for raw in ("a=1, b=2", "A=1", "garbage no equals"):
                span = tracing.start_consumer({"traceparent": tp, "tracestate": raw}, "mesh.infer.m.1.low", "r", "w")
                headers: dict[str, str] = {}
                tracing.inject(span, headers)
                forwarded.append(headers.get("tracestate"))
        finally:
            tracing.disable()
    assert forwarded == ["a=1,b=2", None, None]


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({"OTEL_BSP_MAX_QUEUE_SIZE": "1e4", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "0", "OTEL_BSP_SCHEDULE_DELAY": "0"},
         (2048, 512, 5.0, 10.0)),
        ({"OTEL_BSP_MAX_QUEUE_SIZE": "100", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "500",
          "OTEL_EXPORTER_OTLP_TIMEOUT": "-1"}, (100, 100, 5.0, 10.0)),
        ({"OTEL_BSP_SCHEDULE_DELAY": "nan", "OTEL_EXPORTER_OTLP_TIMEOUT": "x"}, (2048, 512, 5.0, 10.0)),
    ],
)  # fmt: skip
def test_settings_the_sdk_would_refuse_fall_back_to_defaults(
    variables: dict[str, str], expected: tuple[int, int, float, float]
) -> None:
    s = ExportSettings.from_env(variables)
    assert (s.max_queue, s.batch_size, s.delay_s, s.timeout_s) == expected


def test_headers_that_http_cannot_carry_are_left_out() -> None:
    s = ExportSettings.from_env({"OTEL_EXPORTER_OTLP_HEADERS": "api-key=%E2%82%AC,x=a%0Ab,ok=1"})
    assert dict(s.headers) == {"ok": "1"}


@pytest.mark.parametrize(
    ("name", "ratio", "expected"),
    [("TraceIdRatio", "0.25", "traceidratio"), ("parentbased_jaeger_remote", "", "parentbased_always_on"),
     ("traceidratio", "nan", "traceidratio"), ("traceidratio", "-0.5", "traceidratio")],
)  # fmt: skip
def test_samplers_from_the_environment_never_stop_a_process(name: str, ratio: str, expected: str) -> None:
    sampler = tracing._sampler_from_env({"OTEL_TRACES_SAMPLER": name, "OTEL_TRACES_SAMPLER_ARG": ratio})
    assert sampler.name == expected
    if ratio in ("nan", "-0.5"):  # not a ratio: the default, 1.0, as the SDK falls back to
        assert all(sampler.root(random.getrandbits(128)) for _ in range(100))


def test_a_batch_http_refuses_is_lost_not_the_export_thread() -> None:
    light, _ = _pair(**SPANS["root producer"])  # type: ignore[arg-type]
    with receiving() as receiver:
        settings = ExportSettings(url=receiver.url, delay_s=60, headers={"x": "a\nb"})
        exporter = OtlpExporter(settings, {}, ("s", "1"))
        exporter.submit(encode_span(light))
        exporter.force_flush()
        alive = exporter._thread.is_alive()
        exporter.shutdown()
    assert exporter.failed == 1 and alive and receiver.attempts == 0


def test_shutdown_is_bounded_when_the_collector_never_answers() -> None:
    import socket

    light, _ = _pair(**SPANS["root producer"])  # type: ignore[arg-type]
    with socket.socket() as listener:  # accepts connections, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1/traces"
        exporter = OtlpExporter(ExportSettings(url=url, delay_s=60, timeout_s=1, batch_size=2), {}, ("s", "1"))
        for _ in range(10):
            exporter.submit(encode_span(light))
        started = time.monotonic()
        exporter.shutdown()
        took = time.monotonic() - started
    assert took < 3.5
    exporter._thread.join(5)  # what it was still posting is counted too
    assert exporter.failed == 10 and exporter.exported == 0


def test_turning_tracing_off_or_over_sends_what_the_old_exporter_held() -> None:
    with receiving() as receiver:
        tracing.enable_direct(ExportSettings(url=receiver.url, delay_s=60), Sampler(), "t")
        first = tracing._recorder
        tracing.end(tracing.start_producer("mesh.infer.m.1.high", "r1", {}))
        tracing.enable_direct(ExportSettings(url=receiver.url, delay_s=60), Sampler(), "t")
        tracing.end(tracing.start_producer("mesh.infer.m.1.high", "r2", {}))
        tracing.disable()
    assert first is not None and not first.exporter._thread.is_alive()
    ids = [(s.attributes or {})["messaging.message.id"] for s in receiver.get_finished_spans()]
    assert ids == ["r1", "r2"]


def test_an_error_text_that_is_not_utf8_still_ends_its_span() -> None:
    with receiving() as receiver:
        tracing.enable_direct(ExportSettings(url=receiver.url, delay_s=60), Sampler(), "t")
        try:
            span = tracing.start_producer("mesh.infer.m.1.high", "r", {})
            tracing.end(span, BadInput("cannot open " + os.fsdecode(b"/models/\xff.onnx")))
            tracing.flush()
        finally:
            tracing.disable()
    (exported,) = receiver.get_finished_spans()
    assert exported.status.description == "cannot open /models/?.onnx"  # what cannot be UTF-8 is replaced


def _random_request_span(rng: random.Random, i: int) -> LightSpan:
    """A request span (send or process) with random ids, times, shape (with % bytes in it), message id (empty,
    non-ASCII, a lone surrogate, long enough for two-byte lengths), parent and queue wait."""
    message_ids = ["", "k3Xq9Zt1", "k3Xq9Zt2", "ünï-ćödé", "bad\udc80", "%s%b%%", "x" * 99, "z" * 101, "é" * 60]
    message_ids.append("w" * 300)
    fixed = {**FIXED, "mesh.model": f"m{'%' * (i % 3)}{i % 4}", "padding": "p" * rng.choice((0, 7, 150))}
    shape = span_shape(f"process {i % 2}%b", rng.choice((PRODUCER, CONSUMER)), fixed)
    parent = rng.choice((None, rng.randbytes(8)))
    attrs: list[tuple[str, Any]] = [("messaging.message.id", rng.choice(message_ids))]
    if rng.random() < 0.5:
        attrs.append(("mesh.queue_wait_ms", rng.choice((0.0, 1.25, rng.uniform(0, 1e4)))))
    light = LightSpan(rng.randbytes(16), rng.randbytes(8), parent, shape, attrs)
    light.start = rng.randrange(1 << 63)
    light.end, light.remote_parent = light.start + rng.randrange(1 << 40), parent is not None and rng.random() < 0.5
    return light


def _each_span(chunks: list[bytes]) -> list[bytes]:
    """The spans in ``chunks`` of ScopeSpans fields, one by one, as the SDK's protobuf reads them."""
    request = ExportTraceServiceRequest.FromString(encode_request(b"", b"", chunks))
    return sorted(span.SerializeToString() for span in request.resource_spans[0].scope_spans[0].spans)


def test_request_spans_written_in_bulk_are_the_bytes_encode_span_writes() -> None:
    """Request spans are written many at a time from one template per layout: alone, each is exactly what
    encode_span writes; mixed (layouts, message id lengths, ASCII or not), every span comes out once."""
    rng = random.Random(11)
    spans = [_random_request_span(rng, i) for i in range(800)]
    assert all(request_record(span) is not None for span in spans)
    for span in spans:
        assert encode_request_spans([request_record(span)]) == [encode_span(span)], (span.attrs, span.parent_id)
    for size in (2, 17, 800):
        group = spans[:size]
        chunks = encode_request_spans([request_record(span) for span in group])
        assert _each_span(chunks) == _each_span([encode_span(span) for span in group])
        assert len(b"".join(chunks)) == sum(len(encode_span(span)) for span in group)
    # Many spans of one layout: one template, filled column by column.
    same = [LightSpan(rng.randbytes(16), rng.randbytes(8), P, spans[0].shape, [("messaging.message.id", f"r{n:05}")])
            for n in range(300)]  # fmt: skip
    for n, span in enumerate(same):
        span.start, span.end = 1_700_000_000_000_000_000 + n, 1_700_000_000_000_000_000 + 2 * n
    assert encode_request_spans([request_record(span) for span in same]) == [b"".join(map(encode_span, same))]


def test_only_request_spans_take_the_bulk_path() -> None:
    """A span with trace state, links, an error or other attributes is encoded on its own."""
    for case in SPANS:
        light, _ = _pair(**SPANS[case])  # type: ignore[arg-type]
        assert (request_record(light) is not None) == (case == "root producer"), case
    light, _ = _pair(**SPANS["root producer"])  # type: ignore[arg-type]
    for change in (
        {"trace_state": "a=1"}, {"links": [(T, P)]}, {"error": "failed"},
        {"attrs": [("messaging.message.id", "r"), ("mesh.status", 400)]},
        {"attrs": [("messaging.message.id", "r"), ("mesh.queue_wait_ms", 1)]},  # an int, not the float it writes
        {"attrs": [("mesh.queue_wait_ms", 1.5)]}, {"attrs": [("messaging.message.id", 7)]},
    ):  # fmt: skip
        other = LightSpan(light.trace_id, light.span_id, None, light.shape, light.attrs)
        for name, value in change.items():
            setattr(other, name, value)
        assert request_record(other) is None, change


class _Capture:
    """An exporter stand-in that keeps what the recorder hands over, written as the exporter writes it."""

    def __init__(self) -> None:
        self.spans: list[bytes] = []

    def submit(self, span: bytes | RequestRecord) -> None:
        self.spans.append(span if isinstance(span, bytes) else b"".join(encode_request_spans([span])))

    def submit_many(self, spans: list[bytes | RequestRecord]) -> None:
        for span in spans:
            self.submit(span)


def test_the_recorder_writes_each_request_span_as_encode_span_would(monkeypatch: pytest.MonkeyPatch) -> None:
    """The recorder hands most request spans to the exporter unencoded, to be written in bulk. Whatever the
    parent (none, the caller's local or remote span, a traceparent with or without tracestate) and however
    the span ends (plain, with its queue wait, failed, with extra attributes), what the exporter writes is
    what encode_span writes for the span as it ended. (A worker's usual request span is a tuple until it
    ends: it is compared as the span object it stands for, its drawn span id known here.)"""
    from opentelemetry import context as otel_context

    import broker.spans
    from broker.spans import Recorder

    monkeypatch.setattr(broker.spans, "_random_bytes", lambda n: bytes(range(7, 7 + n)))
    monkeypatch.setattr(broker.spans, "time", SimpleNamespace(time_ns=lambda: 1_700_000_000_123_456_789))
    capture = _Capture()
    recorder = Recorder(capture, Sampler("always_on"), tracing._subject_attributes)  # type: ignore[arg-type]
    subject = "mesh.infer.iris.1.normal"
    local, remote = (SpanContext(int.from_bytes(T), int.from_bytes(P), r, TraceFlags(1)) for r in (False, True))
    with_state = SpanContext(int.from_bytes(T), int.from_bytes(P), True, TraceFlags(1), TraceState([("k", "v")]))

    def start_all() -> list[LightSpan]:
        producers = []
        for parent in (None, local, remote, with_state):
            token = otel_context.attach(set_span_in_context(NonRecordingSpan(parent))) if parent else None
            try:
                producers.append(recorder.producer(subject, "r-1", {}))
            finally:
                if token is not None:
                    otel_context.detach(token)
        assert type(producers[0]) is list  # no parent: a plain list until it ends
        assert [s.remote_parent for s in producers[1:] if isinstance(s, LightSpan)] == [False, True, True]
        incoming = [
            {}, {"traceparent": f"00-{T.hex()}-{P.hex()}-01"},
            {"traceparent": f"00-{T.hex()}-{P.hex()}-01", "tracestate": "a=1"},
        ]  # fmt: skip
        consumers = [recorder.consumer(h, subject, rid, "w-1") for h in incoming for rid in ("r-2", None)]
        return [s for s in producers + consumers if s is not None]

    endings: list[Callable[[Any], None]] = [
        lambda span: recorder.end(span, None, {}),
        lambda span: recorder.end_requests(None, [span], [2.5], {}),
        lambda span: recorder.end_requests(None, [span], [0.5], {0: BadInput("wrong dtype")}),
        lambda span: recorder.end(span, None, {"mesh.rows": 3}),
    ]
    for ending in endings:
        spans = start_all()
        assert len(spans) == 10 and sum(type(span) in (tuple, list) for span in spans) == 2
        for span in spans:
            twin = None  # the span object a plain tuple or list stands for, ended alike
            if type(span) is tuple:
                twin = _span_of(span, bytes(range(7, 15)))
            elif type(span) is list:
                twin = LightSpan(span[0][:16], span[0][16:], None, span[3], [("messaging.message.id", span[1])])
                twin.start = span[2]
            ending(span)
            if twin is not None:
                ending(twin)
                capture.spans.pop()
            assert capture.spans[-1] == encode_span(twin or span), (endings.index(ending), spans.index(span))
    assert len(capture.spans) == 40


def _span_of(pending: tuple[str, str, int, bytes], span_id: bytes) -> LightSpan:
    """A worker's pending request span as the span object it stands for."""
    traceparent, message_id, start, shape = pending
    span = LightSpan(bytes.fromhex(traceparent[3:35]), span_id, bytes.fromhex(traceparent[36:52]), shape,
                     [("messaging.message.id", message_id)])  # fmt: skip
    span.start, span.remote_parent = start, True
    return span


def test_request_spans_wait_for_export_untracked_by_the_garbage_collector() -> None:
    """An ended request span waits in the export queue as a record of plain values: after one collection the
    garbage collector no longer counts or scans it, however many wait (span objects would be collected
    over and over while they wait)."""
    import gc

    from broker.spans import Recorder

    capture = _Kept()
    recorder = Recorder(capture, Sampler("always_on"), tracing._subject_attributes)  # type: ignore[arg-type]
    sent = [recorder.producer("mesh.infer.iris.1.normal", f"r-{n}", {}) for n in range(3)]
    consumed = recorder.consumer({"traceparent": f"00-{T.hex()}-{P.hex()}-01"}, "mesh.infer.iris.1.normal", "r-9", "w")
    for span in sent:
        recorder.end(span, None, {})  # type: ignore[arg-type]
    recorder.end_requests(None, [consumed], [1.5], {})
    gc.collect()
    assert len(capture.items) == 4
    assert not any(isinstance(item, bytes) or gc.is_tracked(item) for item in capture.items)


class _Kept:
    def __init__(self) -> None:
        self.items: list[object] = []

    def submit(self, item: object) -> None:
        self.items.append(item)

    def submit_many(self, items: list[object]) -> None:
        self.items.extend(items)
