"""NATS faults under load: a single nats-server (file storage) restarted, and one node of a
three-node JetStream cluster (R3 stream) killed and brought back. Clients and workers
reconnect by themselves; the test never reconnects anything."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from broker import Connection, NatsServer
from examples.build_models import build_identity_onnx
from servemesh import MeshClient
from tests.conftest import set_config, unique
from tests.faults.conftest import ACK_WAIT_S, identity_repo, start_workers
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


async def test_a_worker_reading_claimed_payloads_through_a_nats_restart_is_not_wedged(
    server: NatsServer, conn: Connection, client: MeshClient, fleet: Fleet, tmp_path: Path
) -> None:
    """Large requests travel by claim check: when nats-server dies while the worker reads their
    objects, those reads end within their bounds, away from the delivery path, so the worker goes
    on serving as soon as the server is back, and its drain on SIGTERM completes."""
    repo = tmp_path / "repo"
    model = identity_repo(repo)
    large = unique("large")
    set_config(build_identity_onnx(repo, large, "float32", max_delay_ms=2), ack_wait_s=ACK_WAIT_S)
    await start_workers(fleet, conn, repo, ["w1"])
    started = time.monotonic()
    async with (
        Load(client, model, callers=8, timeout=15) as small,
        Load(client, large, callers=3, timeout=15, width=2 * 2**20) as big,  # 8 MiB each: by claim check
    ):
        await big.answers(6, 60, "large requests answered before the restart")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, server.kill)
        await asyncio.sleep(DOWN_S)
        await loop.run_in_executor(None, server.start)
        back_at = time.monotonic()
        await small.answers(200, 20, "small requests answered after the restart")
        recovered_s = time.monotonic() - back_at
        await big.answers(3, 30, "large requests answered after the restart")
    fleet.signal("w1", signal.SIGTERM)
    drain_started = time.monotonic()
    assert fleet.wait("w1", timeout=15) == 0
    drain_s = time.monotonic() - drain_started
    record("nats-server killed while a worker reads claims", small.tally, time.monotonic() - started,
           serving_again_after_s=round(recovered_s, 1), drain_s=round(drain_s, 1),
           large_answered=big.tally.answered, large_failed=big.tally.failed_total)  # fmt: skip
    for tally in (small.tally, big.tally):
        assert tally.lost == 0 and tally.wrong == 0 and not tally.untyped
