"""A client that disconnects (is killed) before its replies arrive: the worker computes and
answers into the void, settles every request once, and keeps serving the other clients."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from broker import Connection, NatsServer
from schemas.subjects import STREAM_INFER, consumer_name
from servemesh import MeshClient
from tests.conftest import wait_for
from tests.faults.conftest import REPO_ROOT, identity_repo, start_workers
from tests.faults.fleet import Fleet
from tests.faults.load import Load
from tests.faults.report import record

ORPHANS = 3000


async def test_client_gone_before_its_replies(
    server: NatsServer, conn: Connection, client: MeshClient, fleet: Fleet, tmp_path: Path
) -> None:
    model = identity_repo(tmp_path / "repo")
    await start_workers(fleet, conn, tmp_path / "repo", ["w1"])
    started = time.monotonic()
    async with Load(client, model, callers=8) as load:
        await load.answers(500, 20, "answers before the impatient client")
        # The worker is paused while the client queues and dies (well within the ack wait), so its
        # replies are all still to come when it is gone: at full speed it could answer them first.
        fleet.signal("w1", signal.SIGSTOP)
        impatient = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.faults.impatient", server.url, model, str(ORPHANS),
            stdout=asyncio.subprocess.PIPE, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )  # fmt: skip
        try:
            assert impatient.stdout is not None
            line = await asyncio.wait_for(impatient.stdout.readline(), 30)
            assert line.strip() == b"sent"
        finally:
            impatient.send_signal(signal.SIGKILL)
            await impatient.wait()
        consumer = consumer_name(model, "1", "normal")
        at_kill = await conn.js.consumer_info(STREAM_INFER, consumer)
        # Still to compute or settle when the client died (the load's callers hold at most 8).
        outstanding = at_kill.num_pending + at_kill.num_ack_pending
        fleet.signal("w1", signal.SIGCONT)

        async def orphans_settled() -> bool:
            info = await conn.js.consumer_info(STREAM_INFER, consumer)
            return info.num_pending == 0 and info.num_ack_pending == 0

        # Every request computed and settled once: none left waiting, none redelivered in a loop.
        await wait_for(orphans_settled, 30, "the dead client's requests computed and settled")
        await load.answers(1000, 20, "answers after the impatient client died")
    info = await conn.js.consumer_info(STREAM_INFER, consumer)
    tally = load.tally
    record("client killed before its replies", tally, time.monotonic() - started,
           queued_by_the_dead_client=ORPHANS, outstanding_when_it_died=outstanding,
           redelivered_by_stream=info.num_redelivered)  # fmt: skip
    assert tally.lost == 0 and tally.wrong == 0 and not tally.untyped
    assert tally.failed_total == 0, tally.errors
    assert outstanding > 8, "the client's requests were all answered before it died: nothing was tested"
    assert info.num_redelivered == 0
    assert fleet.alive("w1") and "Traceback" not in fleet.log("w1")


async def test_fire_and_forget_results_arrive_once_across_a_stalled_worker(
    conn: Connection, client: MeshClient, fleet: Fleet, tmp_path: Path
) -> None:
    """A worker stalled past the ack wait has its requests computed again by another; woken, it
    sends its late replies too. A ``subscribe_results`` reader sees each request's result once."""
    model = identity_repo(tmp_path / "repo")
    await start_workers(fleet, conn, tmp_path / "repo", ["stalled", "healthy"])
    subject = f"results.{model}"
    seen: Counter[str] = Counter()
    async with await client.subscribe_results(subject) as results:

        async def read() -> None:
            async for result in results:
                assert result.error is None and result.request_id is not None
                seen[result.request_id] += 1

        reader = asyncio.create_task(read())
        fleet.signal("stalled", signal.SIGSTOP)
        try:
            sent = [await client.publish(model, {"input": np.full((1, 4), i, np.float32)}, reply_to=subject)
                    for i in range(200)]  # fmt: skip

            async def all_answered() -> bool:
                return set(seen) == set(sent)

            await wait_for(all_answered, 30, what="every request answered, some by redelivery")
        finally:
            fleet.signal("stalled", signal.SIGCONT)

        async def late_replies_came() -> bool:  # the woken worker answers what it held, late
            return results.duplicates > 0

        await wait_for(late_replies_came, 20, what="the stalled worker's late replies")
        reader.cancel()
    assert all(count == 1 for count in seen.values()), {k: v for k, v in seen.items() if v > 1}
