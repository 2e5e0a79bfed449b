"""Weighted routes: how requests that name only a model are split across its versions.

A route holds the weights an operator set and the weights before them. Traffic moves to a
version new in the route only once it has as many ready replicas as the versions it replaces
(safe promotion); until then its share stays with the old ones. Pure functions, no I/O.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["choose", "default_weights", "effective_weights", "ready_counts"]


def effective_weights(
    weights: Mapping[str, float], previous: Mapping[str, float], ready: Mapping[str, int] | None
) -> dict[str, float]:
    """The weights to apply now. ``ready``: ready replicas per version (None: unknown, trust the route)."""
    wanted = {v: w for v, w in weights.items() if w > 0}
    old = {v: w for v, w in previous.items() if w > 0}
    if ready is None or not old:
        return wanted
    bar = max(ready.get(v, 0) for v in old)
    held = {v: w for v, w in wanted.items() if v not in old and ready.get(v, 0) < bar}
    effective = {v: w for v, w in wanted.items() if v not in held}
    if held:
        # The held share goes back to the versions being replaced, in their old proportions.
        spare, total_old = sum(held.values()), sum(old.values())
        for version, weight in old.items():
            effective[version] = effective.get(version, 0.0) + spare * weight / total_old
    return effective


def default_weights(target: str, versions: Iterable[str], ready: Mapping[str, int] | None) -> dict[str, float]:
    """Without a route: the default (else newest) version, promoted by the same rule as a route's
    target, so that registering a new version never sends traffic to it before it is ready."""
    serving = {v: 1.0 for v in versions if v != target and ready and ready.get(v)}
    return effective_weights({target: 1.0}, serving, ready)


def ready_counts(status: Mapping[str, Any] | None) -> dict[str, int] | None:
    """Ready replicas per version from the router's status document (None: no router has written one)."""
    if status is None:
        return None
    return {version: len(st.get("ready", [])) for version, st in status.get("versions", {}).items()}


def choose(weights: Mapping[str, float], rng: random.Random | None = None) -> str:
    """One version, drawn with probability proportional to its weight."""
    versions = list(weights)
    return (rng or random).choices(versions, weights=[weights[v] for v in versions])[0]
