"""How long one placement-policy tick takes on large synthetic meshes (seeded random lag, labels, memory).

Run: ``python benchmarks/bench_policy.py [--ticks N]``. Prints a table; the target is ≤ 50 ms per plan
for 1,000 models on 100 workers.
"""

# benchmarks/ is not an installed package, so the repository root goes on sys.path before router imports.
# ruff: noqa: E402
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse
import random
import statistics
import time
from dataclasses import dataclass

from router.policy import PolicyState, plan
from router.snapshot import Assignments, Lag, LoadedUnit, ModelVersion, Snapshot, WorkerState

TARGET_MS = 50.0
PRIORITIES = ("high", "normal", "low")


@dataclass(frozen=True, slots=True)
class Mesh:
    models: dict[tuple[str, str], ModelVersion]
    workers: list[WorkerState]  # without loaded units; each tick reports its assignments as loaded


def build_mesh(n_models: int, n_workers: int, rng: random.Random) -> Mesh:
    models = {}
    for i in range(n_models):
        rule = rng.random()
        placement = {"high": {"tier": "fast"}} if rule < 0.2 else {"low": {"tier": "cheap"}} if rule < 0.3 else {}
        lo = rng.choices([0, 1, 2], weights=[6, 3, 1])[0]
        mv = ModelVersion(f"model-{i}", "1", int(rng.lognormvariate(6.5, 0.8)) + 50, lo, lo + rng.randint(0, 3),
                          PRIORITIES, placement)  # fmt: skip
        models[(mv.model, mv.version)] = mv
    keys = list(models)
    workers = []
    for j in range(n_workers):
        labels = {"tier": rng.choice(["fast", "cheap"]), "zone": rng.choice("abc")}
        cached = frozenset(rng.sample(keys, min(len(keys), 20)))
        workers.append(WorkerState(f"worker-{j}", rng.choice([16_384, 32_768, 65_536]), labels, cached=cached))
    return Mesh(models, workers)


def tick_snapshot(mesh: Mesh, now: float, assigned: Assignments, rng: random.Random) -> Snapshot:
    """The mesh at ``now``: ~5% of subjects lagging, every assigned unit loaded and serving."""
    lag = {}
    for model, version in rng.sample(list(mesh.models), len(mesh.models) // 20):
        lag[(model, version, rng.choice(PRIORITIES))] = Lag(rng.randint(1, 400), rng.random() * 2)
    workers = {}
    for w in mesh.workers:
        loaded = tuple(
            LoadedUnit(u, now - rng.random() * 60, rng.choice([0, 0, 0, 1, 4]), rng.random() * 100)
            for u in sorted(assigned.get(w.id, ()))
        )
        workers[w.id] = WorkerState(w.id, w.memory_mb, w.labels, loaded, w.cached | {lu.unit.key for lu in loaded})
    return Snapshot(now, mesh.models, workers, lag, assigned)


def run(n_models: int, n_workers: int, ticks: int, seed: int = 1) -> dict[str, float]:
    rng = random.Random(seed)
    mesh = build_mesh(n_models, n_workers, rng)
    state, assigned = PolicyState(), Assignments()
    times, decisions = [], []
    for t in range(ticks + 1):
        snap = tick_snapshot(mesh, 1000.0 + t, assigned, rng)
        started = time.perf_counter()
        assigned, state, made = plan(snap, state)
        elapsed = (time.perf_counter() - started) * 1000
        if t == 0:
            first_ms, first_decisions = elapsed, len(made)  # everything placed from nothing
        else:
            times.append(elapsed)
            decisions.append(len(made))
    times.sort()
    return {"first_ms": first_ms, "first_decisions": first_decisions, "p50": statistics.median(times),
            "p99": times[min(len(times) - 1, int(len(times) * 0.99))], "decisions": statistics.mean(decisions),
            "replicas": sum(len(units) for units in assigned.values())}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ticks", type=int, default=50, help="steady ticks per mesh (after the first)")
    args = parser.parse_args()
    few = max(5, args.ticks // 5)  # the big meshes take a few hundred ms a tick
    meshes = [(1_000, 100, args.ticks), (10_000, 100, few), (10_000, 1_000, few)]
    print(f"{'models':>7} {'workers':>7} {'ticks':>5} {'first ms':>9} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'decisions/tick':>14} {'first decisions':>15} {'replicas':>8}")  # fmt: skip
    verdicts = []
    for n_models, n_workers, ticks in meshes:
        r = run(n_models, n_workers, ticks)
        print(f"{n_models:>7,} {n_workers:>7,} {ticks:>5} {r['first_ms']:>9.1f} {r['p50']:>8.1f} {r['p99']:>8.1f} "
              f"{r['decisions']:>14.1f} {r['first_decisions']:>15.0f} {r['replicas']:>8.0f}")  # fmt: skip
        if (n_models, n_workers) == (1_000, 100):
            verdicts.append(f"target p99 ≤ {TARGET_MS:.0f} ms for 1,000 models / 100 workers: "
                            f"{'PASS' if r['p99'] <= TARGET_MS else 'FAIL'} ({r['p99']:.1f} ms)")  # fmt: skip
    print(*verdicts, sep="\n")


if __name__ == "__main__":
    main()
