"""The placement policy: a pure function of one tick's :class:`Snapshot` and the previous :class:`PolicyState`
to assignments, the next state, and every change made with its reason. Workers are chosen in :mod:`router.placement`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from router.placement import Choice, Evictable, Labels, Placement, labels_text, least_busy, units_of
from router.snapshot import Assignments, Decision, LoadedUnit, ModelVersion, Snapshot, Unit

__all__ = ["DEFAULT_CONFIG", "PolicyConfig", "PolicyState", "UnitState", "plan", "units_of"]


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Knobs of :func:`plan`; the defaults suit a router ticking about once a second."""

    target_lag_age_s: float = 0.5  # how long baseline-priority requests may wait (and a backlog may take to drain)
    upscale_delay_s: float = 1.0  # lag must persist this long before another replica (never for the first)
    urgent_pressure: float = 4.0  # a backlog this many times over its target scales at once: no blip is that big
    downscale_delay_s: float = 30.0  # quiet this long before a replica is removed
    idle_evict_after_s: float = 10.0  # unused this long (and nothing waiting) before a unit may be evicted
    load_grace_s: float = 30.0  # while new replicas load, lag does not add more (for at most this long)
    priority_weight: Mapping[str, float] = field(default_factory=lambda: {"high": 4.0, "normal": 2.0, "low": 1.0})
    baseline_priority: str = "normal"  # target_lag_age_s holds for this weight; heavier priorities get less
    upscale_smoothing: float = 0.5  # share of a proportional jump (backlog / drain rate) taken at once
    rps_smoothing_s: float = 5.0  # time constant of the moving average of completed requests per second
    quiet_lag_ratio: float = 0.5  # lag under this share of its target counts as none when scaling down
    downscale_utilisation: float = 0.7  # drop a replica only if the rest would then run under this share of peak

    def __post_init__(self) -> None:
        if self.target_lag_age_s <= 0 or any(w <= 0 for w in self.priority_weight.values()):
            raise ValueError("target_lag_age_s and every priority weight must be positive")

    def weight(self, priority: str) -> float:
        return self.priority_weight.get(priority, 1.0)

    def target_for(self, priority: str) -> float:
        return self.target_lag_age_s * self.weight(self.baseline_priority) / self.weight(priority)


DEFAULT_CONFIG = PolicyConfig()


@dataclass(frozen=True, slots=True)
class UnitState:
    """What the policy remembers about one unit between ticks."""

    replicas: int = 0  # replicas assigned at the end of the last tick
    lag_since: float | None = None  # lag over target seen continuously since (restarted by each scale-up)
    quiet_since: float | None = None  # no lag and spare capacity continuously since
    last_scale_up: float = -math.inf  # last time a replica was added
    last_scale_down: float = -math.inf
    rps: float = 0.0  # requests completed per second by all replicas, smoothed
    peak_rps: float = 0.0  # what one replica can complete per second: measured under lag, else the best seen
    seen_at: float | None = None  # snapshot time of the last update, for time-based smoothing
    unplaceable: bool = False  # already reported, so it is said once rather than every tick


@dataclass(frozen=True, slots=True)
class PolicyState:
    """Everything :func:`plan` carries from one tick to the next; start with ``PolicyState()``."""

    units: Mapping[Unit, UnitState] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Demand:
    """A unit's waiting requests, priorities weighed in (weight / baseline weight)."""

    messages: int = 0
    weighted: float = 0.0
    oldest_s: float = 0.0
    age_pressure: float = 0.0  # worst waiting time over its priority's target
    worst: str = ""  # the priority with that pressure


@dataclass(slots=True)
class _Usage:
    """What workers report for one unit: total rate, requests held, and each worker's report."""

    rps: float = 0.0
    in_flight: int = 0
    on: dict[str, LoadedUnit] = field(default_factory=dict)


