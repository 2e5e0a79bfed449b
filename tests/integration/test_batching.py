"""Under concurrent load the worker forms real batches, and every reply reaches its own caller."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from broker import MeshClient, NatsServer
from examples.build_models import build_identity_onnx
from tests.conftest import serving, unique


async def test_concurrent_requests_are_batched_and_routed_to_their_callers(
    nats_server: NatsServer, tmp_path: Path, client: MeshClient
) -> None:
    name = unique("ident")
    build_identity_onnx(tmp_path, name, "float32", max_batch_size=32, max_delay_ms=5, shape=(8,))
    rows = [np.full((1 + i % 3, 8), i, dtype=np.float32) for i in range(300)]
    async with serving(nats_server.url, tmp_path, [name]) as worker:
        replies = await asyncio.gather(*(client.infer_reply(name, {"input": x}, timeout=30) for x in rows))
        stats = worker.servers[f"{name}:1"].stats
    for x, reply in zip(rows, replies, strict=True):
        np.testing.assert_array_equal(reply.outputs["output"], x)
    sizes = [r.timing.batch_size for r in replies]
    assert max(sizes) > 1, "no request was batched with another"
    assert stats.batches < len(rows), "every request ran alone"
    assert stats.rows == sum(x.shape[0] for x in rows)
    # A batch never holds more rows than max_batch_size allows (each request here has ≤ 3 rows).
    assert stats.max_batch <= 32
