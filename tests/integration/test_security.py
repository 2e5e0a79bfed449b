"""Security: nats-server run from the configs in deploy/nats enforces who may do what on the mesh.

Servers start from copies of the shipped configs (secrets made for the run, random client
ports). Each denial is checked as a user meets it: a typed error or the server's permissions
violation on the connection, and mesh state that did not change.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats.aio.msg
import nats.errors
import numpy as np
import pytest
from nats.js.errors import KeyNotFoundError
from pydantic import SecretStr

from broker import Connection, Registry, Settings, ensure_consumer, provision
from router.shadow import shadow_events
from schemas.envelope import encode_request
from schemas.errors import DeadlineExceeded, Forbidden, MeshUnavailable
from schemas.subjects import (
    BUCKET_ASSIGNMENTS,
    BUCKET_CLAIMS,
    BUCKET_JOBS,
    BUCKET_LEADER,
    BUCKET_MODELS,
    BUCKET_PIPELINES,
    BUCKET_ROUTES,
    BUCKET_STATUS,
    BUCKET_WORKERS,
    HDR_BUNDLE,
    HDR_MSG_ID,
    HDR_REPLY,
    STREAM_INFER,
    STREAM_JOBS,
    consumer_name,
    job_subject,
    requeue_subject,
)
from servemesh import MeshClient
from tests.conftest import unique, wait_for
from tests.integration.secure_mesh import (
    BUCKETS,
    ConfigServer,
    Mesh,
    connected,
    deploy_copy,
    free_ports,
    ones,
    queued,
    register,
    serving,
    subject_of,
    violation,
)

pytestmark = pytest.mark.usefixtures("capture_violations")

# -- the permission model -----------------------------------------------------------------------


async def test_admin_provisions_and_a_tenant_gets_replies_from_a_worker(
    secure: Mesh, admin: Connection, tmp_path: Path
) -> None:
    for stream in (STREAM_INFER, STREAM_JOBS):
        assert (await admin.js.stream_info(stream)).config.name == stream
    for bucket in BUCKETS:  # each raises unless provisioned
        await (admin.js.object_store(bucket) if bucket == BUCKET_CLAIMS else admin.js.key_value(bucket))
    spec = await register(admin, tmp_path, "echo_a")
    async with serving(secure.settings("worker"), [spec]) as worker:
        # The worker wrote its own heartbeat.
        heartbeats = await (await Registry.open(admin)).heartbeats()
        assert worker.id in heartbeats
        async with await MeshClient.connect(settings=secure.settings("tenant_a")) as client:
            reply = await client.infer_reply("echo_a", ones(), timeout=10)
    np.testing.assert_array_equal(reply.outputs["output"], ones()["input"])
    assert reply.timing.worker == worker.id
    # The worker pulled and acked it: the work queue no longer holds it.
    await wait_for(lambda: _is(queued(admin, subject_of(spec)), 0), what="the request acked")


async def test_a_tenant_shadows_its_model_and_the_router_hears_how_it_compared(
    secure: Mesh, admin: Connection, tmp_path: Path
) -> None:
    await register(admin, tmp_path, "echo_a")
    spec = await register(admin, tmp_path, "echo_a")  # a second version, the candidate
    primary, candidate = sorted(spec.versions, key=lambda v: v != spec.resolve_version(None))
    registry = await Registry.open(admin)
    await registry.put_route("echo_a", {"weights": {primary: 1}, "shadow": {"version": candidate, "percent": 100}})
    reports = []

    async def hear() -> None:
        async for event in shadow_events(admin):
            reports.append(event)

    hearing = asyncio.create_task(hear())
    try:
        tenant = secure.settings("tenant_a")
        async with serving(secure.settings("worker"), [spec]), await MeshClient.connect(settings=tenant) as client:
            for _ in range(5):
                reply = await client.infer("echo_a", ones(), timeout=10)
                np.testing.assert_array_equal(reply["output"], ones()["input"])
            await wait_for(lambda: _is(_count(reports), 5), what="five shadow reports")
    finally:
        hearing.cancel()
        await registry.delete_route("echo_a")  # later tests register echo_a versions of their own
    assert {(e.version, e.shadow_version, e.outcome) for e in reports} == {(primary, candidate, "agree")}


async def _count(items: list[Any]) -> int:
    return len(items)


async def test_large_tensors_travel_by_claim_check_between_a_tenant_and_a_worker(
    secure: Mesh, admin: Connection, tmp_path: Path
) -> None:
    spec = await register(admin, tmp_path, "echo_a")
    x = {"input": np.arange(3 * 2**20, dtype=np.float32)[None]}  # 12 MiB, on a 1 MiB max_payload
    async with (
        serving(secure.settings("worker"), [spec]),
        await MeshClient.connect(settings=secure.settings("tenant_a")) as client,
    ):
        reply = await client.infer_reply("echo_a", x, timeout=30)
    np.testing.assert_array_equal(reply.outputs["output"], x["input"])
    # Both ways through the tenant's own bucket: used (deletion markers), with no data left in it.
    own = await admin.js.object_store(f"{BUCKET_CLAIMS}-tenant_a")
    assert 0 < (await own.status()).size < 64 * 1024  # type: ignore[attr-defined]


async def test_tenant_cannot_read_another_tenants_large_tensors(
    secure: Mesh, admin: Connection, caplog: pytest.LogCaptureFixture
) -> None:
    async with connected(secure.settings("tenant_b")) as spy:
        for bucket in (f"{BUCKET_CLAIMS}-tenant_a", BUCKET_CLAIMS):
            with pytest.raises(Exception):  # noqa: B017  (a denial arrives as a timeout)
                await asyncio.wait_for(spy.js.object_store(bucket), 5)
            await violation(caplog, "publish", f"$JS.API.STREAM.INFO.OBJ_{bucket}")


async def test_tenant_cannot_queue_requests_for_another_tenants_model(
    secure: Mesh, admin: Connection, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = await register(admin, tmp_path, "echo_b")  # tenant_b's model; no worker serves it
    subject = subject_of(spec)
    async with await MeshClient.connect(settings=secure.settings("tenant_b")) as owner:
        with pytest.raises(DeadlineExceeded, match="no reply"):  # queued, then nobody answered
            await owner.infer("echo_b", ones(), timeout=1)
    assert await queued(admin, subject) == 1
    async with await MeshClient.connect(settings=secure.settings("tenant_a")) as other:
        started = time.monotonic()
        with pytest.raises(Forbidden, match="tenant_a may not publish to") as denied:
            await other.infer("echo_b", ones(), timeout=10)
        assert denied.value.status == 403 and time.monotonic() - started < 5  # at once, not at the timeout
    await violation(caplog, "publish", subject)
    assert await queued(admin, subject) == 1


@pytest.mark.parametrize(
    ("user", "bucket"),
    [
        ("tenant_a", BUCKET_ASSIGNMENTS),
        ("tenant_a", BUCKET_MODELS),
        ("tenant_a", BUCKET_WORKERS),
        ("tenant_a", BUCKET_STATUS),
        ("tenant_a", BUCKET_PIPELINES),
        ("tenant_a", BUCKET_JOBS),
        ("tenant_a", BUCKET_ROUTES),
        ("worker", BUCKET_MODELS),
        ("worker", BUCKET_ASSIGNMENTS),
        ("worker", BUCKET_LEADER),
        ("worker", BUCKET_STATUS),
        ("worker", BUCKET_PIPELINES),
        ("worker", BUCKET_JOBS),
        ("worker", BUCKET_ROUTES),
    ],
)
async def test_only_the_admin_writes_control_state(
    secure: Mesh, admin: Connection, user: str, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    key = unique("key")
    async with connected(secure.settings(user)) as conn:
        kv = await conn.nc.jetstream(timeout=1.0).key_value(bucket)  # reading the bucket's info is allowed
        with pytest.raises(nats.errors.TimeoutError):  # the server dropped the write: no ack comes
            await kv.put(key, b'{"units": []}')
    await violation(caplog, "publish", f"$KV.{bucket}.{key}")
    with pytest.raises(KeyNotFoundError):
        await (await admin.js.key_value(bucket)).get(key)


async def test_tenant_cannot_read_another_tenants_replies(
    secure: Mesh, admin: Connection, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = await register(admin, tmp_path, "echo_a")
    overheard: list[str] = []

    async def listen(msg: Any) -> None:
        overheard.append(msg.subject)

    async with connected(secure.settings("tenant_b")) as spy, serving(secure.settings("worker"), [spec]):
        for pattern in ("_INBOX.tenant_a.>", "_INBOX.>", ">"):
            await spy.nc.subscribe(pattern, cb=listen)
            await violation(caplog, "subscription", pattern)
        async with await MeshClient.connect(settings=secure.settings("tenant_a")) as client:
            reply = await client.infer_reply("echo_a", ones(), timeout=10)
        np.testing.assert_array_equal(reply.outputs["output"], ones()["input"])
        # Anything routed to the spy before tenant_a had its reply is in before this PONG.
        await spy.nc.flush()
    assert overheard == []


async def test_a_client_without_its_inbox_prefix_is_told_so(secure: Mesh, admin: Connection, tmp_path: Path) -> None:
    await register(admin, tmp_path, "echo_a")
    forgetful = secure.settings("tenant_a", inbox_prefix="_INBOX")  # not _INBOX.tenant_a
    started = time.monotonic()
    # Usually when it connects; at the latest when its first request gets no answer.
    with pytest.raises(Forbidden, match="SERVEMESH_INBOX_PREFIX") as denied:
        async with await MeshClient.connect(settings=forgetful) as client:
            await client.infer("echo_a", ones(), timeout=30)
    assert denied.value.status == 403 and time.monotonic() - started < 15  # not the request's timeout


async def test_worker_pulls_acks_and_replies_but_cannot_queue_job_items(
    secure: Mesh, admin: Connection, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker may queue requests (pipeline stages, checked against their owner) but not job items,
    whose headers workers trust."""
    spec = await register(admin, tmp_path, "echo_a")
    subject = subject_of(spec)
    async with serving(secure.settings("worker"), [spec]) as worker:
        async with await MeshClient.connect(settings=secure.settings("tenant_a")) as client:
            replies = await asyncio.gather(*(client.infer_reply("echo_a", ones(), timeout=10) for _ in range(20)))
        assert {reply.timing.worker for reply in replies} == {worker.id}
        await wait_for(lambda: _is(queued(admin, subject), 0), what="every request acked")
        with pytest.raises(nats.errors.TimeoutError):
            await worker.conn.nc.jetstream(timeout=1.0).publish(job_subject(subject), b"forged")
    await violation(caplog, "publish", job_subject(subject))
    assert await queued(admin, job_subject(subject)) == 0