@dataclass(slots=True)
class _Need:
    """One unit this tick: what it has and sees, its replica target, and why that differs from what it has."""

    unit: Unit
    required: Labels
    mv: ModelVersion
    live: list[str]  # workers holding it: the placement's own list, so it follows every add and remove
    lost: list[str]  # why replicas it had are gone (dead worker, failed load...), one entry each
    usage: _Usage
    demand: _Demand
    target: int = 0
    state: UnitState = field(default_factory=UnitState)
    action: str = "place"
    why: str = ""
    urgency: float = 0.0
    added: int = 0
    unplaceable: bool = False


def plan(
    snapshot: Snapshot, state: PolicyState, config: PolicyConfig = DEFAULT_CONFIG
) -> tuple[Assignments, PolicyState, list[Decision]]:
    """One tick: keep what still fits, scale each unit on its lag, place and evict, and say why."""
    placement = Placement(snapshot.workers, snapshot.models)
    decisions: list[Decision] = []
    units = {key: units_of(mv) for key, mv in snapshot.models.items()}
    lost = _keep(snapshot, units, placement, decisions)
    usage, idle = _usage(snapshot), _Usage()
    needs, resting = {}, {}
    for by_unit in units.values():
        for unit, required in by_unit.items():
            prev = state.units.get(unit)
            if _resting(snapshot, unit, prev, placement, lost, usage):
                resting[unit] = prev or UnitState()
            else:
                needs[unit] = _need(snapshot, unit, required, placement, lost.get(unit, []), usage.get(unit, idle),
                                    prev, config)  # fmt: skip
    for need in needs.values():
        _shrink(need, placement, decisions)

    def evictable(worker: str, unit: Unit) -> float | None:
        need = needs[unit]
        report = need.usage.on.get(worker)
        if report is None or report.in_flight > 0 or need.demand.messages > 0:
            return None  # never one in use
        if snapshot.now - report.last_used < config.idle_evict_after_s or len(need.live) <= need.mv.min_replicas:
            return None
        return report.last_used

    for need in sorted((n for n in needs.values() if len(n.live) < n.target), key=_placing_order):
        _grow(need, placement, snapshot.now, evictable, needs, decisions)
    next_state = PolicyState(resting | {u: _final(n, snapshot.now) for u, n in needs.items()})
    return placement.assignments(), next_state, decisions


def _keep(
    snapshot: Snapshot, units: Mapping[tuple[str, str], Mapping[Unit, Labels]], placement: Placement,
    decisions: list[Decision],
) -> dict[Unit, list[str]]:  # fmt: skip
    """Carry over current assignments that are still valid; return the replicas to re-place and why."""
    lost: dict[Unit, list[str]] = {}
    for worker, assigned in sorted(snapshot.assigned.items()):
        ws = snapshot.workers.get(worker)
        for unit in sorted(assigned, key=_order):
            required = units.get(unit.key, {}).get(unit)
            if required is None:
                gone = unit.key not in snapshot.models
                why = "model version deleted" if gone else "placement rules changed: priorities regrouped"
                if ws is not None:
                    decisions.append(Decision(unit.model, unit.version, "remove", why, worker))
            elif ws is None:
                lost.setdefault(unit, []).append(f"worker {worker} is gone")
            elif unit.key in ws.failed:
                lost.setdefault(unit, []).append(f"it failed to load on {worker}")
            elif not required <= ws.labels.items():
                lost.setdefault(unit, []).append(f"{worker} no longer carries {labels_text(required)}")
            elif unit.key in placement.held[worker]:
                why = "a worker holds one unit per version"
                decisions.append(Decision(unit.model, unit.version, "remove", why, worker))
            else:
                placement.add(worker, unit)
    for worker, unit, why in placement.shed_over_budget():
        decisions.append(Decision(unit.model, unit.version, "evict", why, worker))
        lost.setdefault(unit, []).append(f"evicted from {worker} for memory")
    return lost


def _usage(snapshot: Snapshot) -> dict[Unit, _Usage]:
    usage: dict[Unit, _Usage] = {}
    for worker in snapshot.workers.values():
        for report in worker.loaded:
            u = usage.setdefault(report.unit, _Usage())
            u.rps += report.rps
            u.in_flight += report.in_flight
            u.on[worker.id] = report
    return usage


