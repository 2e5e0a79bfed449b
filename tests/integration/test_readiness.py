"""Readiness reflects serving: a worker whose model stops answering the requests waiting for it
says it is not ready, and why, until it answers again."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from broker import Connection, NatsServer, Settings
from examples.build_models import build_identity_onnx
from router.service import Router
from servemesh import MeshClient
from tests.conftest import unique, wait_for
from workers.worker import Worker


async def _models_show(url: str, name: str) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "servemesh", "models", "show", name, "--json", "--nats", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return dict(json.loads(out))


async def test_a_model_that_stops_answering_makes_its_worker_not_ready_and_says_why(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    name = unique("stall")
    build_identity_onnx(tmp_path, name, "float32", shape=(4,), max_batch_size=4, max_delay_ms=1)
    conn = await Connection.open(Settings.from_url(nats_server.url, stall_after_s=1.0))
    worker = Worker(conn, unique("w"))
    router = Router(conn, unique("r"))
    try:
        await worker.start()
        await worker.serve_repository(tmp_path)
        server = worker.servers[(name, "1")]
        released = threading.Event()
        predict = server.runtime.predict

        def hang(inputs: Any) -> Any:  # the runtime stops returning (a wedged device, a deadlock)
            released.wait(60)
            return predict(inputs)

        server.runtime.predict = hang  # type: ignore[method-assign]
        server._row_cost_s = 1.0  # so the batch goes to the executor, not the loop
        await worker.beat_now()
        assert worker.ready
        async with await MeshClient.connect(nats_server.url) as client:
            calls = [asyncio.create_task(client.infer(name, {"input": np.ones((1, 4), np.float32)}, timeout=30))
                     for _ in range(12)]  # fmt: skip

            async def not_ready() -> bool:
                await worker.beat_now()
                return not worker.ready

            await wait_for(not_ready, 15, what="the worker to report it is not serving")
            assert "no request answered" in worker.stalls[f"{name}:1"]
            await router.open()
            await router.tick()
            stalled = (await _models_show(nats_server.url, name))["status"]["1"]["stalled"]
            assert worker.id in stalled and "no request answered" in stalled[worker.id]
            released.set()  # it answers again: ready again, and every request is answered
            for out in await asyncio.gather(*calls):
                np.testing.assert_array_equal(out["output"], np.ones((1, 4)))

            async def ready() -> bool:
                await worker.beat_now()
                return worker.ready

            await wait_for(ready, 15, what="the worker to be ready again")
    finally:
        released.set()
        await worker.drain()
        await conn.close()
