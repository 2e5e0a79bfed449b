"""Under concurrent load the worker forms real batches, and every reply reaches its own caller."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest

from broker import NatsServer
from examples.build_models import build_identity_onnx
from servemesh import MeshClient
from tests.conftest import serving, set_config, unique


async def test_concurrent_requests_are_batched_and_routed_to_their_callers(
    nats_server: NatsServer, tmp_path: Path, client: MeshClient
) -> None:
    name = unique("ident")
    build_identity_onnx(tmp_path, name, "float32", max_batch_size=32, max_delay_ms=5, shape=(8,))
    rows = [np.full((1 + i % 3, 8), i, dtype=np.float32) for i in range(300)]
    async with serving(nats_server.url, tmp_path, [name]) as worker:
        replies = await asyncio.gather(*(client.infer_reply(name, {"input": x}, timeout=30) for x in rows))
        stats = worker.servers[(name, "1")].stats
    for x, reply in zip(rows, replies, strict=True):
        np.testing.assert_array_equal(reply.outputs["output"], x)
    sizes = [r.timing.batch_size for r in replies]
    assert max(sizes) > 1, "no request was batched with another"
    assert stats.batches < len(rows), "every request ran alone"
    assert stats.rows == sum(x.shape[0] for x in rows)
    # A batch never holds more rows than max_batch_size allows (each request here has ≤ 3 rows).
    assert stats.max_batch <= 32


async def test_a_busy_worker_leaves_unclaimed_requests_in_the_queue(
    nats_server: NatsServer, tmp_path: Path, client: MeshClient
) -> None:
    from examples.build_models import build_slow_onnx
    from schemas.subjects import STREAM_INFER, consumer_name

    name = unique("slow")
    build_slow_onnx(tmp_path, name, max_batch_size=2, max_delay_ms=1)
    x = np.ones((1, 256), np.float32)
    async with serving(nats_server.url, tmp_path, [name]) as worker:
        # Created in one turn, these leave the client as bundles of up to max_batch_size requests.
        tasks = [asyncio.create_task(client.infer(name, {"input": x}, timeout=60)) for _ in range(200)]
        js = worker.conn.js
        replica = worker.servers[(name, "1")]
        claimed, held, unclaimed = [], [], []
        while not all(t.done() for t in tasks):
            info = await js.consumer_info(STREAM_INFER, consumer_name(name, "1", "normal"))
            claimed.append(info.num_ack_pending)  # messages
            held.append(replica.in_flight)  # requests
            unclaimed.append(sum(not t.done() for t in tasks) - replica.in_flight)
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
    # The worker holds about two batches (window = 2 × max_batch_size); the rest waits in the
    # stream where another replica could take it.
    assert sorted(held)[len(held) // 2] <= 4
    # Acks are applied by the server a moment after the next pull arrives, hence the slack.
    assert max(claimed) <= 8
    assert max(held) <= 8
    assert max(unclaimed) > 100


async def test_clients_that_do_not_take_bundles_get_one_reply_per_request(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """A plain NATS client (no Mesh-Reply-Inbox header) still gets each reply on its own subject."""
    import nats

    from schemas.envelope import decode_reply, encode_request
    from schemas.subjects import HDR_DEADLINE, HDR_MSG_ID, HDR_REPLY, infer_subject

    name = unique("ident")
    build_identity_onnx(tmp_path, name, "int64", max_batch_size=16, max_delay_ms=50, shape=(2,))
    nc = await nats.connect(nats_server.url)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(f"{inbox}.>")
        async with serving(nats_server.url, tmp_path, [name]) as worker:
            for i in range(10):
                headers = {HDR_MSG_ID: unique("raw"), HDR_REPLY: f"{inbox}.{i}", HDR_DEADLINE: "9999999999999"}
                payload = encode_request({"input": np.full((1, 2), i, np.int64)})
                # Core publishes, flushed together: they reach the stream as one burst and batch.
                await nc.publish(infer_subject(name, "1", "normal"), payload, headers=headers)
            await nc.flush()
            got = {}
            for _ in range(10):
                msg = await sub.next_msg(timeout=10)
                got[msg.subject.rsplit(".", 1)[-1]] = decode_reply(msg.data).outputs["output"]
            assert worker.servers[(name, "1")].stats.max_batch > 1  # they were batched together
    finally:
        await nc.close()
    for i in range(10):
        np.testing.assert_array_equal(got[str(i)], np.full((1, 2), i, np.int64))


@pytest.mark.parametrize("instances", [1, 2])
async def test_a_model_with_two_instances_computes_two_batches_at_once(
    nats_server: NatsServer, tmp_path: Path, client: MeshClient, instances: int
) -> None:
    """``instances: 2`` in servemesh.yaml: two batches in the model at the same time, on one loaded copy
    with a thread each; outputs still equal a direct onnxruntime call. One instance never overlaps."""
    import onnxruntime as ort

    from examples.build_models import build_slow_onnx

    name = unique("slow")
    model_dir = build_slow_onnx(tmp_path, name, repeats=200, max_batch_size=4, max_delay_ms=1)
    set_config(model_dir, instances=instances)
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((1, 256)).astype(np.float32) for _ in range(48)]
    async with serving(nats_server.url, tmp_path, [name]) as worker:
        server = worker.servers[(name, "1")]
        replies = await asyncio.gather(*(client.infer(name, {"input": x}, timeout=60) for x in xs))
        stats = server.stats
        threads = server.runtime._session.get_session_options().intra_op_num_threads  # type: ignore[attr-defined]
    direct = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = direct.run(None, {"input": np.concatenate(xs)})[0]
    for i, reply in enumerate(replies):
        np.testing.assert_allclose(reply["output"], expected[i : i + 1], rtol=1e-5, atol=1e-6)
    assert stats.batches > instances
    assert stats.peak_computing == instances
    # The cores are shared among the instances (0: onnxruntime's own default, one per core).
    assert threads == (0 if instances == 1 else max(1, len(os.sched_getaffinity(0)) // 2))


async def test_draining_a_model_with_two_instances_finishes_both_batches(
    nats_server: NatsServer, tmp_path: Path, client: MeshClient
) -> None:
    """A replica that stops while two batches compute finishes both and answers what it holds;
    the next replica answers the rest: every caller gets its own correct answer."""
    import onnxruntime as ort

    from examples.build_models import build_slow_onnx
    from tests.integration.cluster import eventually

    name = unique("slow")
    model_dir = build_slow_onnx(tmp_path, name, max_batch_size=4, max_delay_ms=1)
    set_config(model_dir, instances=2)
    xs = [np.random.default_rng(i).standard_normal((1, 256)).astype(np.float32) for i in range(128)]
    tasks = []
    async with serving(nats_server.url, tmp_path, [name]) as first:
        server = first.servers[(name, "1")]
        tasks = [asyncio.create_task(client.infer(name, {"input": x}, timeout=60)) for x in xs]

        async def both_computing() -> bool:
            return server.stats.peak_computing == 2

        await eventually(both_computing, 30, "two batches computing at once", poll=0.005)
        await first.unload((name, "1"))
        # Unloaded means done: nothing of this replica's is still computing, queued or settling.
        assert server.in_flight == 0
        answered_first = server.stats.succeeded
    async with serving(nats_server.url, tmp_path, [name]):
        replies = await asyncio.gather(*tasks)
    direct = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = direct.run(None, {"input": np.concatenate(xs)})[0]
    for i, reply in enumerate(replies):
        np.testing.assert_allclose(reply["output"], expected[i : i + 1], rtol=1e-5, atol=1e-6)
    assert 0 < answered_first < len(xs)