def _demand(snapshot: Snapshot, unit: Unit, mv: ModelVersion, usage: _Usage, cfg: PolicyConfig) -> _Demand:
    baseline = cfg.weight(cfg.baseline_priority)
    messages, weighted, oldest, pressure, worst = 0, 0.0, 0.0, 0.0, ""
    for priority in mv.priorities:
        lag = snapshot.lag.get((unit.model, unit.version, priority)) if priority in unit.priorities else None
        if lag is None or lag.messages <= 0:
            continue
        messages += lag.messages
        # Lag counts stream messages; a message may be a bundle of requests, as the replicas saw lately.
        requests = lag.messages * max([1.0, *(r.per_message.get(priority, 1.0) for r in usage.on.values())])
        weighted += requests * cfg.weight(priority) / baseline
        oldest = max(oldest, lag.age_s)
        if lag.age_s / cfg.target_for(priority) > pressure or not worst:
            pressure, worst = lag.age_s / cfg.target_for(priority), priority
    return _Demand(messages, weighted, oldest, pressure, worst)


def _resting(
    snapshot: Snapshot, unit: Unit, prev: UnitState | None, placement: Placement, lost: Mapping[Unit, list[str]],
    usage: Mapping[Unit, _Usage],
) -> bool:  # fmt: skip
    """Scaled to zero, unused and unasked for: nothing to decide. Most units of a large mesh, most of the time."""
    if snapshot.models[unit.key].min_replicas or unit in usage or unit in lost or placement.replicas.get(unit):
        return False
    if prev is not None and (prev.replicas or prev.rps or prev.lag_since is not None or prev.unplaceable):
        return False
    lag = snapshot.lag
    return not any((m := lag.get((unit.model, unit.version, p))) and m.messages > 0 for p in unit.priorities)


def _need(
    snapshot: Snapshot, unit: Unit, required: Labels, placement: Placement, lost: list[str], usage: _Usage,
    prev: UnitState | None, cfg: PolicyConfig,
) -> _Need:  # fmt: skip
    mv = snapshot.models[unit.key]
    demand = _demand(snapshot, unit, mv, usage, cfg)
    need = _Need(unit, required, mv, placement.replicas.setdefault(unit, []), lost, usage, demand)
    n = prev.replicas if prev is not None else len(need.live) + len(lost)
    pending = sum(w not in usage.on for w in need.live)
    scaled = _scale(n, mv, need.demand, usage, pending, prev or UnitState(), cfg, snapshot.now)
    need.target, need.state, why, need.urgency = scaled
    need.unplaceable = need.state.unplaceable
    if why:
        need.action, need.why = ("scale_up" if need.target > n else "scale_down"), why
    elif need.target < len(need.live):
        need.action, need.why = "scale_down", f"{len(need.live)} replicas assigned, {need.target} wanted"
    elif need.target > mv.min_replicas:
        need.action, need.why = "replace", "restoring a lost replica"
    else:
        need.why = f"min_replicas {mv.min_replicas}"
    return need


