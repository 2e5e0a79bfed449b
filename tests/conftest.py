"""Shared fixtures: a real nats-server per session (random port), example models built once,
and in-process workers serving chosen models."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from broker import Connection, NatsServer, Settings, provision
from examples import build_models
from servemesh import MeshClient
from workers.repository import read_model
from workers.worker import Worker

if TYPE_CHECKING:
    from tests.integration.cluster import Cluster


def provisioned(server: NatsServer, **settings: Any) -> NatsServer:
    """``server`` with the mesh provisioned on it, as the admin step (``servemesh provision``) would."""

    async def run() -> None:
        conn = await Connection.open(Settings.from_url(server.url, **settings))
        try:
            await provision(conn)
        finally:
            await conn.close()

    asyncio.run(run())
    return server


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    with NatsServer() as server:
        yield provisioned(server)


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared repository of example models (built once per session)."""
    repo = tmp_path_factory.mktemp("models")
    build_models.build_iris_onnx(repo)
    build_models.build_digits_export(repo)
    build_models.build_digits_torchscript(repo)
    build_models.build_fixed_shape_onnx(repo)
    build_models.build_torch_double(repo)
    build_models.build_torch_double(repo, "double_ex", fmt="torch_export")
    build_models.build_mlp_onnx(repo, d_in=64, hidden=256, d_out=32)
    for dtype in ("float32", "float16", "float64", "int8", "int32", "int64", "uint8", "uint64", "bool", "string"):
        build_models.build_identity_onnx(repo, f"identity_{dtype}", dtype)
    return repo


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def set_config(model_dir: Path, **values: Any) -> None:
    """Override top-level keys of a model's servemesh.yaml (e.g. ack_wait_s for crash tests)."""
    import yaml

    path = model_dir / "servemesh.yaml"
    config = yaml.safe_load(path.read_text())
    config.update(values)
    path.write_text(yaml.safe_dump(config))


@asynccontextmanager
async def serving(
    url: str, repo: Path, models: list[str] | None = None, worker_id: str | None = None
) -> AsyncIterator[Worker]:
    """An in-process worker serving ``models`` of ``repo`` (default: all) until the block ends, then draining."""
    conn = await Connection.open(Settings.from_url(url))
    worker = Worker(conn, worker_id or unique("w"))
    try:
        await worker.start()
        if models is None:
            await worker.serve_repository(repo)
        else:
            for name in models:
                await worker.serve(read_model(repo / name))
        yield worker
    finally:
        await worker.drain()
        await conn.close()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """A nats-server of its own, for routers and workers this test starts (stopped by PID at the end)."""
    from tests.integration.cluster import Cluster

    with NatsServer() as server:
        mesh = await Cluster(server, tmp_path).open()
        try:
            yield mesh
        finally:
            await mesh.close()


@pytest.fixture
async def client(nats_server: NatsServer) -> AsyncIterator[MeshClient]:
    async with await MeshClient.connect(nats_server.url) as mesh_client:
        yield mesh_client


async def wait_for(condition: Callable[[], Awaitable[bool]], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll an async condition until true, or fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
