"""Worker faults under continuous load: SIGKILL mid-batch, SIGTERM (graceful drain), SIGSTOP
(a stalled worker), and a poison request that crashes the runtime's process."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from broker import Connection
from servemesh import MeshClient
from tests.faults.conftest import ACK_WAIT_S, faulty_model, identity_repo, start_workers
from tests.faults.fleet import Fleet
from tests.faults.load import Load
from tests.faults.report import record


async def test_sigkill_worker_mid_batch(conn: Connection, client: MeshClient, fleet: Fleet, tmp_path: Path) -> None:
    # Batches that take 5 ms, and more callers than both workers' pull windows (2 x 16): the
    # workers are the bottleneck, so at any moment the victim holds a full window of pulled,
    # unacked requests, one batch computing. (With a fast model and fewer callers, closed-loop
    # load falls into lockstep: right after a worker's reply, it may hold nothing at all.)
    model = await faulty_model(conn, fleet, tmp_path, ["victim", "survivor"], delay_s=0.005, max_batch_size=8)
    started = time.monotonic()
    async with Load(client, model, callers=48) as load:
        await load.answers(1000, 20, "answers before the kill")
        assert load.tally.by_worker["victim"] > 0, "the victim must have been serving"
        fleet.signal("victim", signal.SIGKILL)
        fleet.wait("victim")
        await load.answers(1000, 20, "answers after the kill")
    tally = load.tally
    record("worker SIGKILL mid-batch", tally, time.monotonic() - started, ack_wait_s=ACK_WAIT_S)
    assert tally.lost == 0 and tally.wrong == 0 and not tally.untyped
    assert tally.failed_total == 0, tally.errors
    # It died holding requests (pulled, unacked): they came back after the ack wait, to the survivor.
    assert tally.redelivered > 0


async def test_sigterm_worker_drains_without_failing_a_request(
    conn: Connection, client: MeshClient, fleet: Fleet, tmp_path: Path
) -> None:
    model = identity_repo(tmp_path / "repo")
    await start_workers(fleet, conn, tmp_path / "repo", ["leaving", "staying"])
    started = time.monotonic()
    async with Load(client, model, callers=16) as load:
        await load.answers(1000, 20, "answers before SIGTERM")
        assert load.tally.by_worker["leaving"] > 0
        fleet.signal("leaving", signal.SIGTERM)
        drain_started = time.monotonic()
        code = await asyncio.get_running_loop().run_in_executor(None, fleet.wait, "leaving", 30.0)
        drained_s = time.monotonic() - drain_started
        await load.answers(1000, 20, "answers after the drain")
    tally = load.tally
    record("worker SIGTERM (drain)", tally, time.monotonic() - started, drain_s=round(drained_s, 2))
    assert code == 0
    assert tally.lost == 0 and tally.wrong == 0 and not tally.untyped
    assert tally.failed_total == 0, tally.errors
    # A drain hands back what it cannot finish at once: nothing waits out an ack timeout.
    assert drained_s < 5.0


async def test_sigstop_stalled_worker_requests_are_redelivered(
    conn: Connection, client: MeshClient, fleet: Fleet, tmp_path: Path
) -> None:
    model = identity_repo(tmp_path / "repo")
    await start_workers(fleet, conn, tmp_path / "repo", ["stalled", "healthy"])
    started = time.monotonic()
    async with Load(client, model, callers=16, timeout=10) as load:
        await load.answers(1000, 20, "answers before SIGSTOP")
        assert load.tally.by_worker["stalled"] > 0
        fleet.signal("stalled", signal.SIGSTOP)
        stopped_at = time.monotonic()
        await _until(lambda: load.tally.redelivered > 0, 10, "a stalled request answered on redelivery")
        redelivered_after_s = time.monotonic() - stopped_at
        await load.answers(1000, 20, "answers while one worker is stalled")
        fleet.signal("stalled", signal.SIGCONT)
        before = load.tally.by_worker["stalled"]
        # Woken up, it serves again: late replies to what it held are duplicates the client drops.
        await _until(lambda: load.tally.by_worker["stalled"] > before, 15, "the stalled worker serving again")
    tally = load.tally
    record("worker SIGSTOP (stalled)", tally, time.monotonic() - started,
           ack_wait_s=ACK_WAIT_S, first_redelivered_answer_s=round(redelivered_after_s, 2))  # fmt: skip
    assert tally.lost == 0 and tally.wrong == 0 and not tally.untyped
    assert tally.failed_total == 0, tally.errors
    assert redelivered_after_s >= ACK_WAIT_S * 0.9  # redelivered by the ack timeout, not sooner
    assert fleet.alive("stalled")


async def _until(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)
