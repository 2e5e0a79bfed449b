"""Where replicas go: the assignment built during one tick, with memory budgets, labels, cached
artifacts, spreading and LRU eviction. Pure data, no I/O; :mod:`router.policy` drives it.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from router.snapshot import ModelVersion, Unit, WorkerState

__all__ = ["Choice", "Evictable", "Labels", "Placement", "labels_text", "least_busy", "units_of"]

Key = tuple[str, str]
Labels = frozenset[tuple[str, str]]
# (worker id, unit) → the unit's last use if it may be evicted there now, else None.
Evictable = Callable[[str, Unit], float | None]
_ANYWHERE: Labels = frozenset()


def units_of(mv: ModelVersion) -> dict[Unit, Labels]:
    """A version's units (its priorities grouped by identical label requirements) and their requirements."""
    if not mv.placement:  # the common case, and this runs for every version on every tick
        return {Unit(mv.model, mv.version, frozenset(mv.priorities)): _ANYWHERE}
    groups: dict[Labels, set[str]] = {}
    for priority in mv.priorities:
        groups.setdefault(frozenset(mv.placement.get(priority, {}).items()), set()).add(priority)
    return {Unit(mv.model, mv.version, frozenset(ps)): required for required, ps in groups.items()}


def labels_text(required: Labels) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(required))


def _workers_with(required: Labels) -> str:
    return f"worker with {labels_text(required)}" if required else "worker"


@dataclass(frozen=True, slots=True)
class Choice:
    """Where a replica went, why there, and what was evicted to make room (unit, last use)."""

    worker: str
    why: str
    evicted: tuple[tuple[Unit, float], ...] = ()


@dataclass(slots=True)
class _Group:
    """Workers carrying one label requirement, in a heap by memory used (entries go stale, not removed)."""

    workers: list[str]
    heap: list[tuple[float, int, str, int]] = field(default_factory=list)
    # Upper bound on the memory any member could offer even after evictions; valid for one epoch.
    room_bound: tuple[int, int] | None = None  # (epoch, MB)


