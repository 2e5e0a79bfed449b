"""Traces across the mesh, recorded by the OpenTelemetry SDK: the client's send span per request,
one process span per batch linked to every sampled request it carried, the model's infer span under
it, pipeline stages as their own send/process pairs in one trace, and sampling decided once where
the trace begins."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind

from broker import NatsServer
from examples.build_models import build_identity_onnx
from schemas.errors import BadInput
from servemesh import MeshClient
from telemetry import tracing
from tests.conftest import serving, unique
from tests.otlp_receiver import receiving


@contextmanager
def recording(ratio: float | None = None) -> Iterator[InMemorySpanExporter]:
    """Trace this process (client and in-process workers); ``ratio``: parentbased_traceidratio."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio) if ratio is not None else ALWAYS_ON))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    try:
        yield exporter
    finally:
        tracing.disable()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    with recording() as recorded:
        yield recorded


def named(exporter: InMemorySpanExporter, prefix: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name.startswith(prefix)]


async def test_single_request_trace(nats_server: NatsServer, tmp_path: Path, spans: InMemorySpanExporter) -> None:
    name = unique("ident")
    build_identity_onnx(tmp_path, name, "float32", shape=(2,))
    async with serving(nats_server.url, tmp_path, [name]) as worker, await MeshClient.connect(nats_server.url) as c:
        await c.infer(name, {"input": np.ones((1, 2), np.float32)})
    (send,) = named(spans, "send ")
    (process,) = named(spans, "process ")
    (infer,) = named(spans, "infer ")
    assert send.kind == SpanKind.PRODUCER and process.kind == SpanKind.CONSUMER
    assert process.context.trace_id == send.context.trace_id == infer.context.trace_id
    assert process.parent is not None and process.parent.span_id == send.context.span_id
    (link,) = process.links
    assert link.context.span_id == send.context.span_id
    assert (link.attributes or {})["messaging.message.id"] == (send.attributes or {})["messaging.message.id"]
    assert float((link.attributes or {})["mesh.queue_wait_ms"]) >= 0
    assert infer.parent is not None and infer.parent.span_id == process.context.span_id
    attrs = process.attributes or {}
    assert attrs["messaging.system"] == "nats" and attrs["mesh.model"] == name and attrs["mesh.version"] == "1"
    assert attrs["mesh.worker"] == worker.id and attrs["messaging.batch.message_count"] == 1
    assert (send.attributes or {})["messaging.destination.name"] == f"mesh.infer.{name}.1.normal"


