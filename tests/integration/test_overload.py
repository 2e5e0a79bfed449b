"""Overload sheds at once: with a worker's queue holding more than a request's timeout of work, the
request is refused at once (429), not queued to wait out its timeout; those admitted are answered
in time, and high priority is not held behind the flood."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker import NatsServer
from examples.build_models import build_identity_onnx
from schemas.errors import DeadlineExceeded, MeshError, Overloaded
from servemesh import MeshClient
from tests.conftest import serving, set_config, unique

BATCH, BATCH_S = 4, 0.02  # 200 requests/s


def row(i: int) -> dict[str, np.ndarray[Any, Any]]:
    return {"input": np.full((1, 4), i, np.float32)}


@pytest.fixture
def slow(tmp_path: Path) -> tuple[Path, str]:
    name = unique("flood")
    build_identity_onnx(tmp_path, name, "float32", shape=(4,), max_batch_size=BATCH, max_delay_ms=1)
    return tmp_path, name


def slowed(worker: Any, name: str) -> None:
    """Each batch of the model takes BATCH_S (computed in the executor, as a real model's would be)."""
    server = worker.servers[(name, "1")]
    predict = server.runtime.predict

    def slow_predict(inputs: Any) -> Any:
        time.sleep(BATCH_S)
        return predict(inputs)

    server.runtime.predict = slow_predict
    server._row_cost_s = 1.0


async def outcome(client: MeshClient, name: str, i: int, timeout: float, **kw: Any) -> tuple[str, float]:
    started = time.monotonic()
    try:
        out = await client.infer(name, row(i), timeout=timeout, **kw)
    except MeshError as err:
        return type(err).__name__, time.monotonic() - started
    np.testing.assert_array_equal(out["output"], row(i)["input"])
    return "ok", time.monotonic() - started


async def test_a_flood_is_refused_at_once_and_what_is_admitted_is_served_in_time(
    nats_server: NatsServer, slow: tuple[Path, str], client: MeshClient
) -> None:
    repo, name = slow
    async with serving(nats_server.url, repo, [name]) as worker:
        slowed(worker, name)
        # A backlog for a moment: the worker measures its rate and tells it in its replies.
        await asyncio.gather(*(outcome(client, name, i, 10.0) for i in range(60)))
        results = await asyncio.gather(*(outcome(client, name, i, 1.0) for i in range(800)))
        high = await asyncio.gather(*(outcome(client, name, i, 1.0, priority="high") for i in range(4)))
    kinds = [kind for kind, _ in results]
    refused = [s for kind, s in results if kind == Overloaded.__name__]
    # 1 s of work is ~200 requests: most of the 800 are refused, each at once.
    assert len(refused) > 400, kinds.count("ok")
    assert max(refused) < 0.1
    assert kinds.count(DeadlineExceeded.__name__) <= 0.05 * len(results)  # admitted, then not served in time
    assert kinds.count("ok") >= 100
    assert [kind for kind, _ in high] == ["ok"] * 4


async def test_max_queue_bounds_a_models_queue_in_requests(
    nats_server: NatsServer, slow: tuple[Path, str], client: MeshClient
) -> None:
    repo, name = slow
    set_config(repo / name, max_queue=20)
    async with serving(nats_server.url, repo, [name]) as worker:
        slowed(worker, name)
        await asyncio.gather(*(outcome(client, name, i, 30.0) for i in range(30)))
        results = await asyncio.gather(*(outcome(client, name, i, 30.0) for i in range(200)))
    kinds = [kind for kind, _ in results]
    # Bundled requests count one by one: about 20 wait at a time, the rest are refused at once.
    assert kinds.count(Overloaded.__name__) >= 150 and "DeadlineExceeded" not in kinds
