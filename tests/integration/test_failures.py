"""Crashes and overload: a killed worker loses nothing, a full queue answers 429 at once."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from broker import Connection, NatsServer, Registry, Settings, provision
from examples.build_models import build_identity_onnx, build_slow_onnx
from schemas.errors import DeadlineExceeded, Overloaded
from schemas.subjects import STREAM_INFER
from servemesh import MeshClient
from servemesh.local import spawn_worker, wait_workers_ready
from tests.conftest import set_config, unique
from workers.repository import read_model


@pytest.fixture
def own_server() -> Iterator[NatsServer]:
    """A server for this test alone (stream settings differ from the shared one)."""
    with NatsServer() as server:
        yield server


async def test_sigkilled_worker_loses_no_request(nats_server: NatsServer, tmp_path: Path, client: MeshClient) -> None:
    name = unique("slow")
    set_config(build_slow_onnx(tmp_path, name, max_batch_size=4, max_delay_ms=1), ack_wait_s=2.0)
    ids = [unique("victim"), unique("survivor")]
    conn = await Connection.open(Settings.from_url(nats_server.url))
    await provision(conn)
    procs = {w: spawn_worker(nats_server.url, tmp_path, w, tmp_path / f"{w}.log") for w in ids}
    try:
        await wait_workers_ready(await Registry.open(conn), ids, timeout=60)
        await conn.close()
        inputs = [np.full((1, 256), i / 400, dtype=np.float32) for i in range(400)]
        tasks = [asyncio.create_task(client.infer_reply(name, {"input": x}, timeout=60)) for x in inputs]
        while sum(t.done() for t in tasks) < 40:
            await asyncio.sleep(0.005)
        procs[ids[0]].send_signal(signal.SIGKILL)  # mid-stream: it holds pulled, unacked requests
        replies = await asyncio.gather(*tasks)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    expected = _slow_direct(tmp_path / name / "1" / "model.onnx", np.concatenate(inputs))
    for i, reply in enumerate(replies):
        np.testing.assert_allclose(reply.outputs["output"][0], expected[i], rtol=1e-5, atol=1e-6)
    redelivered = [r for r in replies if r.timing.attempt > 1]
    assert redelivered, "the victim held no unacknowledged request when it was killed"
    assert {r.timing.worker for r in redelivered} == {ids[1]}


def _slow_direct(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


async def test_full_queue_rejects_at_once_with_429(own_server: NatsServer, tmp_path: Path) -> None:
    name = unique("ident")
    build_identity_onnx(tmp_path, name, "float32", shape=(4,))
    settings = Settings.from_url(own_server.url, max_queue=5)
    conn = await Connection.open(settings)
    await provision(conn)
    # Registered, but no worker serves it: requests pile up in its queue.
    await (await Registry.open(conn)).put_spec(read_model(tmp_path / name))
    x = np.zeros((1, 4), np.float32)
    async with await MeshClient.connect(own_server.url) as client:
        queued = []
        for i in range(5):  # one at a time, so each is a message of its own (not a bundle)
            queued.append(asyncio.create_task(client.infer(name, {"input": x}, timeout=3)))
            while (await conn.js.stream_info(STREAM_INFER)).state.messages < i + 1:
                await asyncio.sleep(0.01)
        start = time.monotonic()
        with pytest.raises(Overloaded) as err:
            await client.infer(name, {"input": x}, timeout=10)
        assert err.value.status == 429
        assert time.monotonic() - start < 2.0  # rejected, not left hanging until its timeout
        # Concurrent requests leave as one bundle: all of them rejected at once.
        start = time.monotonic()
        bundled = await asyncio.gather(*(client.infer(name, {"input": x}, timeout=10) for _ in range(3)),
                                       return_exceptions=True)  # fmt: skip
        assert all(isinstance(e, Overloaded) and e.status == 429 for e in bundled), bundled
        assert time.monotonic() - start < 2.0
        # Another priority has its own bound, so it is still accepted.
        high = asyncio.create_task(client.infer(name, {"input": x}, priority="high", timeout=3))
        for outcome in await asyncio.gather(*queued, high, return_exceptions=True):
            assert isinstance(outcome, DeadlineExceeded)
    await conn.close()
