"""The leader router dies under load: the data plane never waits for it, and a standby takes the
lease and resumes placement."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from broker import Connection, Registry
from servemesh import MeshClient
from tests.conftest import wait_for
from tests.faults.conftest import holders, identity_repo
from tests.faults.fleet import Fleet
from tests.faults.load import Load
from tests.faults.report import record
from workers.repository import read_model


async def _leader(conn: Connection) -> str | None:
    kv = await conn.js.key_value("mesh-leader")
    try:
        entry = await kv.get("router")
    except Exception:  # no lease held at this instant
        return None
    return entry.value.decode() if entry.value else None


async def test_leader_router_killed_under_load(
    conn: Connection, client: MeshClient, fleet: Fleet, tmp_path: Path
) -> None:
    model = identity_repo(tmp_path / "repo", min_replicas=2, max_replicas=2)
    registry = await Registry.open(conn)
    await registry.put_spec(read_model(tmp_path / "repo" / model))
    fleet.router("r1")
    await wait_for(lambda: _is_leader(conn, "r1"), timeout=30, what="r1 leading")
    fleet.router("r2")
    fleet.worker("w1")
    fleet.worker("w2")

    async def placed() -> bool:
        return await holders(conn, model) == {"w1", "w2"}

    await wait_for(placed, timeout=60, what="the model placed on both workers")
    started = time.monotonic()
    async with Load(client, model, callers=16) as load:
        await load.answers(1000, 20, "answers before the kill")
        fleet.signal("r1", signal.SIGKILL)
        fleet.wait("r1")
        killed_at = time.monotonic()
        await wait_for(lambda: _is_leader(conn, "r2"), timeout=15, what="the standby taking the lease")
        takeover_s = time.monotonic() - killed_at

        async def new_leader_wrote_status() -> bool:
            return ((await registry.get_status(model)) or {}).get("leader") == "r2"

        await wait_for(new_leader_wrote_status, timeout=10, what="the new leader placing and reporting")
        await load.answers(1000, 20, "answers after the takeover")
    tally = load.tally
    record("leader router SIGKILL", tally, time.monotonic() - started, takeover_s=round(takeover_s, 1))
    assert tally.lost == 0 and tally.wrong == 0 and not tally.untyped
    assert tally.failed_total == 0, tally.errors
    assert await holders(conn, model) == {"w1", "w2"}  # the new leader kept the placement as it was


async def _is_leader(conn: Connection, router: str) -> bool:
    return await _leader(conn) == router