async def test_one_process_span_per_batch_links_every_request_and_errors_are_marked(
    nats_server: NatsServer, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    name = unique("ident")
    build_identity_onnx(tmp_path, name, "float32", max_batch_size=16, max_delay_ms=50, shape=(2,))
    async with serving(nats_server.url, tmp_path, [name]), await MeshClient.connect(nats_server.url) as c:
        good = [c.infer(name, {"input": np.full((1, 2), i, np.float32)}) for i in range(6)]
        bad = c.infer(name, {"input": np.zeros((1, 3), np.float32)})
        results = await asyncio.gather(*good, bad, return_exceptions=True)
    assert isinstance(results[-1], BadInput)
    sends = named(spans, "send ")
    processes = named(spans, "process ")
    assert len(sends) == 7
    linked = {link.context.span_id for p in processes for link in p.links}
    ok_sends = {s.context.span_id for s in sends if s.status.is_ok}
    assert ok_sends <= linked and len(ok_sends) == 6
    assert len(processes) < 7 and max(len(p.links) for p in processes) > 1  # batched: fewer spans than requests
    failed_send = [s for s in sends if not s.status.is_ok]
    assert len(failed_send) == 1 and (failed_send[0].attributes or {})["mesh.status"] == 400
    # The refused request (refused on arrival, before any batch) has a failed process span of its own.
    refused = [p for p in processes if not p.status.is_ok]
    assert len(refused) == 1 and refused[0].parent is not None
    assert refused[0].parent.span_id == failed_send[0].context.span_id


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
    (send,) = named(spans, "send ")  # the second request made no span
    assert traced["traceparent"].split("-")[1] == format(send.context.trace_id, "032x")
    assert "traceparent" not in untraced


async def test_pipeline_stages_are_send_process_pairs_in_one_trace(
    nats_server: NatsServer, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    from examples.build_models import build_iris_onnx
    from tests.integration.test_pipelines import build_scale

    prep, clf = unique("prep"), unique("clf")
    build_scale(tmp_path, prep, 0.5)
    build_iris_onnx(tmp_path, name=clf)
    async with serving(nats_server.url, tmp_path, [prep, clf]), await MeshClient.connect(nats_server.url) as c:
        await c.infer([prep, clf], {"raw": np.ones((1, 4), np.float32)})
    (first_send,) = named(spans, f"send {prep}")
    (first,) = named(spans, f"process {prep}")
    (second_send,) = named(spans, f"send {clf}")
    (second,) = named(spans, f"process {clf}")
    assert len({s.context.trace_id for s in (first_send, first, second_send, second)}) == 1
    assert first.parent is not None and first.parent.span_id == first_send.context.span_id
    assert second_send.parent is not None and second_send.parent.span_id == first.context.span_id
    assert second.parent is not None and second.parent.span_id == second_send.context.span_id


async def test_sampling_is_decided_once_per_trace(nats_server: NatsServer, tmp_path: Path) -> None:
    """With a parent-based ratio sampler, the worker's spans are those of the requests the client
    sampled: each recorded request is linked from a recorded process span, no other is."""
    name = unique("ident")
    build_identity_onnx(tmp_path, name, "float32", max_batch_size=8, max_delay_ms=20, shape=(2,))
    with recording(0.5) as exporter:
        async with serving(nats_server.url, tmp_path, [name]), await MeshClient.connect(nats_server.url) as c:
            await asyncio.gather(*(c.infer(name, {"input": np.full((1, 2), i, np.float32)}) for i in range(40)))
    sends = named(exporter, "send ")
    assert 0 < len(sends) < 40  # some traces were dropped, some kept
    linked = {link.context.span_id for p in named(exporter, "process ") for link in p.links}
    assert linked == {s.context.span_id for s in sends}


async def test_a_dropped_trace_makes_no_worker_spans_and_keeps_its_context(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    import nats

    name = unique("ident")
    build_identity_onnx(tmp_path, name, "float32", shape=(2,))
    nc = await nats.connect(nats_server.url)
    try:
        with recording(0.0) as exporter:
            wire = await nc.subscribe(f"mesh.infer.{name}.>")
            async with serving(nats_server.url, tmp_path, [name]), await MeshClient.connect(nats_server.url) as c:
                await c.infer(name, {"input": np.ones((1, 2), np.float32)})
                headers = (await wire.next_msg(timeout=5)).headers or {}
            assert list(exporter.get_finished_spans()) == []
    finally:
        await nc.close()
    assert int(headers["traceparent"][-2:], 16) & 1 == 0  # context sent, marked not sampled


async def test_processes_configured_by_the_otel_variables_export_one_trace(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """A worker process and the ``servemesh infer`` command, each configured only by the standard
    variables, export over OTLP/HTTP the spans of one trace, each under its own service name."""
    import signal
    import subprocess
    import sys

    from broker import Connection, Registry, Settings
    from servemesh.local import spawn_worker, wait_workers_ready
    from tests.integration.cluster import eventually
    from tests.integration.test_observability import _free_port, _get, _sample

    name, worker_id = unique("ident"), unique("w")
    build_identity_onnx(tmp_path / "repo", name, "float32", shape=(2,))
    np.save(tmp_path / "x.npy", np.ones((1, 2), np.float32))
    with receiving() as receiver:
        receiver.flush = lambda: None  # the spans come from other processes
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url.removesuffix("/v1/traces"), "OTEL_BSP_SCHEDULE_DELAY": "100"}
        port = _free_port()
        worker_env = {**env, "SERVEMESH_HTTP_PORT": str(port)}
        worker = spawn_worker(nats_server.url, tmp_path / "repo", worker_id, tmp_path / "worker.log", worker_env)
        try:
            conn = await Connection.open(Settings.from_url(nats_server.url))
            try:
                await wait_workers_ready(await Registry.open(conn), [worker_id], 60)
            finally:
                await conn.close()
            args = ["infer", name, "--input", f"input={tmp_path / 'x.npy'}", "--nats", nats_server.url]
            cli = subprocess.run(
                [sys.executable, "-m", "servemesh", *args], env={**os.environ, **env}, capture_output=True, timeout=60
            )
            assert cli.returncode == 0, cli.stderr.decode()

            async def traced() -> bool:
                names = {s.name for s in receiver.get_finished_spans()}
                return {f"send {name}", f"process {name}", f"infer {name}"} <= names

            await eventually(traced, 30, "spans from both processes")

            async def counted() -> bool:  # the worker's /metrics counts what it exported: process, infer
                return _sample(_get(port, "/metrics")[1], "servemesh_trace_spans_total", outcome="exported") == 2

            await eventually(counted, 10, "the worker's export counted")
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(30)
    spans = {s.name.split()[0]: s for s in receiver.get_finished_spans()}
    send, process = spans["send"], spans["process"]
    assert process.parent is not None and process.parent.span_id == send.context.span_id
    assert process.context.trace_id == send.context.trace_id == spans["infer"].context.trace_id
    assert send.resource.attributes["service.name"] == "servemesh-cli"
    assert process.resource.attributes["service.name"] == "servemesh-worker"
    assert (process.attributes or {})["mesh.worker"] == worker_id
