"""A worker's spans for a batch's requests: pending as tuples, their span ids drawn by the batch, written as
columns by the export thread, however the export splits them. What reaches the collector is what the recorder
writes for the same spans held as span objects, and the batch span links every one of them."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

import broker.spans
from broker import tracing
from broker.otlp import encode_queued, encode_request
from broker.span_export import ExportSettings, OtlpExporter
from broker.spans import LightSpan, Recorder, Sampler
from schemas.errors import BadInput
from tests.otlp_receiver import receiving
from tests.unit.test_otlp import _Kept, _span_of

NOW = 1_700_000_000_123_456_789


class _Queue(_Kept):
    """An exporter stand-in that queues as the exporter does (columns once per span) and writes in posts."""

    items: list[Any]

    def submit_columns(self, columns: Any) -> None:
        self.items += [columns] * len(columns)

    def written(self, post: int) -> list[PbSpan]:
        """Everything queued, written ``post`` items at a time, as the protobuf classes read it back."""
        spans: list[PbSpan] = []
        items, self.items = self.items, []
        for at in range(0, len(items), post):
            chunk = items[at : at + post]
            encoded = [item for item in chunk if type(item) is bytes] + encode_queued(
                [item for item in chunk if type(item) is not bytes]
            )
            request = ExportTraceServiceRequest.FromString(encode_request(b"", b"", encoded))
            spans += request.resource_spans[0].scope_spans[0].spans
        return spans


@pytest.fixture
def fixed(monkeypatch: pytest.MonkeyPatch) -> None:
    """One clock reading for every span, so that spans written two ways can be compared byte for byte."""
    monkeypatch.setattr(broker.spans, "time", SimpleNamespace(time_ns=lambda: NOW))


def _recorder() -> tuple[Recorder, _Queue]:
    queue = _Queue()
    return Recorder(queue, Sampler(), tracing._subject_attributes), queue  # type: ignore[arg-type]


def _traceparent(rng: random.Random, flags: str = "01") -> str:
    return f"00-{rng.randbytes(16).hex()}-{rng.randbytes(8).hex()}-{flags}"


@pytest.mark.parametrize("post", [1, 7, 512])
def test_a_batch_of_requests_is_written_as_their_span_objects_would_be(fixed: None, post: int) -> None:
    """Usual requests (pending spans) beside others (trace state, no traceparent, forwarded: span objects;
    not sampled: none), some failed, each with its queue wait; written in posts that split the batch."""
    rng = random.Random(post)
    recorder, queue = _recorder()
    subjects = ["mesh.infer.iris.1.normal", "mesh.infer.iris.1.high"]  # one batch, two priorities: two layouts
    headers: list[dict[str, str]] = [{"traceparent": _traceparent(rng)} for _ in range(14)]
    headers[3]["tracestate"] = "k=v"
    headers[5] = {}
    headers[8]["traceparent"] = _traceparent(rng, "00")
    spans = [recorder.consumer(h, subjects[i % 3 == 0], f"r-{i:03}", "w-1", forwarded=i == 11)
             for i, h in enumerate(headers)]  # fmt: skip
    kinds = ["pending" if type(s) is tuple else type(s).__name__ for s in spans]
    assert kinds.count("pending") == 10 and kinds.count("LightSpan") == 3 and kinds[8] == "NoneType"
    batch = recorder.batch("iris", "1", spans, "w-1")
    assert batch is not None and batch.requests is not None
    recorder.end(batch, None, {})
    waits, errors = [i / 4 for i in range(len(spans))], {2: BadInput("wrong dtype"), 3: BadInput("no")}
    recorder.end_requests(batch, spans, waits, errors)
    recorder.end_requests(batch, spans, waits, errors)  # ended once only
    exported = queue.written(post)
    written = {span.span_id: span for span in exported}
    assert len(exported) == len(written) == 10 + 3 + 1  # pending, span objects, the batch

    # The same requests' spans as span objects, ended alike by a recorder of their own.
    twins = [_span_of(s, batch.requests.span_id(s)) if type(s) is tuple else None for s in spans]
    reference, reference_queue = _recorder()
    reference.end_requests(None, twins, waits, errors)
    expected = {span.span_id: span for span in reference_queue.written(512)}
    assert len(expected) == 10
    for span_id, span in expected.items():
        assert written[span_id].SerializeToString() == span.SerializeToString()
    assert {s.span_id for s in spans if isinstance(s, LightSpan)} <= set(written)

    (batch_span,) = [s for s in written.values() if s.name == "batch iris"]
    recorded = [s for s in spans if s is not None]
    ids = [(s.trace_id, s.span_id) if isinstance(s, LightSpan) else (bytes.fromhex(s[0][3:35]), twin.span_id)
           for s, twin in zip(spans, twins, strict=True) if s is not None]  # fmt: skip
    assert [(link.trace_id, link.span_id) for link in batch_span.links] == ids
    assert batch_span.trace_id == ids[0][0] and batch_span.parent_span_id == ids[0][1]
    assert {kv.key: kv.value.int_value for kv in batch_span.attributes}["messaging.batch.message_count"] == len(
        recorded
    )


def test_usual_batches_are_queued_one_source_each_and_written_together(fixed: None) -> None:
    """Nothing per span is left to the loop beyond a tuple: each batch's spans are queued as one source, those
    of several batches written together, from one template; each span as its span object would be."""
    rng = random.Random(3)
    recorder, queue = _recorder()
    reference, reference_queue = _recorder()
    links = []
    for _ in range(3):
        spans, batch = _usual_batch(recorder, rng)
        assert batch.requests is not None and batch.links is batch.requests  # written on export
        recorder.end_requests(batch, spans, [i / 8 for i in range(20)], {})
        twins = [_span_of(s, batch.requests.span_id(s)) for s in spans]
        reference.end_requests(None, twins, [i / 8 for i in range(20)], {})
        links.append([(t.trace_id, t.span_id) for t in twins])
        recorder.end(batch, None, {})
    sources = [item for item in queue.items if hasattr(item, "take")]
    assert len(sources) == 60 and len({id(item) for item in sources}) == 3
    written = encode_queued(sources)
    assert len(written) == 1
    assert [span.SerializeToString() for span in _read(written)] == [
        span.SerializeToString() for span in reference_queue.written(512)
    ]
    batches = _read(encode_queued([item for item in queue.items if isinstance(item, LightSpan)]))
    assert [[(link.trace_id, link.span_id) for link in b.links] for b in batches] == links


def _read(written: list[bytes]) -> list[PbSpan]:
    return list(
        ExportTraceServiceRequest.FromString(encode_request(b"", b"", written)).resource_spans[0].scope_spans[0].spans
    )


def test_a_pending_span_ended_before_its_batch_is_written_alone() -> None:
    """A request that fails before it is batched (expired, refused): its span ends on its own, failed."""
    rng = random.Random(5)
    recorder, queue = _recorder()
    traceparent = _traceparent(rng)
    pending = recorder.consumer({"traceparent": traceparent}, "mesh.infer.iris.1.normal", "r-1", "w")
    assert type(pending) is tuple
    recorder.end(pending, BadInput("expired"), {})
    (span,) = queue.written(512)
    assert span.trace_id.hex() == traceparent[3:35] and span.parent_span_id.hex() == traceparent[36:52]
    assert span.status.code == 2 and span.status.message == "expired" and span.flags & 0x200  # remote parent


@pytest.mark.parametrize(("room", "kept"), [(2048, 20), (11, 11)])
def test_a_batch_reaches_the_collector_once_per_span_within_the_queue(room: int, kept: int) -> None:
    """Through the exporter: a batch's 20 spans, queued as one source, posted 5 at a time. With room for
    fewer, as if each came alone, those beyond are dropped and counted."""
    recorder, _ = _recorder()
    spans, batch = _usual_batch(recorder, random.Random(room))
    with receiving() as receiver:
        exporter = OtlpExporter(
            ExportSettings(url=receiver.url, delay_s=60, max_queue=room, batch_size=5), {}, ("s", "1")
        )
        recorder.exporter = exporter
        recorder.end_requests(batch, spans, [1.0] * 20, {})
        exporter.force_flush()
        exporter.shutdown()
    sizes = [len(r.resource_spans[0].scope_spans[0].spans) for r in receiver.requests]
    assert sum(sizes) == exporter.exported == kept and max(sizes) <= 5 and exporter.dropped == 20 - kept
    exported = [s.attributes["messaging.message.id"] for s in receiver.get_finished_spans()]
    assert sorted(exported) == [f"r-{i:03}" for i in range(kept)]  # type: ignore[type-var]


def _usual_batch(recorder: Recorder, rng: random.Random) -> tuple[list[Any], LightSpan]:
    """A batch of 20 usual requests (their spans pending), started."""
    spans = [recorder.consumer({"traceparent": _traceparent(rng)}, "mesh.infer.iris.1.normal", f"r-{i:03}", "w")
             for i in range(20)]  # fmt: skip
    batch = recorder.batch("iris", "1", spans, "w")
    assert batch is not None and batch.requests is not None
    return spans, batch
