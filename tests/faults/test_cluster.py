"""A three-node JetStream cluster (deploy/nats/cluster-*.conf, R3 stream) on loopback: the node
leading the inference stream is killed under load, then brought back and catches up."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import Connection, Registry, Settings, provision
from schemas.subjects import STREAM_INFER, consumer_name
from servemesh import MeshClient
from servemesh.local import wait_workers_ready
from tests.conftest import wait_for
from tests.faults.conftest import identity_repo
from tests.faults.fleet import Fleet
from tests.faults.load import Load
from tests.faults.report import record
from tests.integration.secure_mesh import ConfigServer, Mesh, connected, deploy_copy, free_ports
from workers.repository import read_model

NODES = (1, 2, 3)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[tuple[list[ConfigServer], dict[str, str]]]:
    """cluster-1..3.conf from deploy/nats, route ports moved to free ones; stopped by PID."""
    ports = free_ports(3)
    workdir = tmp_path / "nats"
    passwords = deploy_copy(workdir, route_ports=ports)
    for i, port in zip(NODES, ports, strict=True):
        config = workdir / f"cluster-{i}.conf"
        config.write_text(re.sub(r"(\n  port: )\d+", rf"\g<1>{port}", config.read_text()))
    servers = [ConfigServer(workdir, f"cluster-{i}.conf") for i in NODES]
    try:
        for server in servers:
            server.start()
        yield servers, passwords
    finally:
        for server in servers:
            server.stop()


def _restart(server: ConfigServer) -> None:
    # start() reads readiness from the log: the previous run's lines must not answer for this one.
    server.log_path.rename(server.log_path.with_suffix(f".{time.monotonic_ns()}.log"))
    server.start()


async def _stream_replicas(conn: Connection) -> tuple[str | None, dict[str, bool]]:
    """The inference stream's leader and, per follower, whether it is current."""
    info = await conn.js.stream_info(STREAM_INFER)
    assert info.cluster is not None
    return info.cluster.leader, {p.name or "": bool(p.current) for p in info.cluster.replicas or []}


async def test_cluster_node_killed_under_load_and_rejoins(
    nodes: tuple[list[ConfigServer], dict[str, str]], tmp_path: Path
) -> None:
    servers, passwords = nodes
    meshes = [Mesh(server, passwords) for server in servers]
    admin = meshes[0].settings("admin", replicas=3)
    conn = await Connection.open(admin)
    fleet: Fleet | None = None
    try:

        async def provisioned() -> bool:  # once the nodes have elected a JetStream leader
            try:
                await provision(conn)
            except Exception:
                return False
            return True

        await wait_for(provisioned, timeout=30, what="the JetStream cluster accepting the R3 stream")
        model = identity_repo(tmp_path / "repo", ack_wait_s=None)  # the default ack wait, as users get it
        await (await Registry.open(conn)).put_spec(read_model(tmp_path / "repo" / model))
        # Each worker on a node of its own; the client on the first.
        fleet = Fleet(servers[0].url, tmp_path)
        for i, name in ((1, "w1"), (2, "w2")):
            fleet.worker(name, tmp_path / "repo", env=_env(meshes[i].settings("admin", replicas=3)), url=servers[i].url)
        await wait_workers_ready(await Registry.open(conn), ["w1", "w2"], timeout=60)
        # The node leading the model's consumer: what it delivered and had not heard acked is what a
        # leader loss can strand (the stream's leader is often the same node; the consumer's decides).
        info = await conn.js.consumer_info(STREAM_INFER, consumer_name(model, "1", "normal"))
        consumer_leader = info.cluster.leader if info.cluster else None
        victim = next((s for s in servers if consumer_leader and s.config == f"cluster-{consumer_leader[-1]}.conf"),
                      servers[1])  # fmt: skip
        victim_name = f"mesh-{victim.config.removeprefix('cluster-').removesuffix('.conf')}"
        started = time.monotonic()
        # The test watches the stream through a node that survives.
        survivor = meshes[0] if victim is not servers[0] else meshes[1]
        client = await MeshClient.connect(settings=meshes[0].settings("admin"))
        async with client, connected(survivor.settings("admin")) as watcher, Load(client, model, 48, 15) as load:
            await load.answers(500, 30, "answers before the kill")
            assert victim.proc is not None
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait(10)
            killed_at = time.monotonic()

            async def new_leader() -> bool:  # of the consumer, and a stream led by a live node
                try:
                    stream_leader, _ = await _stream_replicas(watcher)
                    now = await watcher.js.consumer_info(STREAM_INFER, consumer_name(model, "1", "normal"))
                except Exception:
                    return False
                live = victim_name not in (stream_leader, now.cluster.leader if now.cluster else None)
                return bool(stream_leader) and bool(now.cluster and now.cluster.leader) and live

            await wait_for(new_leader, timeout=20, what="new stream and consumer leaders")
            failover_s = time.monotonic() - killed_at
            await load.answers(500, 30, "answers with one node down")
            await asyncio.get_running_loop().run_in_executor(None, _restart, victim)
            back_at = time.monotonic()

            async def rejoined() -> bool:
                try:
                    _, followers = await _stream_replicas(watcher)
                except Exception:
                    return False
                return victim_name in followers and all(followers.values())

            await wait_for(rejoined, timeout=30, what="the node back and current in the stream")
            rejoin_s = time.monotonic() - back_at
            await load.answers(500, 30, "answers after the node rejoined")
        tally = load.tally
        record("3-node cluster: consumer leader SIGKILL, then back", tally, time.monotonic() - started,
               new_leader_s=round(failover_s, 1), rejoined_s=round(rejoin_s, 1))  # fmt: skip
        assert tally.lost == 0 and tally.wrong == 0 and not tally.untyped
        # With the default ack wait, what the dead leader had delivered comes back well within the
        # requests' 15 s timeout: a leader loss fails no request.
        assert tally.failed_total == 0, tally.errors
    finally:
        if fleet is not None:
            fleet.close()
        await conn.close()


def _env(settings: Settings) -> dict[str, str]:
    """The SERVEMESH_* variables a worker process reads these settings from."""
    assert settings.password is not None
    return {
        "SERVEMESH_USER": settings.user or "", "SERVEMESH_PASSWORD": settings.password.get_secret_value(),
        "SERVEMESH_INBOX_PREFIX": settings.inbox_prefix, "SERVEMESH_REPLICAS": str(settings.replicas),
    }  # fmt: skip
