"""Where replicas go: the assignment built during one tick, with memory budgets in two dimensions (host and
GPU), labels, cached artifacts, spreading and LRU eviction per dimension. Pure data, no I/O; :mod:`router.policy`
drives it.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from router.snapshot import CPU, Footprint, ModelVersion, Unit, WorkerState

__all__ = ["Choice", "Evictable", "Labels", "Placement", "labels_text", "least_busy", "units_of"]

Key = tuple[str, str]
Labels = frozenset[tuple[str, str]]
# (worker id, unit) → the unit's last use if it may be evicted there now, else None.
Evictable = Callable[[str, Unit], float | None]
_ANYWHERE: Labels = frozenset()
Bounds = dict[str, tuple[int, int]]  # device kind → (host MB, GPU MB) a worker of that kind could offer at most


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
    kinds: list[str]  # the device kinds among them
    heap: list[tuple[float, int, str, int]] = field(default_factory=list)
    # Upper bounds on the memory members could offer even after evictions, per device kind; valid for one epoch.
    room_bound: tuple[int, Bounds] | None = None


class Placement:
    """Who holds what this tick; one unit per model version per worker, within both of its memory budgets."""

    def __init__(self, workers: Mapping[str, WorkerState], models: Mapping[Key, ModelVersion]) -> None:
        self.workers = workers
        self.models = models
        self.used: dict[str, int] = dict.fromkeys(workers, 0)  # host MB
        self.used_gpu: dict[str, int] = dict.fromkeys(workers, 0)
        self._needs: dict[tuple[Key, str], Footprint] = {}
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

    def need(self, worker: str, key: Key) -> Footprint:
        """What one replica of ``key`` takes on ``worker``: measured on its device kind, else declared."""
        kind = self.workers[worker].device
        fp = self._needs.get((key, kind))
        if fp is None:
            fp = self._needs[(key, kind)] = self.models[key].footprint(kind)
        return fp

    def free_mb(self, worker: str) -> int:
        return self.workers[worker].memory_mb - self.used[worker]

    def free_gpu_mb(self, worker: str) -> int:
        return self.workers[worker].gpu_memory_mb - self.used_gpu[worker]

    def fits(self, worker: str, key: Key) -> bool:
        fp = self.need(worker, key)
        return self.free_mb(worker) >= fp.host_mb and self.free_gpu_mb(worker) >= fp.gpu_mb

    def fraction(self, worker: str) -> float:
        """The fuller of its two budgets (GPU only where it has one)."""
        ws = self.workers[worker]
        host = self.used[worker] / ws.memory_mb if ws.memory_mb > 0 else 1.0
        return max(host, self.used_gpu[worker] / ws.gpu_memory_mb) if ws.gpu_memory_mb > 0 else host

    def add(self, worker: str, unit: Unit) -> None:
        fp = self.need(worker, unit.key)
        self.held[worker][unit.key] = unit
        self.used[worker] += fp.host_mb
        self.used_gpu[worker] += fp.gpu_mb
        self.replicas.setdefault(unit, []).append(worker)
        self._touch(worker)

    def remove(self, worker: str, unit: Unit) -> None:
        fp = self.need(worker, unit.key)
        del self.held[worker][unit.key]
        self.used[worker] -= fp.host_mb
        self.used_gpu[worker] -= fp.gpu_mb
        self.replicas[unit].remove(worker)
        self._epoch += 1
        self._touch(worker)

    def _over(self, worker: str) -> str | None:
        """Why ``worker`` holds more than a budget allows, or None."""
        ws = self.workers[worker]
        if self.free_mb(worker) < 0:
            return f"{worker} is over its memory budget ({self.used[worker]} MB > {ws.memory_mb} MB)"
        if self.free_gpu_mb(worker) < 0:
            return f"{worker} is over its GPU memory budget ({self.used_gpu[worker]} MB > {ws.gpu_memory_mb} MB)"
        return None

    def shed_over_budget(self) -> list[tuple[str, Unit, str]]:
        """Units workers give up because a budget shrank (or models grew, measured), least recently used first,
        each freeing the dimension that is over; and why."""
        shed = []
        for worker, ws in self.workers.items():
            if self._over(worker) is None:
                continue
            last_used = {lu.unit: lu.last_used for lu in ws.loaded}
            for unit in sorted(self.held[worker].values(), key=lambda u: (last_used.get(u, math.inf), u.key)):
                why = self._over(worker)
                if why is None:
                    break
                fp = self.need(worker, unit.key)
                if not (fp.host_mb if self.free_mb(worker) < 0 else fp.gpu_mb):
                    continue  # frees nothing where the worker is over
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
            kinds = sorted({self.workers[w].device for w in members})
            group = _Group(members, kinds, [self._entry(w) for w in members])
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
        bound = group.room_bound
        if bound is not None and bound[0] == self._epoch and not self._may_fit(unit.key, bound[1]):
            return self._no_room(unit.key, required, bound[1])
        worker = self._cached_worker(unit.key, required) or self._least_loaded(group, unit.key)
        if worker is not None:
            cached = " artifact cached," if worker in self._cached.get(unit.key, ()) else ""
            return Choice(worker, f"{cached} {self.fraction(worker):.0%} memory used".lstrip())
        return self._evict_for(group, unit, required, evictable)

    def _cached_worker(self, key: Key, required: Labels) -> str | None:
        fits = [
            (self.fraction(w), len(self.held[w]), w)
            for w in self._cached.get(key, ())
            if self.fits(w, key) and self._open_to(w, key) and required <= self.workers[w].labels.items()
        ]
        return min(fits)[2] if fits else None

    def _least_loaded(self, group: _Group, key: Key) -> str | None:
        skipped, found = [], None
        while group.heap:
            entry = heapq.heappop(group.heap)
            worker = entry[2]
            if entry[3] != self._stamp[worker]:
                continue  # stale: a newer entry for this worker is in the heap
            if self.fits(worker, key) and self._open_to(worker, key):
                found = worker
                break
            skipped.append(entry)
        for entry in skipped:
            heapq.heappush(group.heap, entry)
        if found is not None:
            heapq.heappush(group.heap, self._entry(found))  # still current until add() touches it
        return found

    def _evict_for(self, group: _Group, unit: Unit, required: Labels, evictable: Evictable) -> Choice | str:
        """Free room on one worker by evicting its least recently used idle units, oldest first overall; a unit
        is evicted only for a dimension (host or GPU) the new one is short of and it frees."""
        candidates: list[tuple[float, str, Unit]] = []
        bounds: Bounds = {}
        for w in group.workers:
            idle = [(last, w, u) for u in self.held[w].values() if (last := evictable(w, u)) is not None]
            host = self.free_mb(w) + sum(self.need(w, u.key).host_mb for _, _, u in idle)
            gpu = self.free_gpu_mb(w) + sum(self.need(w, u.key).gpu_mb for _, _, u in idle)
            kind = self.workers[w].device
            was = bounds.get(kind, (host, gpu))
            bounds[kind] = (max(was[0], host), max(was[1], gpu))
            if self._open_to(w, unit.key):
                candidates.extend(idle)
        freed: dict[str, list[tuple[Unit, float]]] = {}
        room: dict[str, tuple[int, int]] = {}  # worker → (host, GPU) free once what was chosen there goes
        for last, w, u in sorted(candidates):
            want = self.need(w, unit.key)
            host, gpu = room.get(w, (self.free_mb(w), self.free_gpu_mb(w)))
            gives = self.need(w, u.key)
            if not ((host < want.host_mb and gives.host_mb) or (gpu < want.gpu_mb and gives.gpu_mb)):
                continue  # frees nothing the new unit is short of here
            freed.setdefault(w, []).append((u, last))
            room[w] = host, gpu = host + gives.host_mb, gpu + gives.gpu_mb
            if host >= want.host_mb and gpu >= want.gpu_mb:
                chosen = self._spare(w, want, freed[w])
                for v, _ in chosen:
                    self.remove(w, v)
                return Choice(w, f"after evicting {', '.join(str(v) for v, _ in chosen)}", tuple(chosen))
        group.room_bound = (self._epoch, bounds)
        if not self._may_fit(unit.key, bounds):
            return self._no_room(unit.key, required, bounds)
        return self._why_not(group, unit, required)

    def _spare(self, worker: str, want: Footprint, chosen: list[tuple[Unit, float]]) -> list[tuple[Unit, float]]:
        """Keep what need not go after all (an older small unit taken before the large one that made room),
        the most recently used first."""
        for item in reversed(chosen[:-1]):
            rest = [c for c in chosen if c is not item]
            gives = [self.need(worker, u.key) for u, _ in rest]
            host = self.free_mb(worker) + sum(g.host_mb for g in gives)
            if host >= want.host_mb and self.free_gpu_mb(worker) + sum(g.gpu_mb for g in gives) >= want.gpu_mb:
                chosen = rest
        return chosen

    def _may_fit(self, key: Key, bounds: Bounds) -> bool:
        """Whether a worker of some kind could offer what ``key`` needs there, even after evictions."""
        mv = self.models[key]
        return any((fp := mv.footprint(kind)).host_mb <= host and fp.gpu_mb <= gpu
                   for kind, (host, gpu) in bounds.items())  # fmt: skip

    def _need_text(self, key: Key, kinds: Iterable[str]) -> str:
        needs = {kind: self.models[key].footprint(kind) for kind in kinds}
        if len(needs) <= 1:
            return str(next(iter(needs.values()), self.models[key].footprint(CPU)))
        return ", ".join(f"{fp} on a {kind} worker" for kind, fp in sorted(needs.items()))

    def _no_room(self, key: Key, required: Labels, bounds: Bounds) -> str:
        most = ", ".join(f"{Footprint(*b)}" + (f" on a {kind} worker" if len(bounds) > 1 else "")
                         for kind, b in sorted(bounds.items()))  # fmt: skip
        return (f"needs {self._need_text(key, bounds)}; no {_workers_with(required)} has that much free even "
                f"after evicting idle models (at most {most})")  # fmt: skip

    def _why_not(self, group: _Group, unit: Unit, required: Labels) -> str:
        failed = sum(unit.key in self.workers[w].failed for w in group.workers)
        holding = sum(unit.key in self.held[w] for w in group.workers)
        return (f"needs {self._need_text(unit.key, group.kinds)} on one of {len(group.workers)} "
                f"{_workers_with(required)}s: {holding} already hold it, it failed to load on {failed}, "
                "the rest lack room")  # fmt: skip


def least_busy(replicas: Iterable[str], placement: Placement, in_flight: Callable[[str], int]) -> str:
    """The replica to give up first: the least busy, then the one on the fullest worker."""
    return min(replicas, key=lambda w: (in_flight(w), -placement.fraction(w), w))
