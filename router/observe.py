"""Build the policy's Snapshot from the mesh's shared state: specs, heartbeats, lag, assignments."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from broker.connection import Connection
from broker.registry import Json, Registry
from router.footprints import FootprintBook
from router.lag import read_lag
from router.snapshot import CPU, Footprint, Lag, LoadedUnit, ModelVersion, Snapshot, Unit, WorkerState
from schemas.spec import ModelSpec

__all__ = ["STALE_AFTER_S", "observe", "unit_from_json", "unit_to_json"]

# Workers beat every second; one silent this long is treated as dead (its KV entry expires later).
STALE_AFTER_S = 3.0


def unit_to_json(unit: Unit) -> Json:
    return {"model": unit.model, "version": unit.version, "priorities": sorted(unit.priorities)}


def unit_from_json(raw: Json) -> Unit:
    return Unit(str(raw["model"]), str(raw["version"]), frozenset(raw["priorities"]))


def model_versions(
    specs: list[ModelSpec], measured: Mapping[tuple[str, str], Mapping[str, Footprint]] | None = None
) -> dict[tuple[str, str], ModelVersion]:
    """The policy's view of each registered version; ``measured``: (model, version) → device kind → footprint."""
    versions = {}
    for spec in specs:
        for version in spec.versions:
            versions[(spec.name, version)] = ModelVersion(
                model=spec.name, version=version, memory_mb=spec.memory_of(version),
                min_replicas=spec.min_replicas, max_replicas=spec.max_replicas,
                priorities=tuple(spec.priorities), placement=_placement(spec),
                measured=dict((measured or {}).get((spec.name, version), {})),
            )  # fmt: skip
    return versions


def _placement(spec: ModelSpec) -> dict[str, dict[str, str]]:
    """Worker labels each priority needs: the model's labels, plus the priority's own rule."""
    rules: dict[str, dict[str, str]] = {}
    for priority in spec.priorities:
        required = {**spec.labels, **spec.placement.get(priority, {})}
        if required:
            rules[priority] = required
    return rules


def worker_state(beat: dict[str, Any]) -> WorkerState:
    loaded = tuple(
        LoadedUnit(
            unit=Unit(m["model"], m["version"], frozenset(m["priorities"])),
            last_used=float(m.get("last_used", 0.0)),
            in_flight=int(m.get("in_flight", 0)),
            rps=float(m.get("rps", 0.0)),
            per_message={str(p): float(n) for p, n in (m.get("per_message") or {}).items()},
        )
        for m in beat.get("models", {}).values()
    )
    return WorkerState(
        id=beat["id"],
        memory_mb=int(beat.get("memory_mb", 0)),
        labels=dict(beat.get("labels", {})),
        loaded=loaded,
        cached=frozenset(_key(k) for k in beat.get("cached", [])),
        failed=frozenset(_key(k) for k in beat.get("failed", {}) if ":" in k),
        device=str((beat.get("device") or {}).get("kind", CPU)),
        gpu_memory_mb=int(beat.get("gpu_memory_mb") or 0),
    )


def _key(label: str) -> tuple[str, str]:
    model, _, version = label.rpartition(":")
    return (model, version)


Failures = dict[tuple[str, str], dict[str, str]]  # (model, version) → worker → why it failed to load


async def observe(
    conn: Connection, registry: Registry, now: float, book: FootprintBook | None = None
) -> tuple[Snapshot, Failures, Failures]:
    """The policy's snapshot, the load failures workers report, and the versions they hold that
    stopped answering their queue (both shown by ``models show``). ``book`` keeps measured memory
    across ticks (None: only what the heartbeats read now report)."""
    specs = await registry.list_specs()
    beats = await registry.heartbeats()
    book = FootprintBook() if book is None else book
    book.record(beats.values())
    book.forget((spec.name, version) for spec in specs for version in spec.versions)
    failures: Failures = {}
    stalls: Failures = {}
    for worker_id, beat in beats.items():
        if now - float(beat.get("time", 0.0)) < STALE_AFTER_S:
            # "retrying": failed, backoff over; placeable again, yet still failed as far as users can see.
            for label, reason in {**beat.get("failed", {}), **beat.get("retrying", {})}.items():
                failures.setdefault(_key(label), {})[worker_id] = reason
            for label, reason in (beat.get("stalled") or {}).items():
                stalls.setdefault(_key(label), {})[worker_id] = reason
    lag = await read_lag(conn.js, now)
    assigned = await registry.assignments()
    snapshot = Snapshot(
        now=now,
        models=model_versions(specs, book.by_version()),
        # Workers serving a fixed repository ignore assignments, so the policy leaves them out.
        workers={
            w: worker_state(b)
            for w, b in beats.items()
            if b.get("managed") and now - float(b.get("time", 0.0)) < STALE_AFTER_S
        },
        lag={k: Lag(v.messages, v.age_s) for k, v in lag.items()},
        assigned={w: frozenset(unit_from_json(u) for u in units) for w, units in assigned.items()},
    )
    return snapshot, failures, stalls
