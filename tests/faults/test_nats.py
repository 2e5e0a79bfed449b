"""NATS faults under load: a single nats-server (file storage) restarted, and one node of a
three-node JetStream cluster (R3 stream) killed and brought back. Clients and workers
reconnect by themselves; the test never reconnects anything."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from broker import Connection, MeshClient, NatsServer
from tests.faults.conftest import identity_repo, start_workers
from tests.faults.fleet import Fleet
from tests.faults.load import Load
from tests.faults.report import record

DOWN_S = 1.0  # how long a stopped server stays down


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
async def test_single_nats_server_restarted_under_load(
    server: NatsServer, conn: Connection, client: MeshClient, fleet: Fleet, tmp_path: Path, how: str
) -> None:
    model = identity_repo(tmp_path / "repo")
    await start_workers(fleet, conn, tmp_path / "repo", ["w1", "w2"])
    started = time.monotonic()
    async with Load(client, model, callers=16, timeout=15) as load:
        await load.answers(1000, 20, "answers before the restart")
        loop = asyncio.get_running_loop()
        down_at = time.monotonic()
        await loop.run_in_executor(None, server.stop if how == "SIGTERM" else server.kill)
        await asyncio.sleep(DOWN_S)  # the fault itself: callers keep sending meanwhile
        await loop.run_in_executor(None, server.start)  # the same port and store directory
        outage_s = time.monotonic() - down_at
        recovered_s = await load.answers(1000, 30, "answers after the restart")
    tally = load.tally
    record(f"nats-server restart ({how}, file storage)", tally, time.monotonic() - started,
           outage_s=round(outage_s, 1), first_1000_answers_after_s=round(recovered_s, 1))  # fmt: skip
    assert tally.lost == 0 and tally.wrong == 0 and not tally.untyped
    assert tally.by_worker["w1"] and tally.by_worker["w2"]
