"""Bad requests get the right typed error, and never take their batch-mates down with them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgpack
import nats
import numpy as np
import pytest

from broker import NatsServer
from examples.build_models import build_identity_onnx
from schemas.envelope import decode_reply
from schemas.errors import BadInput, MeshError, UnknownModel
from schemas.subjects import HDR_DEADLINE, HDR_MSG_ID, HDR_REPLY, infer_subject
from servemesh import MeshClient
from tests.conftest import serving, unique


@pytest.fixture
def ident(tmp_path: Path) -> tuple[Path, str]:
    name = unique("ident")
    build_identity_onnx(tmp_path, name, "float32", max_batch_size=16, max_delay_ms=20, shape=(4,))
    return tmp_path, name


async def test_unknown_model_and_version_are_404(
    client: MeshClient, nats_server: NatsServer, ident: tuple[Path, str]
) -> None:
    repo, name = ident
    x = np.zeros((1, 4), np.float32)
    async with serving(nats_server.url, repo, [name]):
        with pytest.raises(UnknownModel) as err:
            await client.infer(unique("nosuchmodel"), {"input": x})
        assert err.value.status == 404
        with pytest.raises(UnknownModel) as err:
            await client.infer(name, {"input": x}, version="99")
        assert err.value.status == 404


@pytest.mark.parametrize(
    ("inputs", "fragment"),
    [
        ({"inpt": np.zeros((1, 4), np.float32)}, "unknown input"),
        ({"input": np.zeros((1, 4), np.float64)}, "must be float32"),
        ({"input": np.zeros((1, 4), np.int32)}, "must be float32"),
        ({"input": np.zeros((4,), np.float32)}, "shape"),
        ({"input": np.zeros((1, 5), np.float32)}, "shape"),
        ({"input": np.zeros((1, 2, 2), np.float32)}, "shape"),
        ({"input": np.zeros((17, 4), np.float32)}, "max_batch_size"),
        ({"input": np.array([["a"] * 4], dtype=object)}, "must be float32"),
    ],
)
async def test_bad_inputs_are_400_and_batch_mates_still_succeed(
    client: MeshClient, nats_server: NatsServer, ident: tuple[Path, str], inputs: dict, fragment: str
) -> None:
    repo, name = ident
    good = [np.full((1, 4), i, np.float32) for i in range(6)]
    async with serving(nats_server.url, repo, [name]) as worker:
        # Sent together, inside one max_delay window, so the bad one lands among good batch-mates.
        results = await asyncio.gather(
            *(client.infer(name, {"input": g}) for g in good[:3]),
            client.infer(name, inputs),
            *(client.infer(name, {"input": g}) for g in good[3:]),
            return_exceptions=True,
        )
        max_batch = worker.servers[(name, "1")].stats.max_batch
    bad = results[3]
    assert isinstance(bad, BadInput), bad
    assert bad.status == 400 and fragment in bad.message
    oks = results[:3] + results[4:]
    for g, out in zip(good, oks, strict=True):
        np.testing.assert_array_equal(out["output"], g)
    assert max_batch > 1


async def test_bad_priority_is_rejected_by_the_client(
    client: MeshClient, nats_server: NatsServer, ident: tuple[Path, str]
) -> None:
    repo, name = ident
    async with serving(nats_server.url, repo, [name]):
        with pytest.raises(BadInput):
            await client.infer(name, {"input": np.zeros((1, 4), np.float32)}, priority="urgent")


async def test_a_job_with_an_invalid_model_name_or_job_id_is_400(
    client: MeshClient, nats_server: NatsServer, ident: tuple[Path, str]
) -> None:
    repo, name = ident
    items = [{"input": np.zeros((1, 4), np.float32)}]
    with pytest.raises(BadInput, match="invalid model name"):
        await client.submit_job("no such.model", items)
    async with serving(nats_server.url, repo, [name]):
        with pytest.raises(BadInput, match="job id"):
            await client.submit_job(name, items, job_id="a.b")


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1 not msgpack",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"inputs": {"input": {"dt": "float32", "sh": [1, 4], "b": b"short"}}}),
        msgpack.packb({"inputs": {"input": {"dt": "float99", "sh": [1, 4], "b": b"\0" * 16}}}),
        msgpack.packb({"inputs": {"input": {"dt": "float32", "sh": [-1, 4], "b": b""}}}),
        msgpack.packb({"inputs": {"input": [1.0, 2.0]}}),
    ],
)
async def test_malformed_payload_gets_400_and_worker_keeps_serving(
    client: MeshClient, nats_server: NatsServer, ident: tuple[Path, str], payload: bytes
) -> None:
    repo, name = ident
    nc = await nats.connect(nats_server.url)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        async with serving(nats_server.url, repo, [name]):
            await nc.jetstream().publish(
                infer_subject(name, "1", "normal"),
                payload,
                headers={HDR_MSG_ID: unique("raw"), HDR_REPLY: inbox, HDR_DEADLINE: "9999999999999"},
            )
            reply = await sub.next_msg(timeout=10)
            with pytest.raises(MeshError) as err:
                decode_reply(reply.data)
            assert isinstance(err.value, BadInput) and err.value.status == 400
            x = np.arange(4, dtype=np.float32).reshape(1, 4)
            np.testing.assert_array_equal((await client.infer(name, {"input": x}))["output"], x)
    finally:
        await nc.close()
