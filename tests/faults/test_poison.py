"""A poison request whose computation crashes the worker process: it is tried max_attempts
times, then answered with an error (dead letter), and the mesh keeps serving everyone else;
the requests its crashes took down with it are delivered again and answered, none failed."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from broker import Connection
from schemas.errors import ModelFailure
from servemesh import MeshClient
from tests.faults import faulty_runtime
from tests.faults.conftest import faulty_model
from tests.faults.fleet import Fleet
from tests.faults.load import Load
from tests.faults.report import record

WORKERS = ["w1", "w2"]
MAX_ATTEMPTS = 3


async def _supervise(fleet: Fleet, crashes: list[str]) -> None:
    """Restart crashed workers under the same id, as Kubernetes or systemd would."""
    while True:
        for name in WORKERS:
            if not fleet.alive(name):
                crashes.append(name)
                fleet.restart(name)
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("instances", [1, 2])
async def test_poison_request_ends_as_dead_letter_and_serving_goes_on(
    conn: Connection, client: MeshClient, fleet: Fleet, tmp_path: Path, instances: int
) -> None:
    name = await faulty_model(conn, fleet, tmp_path, WORKERS, max_batch_size=64, max_attempts=MAX_ATTEMPTS,
                              instances=instances)  # fmt: skip
    crashes: list[str] = []
    supervisor = asyncio.create_task(_supervise(fleet, crashes))
    started = time.monotonic()
    try:
        async with Load(client, name, callers=8, timeout=15) as load:
            await load.answers(500, 20, "answers before the poison")
            poison = np.full((1, 4), faulty_runtime.POISON, np.float32)
            poisoned_at = time.monotonic()
            with pytest.raises(ModelFailure) as err:
                await client.infer(name, {"input": poison}, timeout=60)
            dead_letter_s = time.monotonic() - poisoned_at
            await load.answers(500, 30, "answers after the dead letter")
    finally:
        supervisor.cancel()
    tally = load.tally
    scenario = "poison request (crashes its worker)" + ("" if instances == 1 else f", {instances} instances")
    record(scenario, tally, time.monotonic() - started,
           crashes=len(crashes), max_attempts=MAX_ATTEMPTS, dead_letter_s=round(dead_letter_s, 1))  # fmt: skip
    assert err.value.status == 500 and f"gave up after {MAX_ATTEMPTS} attempts" in err.value.message
    # Each attempt that reached a worker crashed it; the delivery after the last one did not.
    assert 1 <= len(crashes) <= MAX_ATTEMPTS
    assert tally.lost == 0 and tally.wrong == 0 and not tally.untyped
    # Requests held beside the poison by a worker it crashed are not charged for the crash: none fails.
    assert tally.failed_total == 0, tally.errors
    assert all(fleet.alive(w) for w in WORKERS)