class Placement:
    """Who holds what this tick; one unit per model version per worker, within each memory budget."""

    def __init__(self, workers: Mapping[str, WorkerState], models: Mapping[Key, ModelVersion]) -> None:
        self.workers = workers
        self.models = models
        self.used: dict[str, int] = dict.fromkeys(workers, 0)
        self.held: dict[str, dict[Key, Unit]] = {w: {} for w in workers}
        self.replicas: dict[Unit, list[str]] = {}
        self._stamp: dict[str, int] = dict.fromkeys(workers, 0)
        self._groups: dict[Labels, _Group] = {}
        self._member_of: dict[str, list[_Group]] = {w: [] for w in workers}
        self._cached: dict[Key, list[str]] = {}
        for w in sorted(workers):
            # A version still loaded (being drained) is as cheap to bring back as a cached one.
            for key in workers[w].cached | {lu.unit.key for lu in workers[w].loaded}:
                self._cached.setdefault(key, []).append(w)
        self._epoch = 0  # bumped whenever memory is freed, which invalidates room bounds

    def memory_of(self, unit: Unit) -> int:
        return self.models[unit.key].memory_mb

    def free_mb(self, worker: str) -> int:
        return self.workers[worker].memory_mb - self.used[worker]

    def fraction(self, worker: str) -> float:
        budget = self.workers[worker].memory_mb
        return self.used[worker] / budget if budget > 0 else 1.0

    def add(self, worker: str, unit: Unit) -> None:
        self.held[worker][unit.key] = unit
        self.used[worker] += self.memory_of(unit)
        self.replicas.setdefault(unit, []).append(worker)
        self._touch(worker)

    def remove(self, worker: str, unit: Unit) -> None:
        del self.held[worker][unit.key]
        self.used[worker] -= self.memory_of(unit)
        self.replicas[unit].remove(worker)
        self._epoch += 1
        self._touch(worker)

    def shed_over_budget(self) -> list[tuple[str, Unit, str]]:
        """Units workers give up because a budget shrank (or models grew), least recently used first, and why."""
        shed = []
        for worker, ws in self.workers.items():
            if self.free_mb(worker) >= 0:
                continue
            last_used = {lu.unit: lu.last_used for lu in ws.loaded}
            for unit in sorted(self.held[worker].values(), key=lambda u: (last_used.get(u, math.inf), u.key)):
                if self.free_mb(worker) >= 0:
                    break
                why = f"{worker} is over its memory budget ({self.used[worker]} MB > {ws.memory_mb} MB)"
                self.remove(worker, unit)
                shed.append((worker, unit, why))
        return shed

    def assignments(self) -> dict[str, frozenset[Unit]]:
        return {w: frozenset(units.values()) for w, units in self.held.items()}

    def _touch(self, worker: str) -> None:
        self._stamp[worker] += 1
        for group in self._member_of[worker]:
            heapq.heappush(group.heap, self._entry(worker))

    def _entry(self, worker: str) -> tuple[float, int, str, int]:
        # Least memory used first, then fewest units (spread), then id for a stable order.
        return (self.fraction(worker), len(self.held[worker]), worker, self._stamp[worker])

    def _group(self, required: Labels) -> _Group:
        group = self._groups.get(required)
        if group is None:
            members = [w for w, ws in self.workers.items() if required <= ws.labels.items()]
            group = _Group(members, [self._entry(w) for w in members])
            heapq.heapify(group.heap)
            for w in members:
                self._member_of[w].append(group)
            self._groups[required] = group
        return group

    def _open_to(self, worker: str, key: Key) -> bool:
        return key not in self.held[worker] and key not in self.workers[worker].failed

    def choose(self, unit: Unit, required: Labels, evictable: Evictable) -> Choice | str:
        """The best worker for one more replica of ``unit`` (evicting if need be), or why there is none."""
        group = self._group(required)
        if not group.workers:
            return f"no live {_workers_with(required)}"
        mem = self.memory_of(unit)
        bound = group.room_bound
        if bound is not None and bound[0] == self._epoch and mem > bound[1]:
            return self._no_room(mem, required, bound[1])
        worker = self._cached_worker(unit.key, mem, required) or self._least_loaded(group, unit.key, mem)
        if worker is not None:
            cached = " artifact cached," if worker in self._cached.get(unit.key, ()) else ""
            return Choice(worker, f"{cached} {self.fraction(worker):.0%} memory used".lstrip())
        return self._evict_for(group, unit, mem, required, evictable)

    def _cached_worker(self, key: Key, mem: int, required: Labels) -> str | None:
        fits = [
            (self.fraction(w), len(self.held[w]), w)
            for w in self._cached.get(key, ())
            if self.free_mb(w) >= mem and self._open_to(w, key) and required <= self.workers[w].labels.items()
        ]
        return min(fits)[2] if fits else None

    def _least_loaded(self, group: _Group, key: Key, mem: int) -> str | None:
        skipped, found = [], None
        while group.heap:
            entry = heapq.heappop(group.heap)
            worker = entry[2]
            if entry[3] != self._stamp[worker]:
                continue  # stale: a newer entry for this worker is in the heap
            if self.free_mb(worker) >= mem and self._open_to(worker, key):
                found = worker
                break
            skipped.append(entry)
        for entry in skipped:
            heapq.heappush(group.heap, entry)
        if found is not None:
            heapq.heappush(group.heap, self._entry(found))  # still current until add() touches it
        return found

    def _evict_for(self, group: _Group, unit: Unit, mem: int, required: Labels, evictable: Evictable) -> Choice | str:
        """Free room on one worker by evicting its least recently used idle units, oldest first overall."""
        candidates, bound = [], 0
        for w in group.workers:
            idle = [(last, w, u) for u in self.held[w].values() if (last := evictable(w, u)) is not None]
            bound = max(bound, self.free_mb(w) + sum(self.memory_of(u) for _, _, u in idle))
            if self._open_to(w, unit.key):
                candidates.extend(idle)
        freed: dict[str, list[tuple[Unit, float]]] = {}
        for last, w, u in sorted(candidates):
            freed.setdefault(w, []).append((u, last))
            if self.free_mb(w) + sum(self.memory_of(v) for v, _ in freed[w]) >= mem:
                for v, _ in freed[w]:
                    self.remove(w, v)
                return Choice(w, f"after evicting {', '.join(str(v) for v, _ in freed[w])}", tuple(freed[w]))
        group.room_bound = (self._epoch, bound)
        if mem > bound:
            return self._no_room(mem, required, bound)
        return self._why_not(group, unit, mem, required)

    def _no_room(self, mem: int, required: Labels, bound: int) -> str:
        return (f"needs {mem} MB; no {_workers_with(required)} has that much free even after "
                f"evicting idle models (at most {bound} MB)")  # fmt: skip

    def _why_not(self, group: _Group, unit: Unit, mem: int, required: Labels) -> str:
        failed = sum(unit.key in self.workers[w].failed for w in group.workers)
        holding = sum(unit.key in self.held[w] for w in group.workers)
        return (f"needs {mem} MB on one of {len(group.workers)} {_workers_with(required)}s: "
                f"{holding} already hold it, it failed to load on {failed}, the rest lack room")  # fmt: skip


def least_busy(replicas: Iterable[str], placement: Placement, in_flight: Callable[[str], int]) -> str:
    """The replica to give up first: the least busy, then the one on the fullest worker."""
    return min(replicas, key=lambda w: (in_flight(w), -placement.fraction(w), w))
