"""Priorities and deadlines on a saturated worker."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from broker import NatsServer
from examples.build_models import build_slow_onnx
from schemas.errors import DeadlineExceeded
from servemesh import MeshClient
from tests.conftest import serving, unique


async def _timed(coro: object) -> float:
    await coro  # type: ignore[misc]
    return time.monotonic()


async def test_high_priority_finishes_before_low_under_saturation(
    nats_server: NatsServer, tmp_path: Path, client: MeshClient
) -> None:
    name = unique("slow")
    build_slow_onnx(tmp_path, name, max_batch_size=4, max_delay_ms=1)
    x = np.ones((1, 256), dtype=np.float32)
    async with serving(nats_server.url, tmp_path, [name]):
        await client.infer(name, {"input": x}, timeout=30)  # warm
        start = time.monotonic()
        low = [_timed(client.infer(name, {"input": x}, priority="low", timeout=60)) for _ in range(600)]
        low_tasks = [asyncio.create_task(c) for c in low]
        await asyncio.sleep(0.2)  # the low backlog is queued and the worker is busy with it
        high = [_timed(client.infer(name, {"input": x}, priority="high", timeout=60)) for _ in range(12)]
        low_done, high_done = await asyncio.gather(asyncio.gather(*low_tasks), asyncio.gather(*high))
    high_latency = max(high_done) - start
    low_latency = max(low_done) - start
    # Every high request, though sent after the whole low backlog, is answered before it drains.
    assert high_latency < low_latency
    assert sum(t < max(high_done) for t in low_done) < len(low_done) // 2


async def test_expired_request_is_not_computed_and_caller_gets_504(
    nats_server: NatsServer, tmp_path: Path, client: MeshClient
) -> None:
    name = unique("slow")
    build_slow_onnx(tmp_path, name, max_batch_size=2, max_delay_ms=1)
    x = np.ones((1, 256), dtype=np.float32)
    async with serving(nats_server.url, tmp_path, [name]) as worker:
        await client.infer(name, {"input": x}, timeout=30)
        backlog = [asyncio.create_task(client.infer(name, {"input": x}, timeout=60)) for _ in range(150)]
        await asyncio.sleep(0.1)
        with pytest.raises(DeadlineExceeded) as excinfo:
            await client.infer(name, {"input": x}, timeout=0.2)
        assert excinfo.value.status == 504
        await asyncio.gather(*backlog)
        stats = worker.servers[(name, "1")].stats
    # The expired request was dropped by the worker, not computed: rows computed = answered requests.
    assert stats.expired >= 1
    assert stats.rows == stats.succeeded == 151
