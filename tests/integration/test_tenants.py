"""Tenant isolation, row by row as docs/security.md tabulates it: tenant_a tries each thing against
tenant_b on a server run from deploy/nats/secure.conf, and each is refused — by the server (its
permissions violation, and nothing changed), or by the worker (a typed 403 reply, nothing
computed or written for tenant_b)."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import nats.errors
import pytest
from nats.aio.msg import Msg

from broker import Connection, Registry
from schemas.envelope import Claim, decode_reply, encode_claim, encode_request
from schemas.errors import Forbidden, MeshError
from schemas.spec import ModelSpec
from schemas.subjects import (
    BUCKET_CLAIMS,
    BUCKET_JOBS,
    BUCKET_MODELS,
    HDR_CLAIM_BUCKET,
    HDR_DEADLINE,
    HDR_JOB,
    HDR_JOB_ITEM,
    HDR_MSG_ID,
    HDR_REPLY,
    HDR_ROUTE,
    STREAM_INFER,
    consumer_name,
    job_subject,
    requeue_subject,
)
from servemesh import MeshClient
from tests.conftest import unique, wait_for
from tests.integration.secure_mesh import Mesh, connected, ones, queued, register, serving, subject_of, violation

pytestmark = pytest.mark.usefixtures("capture_violations")


@dataclass
class Scene:
    secure: Mesh
    admin: Connection
    attacker: Connection  # tenant_a's connection
    own: ModelSpec  # tenant_a's model
    victim: ModelSpec  # tenant_b's model
    caplog: pytest.LogCaptureFixture


Row = Callable[[Scene], Awaitable[None]]


async def _refused(scene: Scene, subject: str, payload: bytes = b"{}") -> None:
    """A JetStream API call or a stream publish the server drops: no answer, and a violation."""
    with pytest.raises(nats.errors.TimeoutError):
        await scene.attacker.nc.request(subject, payload, timeout=1.0)
    await violation(scene.caplog, "publish", subject)


async def publish_to_their_model(scene: Scene) -> None:
    async with await MeshClient.connect(settings=scene.secure.settings("tenant_a")) as client:
        with pytest.raises(Forbidden) as denied:
            await client.infer(scene.victim.name, ones(), timeout=10)
    assert denied.value.status == 403
    assert await queued(scene.admin, subject_of(scene.victim)) == 0


async def publish_job_items(scene: Scene) -> None:
    """Job and requeue subjects (whose headers workers trust) are the mesh's own, for both tenants' models."""
    for subject in (job_subject(subject_of(scene.victim)), job_subject(subject_of(scene.own)),
                    requeue_subject(subject_of(scene.own))):  # fmt: skip
        await _refused(scene, subject, encode_request(ones()))
        assert await queued(scene.admin, subject) == 0


async def subscribe_to_their_inbox(scene: Scene) -> None:
    for pattern in ("_INBOX.tenant_b.>", "_INBOX.>"):
        await scene.attacker.nc.subscribe(pattern)
        await violation(scene.caplog, "subscription", pattern)


async def subscribe_to_their_requests(scene: Scene) -> None:
    for pattern in (subject_of(scene.victim), "mesh.infer.>", ">"):
        await scene.attacker.nc.subscribe(pattern)
        await violation(scene.caplog, "subscription", pattern)


async def write_the_registry(scene: Scene) -> None:
    await _refused(scene, f"$KV.{BUCKET_MODELS}.{scene.victim.name}", b'{"name": "hijacked"}')
    spec = await (await Registry.open(scene.admin)).get_spec(scene.victim.name)
    assert spec is not None and spec.tenant == "tenant_b"


async def read_jobs_and_assignments(scene: Scene) -> None:
    for subject in (f"$JS.API.DIRECT.GET.KV_{BUCKET_JOBS}.$KV.{BUCKET_JOBS}.any",
                    "$JS.API.STREAM.MSG.GET.KV_mesh-assignments"):  # fmt: skip
        await _refused(scene, subject)


async def create_a_stream_capturing_their_inbox(scene: Scene) -> None:
    """Its own claims bucket's stream, made with extra subjects: it would store tenant_b's replies."""
    name = f"OBJ_{BUCKET_CLAIMS}-tenant_a"
    config = {"name": name, "subjects": [f"$O.{BUCKET_CLAIMS}-tenant_a.>", "_INBOX.tenant_b.>", "_INBOX.worker.>"]}
    await _refused(scene, f"$JS.API.STREAM.CREATE.{name}", json.dumps(config).encode())
    await _refused(scene, f"$JS.API.STREAM.UPDATE.{name}", json.dumps(config).encode())
    info = await scene.admin.js.stream_info(name)
    assert all(s.startswith(f"$O.{BUCKET_CLAIMS}-tenant_a.") for s in info.config.subjects or []), info.config


async def read_the_queue(scene: Scene) -> None:
    consumer = consumer_name(scene.victim.name, next(iter(scene.victim.versions)), "normal")
    for api in (f"CONSUMER.DURABLE.CREATE.{STREAM_INFER}.spy", f"CONSUMER.CREATE.{STREAM_INFER}.spy",
                f"STREAM.MSG.GET.{STREAM_INFER}", f"DIRECT.GET.{STREAM_INFER}",
                f"CONSUMER.MSG.NEXT.{STREAM_INFER}.{consumer}"):  # fmt: skip
        await _refused(scene, f"$JS.API.{api}")


async def read_their_large_tensors(scene: Scene) -> None:
    bucket = f"OBJ_{BUCKET_CLAIMS}-tenant_b"
    for api in (f"STREAM.INFO.{bucket}", f"CONSUMER.CREATE.{bucket}", f"STREAM.MSG.GET.{bucket}"):
        await _refused(scene, f"$JS.API.{api}")


async def _ask_own_model(scene: Scene, **headers: str) -> MeshError:
    """A request to tenant_a's own model with extra ``headers``: the worker's typed refusal."""
    inbox = scene.attacker.nc.new_inbox()
    sub = await scene.attacker.nc.subscribe(f"{inbox}.>")
    base = {HDR_MSG_ID: unique("t"), HDR_REPLY: f"{inbox}.r.1", HDR_DEADLINE: str(int((time.time() + 20) * 1000))}
    ack = await scene.attacker.nc.request(subject_of(scene.own), encode_request(ones()), timeout=5,
                                          headers={**base, **headers})  # fmt: skip
    assert b'"error"' not in ack.data
    reply: Msg = await sub.next_msg(timeout=15)
    with pytest.raises(MeshError) as refused:
        decode_reply(reply.data)
    return refused.value


async def route_through_their_model(scene: Scene) -> None:
    err = await _ask_own_model(scene, **{HDR_ROUTE: subject_of(scene.victim)})
    assert isinstance(err, Forbidden) and err.data["stage"] == subject_of(scene.victim)
    assert "tenant_b" not in json.dumps(err.to_wire())
    assert await queued(scene.admin, subject_of(scene.victim)) == 0


async def claim_from_their_bucket(scene: Scene) -> None:
    """A claim reference that names tenant_b's bucket (the worker could read it with its rights)."""
    inbox = scene.attacker.nc.new_inbox()
    sub = await scene.attacker.nc.subscribe(f"{inbox}.>")
    claim = encode_claim(Claim(f"{BUCKET_CLAIMS}-tenant_b", "anything", 16))
    headers = {HDR_MSG_ID: unique("c"), HDR_REPLY: f"{inbox}.r.1"}
    await scene.attacker.nc.request(subject_of(scene.own), claim, timeout=5, headers=headers)
    with pytest.raises(Forbidden):
        decode_reply((await sub.next_msg(timeout=15)).data)


