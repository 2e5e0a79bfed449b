"""Cancellation end to end: a cancelled MeshClient.infer is never computed if it has not been yet,
whether it waits in the stream or in a forming batch; a pipeline stops at its next stage; the
rest of the traffic is unaffected. The worker's own counters are the proof."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker import NatsServer
from examples.build_models import build_identity_onnx
from servemesh import MeshClient
from tests.conftest import serving, unique, wait_for

BATCH_S = 0.2  # one batch of the slow model
BATCH = 8


def _row(i: int) -> dict[str, np.ndarray]:
    return {"input": np.full((1, 4), i, np.float32)}


def _slowed(worker: Any, name: str, seen: list[float]) -> None:
    server = worker.servers[(name, "1")]
    predict = server.runtime.predict

    def slow_predict(inputs: Any) -> Any:
        seen.extend(float(v) for v in np.asarray(inputs["input"])[:, 0])
        time.sleep(BATCH_S)
        return predict(inputs)

    server.runtime.predict = slow_predict
    server._row_cost_s = 1.0  # never inline: the loop stays free while a batch computes


@pytest.fixture
def slow(tmp_path: Path) -> tuple[Path, str]:
    name = unique("slow")
    build_identity_onnx(tmp_path, name, "float32", shape=(4,), max_batch_size=BATCH, max_delay_ms=1)
    return tmp_path, name


async def test_a_thousand_cancelled_requests_are_never_computed(
    nats_server: NatsServer, slow: tuple[Path, str], client: MeshClient
) -> None:
    repo, name = slow
    computed: list[float] = []
    async with serving(nats_server.url, repo, [name]) as worker:
        _slowed(worker, name, computed)
        server = worker.servers[(name, "1")]
        await client.infer(name, _row(-1), timeout=10)  # route cached, model warm
        computed.clear()
        # Ahead of them: 16 requests that keep the model busy for a while.
        kept = [asyncio.create_task(client.infer(name, _row(10_000 + i), timeout=60)) for i in range(16)]
        await asyncio.sleep(0.05)
        doomed = [asyncio.create_task(client.infer(name, _row(i), timeout=60)) for i in range(1000)]
        await asyncio.sleep(0.3)  # published, queued behind the busy model (in the stream and a forming batch)
        for task in doomed:
            task.cancel()
        after = [asyncio.create_task(client.infer(name, _row(20_000 + i), timeout=60)) for i in range(8)]
        results = await asyncio.gather(*kept, *after)
        for i, out in enumerate(results):
            expected = 10_000 + i if i < 16 else 20_000 + i - 16
            np.testing.assert_array_equal(out["output"], _row(expected)["input"])
        assert all(task.cancelled() for task in doomed)

        async def all_settled() -> bool:
            return server.stats.cancelled + sum(1 for v in computed if 0 <= v < 1000) >= 1000

        await wait_for(all_settled, 30, "every cancelled request settled")
        cancelled_computed = sorted({int(v) for v in computed if 0 <= v < 1000})
        # A batch already computing when the cancellation came may have held a few; no more than one.
        assert len(cancelled_computed) <= BATCH, cancelled_computed
        assert server.stats.cancelled >= 1000 - BATCH
        assert server.in_flight == 0


async def test_a_cancelled_pipeline_stops_at_its_next_stage(nats_server: NatsServer, tmp_path: Path,
                                                          client: MeshClient) -> None:  # fmt: skip
    first, second = unique("stage_a"), unique("stage_b")
    build_identity_onnx(tmp_path, first, "float32", shape=(4,), max_batch_size=BATCH, max_delay_ms=1,
                        names=("input", "mid"))  # fmt: skip
    build_identity_onnx(tmp_path, second, "float32", shape=(4,), max_batch_size=BATCH, max_delay_ms=1,
                        names=("mid", "output"))  # fmt: skip
    seen_first: list[float] = []
    async with serving(nats_server.url, tmp_path, [first, second]) as worker:
        stage_one = worker.servers[(first, "1")]
        predict = stage_one.runtime.predict

        def slow_first(inputs: Any) -> Any:
            seen_first.extend(float(v) for v in np.asarray(inputs["input"])[:, 0])
            time.sleep(0.5)
            return predict(inputs)

        stage_one.runtime.predict = slow_first
        stage_one._row_cost_s = 1.0
        out = await client.infer([first, second], _row(-1), timeout=10)  # warm both stages
        np.testing.assert_array_equal(out["output"], _row(-1)["input"])
        stage_two = worker.servers[(second, "1")]
        before = stage_two.stats.rows
        call = asyncio.create_task(client.infer([first, second], _row(7), timeout=30))
        await wait_for(lambda: _true(7.0 in seen_first), 10, "the first stage computing")
        call.cancel()  # while its first stage computes: the second must not run it

        async def second_settled() -> bool:
            return stage_two.stats.cancelled >= 1

        await wait_for(second_settled, 10, "the second stage dropping the cancelled request")
        assert stage_two.stats.rows == before


async def _true(value: bool) -> bool:
    return value