def _scale(
    n: int, mv: ModelVersion, demand: _Demand, usage: _Usage, pending: int, prev: UnitState, cfg: PolicyConfig,
    now: float,
) -> tuple[int, UnitState, str, float]:  # fmt: skip
    """Target replicas for one unit, its updated state, the reason when it scaled, and its lag pressure."""
    lo, hi = mv.min_replicas, max(mv.min_replicas, mv.max_replicas)
    if n == lo and not demand.messages and not usage.on and not prev.rps and prev.lag_since is None:
        return n, prev, "", 0.0  # at rest, nothing to update: most scaled-to-zero models, most of the time
    dt = now - prev.seen_at if prev.seen_at is not None else math.inf
    rps = _smooth(prev.rps, usage.rps, dt, cfg.rps_smoothing_s)
    if n > hi:
        return hi, _state(prev, now, rps), f"above max_replicas {hi}", 0.0
    rate = max(rps, usage.rps)  # a rise in throughput counts at once, a fall only as the average decays
    pressure, drain = _pressure(demand, rate, cfg)
    if n == 0 and demand.messages > 0 and hi > 0:
        why = f"cold start: {demand.messages} requests waiting, no replica"
        return max(lo, 1), _state(prev, now, rps, lag_since=now), why, pressure
    lag_since = _since(prev.lag_since, now, pressure > 1)
    peak = _capacity(prev.peak_rps, usage, pressure > 1)
    held = pending > 0 and now - prev.last_scale_up < cfg.load_grace_s  # replicas still loading will drain it soon
    sustained = lag_since is not None and (now - lag_since >= cfg.upscale_delay_s or pressure >= cfg.urgent_pressure)
    if sustained and n < hi and not held:
        target = min(hi, n + _upscale_step(n, drain, demand, cfg))
        why = f"{_lag_text(demand, rate, drain, n, cfg)} → {target}"
        return target, _state(prev, now, rps, peak, lag_since=now), why, pressure
    utilisation = _utilisation_after(rate, peak, usage, n)
    quiet_since = _since(prev.quiet_since, now, _quiet(pressure, utilisation, cfg))
    if n > lo and quiet_since is not None and now - quiet_since >= cfg.downscale_delay_s:
        why = _quiet_text(now - quiet_since, rate, utilisation, n)
        return n - 1, _state(prev, now, rps, peak, lag_since, quiet_since=now), why, pressure
    return max(n, lo), _state(prev, now, rps, peak, lag_since, quiet_since), "", pressure


def _state(
    prev: UnitState, now: float, rps: float, peak: float | None = None, lag_since: float | None = None,
    quiet_since: float | None = None,
) -> UnitState:  # fmt: skip
    # Built directly rather than with dataclasses.replace: this runs for every unit on every tick.
    return UnitState(prev.replicas, lag_since, quiet_since, prev.last_scale_up, prev.last_scale_down, rps,
                     prev.peak_rps if peak is None else peak, now, prev.unplaceable)  # fmt: skip


def _since(since: float | None, now: float, condition: bool) -> float | None:
    """When a condition started holding without a break, or None while it does not hold."""
    return (now if since is None else since) if condition else None


def _upscale_step(n: int, drain: float, demand: _Demand, cfg: PolicyConfig) -> int:
    """Replicas to add: proportional to the backlog over what current replicas drain in time; one for age alone."""
    if drain < demand.age_pressure:
        return 1
    return max(1, math.ceil(n * (drain - 1) * cfg.upscale_smoothing))


def _quiet(pressure: float, utilisation_after: float, cfg: PolicyConfig) -> bool:
    """No lag to speak of, and one replica fewer would still leave headroom: the gap keeps it from flapping."""
    return pressure <= cfg.quiet_lag_ratio and utilisation_after < cfg.downscale_utilisation


def _capacity(peak: float, usage: _Usage, lagging: bool) -> float:
    """Requests per second one replica can complete: measured while lag keeps replicas busy, else the best seen."""
    if not usage.on:
        return peak
    if lagging:
        return usage.rps / len(usage.on)  # saturated, so this is the real figure, even if lower than before
    return max(peak, max(r.rps for r in usage.on.values()))


def _smooth(old: float, new: float, dt: float, tau: float) -> float:
    """Exponential moving average over time, so the result does not depend on the tick rate."""
    if tau <= 0 or not math.isfinite(dt):
        return new
    value = old + (1 - math.exp(-max(dt, 0.0) / tau)) * (new - old)
    return value if value >= 1e-3 or new > 0 else 0.0  # a decayed rate reaches zero, so the unit can rest


def _pressure(demand: _Demand, rps: float, cfg: PolicyConfig) -> tuple[float, float]:
    """How far lag is over target (1 = at target), and the backlog's share of it at the current rate."""
    drain = demand.weighted / (rps * cfg.target_lag_age_s) if rps > 0 else 0.0
    return max(demand.age_pressure, drain), drain


