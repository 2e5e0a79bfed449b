"""Fixtures of the fault-injection suite: a nats-server of each test's own (it may be killed),
a fleet of worker and router processes stopped by PID, and the identity model the load runs on."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker import Connection, NatsServer, Registry, Settings, provision
from examples.build_models import build_identity_onnx
from schemas.spec import ModelSpec, TensorSpec, VersionSpec
from servemesh import MeshClient
from servemesh.local import wait_workers_ready
from tests.conftest import provisioned, set_config, unique, wait_for
from tests.faults import faulty_runtime
from tests.faults.fleet import Fleet
from tests.faults.report import LINES

# Short enough that a stalled or dead holder's requests come back within a scenario.
ACK_WAIT_S = 1.0


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Each scenario's line — sent / answered / failed / lost — whether or not output was captured."""
    if LINES:
        terminalreporter.section("fault scenarios")
        for line in LINES:
            terminalreporter.line(line)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server with file storage, for this test alone (scenarios kill and restart it)."""
    with NatsServer(store_dir=tmp_path / "nats") as nats_server:
        yield provisioned(nats_server)


@pytest.fixture
def fleet(server: NatsServer, tmp_path: Path) -> Iterator[Fleet]:
    procs = Fleet(server.url, tmp_path)
    try:
        yield procs
    finally:
        procs.close()


@pytest.fixture
async def conn(server: NatsServer) -> AsyncIterator[Connection]:
    """The test's own connection, to the provisioned mesh."""
    connection = await Connection.open(Settings.from_url(server.url))
    await provision(connection)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def client(server: NatsServer) -> AsyncIterator[MeshClient]:
    async with await MeshClient.connect(server.url) as mesh_client:
        yield mesh_client


def identity_repo(repo: Path, **config: object) -> str:
    """An identity model (output = input, float32 [4]) of a name unique to the test, in ``repo``; its
    ack wait ACK_WAIT_S unless ``config`` says otherwise (None: the default a user gets)."""
    name = unique("ident")
    config = {"ack_wait_s": ACK_WAIT_S, **config}
    if config["ack_wait_s"] is None:
        del config["ack_wait_s"]
    set_config(build_identity_onnx(repo, name, "float32", shape=(4,), max_delay_ms=2), **config)
    return name


async def start_workers(fleet: Fleet, conn: Connection, repo: Path, names: list[str]) -> None:
    for name in names:
        fleet.worker(name, repo)
    await wait_workers_ready(await Registry.open(conn), names, timeout=60)


REPO_ROOT = Path(__file__).resolve().parents[2]


async def holders(conn: Connection, model: str, version: str = "1") -> set[str]:
    """Workers whose latest heartbeat says they serve ``model:version``."""
    beats = await (await Registry.open(conn)).heartbeats()
    return {worker for worker, beat in beats.items() if f"{model}:{version}" in beat.get("models", {})}


async def faulty_model(
    conn: Connection, fleet: Fleet, tmp_path: Path, workers: list[str], delay_s: float = 0.0, **spec: Any
) -> str:
    """Register a model on the faulty runtime plugin (identity, ``delay_s`` per batch, crashes on
    the poison value), start a router and ``workers`` that can load it, and wait until every one
    of them serves it. Returns the model's name."""
    name = unique("faulty")
    artifact = tmp_path / f"{name}.json"
    artifact.write_text(json.dumps({"delay_s": delay_s}))
    tensor = TensorSpec(name="input", dtype="float32", shape=(4,))
    model = ModelSpec(
        name=name, versions={"1": VersionSpec(uri=artifact.as_uri(), format=faulty_runtime.FORMAT)},
        inputs=[tensor], outputs=[tensor.model_copy(update={"name": "output"})], ack_wait_s=ACK_WAIT_S,
        min_replicas=len(workers), max_replicas=len(workers), **spec,
    )  # fmt: skip
    await (await Registry.open(conn)).put_spec(model)
    plugin = faulty_runtime.install(tmp_path / "plugin")
    env = {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(plugin)])}
    fleet.router("r1")
    for worker in workers:
        fleet.worker(worker, env=env)

    async def all_serving() -> bool:
        return await holders(conn, name) == set(workers)

    await wait_for(all_serving, timeout=60, what=f"{', '.join(workers)} serving {name}")
    return name
