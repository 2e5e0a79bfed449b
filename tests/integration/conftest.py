"""Fixtures of the integration tests that run routers and workers as separate processes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator

import pytest

from broker import Connection, provision
from tests.integration.secure_mesh import TENANTS, ConfigServer, Mesh, connected, deploy_copy


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
