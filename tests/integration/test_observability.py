"""Metrics and health as an operator sees them: scrape /metrics, probe /health/*, run --check."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from examples.build_models import build_identity_onnx
from schemas.errors import BadInput
from servemesh import MeshClient
from telemetry.logs import JsonFormatter
from tests.conftest import unique
from tests.integration.cluster import Cluster, eventually
from workers.repository import read_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one Prometheus sample, or None."""
    for line in text.splitlines():
        named = line.startswith((name + "{", name + " "))
        if named and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


async def _check(kind: str, port: int) -> int:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "servemesh", kind, "--check", "--http-port", str(port), stdout=asyncio.subprocess.DEVNULL
    )
    return await asyncio.wait_for(proc.wait(), 30)


async def test_worker_metrics_and_health(cluster: Cluster, tmp_path: Path) -> None:
    name = unique("ident")
    good = build_identity_onnx(tmp_path, name, "float32", shape=(2,))
    broken = tmp_path / unique("broken")
    (broken / "1").mkdir(parents=True)
    (broken / "1" / "model.onnx").write_bytes(b"not an onnx model")
    assert cluster.registry is not None
    await cluster.registry.put_spec(read_model(good))
    port, router_port = _free_port(), _free_port()
    cluster.worker("w1", env={"SERVEMESH_HTTP_PORT": str(port)})
    cluster.router("r1", env={"SERVEMESH_HTTP_PORT": str(router_port)})
    await eventually(lambda: _ready_code(port, 200), 30, "worker ready once its model is loaded")
    assert _get(port, "/health/live")[0] == 200 and await _check("worker", port) == 0
    async with await MeshClient.connect(cluster.server.url) as client:
        for _ in range(5):
            await client.infer(name, {"input": np.ones((1, 2), np.float32)})
        with pytest.raises(BadInput):
            await client.infer(name, {"input": np.ones((1, 3), np.float32)})
    status, text = _get(port, "/metrics")
    assert status == 200
    assert _sample(text, "servemesh_inference_request_success_total", model=name, version="1") == 5
    assert _sample(text, "servemesh_inference_request_failure_total", model=name, status="400") == 1
    assert _sample(text, "servemesh_inference_batch_size_count", model=name) == 5
    assert _sample(text, "servemesh_inference_queue_duration_seconds_count", model=name) == 5
    assert _sample(text, "servemesh_model_loaded", model=name, version="1") == 1
    assert _sample(text, "servemesh_model_instances", model=name, version="1") == 1
    assert _sample(text, "servemesh_inference_batches_computing", model=name, version="1") == 0  # all answered
    assert _sample(text, "servemesh_worker_ready") == 1
    router_text = _get(router_port, "/metrics")[1]
    assert _sample(router_text, "servemesh_router_leader") == 1
    assert _sample(router_text, "servemesh_router_replicas_ready", model=name) == 1
    assert (_sample(router_text, "servemesh_router_placement_decisions_total", action="place") or 0) >= 1
    assert await _check("router", router_port) == 0
    # An assigned model that cannot load leaves the worker alive but not ready. (With the router
    # gone, nothing moves the broken model elsewhere, so the worker stays in that state.)
    cluster.kill("r1")
    await cluster.registry.put_spec(read_model(broken))
    units = [{"model": name, "version": "1", "priorities": ["high", "normal", "low"]},
             {"model": broken.name, "version": "1", "priorities": ["normal"]}]  # fmt: skip
    await cluster.registry.put_assignment("w1", units)
    await eventually(lambda: _ready_code(port, 503), 30, "not ready while an assigned model fails to load")
    assert _get(port, "/health/live")[0] == 200 and await _check("worker", port) == 1
    beat = (await cluster.registry.heartbeats())["w1"]
    failed = {**beat["failed"], **beat.get("retrying", {})}  # "retrying" once its backoff is over
    assert "onnxruntime cannot load" in failed[f"{broken.name}:1"]


async def _ready_code(port: int, code: int) -> bool:
    try:
        return _get(port, "/health/ready")[0] == code
    except OSError:
        return False


def test_check_fails_when_nothing_answers() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "servemesh", "worker", "--check", "--http-port", str(_free_port())], capture_output=True
    )
    assert result.returncode == 1


def test_json_log_lines_carry_trace_and_request_ids() -> None:
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("t")
    record = logging.LogRecord("workers.model_server", logging.INFO, __file__, 1, "failed %s", ("x",), None)
    record.request_id = "abc123"
    with tracer.start_as_current_span("process m") as span:
        line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "failed x" and line["request_id"] == "abc123"
    assert line["trace_id"] == format(span.get_span_context().trace_id, "032x")
