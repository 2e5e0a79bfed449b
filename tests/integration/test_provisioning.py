"""Provisioning from one place: only the admin step (`servemesh provision`, `servemesh up`) creates
or changes the mesh's streams and buckets; every other process checks, reports and waits."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import numpy as np

from broker import Connection, NatsServer, Settings
from examples.build_models import build_identity_onnx
from schemas.subjects import STREAM_INFER
from servemesh import MeshClient
from tests.conftest import unique
from workers.worker import Worker


async def _servemesh(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "servemesh", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_only_the_admin_step_changes_the_stream(tmp_path: Path) -> None:
    with NatsServer() as server:
        code, out, _ = await _servemesh("provision", "--nats", server.url, "--max-queue", "100", "--tenant", "t1",
                                        "--json")  # fmt: skip
        assert code == 0
        done = json.loads(out)["done"]
        assert any("MESH_INFER" in line for line in done) and any("mesh-claims-t1" in line for line in done)
        # A command run with other settings reads the registry and leaves the stream alone.
        code, out, err = await _servemesh("models", "list", "--json", "--nats", server.url,
                                          env={"SERVEMESH_MAX_QUEUE": "5", "SERVEMESH_REPLICAS": "1"})  # fmt: skip
        assert code == 0, err
        conn = await Connection.open(Settings.from_url(server.url, max_queue=5))
        try:
            # So does a worker: it reports the difference and changes nothing.
            worker = Worker(conn, unique("w"))
            await worker.start()
            await worker.drain()
            assert (await conn.js.stream_info(STREAM_INFER)).config.max_msgs_per_subject == 100
        finally:
            await conn.close()
        code, out, _ = await _servemesh("provision", "--nats", server.url, "--max-queue", "100")
        assert code == 0 and "nothing to change" in out


async def test_an_unprovisioned_mesh_is_reported_and_waited_for(tmp_path: Path) -> None:
    name = unique("prov")
    build_identity_onnx(tmp_path, name, "float32", shape=(4,))
    with NatsServer() as server:
        code, out, err = await _servemesh("models", "list", "--nats", server.url)
        assert code == 1 and out == ""
        assert err.strip().count("\n") == 0 and "servemesh provision" in err, err  # one line, what to do
        conn = await Connection.open(Settings.from_url(server.url))
        worker = Worker(conn, unique("w"))
        starting = asyncio.create_task(worker.start())  # waits for the mesh to be provisioned
        try:
            await asyncio.sleep(1.5)
            assert not starting.done()
            with_streams = await conn.js.streams_info()
            assert with_streams == []  # the waiting worker made nothing
            code, _, _ = await _servemesh("provision", "--nats", server.url)
            assert code == 0
            await asyncio.wait_for(starting, 10)
            await worker.serve_repository(tmp_path)
            async with await MeshClient.connect(server.url) as client:
                out = await client.infer(name, {"input": np.ones((1, 4), np.float32)}, timeout=10)
            np.testing.assert_array_equal(out["output"], np.ones((1, 4)))
        finally:
            starting.cancel()
            await worker.drain()
            await conn.close()

