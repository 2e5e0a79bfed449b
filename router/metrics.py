"""Prometheus metrics of a router: lag per subject, replicas desired vs ready, decisions by action,
and shadow traffic (agreement and latency of candidate versions)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from router.service import Router

__all__ = ["router_metrics"]


class _RouterCollector(Collector):
    def __init__(self, router: Router) -> None:
        self.router = router

    def collect(self) -> Iterator[Metric]:
        leader = GaugeMetricFamily("servemesh_router_leader", "1 while this router holds the lease.")
        leader.add_metric([], 1 if self.router.leading else 0)
        yield leader
        decisions = CounterMetricFamily("servemesh_router_placement_decisions", "Placement changes by action.",
                                        labels=["action"])  # fmt: skip
        for action, count in sorted(self.router.decision_counts.items()):
            decisions.add_metric([action], count)
        yield decisions
        snapshot = self.router.last_snapshot
        if snapshot is None or not self.router.leading:
            return
        labels = ["model", "version", "priority"]
        lag_msgs = GaugeMetricFamily("servemesh_router_lag_messages", "Requests waiting per subject.", labels=labels)
        lag_age = GaugeMetricFamily("servemesh_router_lag_seconds", "Age of the oldest waiting request.", labels=labels)
        for (model, version, priority), lag in sorted(snapshot.lag.items()):
            lag_msgs.add_metric([model, version, priority], lag.messages)
            lag_age.add_metric([model, version, priority], lag.age_s)
        yield from (lag_msgs, lag_age)
        desired = Counter(u.key for units in self.router.last_assignments.values() for u in units)
        ready = Counter(lu.unit.key for w in snapshot.workers.values() for lu in w.loaded)
        want = GaugeMetricFamily("servemesh_router_replicas_desired", "Replicas assigned.", labels=["model", "version"])
        have = GaugeMetricFamily("servemesh_router_replicas_ready", "Replicas loaded.", labels=["model", "version"])
        for model, version in sorted(snapshot.models):
            want.add_metric([model, version], desired[(model, version)])
            have.add_metric([model, version], ready[(model, version)])
        yield from (want, have)
        yield from _shadow_metrics(self.router)


def _shadow_metrics(router: Router) -> Iterator[Metric]:
    labels = ["model", "version", "shadow_version"]
    outcomes = CounterMetricFamily("servemesh_shadow_requests", "Mirrored requests by outcome of the comparison.",
                                   labels=[*labels, "outcome"])  # fmt: skip
    agreement = GaugeMetricFamily("servemesh_shadow_agreement_ratio", "Share of compared replies that agreed.",
                                  labels=labels)  # fmt: skip
    latency = HistogramMetricFamily("servemesh_shadow_latency_seconds", "Client-side latency of mirrored requests "
                                    "that both versions answered, by side (primary or shadow).",
                                    labels=[*labels, "side"])  # fmt: skip
    for key, tally in sorted(router.shadow.tallies.items()):
        for outcome, count in sorted(tally.outcomes.items()):
            outcomes.add_metric([*key, outcome], count)
        compared = tally.outcomes["agree"] + tally.outcomes["disagree"]
        if compared:
            agreement.add_metric(list(key), tally.outcomes["agree"] / compared)
        for side, hist in tally.latency.items():
            latency.add_metric([*key, side], hist.cumulative(), hist.sum)
    yield from (outcomes, agreement, latency)


def router_metrics(router: Router) -> CollectorRegistry:
    """A registry whose every collection reads ``router`` as it is then (served by telemetry/endpoint.py)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_RouterCollector(router))
    return registry
