"""What the placement policy sees and decides: plain, immutable data, no I/O.

The router builds a :class:`Snapshot` each tick from the registry, worker heartbeats and the
stream's per-subject lag; :func:`router.policy.plan` turns it into :class:`Assignments`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["Assignments", "Decision", "Lag", "LoadedUnit", "ModelVersion", "Snapshot", "Unit", "WorkerState"]


@dataclass(frozen=True, slots=True, order=True)
class Unit:
    """What a worker is assigned: one model version, serving a set of its priorities."""

    model: str
    version: str
    priorities: frozenset[str]

    @property
    def key(self) -> tuple[str, str]:
        return (self.model, self.version)

    def __str__(self) -> str:
        return f"{self.model}:{self.version}[{','.join(sorted(self.priorities))}]"


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """A registered model version as the policy needs it."""

    model: str
    version: str
    memory_mb: int
    min_replicas: int = 1
    max_replicas: int = 1
    priorities: tuple[str, ...] = ("high", "normal", "low")
    # priority → labels a worker must carry to serve it (e.g. {"high": {"tier": "fast"}}).
    placement: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Lag:
    """Requests waiting on one subject (model, version, priority)."""

    messages: int = 0
    age_s: float = 0.0  # age of the oldest waiting request


@dataclass(frozen=True, slots=True)
class LoadedUnit:
    """A unit a worker reports as loaded and serving."""

    unit: Unit
    last_used: float = 0.0  # wall-clock time of its latest request
    in_flight: int = 0  # requests held (queued locally or computing)
    rps: float = 0.0  # requests completed per second, recently
    # priority → requests per stream message it received lately (bundles carry several)
    per_message: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WorkerState:
    id: str
    memory_mb: int  # budget for loaded models
    labels: Mapping[str, str] = field(default_factory=dict)
    loaded: tuple[LoadedUnit, ...] = ()
    cached: frozenset[tuple[str, str]] = frozenset()  # (model, version) artifacts on local disk
    failed: frozenset[tuple[str, str]] = frozenset()  # versions that failed to load here


@dataclass(frozen=True, slots=True)
class Snapshot:
    now: float  # wall-clock seconds
    models: Mapping[tuple[str, str], ModelVersion]
    workers: Mapping[str, WorkerState]  # live workers only
    lag: Mapping[tuple[str, str, str], Lag]  # (model, version, priority) → lag
    assigned: Mapping[str, frozenset[Unit]] = field(default_factory=dict)  # current assignments


Assignments = dict[str, frozenset[Unit]]


@dataclass(frozen=True, slots=True)
class Decision:
    """One change the policy made, and why (shown by `servemesh models show` and logged)."""

    model: str
    version: str
    action: str  # "scale_up", "scale_down", "place", "evict", "replace", "remove", "unplaceable"
    reason: str
    worker: str | None = None