def _utilisation_after(rate: float, peak_rps: float, usage: _Usage, n: int) -> float:
    """Share of their capacity the replicas left after removing one would use (inf: unknown, or still needed)."""
    if n <= 1:
        return 0.0 if usage.rps == 0 and usage.in_flight == 0 else math.inf
    if peak_rps <= 0:
        return 0.0 if rate == 0 else math.inf
    return rate / (peak_rps * (n - 1))


def _lag_text(demand: _Demand, rps: float, drain: float, n: int, cfg: PolicyConfig) -> str:
    head = f"lag {demand.messages} msgs, oldest {demand.oldest_s:.1f} s"
    if drain >= demand.age_pressure:
        drain_s, target_s = drain * cfg.target_lag_age_s, cfg.target_lag_age_s
        cause = f"draining takes {drain_s:.1f} s at {rps:.0f} rps > {target_s:g} s target"
    else:
        target = cfg.target_for(demand.worst)
        cause = f"{demand.worst} waits {demand.age_pressure * target:.1f} s > {target:g} s target"
    return f"{head}: {cause} with {n} replica{'' if n == 1 else 's'}"


def _quiet_text(quiet_s: float, rps: float, utilisation: float, n: int) -> str:
    if n == 1:
        return f"idle for {quiet_s:.0f} s: no lag, no requests → 0"
    return f"quiet for {quiet_s:.0f} s: no lag, {rps:.1f} rps would use {utilisation:.0%} of {n - 1} replicas → {n - 1}"


def _placing_order(need: _Need) -> tuple[bool, bool, float, tuple[str, str, list[str]]]:
    """Who gets room first: units short of min_replicas, then those with no replica, then by weighted lag."""
    return (len(need.live) >= need.mv.min_replicas, bool(need.live), -need.urgency, _order(need.unit))


def _order(unit: Unit) -> tuple[str, str, list[str]]:
    return (unit.model, unit.version, sorted(unit.priorities))


def _shrink(need: _Need, placement: Placement, decisions: list[Decision]) -> None:
    on = need.usage.on
    while len(need.live) > need.target:
        worker = least_busy(need.live, placement, lambda w: on[w].in_flight if w in on else 0)
        placement.remove(worker, need.unit)
        decisions.append(Decision(need.unit.model, need.unit.version, "scale_down", need.why, worker))


def _grow(
    need: _Need, placement: Placement, now: float, evictable: Evictable, needs: Mapping[Unit, _Need],
    decisions: list[Decision],
) -> None:  # fmt: skip
    unit = need.unit
    while len(need.live) < need.target:
        action, why = ("replace", need.lost.pop(0)) if need.lost else (need.action, need.why)
        choice = placement.choose(unit, need.required, evictable)
        if not isinstance(choice, Choice):
            if not need.unplaceable:
                decisions.append(Decision(unit.model, unit.version, "unplaceable", f"{why}; {choice}"))
            need.unplaceable = True
            return
        for evicted, last_used in choice.evicted:
            gone = needs[evicted]
            gone.target = min(gone.target, len(gone.live))  # it was idle: not to come back this tick
            idle = f"idle {now - last_used:.0f} s, least recently used on {choice.worker}; room for {unit}"
            decisions.append(Decision(evicted.model, evicted.version, "evict", idle, choice.worker))
        placement.add(choice.worker, unit)
        need.added += 1
        need.unplaceable = False
        reason = f"{why}; on {choice.worker}: {choice.why}"
        decisions.append(Decision(unit.model, unit.version, action, reason, choice.worker))


def _final(need: _Need, now: float) -> UnitState:
    replicas, st = len(need.live), need.state
    # Said once: cleared only when a replica lands or nothing more is wanted, not each time a retry waits.
    unplaceable = need.unplaceable and (replicas < need.target or st.lag_since is not None)
    if replicas == st.replicas and not need.added and unplaceable == st.unplaceable:
        return st
    return replace(
        st, replicas=replicas, unplaceable=unplaceable, last_scale_up=now if need.added else st.last_scale_up,
        last_scale_down=now if replicas < st.replicas else st.last_scale_down,
    )  # fmt: skip
