"""Fixtures of the integration tests that run routers and workers as separate processes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker import NatsServer
from tests.integration.cluster import Cluster


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """A nats-server of its own, for routers and workers this test starts (stopped by PID at the end)."""
    with NatsServer() as server:
        mesh = await Cluster(server, tmp_path).open()
        try:
            yield mesh
        finally:
            await mesh.close()
