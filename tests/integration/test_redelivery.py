"""At-least-once without poison loops: dead letters after max_attempts, keep-alive on long batches."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nats
import numpy as np
import pytest

from broker import Connection, NatsServer, Settings, ensure_consumer, provision
from broker.provision import max_deliveries
from examples.build_models import build_identity_onnx
from schemas.envelope import decode_reply, encode_request
from schemas.errors import ModelFailure
from schemas.subjects import HDR_DEADLINE, HDR_MSG_ID, HDR_REPLY, STREAM_INFER, consumer_name, infer_subject
from servemesh import MeshClient
from tests.conftest import serving, set_config, unique


async def test_deliveries_never_computed_are_not_attempts_but_end_at_the_delivery_cap(
    nats_server: NatsServer, tmp_path: Path, client: MeshClient
) -> None:
    name = unique("ident")
    set_config(build_identity_onnx(tmp_path, name, "float32", shape=(4,)), max_attempts=3)
    conn = await Connection.open(Settings.from_url(nats_server.url))
    await provision(conn)
    # Each on a subject of its own (priorities), so that their redeliveries do not interleave.
    target = {"normal": 3, "high": max_deliveries(3)}  # "held" 3 times; every delivery the cap allows
    nc = await nats.connect(nats_server.url)
    try:
        x = np.ones((1, 4), np.float32)
        inboxes = {}
        # Taken by workers that died before computing them (simulated by naks from a raw pull).
        for priority, deliveries in target.items():
            await ensure_consumer(conn.js, name, "1", priority, ack_wait_s=30, max_attempts=3)
            inboxes[priority] = nc.new_inbox()
            await conn.js.publish(
                infer_subject(name, "1", priority),
                encode_request({"input": x}),
                headers={HDR_MSG_ID: unique("r"), HDR_REPLY: inboxes[priority], HDR_DEADLINE: "9999999999999"},
            )
            pull = await nc.jetstream().pull_subscribe_bind(consumer_name(name, "1", priority), STREAM_INFER)
            try:
                for delivery in range(1, deliveries + 1):
                    (msg,) = await pull.fetch(1, timeout=5)
                    assert msg.metadata.num_delivered == delivery
                    await msg.nak()
            finally:
                await pull.unsubscribe()
        replies = {label: await nc.subscribe(inbox) for label, inbox in inboxes.items()}
        async with serving(nats_server.url, tmp_path, [name]):
            held = decode_reply((await replies["normal"].next_msg(timeout=10)).data)
            np.testing.assert_array_equal(held.outputs["output"], x)  # computed alone, and answered
            assert held.timing.attempt == 4 and held.timing.batch_size == 1
            with pytest.raises(ModelFailure) as err:
                decode_reply((await replies["high"].next_msg(timeout=10)).data)
            assert err.value.status == 500 and "gave up after 3 attempts" in err.value.message
            np.testing.assert_array_equal((await client.infer(name, {"input": x}))["output"], x)
        for priority in target:
            info = await conn.js.consumer_info(STREAM_INFER, consumer_name(name, "1", priority))
            assert info.num_pending == 0 and info.num_ack_pending == 0  # settled, not looping
    finally:
        await nc.close()
        await conn.close()


def _build_spin_model(repo: Path, name: str) -> Path:
    """A TorchScript model whose compute time the request chooses (n iterations)."""
    import torch

    class Spin(torch.nn.Module):
        def forward(self, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
            y = x
            for _ in range(int(n.item())):
                y = torch.tanh(y * 1.0001)
            return y

    version_dir = repo / name / "1"
    version_dir.mkdir(parents=True)
    torch.jit.script(Spin()).save(str(version_dir / "model.pt"))
    (repo / name / "servemesh.yaml").write_text(
        "format: torchscript\nmax_batch_size: 0\nack_wait_s: 0.4\n"
        "inputs:\n  - {name: x, dtype: float32, shape: [4]}\n  - {name: n, dtype: int64, shape: []}\n"
        "outputs:\n  - {name: y, dtype: float32, shape: [4]}\n"
    )
    return repo / name


async def test_long_batch_is_kept_alive_and_not_redelivered(
    nats_server: NatsServer, tmp_path: Path, client: MeshClient
) -> None:
    name = unique("spin")
    _build_spin_model(tmp_path, name)
    async with serving(nats_server.url, tmp_path, [name]) as worker:
        start = time.monotonic()
        reply = await client.infer_reply(
            name, {"x": np.ones(4, np.float32), "n": np.array(1_000_000, np.int64)}, timeout=30
        )
        elapsed = time.monotonic() - start
        await asyncio.sleep(0.5)  # room for a wrongful redelivery to show up in the stats
        stats = worker.servers[(name, "1")].stats
    assert elapsed > 1.0, "the model must outlast several ack waits for this test to mean anything"
    assert reply.timing.attempt == 1
    assert stats.succeeded == 1 and stats.batches == 1
