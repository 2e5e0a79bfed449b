"""Fixtures of the integration tests that run routers and workers as separate processes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from broker import Connection, NatsServer, provision
from tests.integration.cluster import Cluster
from tests.integration.secure_mesh import TENANTS, ConfigServer, Mesh, connected, deploy_copy


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """A nats-server of its own, for routers and workers this test starts (stopped by PID at the end)."""
    with NatsServer() as server:
        mesh = await Cluster(server, tmp_path).open()
        try:
            yield mesh
        finally:
            await mesh.close()


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    workdir = tmp_path_factory.mktemp("secure") / "nats"
    passwords = deploy_copy(workdir)
    server = ConfigServer(workdir, "secure.conf").start()
    try:
        yield Mesh(server, passwords)
    finally:
        server.stop()


@pytest.fixture
async def admin(secure: Mesh) -> AsyncIterator[Connection]:
    """The admin's connection, with the mesh provisioned (each tenant's claims bucket too): only the
    admin may create streams and buckets."""
    async with connected(secure.settings("admin")) as conn:
        await provision(conn, TENANTS)
        yield conn


@pytest.fixture
def capture_violations(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="broker.connection")