async def reply_into_their_bucket(scene: Scene) -> None:
    """A large reply would be stored where Mesh-Claim-Bucket says: tenant_b's bucket is refused."""
    err = await _ask_own_model(scene, **{HDR_CLAIM_BUCKET: f"{BUCKET_CLAIMS}-tenant_b"})
    assert isinstance(err, Forbidden)


async def write_into_a_job(scene: Scene) -> None:
    """Job headers on a tenant's own request subject would make the worker store results under a job."""
    err = await _ask_own_model(scene, **{HDR_JOB: "someone-elses-job", HDR_JOB_ITEM: "0"})
    assert isinstance(err, Forbidden)
    info = await scene.admin.js.stream_info("MESH_JOBS", subjects_filter="mesh.jobs.someone-elses-job.>")
    assert not info.state.subjects


ROWS: dict[str, Row] = {
    "publish a request to their model": publish_to_their_model,
    "publish job items or requeued requests": publish_job_items,
    "subscribe to their replies and acks": subscribe_to_their_inbox,
    "subscribe to their requests": subscribe_to_their_requests,
    "write the registry": write_the_registry,
    "read jobs and assignments": read_jobs_and_assignments,
    "create a stream that captures their inbox": create_a_stream_capturing_their_inbox,
    "read their queued requests": read_the_queue,
    "read their large tensors": read_their_large_tensors,
    "route a pipeline through their model": route_through_their_model,
    "claim a payload from their bucket": claim_from_their_bucket,
    "have a large reply stored in their bucket": reply_into_their_bucket,
    "write results into a job": write_into_a_job,
}


@pytest.mark.parametrize("row", list(ROWS), ids=list(ROWS))
async def test_tenant_a_against_tenant_b(
    secure: Mesh, admin: Connection, tmp_path: Path, caplog: pytest.LogCaptureFixture, row: str
) -> None:
    own, victim = await register(admin, tmp_path, "echo_a"), await register(admin, tmp_path, "echo_b")
    async with (
        serving(secure.settings("worker"), [own, victim]) as worker,
        connected(secure.settings("tenant_a")) as attacker,
    ):
        await ROWS[row](Scene(secure, admin, attacker, own, victim, caplog))
        victim_rows = worker.servers[(victim.name, next(iter(victim.versions)))].stats.rows
    assert victim_rows == 0  # tenant_b's model computed nothing for tenant_a

    async def nothing_queued() -> bool:
        return await queued(admin, subject_of(own)) == 0

    await wait_for(nothing_queued, 10, what="tenant_a's requests settled")


async def test_the_table_in_docs_lists_every_row() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    missing = [row for row in ROWS if f"| {row} |" not in doc]
    assert not missing, f"docs/security.md lacks rows for {missing}"

