"""One bad message never stops a model: requests whose headers cannot be used, published as a
client, a tenant or an attacker might, are each answered with a typed error and settled, and the
same worker goes on answering ordinary requests correctly, however many came before."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from nats.aio.msg import Msg

from broker import Connection, NatsServer, Settings
from examples.build_models import build_identity_onnx
from schemas.envelope import decode_reply, encode_request, encode_request_bundle
from schemas.errors import BadInput, Forbidden, MeshError
from schemas.subjects import (
    HDR_BUNDLE,
    HDR_DEADLINE,
    HDR_JOB,
    HDR_JOB_ITEM,
    HDR_MSG_ID,
    HDR_REPLY,
    infer_subject,
    job_subject,
)
from servemesh import MeshClient
from tests.conftest import serving, unique, wait_for
from tests.hostile import RawPublisher, header_block
from workers.worker import Worker

# More than one pull window of the model below (2 batches of 8): one window of messages that leak
# their credit is what used to stop a worker pulling for good.
HOSTILE = 40
BATCH = 8


class Replies:
    """A raw connection publishing hand-made requests and collecting their replies by token."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.inbox = conn.nc.new_inbox()
        self._ids = itertools.count()
        self.got: dict[str, bytes] = {}

    async def start(self) -> Replies:
        await self.conn.nc.subscribe(f"{self.inbox}.>", cb=self._on_reply)
        return self

    async def _on_reply(self, msg: Msg) -> None:
        self.got[msg.subject.rsplit(".", 1)[-1]] = msg.data

    def headers(self, **extra: str) -> tuple[dict[str, str], str]:
        token = f"t{next(self._ids)}"
        headers = {HDR_MSG_ID: unique("h"), HDR_REPLY: f"{self.inbox}.r.{token}",
                   HDR_DEADLINE: str(int((time.time() + 30) * 1000)), **extra}  # fmt: skip
        return headers, token

    async def wait(self, tokens: list[str], timeout: float = 20.0) -> list[bytes]:
        async def arrived() -> bool:
            return all(t in self.got for t in tokens)

        await wait_for(arrived, timeout, what=f"{len(tokens)} replies")
        return [self.got[t] for t in tokens]


def error_of(reply: bytes) -> MeshError:
    with pytest.raises(MeshError) as got:
        decode_reply(reply)
    return got.value


def row(value: float) -> dict[str, np.ndarray[Any, Any]]:
    return {"input": np.full((1, 4), value, np.float32)}


@pytest.fixture
def ident(tmp_path: Path) -> tuple[Path, str]:
    name = unique("hostile")
    build_identity_onnx(tmp_path, name, "float32", shape=(4,), max_batch_size=BATCH, max_delay_ms=1)
    return tmp_path, name


@pytest.fixture
async def served(nats_server: NatsServer, ident: tuple[Path, str]) -> AsyncIterator[tuple[str, Worker]]:
    repo, name = ident
    async with serving(nats_server.url, repo, [name]) as worker:
        yield name, worker


@pytest.fixture
async def raw(nats_server: NatsServer) -> AsyncIterator[Replies]:
    conn = await Connection.open(Settings.from_url(nats_server.url))
    try:
        yield await Replies(conn).start()
    finally:
        await conn.close()


async def still_serves(client: MeshClient, model: str, worker: Worker) -> None:
    """Ordinary requests are answered with their own values; the feed holds no credit at rest."""
    outputs = await asyncio.gather(*(client.infer(model, row(i), timeout=10) for i in range(3 * BATCH)))
    for i, out in enumerate(outputs):
        np.testing.assert_array_equal(out["output"], row(i)["input"])

    async def nothing_held() -> bool:
        return all(feed.held == 0 for server in worker.servers.values() for feed in server._feeds.values())

    await wait_for(nothing_held, 10, what="the feeds to hold no credit")


@pytest.mark.parametrize("key", ["a b", "*", ">"])
@pytest.mark.parametrize("bundled", [False, True], ids=["lone", "bundle-member"])
async def test_a_job_header_that_is_no_kv_key_is_refused_and_the_model_goes_on(
    served: tuple[str, Worker], raw: Replies, client: MeshClient, key: str, bundled: bool
) -> None:
    model, worker = served
    subject = infer_subject(model, "1", "normal")
    tokens_by_kind: dict[str, list[str]] = {"request": [], "job": []}
    for kind, target in (("request", subject), ("job", job_subject(subject))):
        for i in range(HOSTILE):
            headers, token = raw.headers(**{HDR_JOB: key, HDR_JOB_ITEM: str(i)})
            tokens_by_kind[kind].append(token)
            if bundled:  # the hostile request rides in a bundle beside a good one
                good, _ = raw.headers()
                payload = encode_request_bundle([(good, encode_request(row(i))), (headers, encode_request(row(i)))])
                await raw.conn.js.publish(target, payload, headers={HDR_BUNDLE: "2", HDR_MSG_ID: unique("b")})
            else:
                await raw.conn.js.publish(target, encode_request(row(i)), headers=headers)
    # On a client's own subject only the mesh may send job headers (403); on the job subject the
    # id must be one a job can have (400).
    for reply in await raw.wait(tokens_by_kind["request"]):
        assert isinstance(error_of(reply), Forbidden)
    for reply in await raw.wait(tokens_by_kind["job"]):
        err = error_of(reply)
        assert isinstance(err, BadInput) and err.status == 400 and HDR_JOB in err.message
    await still_serves(client, model, worker)


