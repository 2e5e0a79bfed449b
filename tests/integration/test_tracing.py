"""Traces across the mesh, collected in memory: client send → worker process (its child), one batch
span linked to every request it carried, and the model's inference span under the batch."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from broker import MeshClient, NatsServer, tracing
from examples.build_models import build_identity_onnx
from schemas.errors import BadInput
from tests.conftest import serving, unique


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    try:
        yield exporter
    finally:
        tracing.disable()


def _by_name(exporter: InMemorySpanExporter, prefix: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name.startswith(prefix)]


async def test_single_request_trace(nats_server: NatsServer, tmp_path: Path, spans: InMemorySpanExporter) -> None:
    name = unique("ident")
    build_identity_onnx(tmp_path, name, "float32", shape=(2,))
    async with serving(nats_server.url, tmp_path, [name]) as worker, await MeshClient.connect(nats_server.url) as c:
        await c.infer(name, {"input": np.ones((1, 2), np.float32)})
    (send,) = _by_name(spans, "send ")
    (process,) = _by_name(spans, "process ")
    (batch,) = _by_name(spans, "batch ")
    (infer,) = _by_name(spans, "infer ")
    assert send.kind == SpanKind.PRODUCER and process.kind == SpanKind.CONSUMER
    assert process.context.trace_id == send.context.trace_id
    assert process.parent is not None and process.parent.span_id == send.context.span_id
    assert [link.context.span_id for link in batch.links] == [process.context.span_id]
    assert infer.parent is not None and infer.parent.span_id == batch.context.span_id
    attrs = process.attributes or {}
    assert attrs["messaging.system"] == "nats" and attrs["mesh.model"] == name and attrs["mesh.version"] == "1"
    assert attrs["mesh.priority"] == "normal" and attrs["mesh.worker"] == worker.id
    assert attrs["messaging.destination.name"] == f"mesh.infer.{name}.1.normal"
    assert attrs["messaging.message.id"] == (send.attributes or {})["messaging.message.id"]
    assert float(attrs["mesh.queue_wait_ms"]) >= 0
    assert (batch.attributes or {})["messaging.batch.message_count"] == 1


async def test_batch_span_links_every_request_and_errors_are_marked(
    nats_server: NatsServer, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    name = unique("ident")
    build_identity_onnx(tmp_path, name, "float32", max_batch_size=16, max_delay_ms=50, shape=(2,))
    async with serving(nats_server.url, tmp_path, [name]), await MeshClient.connect(nats_server.url) as c:
        good = [c.infer(name, {"input": np.full((1, 2), i, np.float32)}) for i in range(6)]
        bad = c.infer(name, {"input": np.zeros((1, 3), np.float32)})
        results = await asyncio.gather(*good, bad, return_exceptions=True)
    assert isinstance(results[-1], BadInput)
    sends = _by_name(spans, "send ")
    processes = _by_name(spans, "process ")
    assert len(sends) == len(processes) == 7
    parent_of = {p.parent.span_id: p for p in processes if p.parent is not None}
    assert set(parent_of) == {s.context.span_id for s in sends}  # every request: client span → worker span
    linked = {link.context.span_id for b in _by_name(spans, "batch ") for link in b.links}
    ok_processes = {p.context.span_id for p in processes if p.status.status_code != StatusCode.ERROR}
    assert linked == ok_processes and len(ok_processes) == 6
    assert max(len(b.links) for b in _by_name(spans, "batch ")) > 1  # batched together
    failed = [p for p in processes if p.status.status_code == StatusCode.ERROR]
    assert len(failed) == 1 and (failed[0].attributes or {})["mesh.status"] == 400
    failed_send = [s for s in sends if s.status.status_code == StatusCode.ERROR]
    assert len(failed_send) == 1


async def test_trace_context_travels_only_when_tracing_is_on(
    nats_server: NatsServer, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    import nats

    name = unique("ident")
    build_identity_onnx(tmp_path, name, "float32", shape=(2,))
    nc = await nats.connect(nats_server.url)
    try:
        wire = await nc.subscribe(f"mesh.infer.{name}.>")  # sees each request as published
        async with serving(nats_server.url, tmp_path, [name]), await MeshClient.connect(nats_server.url) as c:
            await c.infer(name, {"input": np.ones((1, 2), np.float32)})
            traced = (await wire.next_msg(timeout=5)).headers or {}
            tracing.disable()
            await c.infer(name, {"input": np.ones((1, 2), np.float32)})
            untraced = (await wire.next_msg(timeout=5)).headers or {}
    finally:
        await nc.close()
    (send,) = _by_name(spans, "send ")  # the second request made no span
    assert traced["traceparent"].split("-")[1] == format(send.context.trace_id, "032x")
    assert "traceparent" not in untraced


async def test_pipeline_stages_appear_in_one_trace(
    nats_server: NatsServer, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    from examples.build_models import build_iris_onnx
    from tests.integration.test_pipelines import build_scale

    prep, clf = unique("prep"), unique("clf")
    build_scale(tmp_path, prep, 0.5)
    build_iris_onnx(tmp_path, name=clf)
    async with serving(nats_server.url, tmp_path, [prep, clf]), await MeshClient.connect(nats_server.url) as c:
        await c.infer([prep, clf], {"raw": np.ones((1, 4), np.float32)})
    (send,) = _by_name(spans, "send ")
    (first,) = _by_name(spans, f"process {prep}")
    (second,) = _by_name(spans, f"process {clf}")
    assert first.context.trace_id == second.context.trace_id == send.context.trace_id
    assert first.parent is not None and first.parent.span_id == send.context.span_id
    assert second.parent is not None and second.parent.span_id == first.context.span_id


async def test_sampling_decided_once_per_trace(nats_server: NatsServer, tmp_path: Path) -> None:
    """With a parent-based ratio sampler, the worker records exactly the requests the client sampled, and
    every recorded request reaches a recorded batch span; dropped traces still carry their context."""
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.5)))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    name = unique("ident")
    build_identity_onnx(tmp_path, name, "float32", max_batch_size=8, max_delay_ms=20, shape=(2,))
    try:
        async with serving(nats_server.url, tmp_path, [name]), await MeshClient.connect(nats_server.url) as c:
            await asyncio.gather(*(c.infer(name, {"input": np.full((1, 2), i, np.float32)}) for i in range(40)))
    finally:
        tracing.disable()
    sends = _by_name(exporter, "send ")
    processes = _by_name(exporter, "process ")
    assert 0 < len(sends) < 40  # some traces were dropped, some kept
    assert {p.parent.span_id for p in processes if p.parent} == {s.context.span_id for s in sends}
    linked = {link.context.span_id for b in _by_name(exporter, "batch ") for link in b.links}
    assert linked == {p.context.span_id for p in processes}


async def test_a_dropped_trace_makes_no_worker_spans_and_keeps_its_context(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    import nats
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.0)))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    name = unique("ident")
    build_identity_onnx(tmp_path, name, "float32", shape=(2,))
    nc = await nats.connect(nats_server.url)
    try:
        wire = await nc.subscribe(f"mesh.infer.{name}.>")
        async with serving(nats_server.url, tmp_path, [name]), await MeshClient.connect(nats_server.url) as c:
            await c.infer(name, {"input": np.ones((1, 2), np.float32)})
            headers = (await wire.next_msg(timeout=5)).headers or {}
    finally:
        tracing.disable()
        await nc.close()
    assert int(headers["traceparent"][-2:], 16) & 1 == 0  # context sent, marked not sampled
    assert exporter.get_finished_spans() == ()
