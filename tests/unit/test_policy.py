"""The placement policy on synthetic snapshots: units, min replicas and cold starts, scaling up and down,
memory and eviction, worker choice, stability, removals, and the reasons it gives."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Mapping, Sequence

from router.policy import DEFAULT_CONFIG, PolicyConfig, PolicyState, plan, units_of
from router.snapshot import Assignments, Decision, Lag, LoadedUnit, ModelVersion, Snapshot, Unit, WorkerState

ALL = ("high", "normal", "low")
FAST, CHEAP = {"tier": "fast"}, {"tier": "cheap"}


def version(
    model: str, memory_mb: int = 100, lo: int = 1, hi: int = 1, placement: Mapping[str, Mapping[str, str]] | None = None
) -> ModelVersion:
    return ModelVersion(model, "1", memory_mb, lo, hi, ALL, placement or {})


def unit(model: str, priorities: Sequence[str] = ALL) -> Unit:
    return Unit(model, "1", frozenset(priorities))


def worker(
    wid: str, memory_mb: int = 1000, labels: Mapping[str, str] | None = None, loaded: Sequence[LoadedUnit] = (),
    cached: Sequence[str] = (), failed: Sequence[str] = (),
) -> WorkerState:  # fmt: skip
    return WorkerState(wid, memory_mb, labels or {}, tuple(loaded), frozenset((m, "1") for m in cached),
                       frozenset((m, "1") for m in failed))  # fmt: skip


def snapshot(
    now: float, models: Sequence[ModelVersion], workers: Sequence[WorkerState],
    lag: Mapping[tuple[str, str], Lag] | None = None, assigned: Assignments | None = None,
) -> Snapshot:  # fmt: skip
    """``lag`` is keyed by (model, priority); every model has version "1"."""
    return Snapshot(now, {(m.model, m.version): m for m in models}, {w.id: w for w in workers},
                    {(m, "1", p): v for (m, p), v in (lag or {}).items()}, assigned or {})  # fmt: skip


def holders(assignments: Assignments, u: Unit) -> list[str]:
    return sorted(w for w, units in assignments.items() if u in units)


def only(decisions: list[Decision], action: str) -> list[Decision]:
    return [d for d in decisions if d.action == action]


def loaded_as_assigned(
    assignments: Assignments, rps: float = 0.0, in_flight: int = 0, last_used: float = 0.0
) -> dict[str, list[LoadedUnit]]:
    """Each worker reports every unit it was assigned as loaded (as if loading were instant)."""
    return {w: [LoadedUnit(u, last_used, in_flight, rps) for u in sorted(units)] for w, units in assignments.items()}


# 1. Units ----------------------------------------------------------------------------------------------------------


def test_priorities_with_different_label_rules_form_separate_units() -> None:
    both = version("m", placement={"high": FAST, "low": CHEAP})
    assert set(units_of(both)) == {unit("m", ["high"]), unit("m", ["normal"]), unit("m", ["low"])}
    high_only = version("m", placement={"high": FAST})
    assert set(units_of(high_only)) == {unit("m", ["high"]), unit("m", ["normal", "low"])}
    assert set(units_of(version("m"))) == {unit("m")}


def test_each_unit_lands_on_a_worker_carrying_its_labels() -> None:
    m = version("m", placement={"high": FAST, "low": CHEAP})
    workers = [worker("fast", labels=FAST), worker("cheap", labels=CHEAP), worker("plain")]
    assignments, _, decisions = plan(snapshot(0, [m], workers), PolicyState())
    assert holders(assignments, unit("m", ["high"])) == ["fast"]
    assert holders(assignments, unit("m", ["low"])) == ["cheap"]
    assert len(holders(assignments, unit("m", ["normal"]))) == 1
    assert {d.action for d in decisions} == {"place"}


def test_unit_needing_labels_no_worker_has_is_reported_unplaceable() -> None:
    m = version("m", placement={"high": {"gpu": "a100"}})
    assignments, _, decisions = plan(snapshot(0, [m], [worker("w1")]), PolicyState())
    assert holders(assignments, unit("m", ["high"])) == []
    [d] = only(decisions, "unplaceable")
    assert d.reason == "min_replicas 1; no live worker with gpu=a100"


def test_replica_counts_follow_the_lag_of_each_units_own_priorities() -> None:
    m = version("m", lo=1, hi=3, placement={"high": FAST})
    high, rest = unit("m", ["high"]), unit("m", ["normal", "low"])
    assigned: Assignments = {"f0": frozenset({high}), "w0": frozenset({rest})}
    lag = {("m", "low"): Lag(messages=5, age_s=3.0)}
    state = PolicyState()
    for now in (0.0, 1.0):
        reports = loaded_as_assigned(assigned, rps=50, last_used=now)
        workers = [worker(w, labels=FAST if w.startswith("f") else {}, loaded=reports.get(w, []))
                   for w in ("f0", "f1", "w0", "w1")]  # fmt: skip
        assigned, state, decisions = plan(snapshot(now, [m], workers, lag, assigned), state)
    assert holders(assigned, high) == ["f0"]
    assert len(holders(assigned, rest)) == 2
    [d] = decisions
    assert d.action == "scale_up" and "low waits 3.0 s > 1 s target" in d.reason


# 2. min_replicas and scale to zero ---------------------------------------------------------------------------------


def test_min_replicas_are_placed_on_distinct_workers() -> None:
    m = version("m", lo=2, hi=4)
    assignments, state, decisions = plan(snapshot(0, [m], [worker(f"w{i}") for i in range(3)]), PolicyState())
    assert len(holders(assignments, unit("m"))) == 2
    assert all("min_replicas 2" in d.reason for d in only(decisions, "place"))
    assert state.units[unit("m")].replicas == 2


def test_min_replicas_beyond_the_workers_places_what_fits_and_says_why_once() -> None:
    m = version("m", lo=3, hi=3)
    snap = snapshot(0, [m], [worker("w1"), worker("w2")])
    assignments, state, decisions = plan(snap, PolicyState())
    assert holders(assignments, unit("m")) == ["w1", "w2"]
    [d] = only(decisions, "unplaceable")
    assert "2 already hold it" in d.reason
    snap = snapshot(1, [m], [worker("w1"), worker("w2")], assigned=assignments)
    assignments, state, decisions = plan(snap, state)
    assert holders(assignments, unit("m")) == ["w1", "w2"] and decisions == []  # not repeated every tick


def test_scaled_to_zero_model_stays_unloaded_until_a_request_then_starts_at_once() -> None:
    m = version("m", lo=0, hi=2)
    workers = [worker("w1")]
    assignments, state, decisions = plan(snapshot(0, [m], workers), PolicyState())
    assert holders(assignments, unit("m")) == [] and decisions == []
    lag = {("m", "low"): Lag(messages=3, age_s=0.01)}
    assignments, state, decisions = plan(snapshot(1, [m], workers, lag), state)
    assert holders(assignments, unit("m")) == ["w1"]
    [d] = decisions
    assert d.action == "scale_up" and "cold start" in d.reason and "3 requests" in d.reason


# 3. Scaling up on lag ----------------------------------------------------------------------------------------------


def _loaded_snapshot(now: float, m: ModelVersion, assigned: Assignments, lag: Mapping[tuple[str, str], Lag],
                     rps: float, loaded: Assignments | None = None) -> Snapshot:  # fmt: skip
    """Four workers; those in ``loaded`` (default: as assigned) report their units serving ``rps`` each."""
    reports = loaded_as_assigned(assigned if loaded is None else loaded, rps=rps, last_used=now)
    workers = [worker(f"w{i}", loaded=reports.get(f"w{i}", [])) for i in range(4)]
    return snapshot(now, [m], workers, lag, assigned)


def test_lag_older_than_target_adds_a_replica_only_after_upscale_delay() -> None:
    m = version("m", lo=1, hi=4)
    assigned: Assignments = {"w0": frozenset({unit("m")})}
    state = PolicyState()
    lag = {("m", "normal"): Lag(messages=5, age_s=1.4)}
    assignments, state, decisions = plan(_loaded_snapshot(0.0, m, assigned, lag, rps=100), state)
    assert holders(assignments, unit("m")) == ["w0"] and decisions == []
    assignments, state, decisions = plan(_loaded_snapshot(0.5, m, assigned, lag, rps=100), state)
    assert decisions == []
    assignments, state, decisions = plan(_loaded_snapshot(1.0, m, assigned, lag, rps=100), state)
    assert len(holders(assignments, unit("m"))) == 2
    [d] = decisions
    assert d.action == "scale_up" and d.worker != "w0"
    assert "oldest 1.4 s" in d.reason and "0.5 s target" in d.reason and "1 replica" in d.reason


def test_urgent_backlog_skips_the_upscale_delay_but_a_mild_one_waits() -> None:
    m = version("m", lo=1, hi=4)
    assigned: Assignments = {"w0": frozenset({unit("m")})}
    mild = {("m", "normal"): Lag(messages=5, age_s=1.4)}  # 2.8 times the 0.5 s target
    urgent = {("m", "normal"): Lag(messages=5, age_s=2.5)}  # 5 times: past urgent_pressure 4
    assignments, _, _ = plan(_loaded_snapshot(0.0, m, assigned, mild, rps=100), PolicyState())
    assert len(holders(assignments, unit("m"))) == 1
    assignments, _, decisions = plan(_loaded_snapshot(0.0, m, assigned, urgent, rps=100), PolicyState())
    assert len(holders(assignments, unit("m"))) == 2 and "oldest 2.5 s" in decisions[0].reason


def test_backlog_beyond_what_replicas_drain_scales_proportionally_within_max() -> None:
    m = version("m", lo=1, hi=3)
    assigned: Assignments = {"w0": frozenset({unit("m")})}
    lag = {("m", "normal"): Lag(messages=1000, age_s=0.1)}  # 10 s of work at 100 rps
    # 20 times the target: no blip is that big, so it scales without waiting for upscale_delay_s.
    assignments, _, decisions = plan(_loaded_snapshot(0.0, m, assigned, lag, rps=100), PolicyState())
    assert len(holders(assignments, unit("m"))) == 3  # more than +1, but bounded by max_replicas
    assert all("lag 1000 msgs" in d.reason and "draining takes 10.0 s" in d.reason for d in decisions)


def test_lag_in_bundles_counts_the_requests_they_carry() -> None:
    m = version("m", lo=1, hi=3)
    assigned: Assignments = {"w0": frozenset({unit("m")})}
    lag = {("m", "normal"): Lag(messages=20, age_s=0.1)}  # fresh, so only the backlog's size can count

    def replicas(per_message: float) -> tuple[int, list[Decision]]:
        report = LoadedUnit(unit("m"), 0.0, 0, 100.0, {"normal": per_message})
        snap = snapshot(0.0, [m], [worker("w0", loaded=[report]), worker("w1"), worker("w2")], lag, assigned)
        assignments, _, decisions = plan(snap, PolicyState())
        return len(holders(assignments, unit("m"))), decisions

    assert replicas(1.0)[0] == 1  # 20 requests: 0.2 s of work at 100 rps
    n, decisions = replicas(50.0)  # 20 bundles of 50: 10 s of work
    assert n == 3 and all("lag 20 msgs" in d.reason and "draining takes 10.0 s" in d.reason for d in decisions)


def test_high_priority_lag_counts_more_than_low() -> None:
    m = version("m", lo=1, hi=2)
    assigned: Assignments = {"w0": frozenset({unit("m")})}

    def replicas_after(priority: str, age_s: float) -> int:
        lag = {("m", priority): Lag(messages=2, age_s=age_s)}
        _, state, _ = plan(_loaded_snapshot(0.0, m, assigned, lag, rps=100), PolicyState())
        assignments, _, _ = plan(_loaded_snapshot(2.0, m, assigned, lag, rps=100), state)
        return len(holders(assignments, unit("m")))

    assert replicas_after("high", 0.3) == 2  # high's target is 0.25 s
    assert replicas_after("normal", 0.3) == 1
    assert replicas_after("low", 0.8) == 1  # low's target is 1.0 s
    assert replicas_after("low", 1.2) == 2


def test_no_further_replicas_while_new_ones_are_still_loading() -> None:
    m = version("m", lo=1, hi=4)
    lag = {("m", "normal"): Lag(messages=3, age_s=3.0)}  # old, but few: one more replica at a time
    first: Assignments = {"w0": frozenset({unit("m")})}
    assigned, state, _ = plan(_loaded_snapshot(0.0, m, first, lag, rps=10), PolicyState())
    assert len(holders(assigned, unit("m"))) == 2  # 6 times its target: at once
    for now in (2.0, 3.0, 5.0):  # only w0 reports it loaded: the new replica is still loading
        assigned, state, decisions = plan(_loaded_snapshot(now, m, assigned, lag, rps=10, loaded=first), state)
        assert len(holders(assigned, unit("m"))) == 2 and decisions == []
    assigned, state, decisions = plan(_loaded_snapshot(6.0, m, assigned, lag, rps=10), state)
    assert len(holders(assigned, unit("m"))) > 2  # loaded, and the lag is still there


def test_when_room_is_short_the_higher_priority_lag_gets_it() -> None:
    models = [version("batch", 600, lo=0), version("chat", 600, lo=0)]
    lag = {("batch", "low"): Lag(5, 0.4), ("chat", "high"): Lag(5, 0.4)}
    assignments, _, decisions = plan(snapshot(0, models, [worker("w1")], lag), PolicyState())
    assert assignments["w1"] == {unit("chat")}
    [d] = only(decisions, "unplaceable")
    assert d.model == "batch" and "needs 600 MB" in d.reason


# 4. Scaling down, with hysteresis ----------------------------------------------------------------------------------


def simulate(
    m: ModelVersion, demand_rps: Callable[[float], float], capacity_rps: float, ticks: int,
    config: PolicyConfig = DEFAULT_CONFIG,
) -> list[int]:  # fmt: skip
    """Closed loop, one tick a second: replicas serve up to ``capacity_rps`` each; the rest queues as lag."""
    assigned: Assignments = {}
    state, backlog, history = PolicyState(), 0.0, []
    for t in range(ticks):
        now = float(t)
        n = len(holders(assigned, unit("m")))
        offered = backlog + demand_rps(now)
        served = min(offered, capacity_rps * n)
        backlog = offered - served
        lag = {("m", "normal"): Lag(int(backlog), backlog / max(served, 1.0))} if backlog >= 1 else {}
        per_replica = served / n if n else 0.0
        reports = loaded_as_assigned(assigned, rps=per_replica, in_flight=int(per_replica > 0), last_used=now)
        workers = [worker(f"w{i}", loaded=reports.get(f"w{i}", [])) for i in range(8)]
        assigned, state, _ = plan(snapshot(now, [m], workers, lag, assigned), state, config)
        history.append(len(holders(assigned, unit("m"))))
    return history


def test_steady_load_settles_and_never_flaps() -> None:
    history = simulate(version("m", lo=1, hi=8), lambda now: 250.0, capacity_rps=100.0, ticks=400)
    settled = history[60:]
    assert min(settled) == max(settled) >= 3  # 250 rps needs three replicas of 100
    changes = sum(a != b for a, b in itertools.pairwise(history))
    assert changes <= 4


def test_identical_snapshots_keep_a_constant_replica_count() -> None:
    m = version("m", lo=1, hi=5)
    assigned: Assignments = {f"w{i}": frozenset({unit("m")}) for i in range(3)}
    lag = {("m", "normal"): Lag(messages=4, age_s=0.05)}  # steady, well under target
    state = PolicyState()
    for t in range(300):
        assigned, state, decisions = plan(_loaded_snapshot(float(t), m, assigned, lag, rps=80), state)
        assert len(holders(assigned, unit("m"))) == 3 and decisions == []


def test_quiet_unit_loses_one_replica_after_downscale_delay_then_waits_again() -> None:
    history = simulate(version("m", lo=1, hi=8), lambda now: 300.0 if now < 60 else 50.0, 100.0, ticks=300)
    assert history[59] >= 3
    assert history[60 + 25] == history[59]  # not before downscale_delay_s (30 s) of quiet
    assert history[-1] == 1  # 50 rps fits one replica of 100
    drops = [i for i in range(1, len(history)) if history[i] < history[i - 1]]
    assert all(b - a >= 30 for a, b in itertools.pairwise(drops))  # one step per delay
    assert all(history[i - 1] - history[i] == 1 for i in drops)


def test_scale_down_decision_names_the_worker_and_the_cause() -> None:
    m = version("m", lo=0, hi=2)
    assigned: Assignments = {"w0": frozenset({unit("m")})}
    state, decisions = PolicyState(), list[Decision]()
    for t in range(32):
        assigned, state, decisions = plan(_loaded_snapshot(float(t), m, assigned, {}, rps=0.0), state)
        if decisions:
            break
    [d] = decisions
    assert d.action == "scale_down" and d.worker == "w0" and "idle for 30 s" in d.reason
    assert holders(assigned, unit("m")) == []
    for t in range(32, 200):  # at rest for a while, then a request: back at once
        assigned, state, decisions = plan(_loaded_snapshot(float(t), m, assigned, {}, rps=0.0), state)
        assert decisions == []
    lag = {("m", "high"): Lag(1, 0.0)}
    assigned, state, decisions = plan(_loaded_snapshot(200.0, m, assigned, lag, rps=0.0), state)
    assert len(holders(assigned, unit("m"))) == 1 and "cold start" in decisions[0].reason


def test_lowering_max_replicas_removes_the_excess_at_once() -> None:
    m = version("m", lo=1, hi=1)
    assigned: Assignments = {"w0": frozenset({unit("m")}), "w1": frozenset({unit("m")})}
    reports = {"w0": [LoadedUnit(unit("m"), 0, 3, 10)], "w1": [LoadedUnit(unit("m"), 0, 0, 10)]}
    workers = [worker(w, loaded=r) for w, r in reports.items()]
    assignments, _, decisions = plan(snapshot(0, [m], workers, assigned=assigned), PolicyState())
    assert holders(assignments, unit("m")) == ["w0"]  # the idle replica goes, the busy one stays
    [d] = decisions
    assert (d.action, d.worker) == ("scale_down", "w1") and "above max_replicas 1" in d.reason


# 5. Memory budgets and eviction ------------------------------------------------------------------------------------


def test_replicas_never_exceed_a_workers_memory() -> None:
    models = [version(f"m{i}", memory_mb=600) for i in range(3)]
    assignments, _, decisions = plan(snapshot(0, models, [worker("w1"), worker("w2")]), PolicyState())
    assert sorted(len(u) for u in assignments.values()) == [1, 1]
    [d] = only(decisions, "unplaceable")
    assert "needs 600 MB" in d.reason


def _full_worker(now: float, resident: Sequence[LoadedUnit]) -> tuple[WorkerState, Assignments]:
    w = worker("w1", memory_mb=1000, loaded=resident)
    return w, {"w1": frozenset(r.unit for r in resident)}


def test_cold_start_evicts_the_least_recently_used_idle_model() -> None:
    models = [version("old", 400, lo=0), version("recent", 400, lo=0), version("new", 400, lo=0)]
    resident = [LoadedUnit(unit("old"), last_used=10), LoadedUnit(unit("recent"), last_used=50)]
    w, assigned = _full_worker(100, resident)
    lag = {("new", "normal"): Lag(2, 0.1)}
    assignments, _, decisions = plan(snapshot(100, models, [w], lag, assigned), PolicyState())
    assert assignments["w1"] == {unit("recent"), unit("new")}
    [evict] = only(decisions, "evict")
    assert (evict.model, evict.worker) == ("old", "w1") and "idle 90 s" in evict.reason
    assert only(decisions, "scale_up")[0].worker == "w1"


def test_a_model_in_use_or_with_waiting_requests_is_never_evicted() -> None:
    models = [version("busy", 500, lo=0), version("queued", 500, lo=0), version("new", 500, lo=0)]
    resident = [LoadedUnit(unit("busy"), last_used=10, in_flight=1), LoadedUnit(unit("queued"), last_used=10)]
    w, assigned = _full_worker(100, resident)
    lag = {("new", "normal"): Lag(2, 0.1), ("queued", "low"): Lag(1, 0.1)}
    assignments, _, decisions = plan(snapshot(100, models, [w], lag, assigned), PolicyState())
    assert assignments["w1"] == {unit("busy"), unit("queued")}
    assert only(decisions, "evict") == []
    [d] = only(decisions, "unplaceable")
    assert d.model == "new" and "cold start" in d.reason


def test_recently_used_and_min_replica_models_are_not_evicted() -> None:
    models = [version("recent", 500, lo=0), version("pinned", 500, lo=1), version("new", 500, lo=0)]
    resident = [LoadedUnit(unit("recent"), last_used=95), LoadedUnit(unit("pinned"), last_used=0)]
    w, assigned = _full_worker(100, resident)
    lag = {("new", "high"): Lag(1, 0.1)}
    assignments, _, decisions = plan(snapshot(100, models, [w], lag, assigned), PolicyState())
    assert assignments["w1"] == {unit("recent"), unit("pinned")}
    assert only(decisions, "evict") == [] and len(only(decisions, "unplaceable")) == 1


def test_a_worker_over_its_budget_sheds_its_least_recently_used_unit_which_moves() -> None:
    models = [version("a", 600), version("b", 600)]
    loaded = [LoadedUnit(unit("a"), last_used=90), LoadedUnit(unit("b"), last_used=10)]
    workers = [worker("w1", loaded=loaded), worker("w2")]
    assigned: Assignments = {"w1": frozenset({unit("a"), unit("b")})}  # its budget was cut to 1000 MB
    assignments, _, decisions = plan(snapshot(100, models, workers, assigned=assigned), PolicyState())
    assert assignments == {"w1": {unit("a")}, "w2": {unit("b")}}
    assert [(d.action, d.model, d.worker) for d in decisions] == [("evict", "b", "w1"), ("replace", "b", "w2")]
    assert "over its memory budget" in decisions[0].reason


# 6. Which worker -------------------------------------------------------------------------------------------------


def test_cached_artifact_beats_a_less_loaded_worker() -> None:
    filler = version("filler", 500)
    m = version("m", 100)
    workers = [worker("empty"), worker("busy", cached=["m"])]
    assigned: Assignments = {"busy": frozenset({unit("filler")})}
    assignments, _, decisions = plan(snapshot(0, [filler, m], workers, assigned=assigned), PolicyState())
    assert holders(assignments, unit("m")) == ["busy"]
    assert "artifact cached" in only(decisions, "place")[0].reason


def test_least_loaded_worker_wins_without_a_cache_and_failed_workers_are_skipped() -> None:
    filler = version("filler", 500)
    m = version("m", 100)
    workers = [worker("half"), worker("empty", failed=["m"]), worker("light")]
    assigned: Assignments = {"half": frozenset({unit("filler")})}
    assignments, _, _ = plan(snapshot(0, [filler, m], workers, assigned=assigned), PolicyState())
    assert holders(assignments, unit("m")) == ["light"]


def test_replicas_of_a_unit_spread_over_workers() -> None:
    models = [version(f"m{i}", 100, lo=2, hi=2) for i in range(4)]
    assignments, _, _ = plan(snapshot(0, models, [worker(f"w{i}") for i in range(4)]), PolicyState())
    for i in range(4):
        assert len(holders(assignments, unit(f"m{i}"))) == 2
    assert sorted(len(u) for u in assignments.values()) == [2, 2, 2, 2]


# 7. Stability and replacement --------------------------------------------------------------------------------------


def test_existing_assignments_stay_put_even_when_a_better_worker_exists() -> None:
    m = version("m", 100)
    workers = [worker("w1", memory_mb=200), worker("w2", memory_mb=10_000, cached=["m"])]
    assigned: Assignments = {"w1": frozenset({unit("m")})}
    assignments, _, decisions = plan(snapshot(0, [m], workers, assigned=assigned), PolicyState())
    assert holders(assignments, unit("m")) == ["w1"] and decisions == []


def test_units_of_a_dead_worker_are_replaced_elsewhere() -> None:
    m = version("m", 100, lo=2, hi=2)
    assigned: Assignments = {"w1": frozenset({unit("m")}), "gone": frozenset({unit("m")})}
    assignments, _, decisions = plan(snapshot(0, [m], [worker("w1"), worker("w2")], assigned=assigned), PolicyState())
    assert holders(assignments, unit("m")) == ["w1", "w2"] and "gone" not in assignments
    [d] = decisions
    assert d.action == "replace" and d.worker == "w2" and "worker gone is gone" in d.reason


def test_a_replica_that_failed_to_load_moves_to_another_worker() -> None:
    m = version("m", 100)
    workers = [worker("w1", failed=["m"]), worker("w2")]
    assignments, _, decisions = plan(snapshot(0, [m], workers, assigned={"w1": frozenset({unit("m")})}), PolicyState())
    assert holders(assignments, unit("m")) == ["w2"]
    assert decisions[0].action == "replace" and "failed to load on w1" in decisions[0].reason


def test_a_worker_that_lost_a_required_label_gives_the_unit_up() -> None:
    m = version("m", placement={"high": FAST})
    high = unit("m", ["high"])
    workers = [worker("w1", labels=CHEAP), worker("w2", labels=FAST), worker("w3")]
    assigned: Assignments = {"w1": frozenset({high}), "w3": frozenset({unit("m", ["normal", "low"])})}
    assignments, _, decisions = plan(snapshot(0, [m], workers, assigned=assigned), PolicyState())
    assert holders(assignments, high) == ["w2"]
    [d] = decisions
    assert d.action == "replace" and "w1 no longer carries tier=fast" in d.reason


# 8. Removal --------------------------------------------------------------------------------------------------------


def test_deleted_models_are_removed_with_a_reason() -> None:
    assigned: Assignments = {"w1": frozenset({unit("kept"), unit("deleted")})}
    assignments, state, decisions = plan(snapshot(0, [version("kept")], [worker("w1")], assigned=assigned),
                                         PolicyState())  # fmt: skip
    assert assignments["w1"] == {unit("kept")}
    assert decisions == [Decision("deleted", "1", "remove", "model version deleted", "w1")]
    assert unit("deleted") not in state.units


def test_changed_placement_rules_replace_the_old_unit_with_the_new_ones() -> None:
    m = version("m", placement={"high": FAST})
    workers = [worker("w1", labels=FAST, loaded=[LoadedUnit(unit("m"))]), worker("w2")]
    assignments, _, decisions = plan(snapshot(0, [m], workers, assigned={"w1": frozenset({unit("m")})}), PolicyState())
    assert holders(assignments, unit("m")) == []
    assert holders(assignments, unit("m", ["high"])) == ["w1"]
    assert len(holders(assignments, unit("m", ["normal", "low"]))) == 1
    assert only(decisions, "remove")[0].reason.startswith("placement rules changed")


def test_plan_is_a_pure_function_of_its_inputs() -> None:
    models = [version(f"m{i}", 300, lo=i % 2, hi=3) for i in range(6)]
    workers = [worker(f"w{i}", loaded=[LoadedUnit(unit(f"m{i}"), 1.0, 0, 5.0)], cached=[f"m{i + 1}"]) for i in range(4)]
    assigned: Assignments = {f"w{i}": frozenset({unit(f"m{i}")}) for i in range(4)}
    snap = snapshot(50, models, workers, {("m5", "high"): Lag(9, 2.0)}, assigned)
    state = plan(snap, PolicyState())[1]
    assert plan(snap, state) == plan(snap, state)


# Invariants on random snapshots ------------------------------------------------------------------------------------


def test_random_snapshots_respect_budgets_labels_failures_and_one_unit_per_version() -> None:
    rng = random.Random(7)
    for _ in range(30):
        models = [version(f"m{i}", rng.randint(50, 800), rng.randint(0, 2), rng.randint(1, 4),
                          {"high": FAST} if rng.random() < 0.3 else {}) for i in range(40)]  # fmt: skip
        workers = [worker(f"w{i}", rng.randint(500, 3000), rng.choice([FAST, CHEAP, {}]),
                          failed=[f"m{j}" for j in range(40) if rng.random() < 0.05]) for i in range(8)]  # fmt: skip
        lag = {(f"m{i}", rng.choice(ALL)): Lag(rng.randint(1, 500), rng.random() * 3) for i in range(0, 40, 3)}
        state, assigned = PolicyState(), Assignments()
        for t in range(5):
            assigned, state, decisions = plan(snapshot(float(t), models, workers, lag, assigned), state)
            by_key = {(m.model, m.version): m for m in models}
            for w in workers:
                units = assigned[w.id]
                assert sum(by_key[u.key].memory_mb for u in units) <= w.memory_mb
                assert len({u.key for u in units}) == len(units)
                assert not {u.key for u in units} & w.failed
                for u in units:
                    assert all(w.labels.get(k) == v for k, v in units_of(by_key[u.key])[u])
            assert all(d.reason for d in decisions)
