"""Weighted routes and safe promotion, on plain numbers."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from servemesh.routes import choose, effective_weights


def test_weights_apply_as_set_when_every_version_is_ready() -> None:
    assert effective_weights({"1": 90, "2": 10}, {"1": 100}, {"1": 2, "2": 2}) == {"1": 90, "2": 10}


def test_a_new_version_gets_traffic_only_with_as_many_ready_replicas_as_the_old() -> None:
    assert effective_weights({"2": 100}, {"1": 100}, {"1": 2, "2": 1}) == {"1": 100.0}
    assert effective_weights({"1": 50, "2": 50}, {"1": 100}, {"1": 2, "2": 0}) == {"1": 100.0}
    assert effective_weights({"2": 100}, {"1": 100}, {"1": 2, "2": 2}) == {"2": 100}


def test_unknown_readiness_trusts_the_route_and_zero_weights_drop_out() -> None:
    assert effective_weights({"1": 0, "2": 100}, {"1": 100}, None) == {"2": 100}


def test_choose_follows_the_weights() -> None:
    rng = random.Random(7)
    counts = Counter(choose({"1": 70, "2": 30}, rng) for _ in range(10_000))
    assert counts["1"] / 10_000 == pytest.approx(0.7, abs=0.02)


def test_without_a_route_a_new_default_waits_for_its_replicas() -> None:
    from servemesh.routes import default_weights

    assert default_weights("2", ["1", "2"], {"1": 1, "2": 0}) == {"1": 1.0}
    assert default_weights("2", ["1", "2"], {"1": 1, "2": 1}) == {"2": 1.0}
    assert default_weights("2", ["1", "2"], None) == {"2": 1.0}  # no router, no readiness: trust the default
