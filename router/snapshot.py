"""What the placement policy sees and decides: plain, immutable data, no I/O.

The router builds a :class:`Snapshot` each tick from the registry, worker heartbeats and the
stream's per-subject lag; :func:`router.policy.plan` turns it into :class:`Assignments`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "CPU", "CUDA", "GPU_HOST_SHARE", "Assignments", "Decision", "Footprint", "Lag", "LoadedUnit", "ModelVersion",
    "Snapshot", "Unit", "WorkerState",
]

# Device kinds a worker reports; a version's memory is measured (and planned) per kind.
CPU, CUDA = "cpu", "cuda"
# Host memory a replica on a GPU worker is planned with until measured, as a share of its declared memory:
# its weights live on the device; the host keeps the runtime's buffers (and the artifact while it loads).
GPU_HOST_SHARE = 0.25


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
class Footprint:
    """Memory one replica takes on a worker, in MiB: host (resident set) and GPU."""

    host_mb: int
    gpu_mb: int = 0

    def __str__(self) -> str:
        return f"{self.host_mb} MB" if not self.gpu_mb else f"{self.host_mb} MB host + {self.gpu_mb} MB GPU"


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """A registered model version as the policy needs it."""

    model: str
    version: str
    memory_mb: int  # declared (or estimated from the artifact): what a replica is planned with until measured
    min_replicas: int = 1
    max_replicas: int = 1
    priorities: tuple[str, ...] = ("high", "normal", "low")
    # priority → labels a worker must carry to serve it (e.g. {"high": {"tier": "fast"}}).
    placement: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # device kind → what workers measured after loading it there (host RSS and GPU memory deltas).
    measured: Mapping[str, Footprint] = field(default_factory=dict)

    def footprint(self, kind: str) -> Footprint:
        """What one replica is planned with on a worker of device ``kind``: measured there, else declared
        (all of it on the host of a CPU worker; on a GPU worker, on the device, and a share on the host)."""
        measured = self.measured.get(kind)
        if measured is not None:
            return measured
        if kind == CPU:
            return Footprint(self.memory_mb)
        return Footprint(max(1, round(self.memory_mb * GPU_HOST_SHARE)), self.memory_mb)


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
    memory_mb: int  # host memory budget for loaded models
    labels: Mapping[str, str] = field(default_factory=dict)
    loaded: tuple[LoadedUnit, ...] = ()
    cached: frozenset[tuple[str, str]] = frozenset()  # (model, version) artifacts on local disk
    failed: frozenset[tuple[str, str]] = frozenset()  # versions that failed to load here
    device: str = CPU  # device kind its models run on
    gpu_memory_mb: int = 0  # GPU memory budget for loaded models (0 on a CPU worker)


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
