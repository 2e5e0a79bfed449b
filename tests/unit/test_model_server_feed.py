"""A model server with requests from a feed of the test's own (workers/feed.py's FeedSource), no NATS
server: batching, replies equal to a direct onnxruntime call, typed errors, acks and pull credit."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from nats.aio.msg import Msg

from broker.settings import Settings
from examples.build_models import build_mlp_onnx
from schemas.envelope import decode_reply, encode_request
from schemas.errors import BadInput
from schemas.spec import ModelSpec
from schemas.subjects import HDR_DEADLINE, HDR_MSG_ID, HDR_REPLY, infer_subject
from workers.delivery import Delivery
from workers.feed import Feed, FeedHandlers
from workers.model_server import ModelServer
from workers.repository import read_model
from workers.runtimes import load_runtime


class _Wire:
    """Stands in for the NATS connection: records what the server publishes."""

    max_payload = 1024 * 1024
    is_closed = is_draining = False

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def publish(self, subject: str, payload: bytes = b"", reply: str = "", headers: Any = None) -> None:
        self.sent.append((subject, payload))

    def new_inbox(self) -> str:
        return "_INBOX.test"


class _NoBuckets:
    async def key_value(self, bucket: str) -> Any:
        raise LookupError(f"no {bucket} here")  # attempts then count by deliveries


class _Feed:
    def __init__(self, priority: str, handlers: FeedHandlers) -> None:
        self.priority, self.handlers = priority, handlers
        self.upstream, self.per_message, self.released_at = 0, 1.0, 0.0
        self.held = 0

    async def release(self, count: int = 1) -> None:
        self.held -= count

    async def stop(self) -> None:
        pass

    async def hand(self, delivery: Delivery) -> None:
        self.held += 1
        await self.handlers.on_delivery(delivery)


class _Feeds:
    def __init__(self) -> None:
        self.opened: dict[str, _Feed] = {}

    async def open(self, spec: ModelSpec, version: str, priority: str, handlers: FeedHandlers) -> Feed:
        self.opened[priority] = feed = _Feed(priority, handlers)
        return feed

    async def remake(self, spec: ModelSpec, version: str, priority: str) -> None:
        pass


def _delivery(wire: _Wire, feed: _Feed, seq: int, payload: bytes) -> Delivery:
    headers = {HDR_MSG_ID: f"r{seq}", HDR_REPLY: f"_INBOX.client.r.r{seq}", HDR_DEADLINE: "99999999999999"}
    ack = f"$JS.ACK.MESH_INFER.mlp-1-normal.1.{seq}.{seq}.1700000000000000000.0"
    msg = Msg(_client=wire, subject=infer_subject("mlp", "1", "normal"), reply=ack, data=payload, headers=headers)  # type: ignore[arg-type]
    return Delivery(wire, msg, "normal", feed)  # type: ignore[arg-type]


@pytest.fixture
def mlp(tmp_path: Path) -> tuple[ModelSpec, Path]:
    build_mlp_onnx(tmp_path, "mlp", d_in=8, hidden=16, d_out=4, max_batch_size=8, max_delay_ms=20)
    return read_model(tmp_path / "mlp"), tmp_path / "mlp" / "1" / "model.onnx"


async def test_a_batch_from_a_test_feed_is_answered_like_onnxruntime(mlp: tuple[ModelSpec, Path]) -> None:
    spec, artifact = mlp
    wire = _Wire()
    conn = SimpleNamespace(nc=wire, js=_NoBuckets(), settings=Settings(), on_reconnect=[])
    feeds = _Feeds()
    server = ModelServer(conn, spec, "1", load_runtime("onnx", artifact, spec), "w-test", feeds=feeds)  # type: ignore[arg-type]
    await server.start()
    feed = feeds.opened["normal"]
    rows = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    try:
        for i in range(5):
            await feed.hand(_delivery(wire, feed, i + 1, encode_request({"input": rows[i : i + 1]})))
        await feed.hand(_delivery(wire, feed, 6, b"\x93not a request"))  # one bad request among them
        for _ in range(200):
            if feed.held == 0 and len([s for s, _ in wire.sent if s.startswith("_INBOX.client")]) == 6:
                break
            await asyncio.sleep(0.01)
    finally:
        await server.drain()
    expected = ort.InferenceSession(str(artifact)).run(None, {"input": rows})[0]
    replies = {s.rsplit(".", 1)[1]: p for s, p in wire.sent if s.startswith("_INBOX.client")}
    for i in range(5):
        reply = decode_reply(replies[f"r{i + 1}"])
        np.testing.assert_allclose(reply.outputs["output"], expected[i : i + 1], rtol=1e-5, atol=1e-6)
        assert reply.timing.batch_size > 1  # batched together
    with pytest.raises(BadInput, match="malformed request payload"):
        decode_reply(replies["r6"])
    acks = [p for s, p in wire.sent if s.startswith("$JS.ACK.")]
    assert len(acks) == 6 and all(p in (b"+ACK", b"+TERM") for p in acks)
    assert feed.held == 0  # every delivery gave its credit back
