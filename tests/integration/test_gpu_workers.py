"""Workers and devices against a real nats-server: a CPU worker's heartbeat (device kind cpu, no GPU budget, each
loaded version's measured memory) and the router's snapshot planning with that measurement; and, on a host with
no GPU, the command line's one-line refusal of CUDA devices."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from broker.connection import Connection
from broker.registry import Registry
from broker.server import NatsServer
from broker.settings import Settings
from examples.build_models import build_mlp_onnx
from router.footprints import FootprintBook
from router.observe import observe
from router.snapshot import CPU
from tests.conftest import serving, unique
from tests.integration.test_cli_newcomer import one_line, servemesh
from workers.device import DeviceError, gpu_uuids


def _has_gpu() -> bool:
    try:
        return bool(gpu_uuids(None))
    except DeviceError:
        return False


no_gpu_only = pytest.mark.skipif(_has_gpu(), reason="this host has a CUDA device")


async def test_a_cpu_workers_heartbeat_reports_its_device_and_measured_memory(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    name = unique("mlp")
    # 2 × 256 × 8192 float32 weights: 16 MiB that loading must add to the worker's resident set.
    build_mlp_onnx(tmp_path, name, d_in=256, hidden=8192, d_out=256, max_batch_size=8)
    async with serving(nats_server.url, tmp_path, [name]) as worker:
        await worker.beat_now()
        conn = await Connection.open(Settings.from_url(nats_server.url))
        try:
            registry = await Registry.open(conn)
            beat = (await registry.heartbeats())[worker.id]
            assert beat["device"]["kind"] == "cpu" and beat["device"]["memory_free_mb"] is None
            assert beat["gpu_memory_mb"] == 0 and "gpu" not in beat["labels"]
            measured = beat["measured"][f"{name}:1"]
            assert 12 <= measured["host_mb"] <= 512 and measured["gpu_mb"] == 0
            assert beat["models"][f"{name}:1"]["memory"] == {"host_mb": measured["host_mb"], "gpu_mb": 0}
            assert beat["memory_used_mb"] == measured["host_mb"]

            book = FootprintBook()
            snapshot, _, _ = await observe(conn, registry, time.time(), book)
            mv = snapshot.models[(name, "1")]
            assert mv.footprint(CPU).host_mb == measured["host_mb"]  # planned with the measurement
            assert mv.memory_mb != measured["host_mb"]  # not with the artifact-size estimate
        finally:
            await conn.close()


@no_gpu_only
async def test_a_cuda_worker_on_a_host_without_cuda_is_one_line_and_exit_1() -> None:
    code, _, err = await servemesh("worker", "--device", "cuda:0", "--nats", "nats://127.0.0.1:1")
    assert code == 1
    one_line(err, "servemesh worker: error: --device cuda:0: no CUDA device can be seen")


@no_gpu_only
async def test_up_with_a_worker_per_gpu_on_a_host_without_one_is_one_line_and_exit_1(tmp_path: Path) -> None:
    code, _, err = await servemesh("up", "--models", str(tmp_path), "--workers", "gpu", "--port", "-1")
    assert code == 1
    one_line(err, "servemesh up: error: --workers gpu: no CUDA device can be seen")


async def test_device_and_worker_count_mistakes_are_usage_errors(tmp_path: Path) -> None:
    for args, needle in [
        (["worker", "--device", "gpu0"], "expected auto, cpu or cuda:N, got 'gpu0'"),
        (["up", "--models", str(tmp_path), "--workers", "0"], "give a number of workers, or gpu"),
    ]:
        code, _, err = await servemesh(*args)
        assert code == 2, err
        one_line(err, needle)
