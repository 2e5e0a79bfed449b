"""The router process: one leader (KV lease) ticks the placement policy; standbys wait.

Each tick reads a snapshot, plans, writes the assignments that changed and each model's
status (replicas, lag, last decision and its reason). Workers never wait for the router:
with no leader they keep serving their current assignments.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import Counter, defaultdict
from typing import Any

from broker.connection import Connection
from broker.provision import wait_provisioned
from broker.registry import Json, Registry
from router.footprints import FootprintBook
from router.lease import Lease
from router.observe import Failures, observe, unit_to_json
from router.policy import PolicyConfig, PolicyState, plan
from router.shadow import ShadowTally, shadow_events
from router.snapshot import Assignments, Decision, Snapshot
from router.storage_watch import StorageWatch

__all__ = ["Router"]

log = logging.getLogger(__name__)

LEASE_KEY = "router"


class Router:
    def __init__(self, conn: Connection, router_id: str | None = None, config: PolicyConfig | None = None,
                 tick_s: float = 0.5) -> None:  # fmt: skip
        self.conn = conn
        self.id = router_id or f"router-{socket.gethostname()}-{os.getpid()}"
        self.config = config or PolicyConfig()
        self.tick_s = tick_s
        self.state = PolicyState()
        self.leading = False
        self._registry: Registry | None = None
        self._last_decisions: dict[tuple[str, str], Decision] = {}
        self._written: dict[str, Json] = {}  # status last written per model, to write only changes
        # What the metrics endpoint shows: the latest tick's view and decisions so far.
        self.last_snapshot: Snapshot | None = None
        self.last_assignments: Assignments = {}
        self.decision_counts: Counter[str] = Counter()
        # Every router tallies shadow reports, so that a new leader has them too; the leader
        # writes them into each model's status.
        self.shadow = ShadowTally()
        self.storage = StorageWatch(conn, self.id)
        self.footprints = FootprintBook()  # measured memory per model version and device kind

    async def open(self) -> Router:
        """Ready to tick: the mesh provisioned (by the admin step, not by routers) and its registry open."""
        await wait_provisioned(self.conn, f"router {self.id}")
        self._registry = await Registry.open(self.conn)
        return self

    async def run(self, stop: asyncio.Event) -> None:
        await self.open()
        lease = await Lease.open(self.conn, LEASE_KEY, self.id)
        tallying = asyncio.create_task(self._tally_shadow())
        # Every router, leading or not: a full disk also stops the lease from being renewed.
        watching = asyncio.create_task(self.storage.run(stop), name="storage-watch")
        try:
            while not stop.is_set():
                started = time.monotonic()
                leading = await lease.tick()
                if leading != self.leading:
                    log.info("%s is %s", self.id, "now the leader" if leading else "a standby")
                    self.leading = leading
                    self.state = PolicyState()  # a new term starts from what KV says, not stale memory
                    self._written.clear()
                if leading:
                    try:
                        await self.tick()
                    except Exception:
                        log.exception("router tick failed; next tick retries")
                await _sleep_until(stop, started + self.tick_s)
        finally:
            tallying.cancel()
            watching.cancel()
            await lease.release()

    async def _tally_shadow(self) -> None:
        async for event in shadow_events(self.conn):
            self.shadow.add(event)

    async def tick(self) -> list[Decision]:
        assert self._registry is not None
        snapshot, failures, stalls = await observe(self.conn, self._registry, time.time(), self.footprints)
        assignments, self.state, decisions = plan(snapshot, self.state, self.config)
        await self._write_assignments(snapshot, assignments)
        self.last_snapshot, self.last_assignments = snapshot, assignments
        self.decision_counts.update(d.action for d in decisions)
        for decision in decisions:
            log.info("%s:%s %s%s: %s", decision.model, decision.version, decision.action,
                     f" on {decision.worker}" if decision.worker else "", decision.reason)  # fmt: skip
            self._last_decisions[(decision.model, decision.version)] = decision
        await self._write_status(snapshot, assignments, failures, stalls)
        return decisions

    async def _write_assignments(self, snapshot: Snapshot, assignments: Assignments) -> None:
        assert self._registry is not None
        for worker_id in set(assignments) | set(snapshot.assigned):
            units = assignments.get(worker_id, frozenset())
            if units == snapshot.assigned.get(worker_id, frozenset()):
                continue
            if units or worker_id in snapshot.workers:
                await self._registry.put_assignment(worker_id, [unit_to_json(u) for u in sorted(units)])
            else:
                await self._registry.delete_assignment(worker_id)  # a dead worker with nothing left

    async def _write_status(
        self, snapshot: Snapshot, assignments: Assignments, failures: Failures, stalls: Failures
    ) -> None:
        assert self._registry is not None
        per_model: dict[str, dict[str, Json]] = defaultdict(dict)
        for (model, version), mv in snapshot.models.items():
            per_model[model][version] = _version_status(snapshot, assignments, model, version, mv.priorities,
                                                        self._last_decisions.get((model, version)))  # fmt: skip
            per_model[model][version]["failed"] = failures.get((model, version), {})
            per_model[model][version]["stalled"] = stalls.get((model, version), {})
        shadow = self.shadow.by_model()
        for model, versions in per_model.items():
            written: Json = {"versions": versions, **({"shadow": shadow[model]} if model in shadow else {})}
            if self._written.get(model) != written:
                await self._registry.put_status(model, {"updated": snapshot.now, "leader": self.id, **written})
                self._written[model] = written
        for model in [m for m in self._written if m not in per_model]:
            await self._registry.delete_status(model)
            del self._written[model]


def _version_status(snapshot: Snapshot, assignments: Assignments, model: str, version: str,
                    priorities: tuple[str, ...], decision: Decision | None) -> Json:  # fmt: skip
    assigned = sorted(w for w, units in assignments.items() if any(u.key == (model, version) for u in units))
    ready, rps = [], 0.0
    for worker in snapshot.workers.values():
        for loaded in worker.loaded:
            if loaded.unit.key == (model, version):
                ready.append(worker.id)
                rps += loaded.rps
    lag: dict[str, Any] = {}
    for priority in priorities:
        subject_lag = snapshot.lag.get((model, version, priority))
        lag[priority] = {"messages": subject_lag.messages if subject_lag else 0,
                         "age_s": round(subject_lag.age_s, 3) if subject_lag else 0.0}  # fmt: skip
    last = None
    if decision is not None:
        last = {"action": decision.action, "reason": decision.reason, "worker": decision.worker}
    return {"desired": assigned, "ready": sorted(ready), "lag": lag, "rps": round(rps, 2), "last_decision": last}


async def _sleep_until(stop: asyncio.Event, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), remaining)
