"""A client's concurrent requests for one subject travel as bundles: one stream message each,
every request answered on its own, and a bundle that comes back after a crash split up."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import numpy as np
import pytest

from broker import Connection, NatsServer, Registry, Settings, ensure_consumer, provision
from examples.build_models import build_identity_onnx
from schemas.envelope import decode_reply, encode_request, encode_request_bundle
from schemas.errors import BadInput
from schemas.subjects import (
    HDR_BUNDLE,
    HDR_DEADLINE,
    HDR_MSG_ID,
    HDR_REPLY,
    HDR_REPLY_INBOX,
    STREAM_INFER,
    consumer_name,
    infer_subject,
)
from servemesh import MeshClient
from tests.conftest import serving, set_config, unique
from workers.repository import read_model


async def _stored(conn: Connection) -> int:
    return (await conn.js.stream_info(STREAM_INFER)).state.last_seq


@pytest.mark.parametrize("coalesce", [True, False])
async def test_concurrent_requests_travel_as_bundles_and_each_gets_its_own_answer(
    nats_server: NatsServer, tmp_path: Path, coalesce: bool
) -> None:
    name = unique("ident")
    build_identity_onnx(tmp_path, name, "float32", max_batch_size=32, shape=(4,))
    settings = Settings.from_url(nats_server.url, coalesce=coalesce)
    xs = [np.full((1 + i % 2, 4), i, np.float32) for i in range(100)]
    async with (
        serving(nats_server.url, tmp_path, [name]) as worker,
        await MeshClient.connect(settings=settings) as client,
    ):
        await client.infer(name, {"input": xs[0]})  # the route is read once, before the count starts
        before = await _stored(worker.conn)
        # One bad request among them: refused alone, its bundle-mates answered.
        bad = client.infer(name, {"input": np.ones((1, 4), np.int64)})
        replies = await asyncio.gather(*(client.infer(name, {"input": x}) for x in xs), bad, return_exceptions=True)
        stored = await _stored(worker.conn) - before
        # What the router reads to turn lag in messages into requests.
        per_message = worker.status()["models"][f"{name}:1"]["per_message"]["normal"]
    for x, reply in zip(xs, replies, strict=False):
        assert isinstance(reply, dict), reply
        np.testing.assert_array_equal(reply["output"], x)
    assert isinstance(replies[-1], BadInput) and replies[-1].status == 400
    if coalesce:  # bundles of at most max_batch_size requests, so at least 4 messages
        assert 4 <= stored < 20 and per_message > 2
    else:
        assert stored == 101 and per_message == 1.0


async def test_a_bundle_held_by_a_worker_that_died_comes_back_as_lone_requests(
    nats_server: NatsServer, tmp_path: Path, client: MeshClient
) -> None:
    name = unique("ident")
    set_config(build_identity_onnx(tmp_path, name, "float32", shape=(4,)), max_attempts=3)
    conn = await Connection.open(Settings.from_url(nats_server.url))
    await provision(conn)
    await (await Registry.open(conn)).put_spec(read_model(tmp_path / name))
    durable = await ensure_consumer(conn.js, name, "1", "normal", ack_wait_s=30, max_attempts=3)
    nc = await nats.connect(nats_server.url)
    try:
        xs = [np.full((1, 4), i, np.float32) for i in range(8)]
        before = await _stored(conn)
        calls = [asyncio.create_task(client.infer_reply(name, {"input": x}, timeout=30)) for x in xs]
        # Taken by a worker that died before computing them (simulated by naks from a raw pull).
        pull = await nc.jetstream().pull_subscribe_bind(durable, STREAM_INFER)
        bundles, held = [], []
        try:
            while sum(bundles) + len(held) - len(bundles) < len(xs):
                (msg,) = await pull.fetch(1, timeout=10)
                held.append(msg)
                size = int((msg.headers or {}).get(HDR_BUNDLE, "1"))
                if size > 1:
                    bundles.append(size)
            for msg in held:
                await msg.nak()
        finally:
            await pull.unsubscribe()
        assert bundles, "no request was bundled with another"
        async with serving(nats_server.url, tmp_path, [name]):
            replies = await asyncio.gather(*calls)
        for x, reply in zip(xs, replies, strict=True):
            np.testing.assert_array_equal(reply.outputs["output"], x)
            # Queued again one by one, each as a redelivered request: computed alone, charged an attempt.
            assert reply.timing.attempt == 2 and reply.timing.batch_size == 1
        info = await conn.js.consumer_info(STREAM_INFER, consumer_name(name, "1", "normal"))
        assert info.num_pending == 0 and info.num_ack_pending == 0
        # Each bundle once, then each of its requests again, alone.
        assert (await _stored(conn)) - before == len(xs) - sum(bundles) + len(bundles) + sum(bundles)
    finally:
        await nc.close()
        await conn.close()


@pytest.mark.parametrize("payload", [b"\xc1 not msgpack", encode_request_bundle([])])
async def test_an_unreadable_bundle_is_dropped_and_the_worker_serves_on(
    nats_server: NatsServer, tmp_path: Path, client: MeshClient, payload: bytes
) -> None:
    name = unique("ident")
    build_identity_onnx(tmp_path, name, "float32", shape=(4,))
    x = np.ones((1, 4), np.float32)
    async with serving(nats_server.url, tmp_path, [name]) as worker:
        ack = await worker.conn.js.publish(infer_subject(name, "1", "normal"), payload, headers={HDR_BUNDLE: "2"})
        np.testing.assert_array_equal((await client.infer(name, {"input": x}))["output"], x)
        info = await worker.conn.js.consumer_info(STREAM_INFER, consumer_name(name, "1", "normal"))
        assert info.delivered.stream_seq >= ack.seq and info.num_ack_pending == 0  # taken, and settled for good
        assert not (
            await worker.conn.js.stream_info(STREAM_INFER, subjects_filter=infer_subject(name, "1", "normal"))
        ).state.messages


async def test_large_requests_are_bundled_within_the_servers_max_payload(
    nats_server: NatsServer, tmp_path: Path, client: MeshClient
) -> None:
    name = unique("ident")
    width = 16_384  # 64 KiB a request: all twenty together would be more than the server's 1 MiB max payload
    build_identity_onnx(tmp_path, name, "float32", max_batch_size=32, shape=(width,))
    xs = [np.full((1, width), i, np.float32) for i in range(20)]
    async with serving(nats_server.url, tmp_path, [name]) as worker:
        await client.infer(name, {"input": xs[0]})  # the route is read once, before the count starts
        before = await _stored(worker.conn)
        replies = await asyncio.gather(*(client.infer(name, {"input": x}) for x in xs))
        stored = await _stored(worker.conn) - before
    for x, reply in zip(xs, replies, strict=True):
        np.testing.assert_array_equal(reply["output"], x)
    assert 3 <= stored < len(xs)  # bundles of at most half the max payload (7 of these), not one of 20


@pytest.mark.parametrize("header", [HDR_REPLY, HDR_REPLY_INBOX])
async def test_a_subject_nats_refuses_inside_a_bundle_costs_only_its_own_reply(
    nats_server: NatsServer, tmp_path: Path, client: MeshClient, header: str
) -> None:
    """Header values inside a bundle are not NATS headers: they may hold what a NATS header cannot, such
    as a line break. A reply subject ending in one is no subject: its request's bundle-mate is answered
    all the same, and the worker serves on."""
    name = unique("ident")
    build_identity_onnx(tmp_path, name, "float32", shape=(4,))
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    async with serving(nats_server.url, tmp_path, [name]) as worker:
        nc = await nats.connect(nats_server.url)
        inbox = nc.new_inbox()
        replies = await nc.subscribe(f"{inbox}.>")
        good = {HDR_MSG_ID: unique("good"), HDR_REPLY: f"{inbox}.good", HDR_DEADLINE: "9999999999999"}
        bad = {**good, HDR_MSG_ID: unique("bad"), HDR_REPLY: f"{inbox}.bad"}
        bad[header] = f"{inbox}.bad\n"
        bundle = encode_request_bundle([(bad, encode_request({"input": x})), (good, encode_request({"input": x}))])
        await worker.conn.js.publish(infer_subject(name, "1", "normal"), bundle, headers={HDR_BUNDLE: "2"})
        # A reply inbox nobody can publish to leaves its request answered alone, on its own Mesh-Reply.
        expected = {f"{inbox}.good"} if header == HDR_REPLY else {f"{inbox}.good", f"{inbox}.bad"}
        got = set()
        for _ in expected:
            msg = await replies.next_msg(timeout=10)
            np.testing.assert_array_equal(decode_reply(msg.data).outputs["output"], x)
            got.add(msg.subject)
        assert got == expected
        np.testing.assert_array_equal((await client.infer(name, {"input": x}))["output"], x)
        assert worker.conn.nc.is_connected
        await nc.close()
