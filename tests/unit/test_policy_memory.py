"""The placement policy's two memory dimensions on synthetic snapshots: host and GPU budgets, measured figures
over declared ones, per-dimension LRU eviction and shedding, and the measured-memory book the router keeps."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from router.footprints import FootprintBook
from router.observe import model_versions, worker_state
from router.policy import PolicyState, plan, units_of
from router.snapshot import CPU, CUDA, Assignments, Footprint, Lag, LoadedUnit, ModelVersion, Unit, WorkerState
from schemas.spec import ModelSpec, VersionSpec
from tests.unit.test_policy import ALL, holders, only, snapshot, unit


def version(model: str, memory_mb: int = 100, lo: int = 1, hi: int = 1,
            measured: Mapping[str, Footprint] | None = None) -> ModelVersion:  # fmt: skip
    return ModelVersion(model, "1", memory_mb, lo, hi, ALL, {}, measured or {})


def gpu_worker(wid: str, memory_mb: int = 8000, gpu_mb: int = 1000, loaded: Sequence[LoadedUnit] = ()) -> WorkerState:
    return WorkerState(wid, memory_mb, {"gpu": "true"}, tuple(loaded), device=CUDA, gpu_memory_mb=gpu_mb)


def cpu_worker(wid: str, memory_mb: int = 8000, loaded: Sequence[LoadedUnit] = ()) -> WorkerState:
    return WorkerState(wid, memory_mb, {}, tuple(loaded))


def resident(assigned: Sequence[LoadedUnit]) -> frozenset[Unit]:
    return frozenset(lu.unit for lu in assigned)


# Footprints: declared until measured, per device kind -------------------------------------------------------------


def test_declared_memory_is_host_memory_on_a_cpu_worker_and_device_memory_on_a_gpu_worker() -> None:
    mv = version("m", 2000)
    assert mv.footprint(CPU) == Footprint(2000, 0)
    assert mv.footprint(CUDA) == Footprint(500, 2000)  # a quarter on the host until measured


def test_a_measurement_replaces_the_declaration_on_its_own_device_kind_only() -> None:
    mv = version("m", 2000, measured={CUDA: Footprint(180, 950)})
    assert mv.footprint(CUDA) == Footprint(180, 950)
    assert mv.footprint(CPU) == Footprint(2000, 0)


# Two budgets -------------------------------------------------------------------------------------------------------


def test_a_model_that_fits_the_cpu_worker_but_not_the_gpu_goes_to_the_cpu_worker() -> None:
    m = version("m", 2000)  # on the GPU worker: 500 MB host (fits) + 2000 MB GPU (does not)
    assignments, _, decisions = plan(snapshot(0, [m], [gpu_worker("g", gpu_mb=1000), cpu_worker("c")]), PolicyState())
    assert holders(assignments, unit("m")) == ["c"]
    assert only(decisions, "place")[0].worker == "c"


def test_a_model_needing_the_gpu_label_that_fits_no_gpu_is_unplaceable_and_says_both_figures() -> None:
    m = ModelVersion("m", "1", 2000, 1, 1, ALL, {p: {"gpu": "true"} for p in ALL})
    assignments, _, decisions = plan(snapshot(0, [m], [gpu_worker("g", gpu_mb=1000), cpu_worker("c")]), PolicyState())
    assert holders(assignments, unit("m")) == []
    [d] = only(decisions, "unplaceable")
    assert "needs 500 MB host + 2000 MB GPU" in d.reason and "worker with gpu=true" in d.reason
    assert "at most 8000 MB host + 1000 MB GPU" in d.reason


def test_gpu_replicas_are_counted_against_the_gpu_budget_and_host_against_the_host_budget() -> None:
    models = [version(f"m{i}", measured={CUDA: Footprint(100, 400)}) for i in range(3)]
    assignments, _, decisions = plan(snapshot(0, models, [gpu_worker("g", memory_mb=8000, gpu_mb=1000)]), PolicyState())
    assert len(assignments["g"]) == 2  # 2 × 400 MB GPU fit in 1000, a third does not; host has room for all
    [d] = only(decisions, "unplaceable")
    assert "needs 100 MB host + 400 MB GPU" in d.reason

    host_heavy = [version(f"h{i}", measured={CUDA: Footprint(3000, 10)}) for i in range(3)]
    assignments, _, _ = plan(snapshot(0, host_heavy, [gpu_worker("g", memory_mb=8000, gpu_mb=1000)]), PolicyState())
    assert len(assignments["g"]) == 2  # the host budget binds this time


def test_a_measured_footprint_lets_a_model_declared_too_large_be_placed() -> None:
    declared = version("m", 5000)
    assert plan(snapshot(0, [declared], [cpu_worker("c", memory_mb=1000)]), PolicyState())[0]["c"] == frozenset()
    measured = version("m", 5000, measured={CPU: Footprint(300)})
    assignments, _, _ = plan(snapshot(0, [measured], [cpu_worker("c", memory_mb=1000)]), PolicyState())
    assert holders(assignments, unit("m")) == ["c"]


def test_the_least_loaded_worker_is_judged_by_its_fuller_budget() -> None:
    filler = version("filler", measured={CUDA: Footprint(10, 900)})
    m = version("m", measured={CUDA: Footprint(10, 50)})
    workers = [gpu_worker("g1", gpu_mb=1000), gpu_worker("g2", gpu_mb=1000)]
    assigned: Assignments = {"g1": frozenset({unit("filler")})}  # g1's host is nearly empty, its GPU 90% full
    assignments, _, _ = plan(snapshot(0, [filler, m], workers, assigned=assigned), PolicyState())
    assert holders(assignments, unit("m")) == ["g2"]


# Eviction per dimension --------------------------------------------------------------------------------------------


def test_gpu_shortage_evicts_the_least_recently_used_idle_model_holding_gpu_memory() -> None:
    # "host" is the oldest idle model but holds no GPU memory: evicting it would not make room on the device.
    models = [version("host", lo=0, measured={CUDA: Footprint(3000, 0)}),
              version("old", lo=0, measured={CUDA: Footprint(50, 500)}),
              version("recent", lo=0, measured={CUDA: Footprint(50, 400)}),
              version("new", lo=0, measured={CUDA: Footprint(50, 500)})]  # fmt: skip
    loaded = [LoadedUnit(unit("host"), last_used=5), LoadedUnit(unit("old"), last_used=20),
              LoadedUnit(unit("recent"), last_used=40)]  # fmt: skip
    g = gpu_worker("g", memory_mb=8000, gpu_mb=1000, loaded=loaded)
    lag = {("new", "normal"): Lag(3, 0.1)}
    assignments, _, decisions = plan(snapshot(100, models, [g], lag, {"g": resident(loaded)}), PolicyState())
    assert assignments["g"] == {unit("host"), unit("recent"), unit("new")}
    [evict] = only(decisions, "evict")
    assert evict.model == "old" and "idle 80 s" in evict.reason


def test_host_shortage_on_a_gpu_worker_evicts_by_host_memory() -> None:
    models = [version("small", lo=0, measured={CUDA: Footprint(100, 300)}),
              version("big", lo=0, measured={CUDA: Footprint(3000, 100)}),
              version("new", lo=0, measured={CUDA: Footprint(2500, 100)})]  # fmt: skip
    loaded = [LoadedUnit(unit("small"), last_used=5), LoadedUnit(unit("big"), last_used=30)]
    g = gpu_worker("g", memory_mb=4000, gpu_mb=1000, loaded=loaded)
    lag = {("new", "normal"): Lag(3, 0.1)}
    assignments, _, decisions = plan(snapshot(100, models, [g], lag, {"g": resident(loaded)}), PolicyState())
    # "small" is older, but 100 MB of host does not make room for 2500; "big" does.
    assert [d.model for d in only(decisions, "evict")] == ["big"]
    assert assignments["g"] == {unit("small"), unit("new")}


def test_a_busy_model_is_never_evicted_for_gpu_room() -> None:
    models = [version("busy", lo=0, measured={CUDA: Footprint(50, 900)}),
              version("new", lo=0, measured={CUDA: Footprint(50, 500)})]  # fmt: skip
    loaded = [LoadedUnit(unit("busy"), last_used=5, in_flight=2)]
    g = gpu_worker("g", gpu_mb=1000, loaded=loaded)
    lag = {("new", "normal"): Lag(3, 0.1)}
    assignments, _, decisions = plan(snapshot(100, models, [g], lag, {"g": resident(loaded)}), PolicyState())
    assert assignments["g"] == {unit("busy")} and only(decisions, "evict") == []
    assert "needs 50 MB host + 500 MB GPU" in only(decisions, "unplaceable")[0].reason


def test_a_gpu_worker_over_its_gpu_budget_once_measured_sheds_its_lru_unit_which_moves() -> None:
    # Declared 400 MB each; measured at 700 MB of GPU, two no longer fit the 1000 MB budget.
    models = [version(m, 400, measured={CUDA: Footprint(50, 700)}) for m in ("a", "b")]
    loaded = [LoadedUnit(unit("a"), last_used=90), LoadedUnit(unit("b"), last_used=10)]
    workers = [gpu_worker("g1", gpu_mb=1000, loaded=loaded), gpu_worker("g2", gpu_mb=1000)]
    assigned: Assignments = {"g1": frozenset({unit("a"), unit("b")})}
    assignments, _, decisions = plan(snapshot(100, models, workers, assigned=assigned), PolicyState())
    assert assignments == {"g1": {unit("a")}, "g2": {unit("b")}}
    assert [(d.action, d.model, d.worker) for d in decisions] == [("evict", "b", "g1"), ("replace", "b", "g2")]
    assert "over its GPU memory budget (1400 MB > 1000 MB)" in decisions[0].reason


def test_random_mixed_meshes_respect_both_budgets_on_every_worker() -> None:
    rng = random.Random(11)
    for _ in range(20):
        models = []
        for i in range(30):
            measured = {}
            if rng.random() < 0.5:
                measured[CUDA] = Footprint(rng.randint(1, 400), rng.randint(0, 3000))
            if rng.random() < 0.5:
                measured[CPU] = Footprint(rng.randint(50, 2000))
            models.append(version(f"m{i}", rng.randint(50, 2000), rng.randint(0, 2), rng.randint(1, 3), measured))
        workers = [gpu_worker(f"g{i}", rng.randint(1000, 8000), rng.randint(1000, 16000)) for i in range(3)]
        workers += [cpu_worker(f"c{i}", rng.randint(1000, 8000)) for i in range(3)]
        lag = {(f"m{i}", rng.choice(ALL)): Lag(rng.randint(1, 300), rng.random() * 3) for i in range(0, 30, 2)}
        state, assigned = PolicyState(), Assignments()
        by_key = {(m.model, m.version): m for m in models}
        for t in range(4):
            assigned, state, decisions = plan(snapshot(float(t), models, workers, lag, assigned), state)
            for w in workers:
                fps = [by_key[u.key].footprint(w.device) for u in assigned[w.id]]
                assert sum(fp.host_mb for fp in fps) <= w.memory_mb
                assert sum(fp.gpu_mb for fp in fps) <= w.gpu_memory_mb
                assert all(units_of(by_key[u.key]) for u in assigned[w.id])
            assert all(d.reason for d in decisions)


# From heartbeats: the worker's device and budgets, and the book of measurements -----------------------------------


def _beat(wid: str, kind: str, measured: dict[str, dict[str, object]], **extra: object) -> dict[str, object]:
    return {"id": wid, "memory_mb": 4096, "device": {"kind": kind}, "measured": measured, **extra}


def test_a_heartbeat_gives_the_workers_device_kind_and_gpu_budget() -> None:
    ws = worker_state(_beat("g", "cuda", {}, gpu_memory_mb=72000, labels={"gpu": "true"}))
    assert (ws.device, ws.gpu_memory_mb, ws.memory_mb, ws.labels["gpu"]) == (CUDA, 72000, 4096, "true")
    old = worker_state({"id": "w", "memory_mb": 1000})  # a worker from before devices were reported
    assert (old.device, old.gpu_memory_mb) == (CPU, 0)


def test_the_book_keeps_the_latest_measurement_per_version_and_device_kind() -> None:
    book = FootprintBook()
    book.record([_beat("g1", "cuda", {"m:1": {"host_mb": 200, "gpu_mb": 900, "at": 10.0}}),
                 _beat("g2", "cuda", {"m:1": {"host_mb": 210, "gpu_mb": 950, "at": 20.0}}),
                 _beat("c1", "cpu", {"m:1": {"host_mb": 1200, "gpu_mb": 0, "at": 5.0},
                                     "m:2": {"host_mb": "lots"}})])  # fmt: skip
    book.record([_beat("g1", "cuda", {"m:1": {"host_mb": 200, "gpu_mb": 900, "at": 10.0}})])  # older: ignored
    assert book.by_version() == {("m", "1"): {CUDA: Footprint(210, 950), CPU: Footprint(1200, 0)}}
    book.forget([("other", "1")])
    assert book.by_version() == {}


def test_measured_figures_reach_the_policy_through_model_versions() -> None:
    spec = ModelSpec(name="m", versions={"1": VersionSpec(uri="file:///m/1/model.onnx", memory_mb=3000)})
    book = FootprintBook()
    book.record([_beat("g", "cuda", {"m:1": {"host_mb": 150, "gpu_mb": 1100, "at": 1.0}})])
    mv = model_versions([spec], book.by_version())[("m", "1")]
    assert mv.memory_mb == 3000  # declared, still used where nothing was measured
    assert (mv.footprint(CUDA), mv.footprint(CPU)) == (Footprint(150, 1100), Footprint(3000, 0))