async def test_a_worker_queues_a_redelivered_bundle_again_request_by_request(
    secure: Mesh, admin: Connection, tmp_path: Path
) -> None:
    """A bundle that comes back after its worker died is split into lone requests on its queue's
    requeue subject, which a worker may publish to (and no other subject of the queues)."""
    spec = await register(admin, tmp_path, "echo_a")
    durable = await ensure_consumer(
        admin.js, "echo_a", next(iter(spec.versions)), "normal", ack_wait_s=30, max_attempts=3
    )
    async with await MeshClient.connect(settings=secure.settings("tenant_a")) as client:
        calls = [asyncio.create_task(client.infer_reply("echo_a", ones(), timeout=20)) for _ in range(8)]
        # Taken by a worker that died before computing them (simulated by naks from a raw pull).
        pull = await admin.nc.jetstream().pull_subscribe_bind(durable, STREAM_INFER)
        held: list[nats.aio.msg.Msg] = []
        while sum(int((m.headers or {}).get(HDR_BUNDLE, "1")) for m in held) < len(calls):
            held.extend(await pull.fetch(1, timeout=10))
        for msg in held:
            await msg.nak()
        await pull.unsubscribe()
        assert any(HDR_BUNDLE in (m.headers or {}) for m in held), "no request was bundled with another"
        async with serving(secure.settings("worker"), [spec]):
            replies = await asyncio.gather(*calls)
    for reply in replies:
        np.testing.assert_array_equal(reply.outputs["output"], ones()["input"])
        assert reply.timing.attempt == 2 and reply.timing.batch_size == 1  # redelivered: alone
    assert await queued(admin, subject_of(spec)) == 0 and await queued(admin, requeue_subject(subject_of(spec))) == 0


