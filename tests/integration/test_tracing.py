"""Traces across the mesh: client send → worker process (its child), one batch span linked to every
request it carried, and the model's inference span under the batch. Each test runs twice: spans recorded
by the SDK into its in-memory exporter, and spans recorded by the mesh's own recorder and exported as
OTLP/HTTP to a receiver that decodes them."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import numpy as np
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from broker import MeshClient, NatsServer, tracing
from broker.span_export import ExportSettings
from broker.spans import Sampler
from examples.build_models import build_identity_onnx
from schemas.errors import BadInput
from tests.conftest import serving, unique
from tests.otlp_receiver import receiving

RECORDERS = ("sdk", "direct")


class Spans(Protocol):
    def get_finished_spans(self) -> Sequence[ReadableSpan]: ...


@contextmanager
def recording(recorder: str, sampler: str = "parentbased_always_on", ratio: float = 1.0) -> Iterator[Spans]:
    """Trace this process (client and in-process workers) with ``recorder`` and the named sampler."""
    if recorder == "sdk":
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased

        exporter = InMemorySpanExporter()
        root = TraceIdRatioBased(ratio) if sampler.endswith("traceidratio") else ALWAYS_ON
        provider = TracerProvider(sampler=ParentBased(root) if sampler.startswith("parentbased_") else root)
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracing.enable(provider)
        try:
            yield exporter
        finally:
            tracing.disable()
        return
    with receiving() as receiver:
        tracing.enable_direct(ExportSettings(url=receiver.url, delay_s=0.2), Sampler(sampler, ratio), "tests")
        assert tracing._recorder is not None
        receiver.flush = tracing._recorder.exporter.force_flush  # also once tracing is turned off
        try:
            yield receiver
        finally:
            tracing.shutdown()
            tracing.disable()


@pytest.fixture(params=RECORDERS)
def spans(request: pytest.FixtureRequest) -> Iterator[Spans]:
    with recording(request.param) as recorded:
        yield recorded


def _by_name(exporter: Spans, prefix: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name.startswith(prefix)]


async def test_single_request_trace(nats_server: NatsServer, tmp_path: Path, spans: Spans) -> None:
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
    nats_server: NatsServer, tmp_path: Path, spans: Spans
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
    nats_server: NatsServer, tmp_path: Path, spans: Spans
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


async def test_pipeline_stages_appear_in_one_trace(nats_server: NatsServer, tmp_path: Path, spans: Spans) -> None:
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


@pytest.mark.parametrize("recorder", RECORDERS)
async def test_sampling_decided_once_per_trace(nats_server: NatsServer, tmp_path: Path, recorder: str) -> None:
    """With a parent-based ratio sampler, the worker records exactly the requests the client sampled, and
    every recorded request reaches a recorded batch span; dropped traces still carry their context."""
    name = unique("ident")
    build_identity_onnx(tmp_path, name, "float32", max_batch_size=8, max_delay_ms=20, shape=(2,))
    with recording(recorder, "parentbased_traceidratio", 0.5) as exporter:
        async with serving(nats_server.url, tmp_path, [name]), await MeshClient.connect(nats_server.url) as c:
            await asyncio.gather(*(c.infer(name, {"input": np.full((1, 2), i, np.float32)}) for i in range(40)))
    sends = _by_name(exporter, "send ")
    processes = _by_name(exporter, "process ")
    assert 0 < len(sends) < 40  # some traces were dropped, some kept
    assert {p.parent.span_id for p in processes if p.parent} == {s.context.span_id for s in sends}
    linked = {link.context.span_id for b in _by_name(exporter, "batch ") for link in b.links}
    assert linked == {p.context.span_id for p in processes}


@pytest.mark.parametrize("recorder", RECORDERS)
async def test_a_dropped_trace_makes_no_worker_spans_and_keeps_its_context(
    nats_server: NatsServer, tmp_path: Path, recorder: str
) -> None:
    import nats

    name = unique("ident")
    build_identity_onnx(tmp_path, name, "float32", shape=(2,))
    nc = await nats.connect(nats_server.url)
    try:
        with recording(recorder, "parentbased_traceidratio", 0.0) as exporter:
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

    from broker import Connection, Registry, Settings, provision
    from router.local import spawn_worker, wait_workers_ready
    from tests.integration.cluster import eventually
    from tests.integration.test_observability import _free_port, _get, _sample

    name, worker_id = unique("ident"), unique("w")
    build_identity_onnx(tmp_path / "repo", name, "float32", shape=(2,))
    np.save(tmp_path / "x.npy", np.ones((1, 2), np.float32))
    with receiving() as receiver:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url.removesuffix("/v1/traces"), "OTEL_BSP_SCHEDULE_DELAY": "100"}
        port = _free_port()
        worker_env = {**env, "SERVEMESH_HTTP_PORT": str(port)}
        worker = spawn_worker(nats_server.url, tmp_path / "repo", worker_id, tmp_path / "worker.log", worker_env)
        try:
            conn = await Connection.open(Settings.from_url(nats_server.url))
            try:
                await provision(conn)
                await wait_workers_ready(await Registry.open(conn), [worker_id], 60)
            finally:
                await conn.close()
            args = ["infer", name, "--input", f"input={tmp_path / 'x.npy'}", "--nats", nats_server.url]
            cli = subprocess.run(
                [sys.executable, "-m", "router", *args], env={**os.environ, **env}, capture_output=True, timeout=60
            )
            assert cli.returncode == 0, cli.stderr.decode()

            async def traced() -> bool:
                names = {s.name for s in receiver.get_finished_spans()}
                return {f"send {name}", f"process {name}", f"batch {name}", f"infer {name}"} <= names

            await eventually(traced, 30, "spans from both processes")

            async def counted() -> bool:  # the worker's /metrics counts what it exported: process, batch, infer
                return _sample(_get(port, "/metrics")[1], "servemesh_trace_spans_total", outcome="exported") == 3

            await eventually(counted, 10, "the worker's export counted")
            assert _sample(_get(port, "/metrics")[1], "servemesh_trace_spans_total", outcome="dropped") == 0
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