@pytest.mark.parametrize(
    "extra",
    [{"Status": "100"}, {"Status": "408", "Nats-Pending-Messages": "zz"}, {"Status": "503"}],
    ids=["heartbeat", "timeout-with-garbage-count", "no-responders"],
)
async def test_a_status_header_does_not_pass_a_request_off_as_a_server_message(
    served: tuple[str, Worker], raw: Replies, client: MeshClient, extra: dict[str, str]
) -> None:
    model, worker = served
    tokens = []
    for i in range(HOSTILE):
        headers, token = raw.headers(**extra)
        tokens.append(token)
        await raw.conn.js.publish(infer_subject(model, "1", "normal"), encode_request(row(i)), headers=headers)
    for i, reply in enumerate(await raw.wait(tokens)):  # an ordinary request, computed like any other
        np.testing.assert_array_equal(decode_reply(reply).outputs["output"], row(i)["input"])
    await still_serves(client, model, worker)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (HDR_DEADLINE, "soon"), (HDR_DEADLINE, "²"), (HDR_DEADLINE, "9" * 400), (HDR_MSG_ID, "a\x01b"),
        (HDR_MSG_ID, "x" * 300), ("Mesh-Route", "$KV.mesh-workers.w1"), ("Mesh-Route", "mesh.infer.a.1.urgent"),
        ("Mesh-Route", ",".join(["mesh.infer.a.1.low"] * 17)), ("Mesh-Claim-Bucket", "mesh-models"),
        ("Mesh-Delivered", "7"),
    ],
)  # fmt: skip
async def test_each_header_the_mesh_reads_is_checked(
    served: tuple[str, Worker], raw: Replies, client: MeshClient, name: str, value: str
) -> None:
    model, worker = served
    headers, token = raw.headers(**{name: value})
    await raw.conn.js.publish(infer_subject(model, "1", "normal"), encode_request(row(1)), headers=headers)
    (reply,) = await raw.wait([token])
    err = error_of(reply)
    assert err.status in (400, 403) and name in err.message, err
    await still_serves(client, model, worker)


@pytest.mark.parametrize(
    "reply_to",
    ["$KV.mesh-workers.w1", "$JS.API.STREAM.DELETE.MESH_INFER", "mesh.infer.victim.1.normal", "_INBOX.abc.a.1"],
)
async def test_a_reply_is_never_aimed_at_the_mesh_or_the_server(
    nats_server: NatsServer, served: tuple[str, Worker], raw: Replies, client: MeshClient, reply_to: str
) -> None:
    """A reply goes out with the worker's rights: aimed at the mesh's or the server's subjects (a
    heartbeat, an API call, another model's queue, a client's publish acknowledgements), it would
    act for the requester. Such requests are computed for nobody and settled."""
    model, worker = served
    seen: list[Msg] = []

    async def heard(msg: Msg) -> None:
        seen.append(msg)

    sub = await raw.conn.nc.subscribe(reply_to, cb=heard)
    headers, _ = raw.headers()
    headers[HDR_REPLY] = reply_to
    await raw.conn.js.publish(infer_subject(model, "1", "normal"), encode_request(row(1)), headers=headers)
    await still_serves(client, model, worker)
    await sub.unsubscribe()
    assert not seen


async def test_a_bundle_larger_than_a_batch_is_refused_not_unbundled(
    served: tuple[str, Worker], raw: Replies, client: MeshClient
) -> None:
    model, worker = served
    members, tokens = [], []
    for i in range(3 * BATCH):
        headers, token = raw.headers()
        members.append((headers, encode_request(row(i))))
        tokens.append(token)
    payload = encode_request_bundle(members)
    rows_before = worker.servers[(model, "1")].stats.rows
    await raw.conn.js.publish(infer_subject(model, "1", "normal"), payload,
                              headers={HDR_BUNDLE: str(len(members)), HDR_MSG_ID: unique("big")})  # fmt: skip
    for reply in await raw.wait(tokens):
        err = error_of(reply)
        assert isinstance(err, BadInput) and f"at most {BATCH}" in err.message
    assert worker.servers[(model, "1")].stats.rows == rows_before  # none of them computed
    await still_serves(client, model, worker)


async def test_poison_queued_while_no_worker_runs_does_not_stop_the_next_one(
    nats_server: NatsServer, ident: tuple[Path, str], raw: Replies, client: MeshClient
) -> None:
    """What wedged a worker came back, redelivered, to the next one: queued before it starts, every
    hostile message is answered and the new worker serves."""
    repo, model = ident
    async with serving(nats_server.url, repo, [model]):
        pass  # registers the model and creates its consumers; nothing is served from here on
    subject = infer_subject(model, "1", "normal")
    publisher = RawPublisher("127.0.0.1", nats_server.port)
    tokens = []
    try:
        for i in range(HOSTILE):
            headers, token = raw.headers(**{HDR_JOB: "a b", HDR_JOB_ITEM: "1"})
            tokens.append(token)
            block = header_block(headers) if i % 2 else header_block({**headers, "Status": "100"})
            await publisher.publish(subject, block, encode_request(row(i)))
        await publisher.flush()
    finally:
        await publisher.close()
    async with serving(nats_server.url, repo, [model]) as worker:
        for reply in await raw.wait(tokens):
            assert isinstance(error_of(reply), Forbidden)
        await still_serves(client, model, worker)