async def test_a_request_cannot_make_a_worker_write_for_it(
    secure: Mesh, admin: Connection, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker replies where a request's headers say, with its own rights: a reply subject of the
    server's or the mesh's own is never used (and the worker's rights would refuse it besides)."""
    spec = await register(admin, tmp_path, "echo_a")
    key = unique("victim")
    target = f"$KV.{BUCKET_ASSIGNMENTS}.{key}"
    async with connected(secure.settings("tenant_a")) as conn, serving(secure.settings("worker"), [spec]):
        ack = await conn.nc.request(
            subject_of(spec), encode_request(ones()), timeout=5.0,
            headers={HDR_MSG_ID: unique("forged"), HDR_REPLY: target},
        )  # fmt: skip
        assert b'"error"' not in ack.data  # queued: the tenant may ask its own model
        await wait_for(lambda: _is(queued(admin, subject_of(spec)), 0), what="the request settled")
    assert not any(target.lower() in record.getMessage().lower() for record in caplog.records)  # never tried
    with pytest.raises(KeyNotFoundError):
        await (await admin.js.key_value(BUCKET_ASSIGNMENTS)).get(key)


async def test_tenant_cannot_route_a_pipeline_through_another_tenants_model(
    secure: Mesh, admin: Connection, tmp_path: Path
) -> None:
    """The worker checks a route against the owner of the model the request came to: a stage of
    another tenant's is refused (403) before anything is computed, and nothing of that model (its
    owner, inputs or outputs) is in the refusal."""
    own, other = await register(admin, tmp_path, "echo_a"), await register(admin, tmp_path, "echo_b")
    async with (
        serving(secure.settings("worker"), [own, other]) as worker,
        await MeshClient.connect(settings=secure.settings("tenant_a")) as client,
    ):
        with pytest.raises(Forbidden) as refused:
            await client.infer(["echo_a", "echo_b"], ones(), timeout=20)
        stats = {server.spec.name: server.stats for server in worker.servers.values()}
    assert refused.value.status == 403
    assert refused.value.data["stage"] == subject_of(other)
    wire = json.dumps(refused.value.to_wire())
    assert "tenant_b" not in wire and "input" not in wire.replace(subject_of(other), "")
    assert stats["echo_a"].rows == 0 and stats["echo_b"].rows == 0  # refused before computing, either stage
    assert await queued(admin, subject_of(other)) == 0


async def test_a_tenant_routes_a_pipeline_through_its_own_models(
    secure: Mesh, admin: Connection, tmp_path: Path
) -> None:
    first = await register(admin, tmp_path, "echo_a")
    second = await register(admin, tmp_path, "fraud", names=("output", "input"))  # takes the first's output
    async with (
        serving(secure.settings("worker"), [first, second]),
        await MeshClient.connect(settings=secure.settings("tenant_a")) as client,
    ):
        reply = await client.infer_reply(["echo_a", "fraud"], ones(), timeout=20)
    np.testing.assert_array_equal(reply.outputs["input"], ones()["input"])


@pytest.mark.parametrize(
    ("user", "api", "what"),
    [
        ("tenant_a", "CONSUMER.MSG.NEXT.MESH_INFER.{consumer}", "pull other requests from the queue"),
        ("tenant_a", "CONSUMER.DURABLE.CREATE.MESH_INFER.spy", "create a consumer to read the queue"),
        ("tenant_a", "STREAM.PURGE.MESH_INFER", "purge the queue"),
        ("worker", "STREAM.PURGE.MESH_INFER", "purge the queue"),
        ("worker", "STREAM.DELETE.MESH_INFER", "delete the queue"),
        ("worker", "STREAM.UPDATE.MESH_INFER", "change the queue's limits"),
        ("worker", "CONSUMER.DELETE.MESH_INFER.{consumer}", "delete a subject's consumer"),
        ("worker", "STREAM.DELETE.KV_mesh-models", "delete the registry"),
    ],
)
async def test_jetstream_api_is_scoped(
    secure: Mesh, admin: Connection, tmp_path: Path, user: str, api: str, what: str, caplog: pytest.LogCaptureFixture
) -> None:
    spec = await register(admin, tmp_path, "echo_b")
    subject = subject_of(spec)
    async with await MeshClient.connect(settings=secure.settings("tenant_b")) as owner:
        with pytest.raises(DeadlineExceeded, match="no reply"):
            await owner.infer("echo_b", ones(), timeout=0.5)
    model, version, priority = spec.name, next(iter(spec.versions)), "normal"
    request = "$JS.API." + api.format(consumer=consumer_name(model, version, priority))
    async with connected(secure.settings(user)) as conn:
        with pytest.raises(nats.errors.TimeoutError):  # `what` was refused: no answer comes
            await conn.nc.request(request, b"{}", timeout=1.0)
    await violation(caplog, "publish", request)
    assert await queued(admin, subject) == 1, f"{user} could {what}"
    await admin.js.key_value(BUCKET_MODELS)  # the registry is still there


async def test_single_conf_is_the_open_default(tmp_path: Path) -> None:
    deploy_copy(tmp_path / "nats")
    server = ConfigServer(tmp_path / "nats", "single.conf").start()
    try:
        async with connected(Settings(nats_url=server.url)) as conn:  # no credentials at all
            await provision(conn)
            assert (await conn.js.stream_info(STREAM_INFER)).config.name == STREAM_INFER
    finally:
        server.stop()


async def test_wrong_password_fails_at_once(secure: Mesh) -> None:
    started = time.monotonic()
    with pytest.raises(MeshUnavailable, match="Authorization Violation"):
        await Connection.open(secure.settings("tenant_a", password="not-the-password"))
    assert time.monotonic() - started < 3.0  # not retried: no retry fixes a password


async def test_secure_server_fsyncs_every_write(secure: Mesh) -> None:
    assert await _sync_always(secure.settings("sys", inbox_prefix="_INBOX"), servers=1) == [True]


# -- TLS, tokens, NKeys -------------------------------------------------------------------------


async def test_tls_with_client_certificates(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    workdir = tmp_path / "nats"
    passwords = deploy_copy(workdir)
    subprocess.run(["sh", "make-dev-certs.sh"], cwd=workdir, check=True, capture_output=True)
    certs = workdir / ".servemesh" / "tls"
    server = ConfigServer(workdir, "secure-tls.conf").start()
    mesh = Mesh(server, passwords)
    tls = {
        "tls_ca": str(certs / "ca.pem"),
        "tls_cert": str(certs / "client.pem"),
        "tls_key": str(certs / "client-key.pem"),
    }
    try:
        async with connected(mesh.settings("admin", **tls)) as admin:
            await provision(admin)
            spec = await register(admin, tmp_path / "models", "echo_a")
            async with (
                serving(mesh.settings("worker", **tls), [spec]) as worker,
                await MeshClient.connect(settings=mesh.settings("tenant_a", **tls)) as client,
            ):
                reply = await client.infer_reply("echo_a", ones(), timeout=10)
            assert reply.timing.worker == worker.id
        # A client that does not trust the server's CA gives up at once.
        started = time.monotonic()
        with pytest.raises(MeshUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            await Connection.open(mesh.settings("tenant_a"))
        assert time.monotonic() - started < 3.0
        # One without a certificate of its own is turned away by the server. Over TLS 1.3 the
        # client learns it from the server's alert (MeshUnavailable at once) or, when its first
        # write loses the race with that alert, only as a dropped connection, the same as a
        # restarting server, so it keeps trying; the server's log says why.
        with pytest.raises((MeshUnavailable, TimeoutError)):
            await asyncio.wait_for(Connection.open(mesh.settings("tenant_a", tls_ca=tls["tls_ca"])), timeout=3.0)
        assert "didn't provide a certificate" in server.log_path.read_text()
    finally:
        server.stop()


async def test_token_authentication(tmp_path: Path) -> None:
    token = secrets.token_urlsafe(16)
    (tmp_path / "token.conf").write_text(f'authorization {{ token: "{token}" }}\njetstream {{ store_dir: "js" }}\n')
    server = ConfigServer(tmp_path, "token.conf").start()
    try:
        async with connected(Settings(nats_url=server.url, token=SecretStr(token))) as conn:
            await provision(conn)
        with pytest.raises(MeshUnavailable, match="Authorization Violation"):
            await Connection.open(Settings(nats_url=server.url, token=SecretStr("wrong")))
    finally:
        server.stop()


async def test_nkey_authentication(tmp_path: Path) -> None:
    import nkeys

    seed = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    (tmp_path / "nkey.conf").write_text(
        f'authorization {{ users: [{{nkey: "{public}"}}] }}\njetstream {{ store_dir: "js" }}\n'
    )
    (tmp_path / "user.nk").write_bytes(seed)
    server = ConfigServer(tmp_path, "nkey.conf").start()
    try:
        for given in (seed.decode(), str(tmp_path / "user.nk")):  # the seed itself, or its file
            async with connected(Settings(nats_url=server.url, nkey_seed=SecretStr(given))) as conn:
                await provision(conn)
        with pytest.raises(MeshUnavailable, match="Authorization Violation"):
            await Connection.open(Settings(nats_url=server.url, user="someone", password=SecretStr("else")))
    finally:
        server.stop()


async def test_creds_file_authentication(tmp_path: Path) -> None:
    """Operator mode: a user JWT signed by an account the operator signed, and the user's seed."""
    import nkeys

    def keypair(prefix: int) -> Any:
        return nkeys.from_seed(bytearray(nkeys.encode_seed(secrets.token_bytes(32), prefix)))

    operator, account = keypair(nkeys.PREFIX_BYTE_OPERATOR), keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    user, stranger = keypair(nkeys.PREFIX_BYTE_USER), keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    unlimited = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True, "conn": -1}
    account_jwt = _jwt(operator, account, {"type": "account", "limits": {**unlimited, "leaf": -1}})
    (tmp_path / "operator.conf").write_text(
        f'operator: "{_jwt(operator, operator, {"type": "operator"})}"\nresolver: MEMORY\n'
        f'resolver_preload: {{ {account.public_key.decode()}: "{account_jwt}" }}\n'
    )
    user_claims = {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}
    for name, issuer in (("user", account), ("stranger", stranger)):  # the stranger's account is unknown
        (tmp_path / f"{name}.creds").write_text(
            f"-----BEGIN NATS USER JWT-----\n{_jwt(issuer, user, user_claims)}\n------END NATS USER JWT------\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{user.seed.decode()}\n------END USER NKEY SEED------\n"
        )
    server = ConfigServer(tmp_path, "operator.conf").start()
    try:
        async with connected(Settings(nats_url=server.url, creds_file=str(tmp_path / "user.creds"))) as conn:
            sub = await conn.nc.subscribe("hello")
            await conn.nc.publish("hello", b"world")
            assert (await sub.next_msg(timeout=5)).data == b"world"
        with pytest.raises(MeshUnavailable, match="Authorization Violation"):
            await Connection.open(Settings(nats_url=server.url, creds_file=str(tmp_path / "stranger.creds")))
    finally:
        server.stop()


def _jwt(issuer: Any, subject: Any, nats_claims: dict[str, Any]) -> str:
    """A NATS JWT (ed25519-nkey) for ``subject``'s public key, signed by ``issuer``."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    claims = {
        "jti": secrets.token_hex(16).upper(), "iat": int(time.time()), "iss": issuer.public_key.decode(),
        "sub": subject.public_key.decode(), "name": nats_claims["type"], "nats": {**nats_claims, "version": 2},
    }  # fmt: skip
    body = f"{b64(json.dumps({'typ': 'JWT', 'alg': 'ed25519-nkey'}).encode())}.{b64(json.dumps(claims).encode())}"
    return f"{body}.{b64(issuer.sign(body.encode()))}"


# -- the three-node cluster ---------------------------------------------------------------------


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[tuple[list[ConfigServer], dict[str, str]]]:
    """cluster-1..3.conf on loopback, their route ports moved to free ones."""
    ports = free_ports(3)
    workdir = tmp_path / "nats"
    passwords = deploy_copy(workdir, route_ports=ports)
    for i, port in enumerate(ports, start=1):
        config = workdir / f"cluster-{i}.conf"
        config.write_text(re.sub(r"(\n  port: )\d+", rf"\g<1>{port}", config.read_text()))
    servers: list[ConfigServer] = []
    try:
        for i in (1, 2, 3):
            servers.append(ConfigServer(workdir, f"cluster-{i}.conf").start())
        yield servers, passwords
    finally:
        for server in servers:
            server.stop()


async def test_cluster_keeps_three_fsynced_copies_and_the_same_permissions(
    nats_cluster: tuple[list[ConfigServer], dict[str, str]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    servers, passwords = nats_cluster
    meshes = [Mesh(server, passwords) for server in servers]
    async with connected(meshes[0].settings("admin", replicas=3)) as admin:

        async def provisioned() -> bool:  # once the nodes have elected a JetStream leader
            try:
                await provision(admin)
            except Exception:
                return False
            return True

        await wait_for(provisioned, timeout=30, what="JetStream cluster to accept the stream")
        buckets = (f"OBJ_{bucket}" if bucket == BUCKET_CLAIMS else f"KV_{bucket}" for bucket in BUCKETS)
        for stream in (STREAM_INFER, *buckets):
            info = await admin.js.stream_info(stream)
            assert info.config.num_replicas == 3
            assert info.cluster is not None and len(info.cluster.replicas or []) == 2
        spec = await register(admin, tmp_path, "echo_b")
        # The rules hold on every node: tenant_a, connected elsewhere, still cannot queue for tenant_b.
        async with await MeshClient.connect(settings=meshes[2].settings("tenant_a")) as other:
            with pytest.raises(Forbidden):
                await other.infer("echo_b", ones(), timeout=10)
        await violation(caplog, "publish", subject_of(spec))
        assert await queued(admin, subject_of(spec)) == 0
    assert await _sync_always(meshes[0].settings("sys", inbox_prefix="_INBOX"), servers=3) == [True] * 3


# -- small helpers ------------------------------------------------------------------------------


async def _is(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def _sync_always(settings: Settings, servers: int) -> list[bool]:
    """Each server's `sync_always` as it reports it to the system account (`$SYS...VARZ`)."""
    found: list[bool] = []
    async with connected(settings) as conn:
        inbox = conn.nc.new_inbox()
        done = asyncio.Event()

        async def collect(msg: Any) -> None:
            found.append(bool(json.loads(msg.data)["data"]["jetstream"]["config"].get("sync_always")))
            if len(found) == servers:
                done.set()

        await conn.nc.subscribe(inbox, cb=collect)
        await conn.nc.publish("$SYS.REQ.SERVER.PING.VARZ", b"{}", reply=inbox)
        await asyncio.wait_for(done.wait(), timeout=10)
    return found
