"""The client's admission rule on synthetic reports: refuse what the queue could not serve in time."""

from __future__ import annotations

import time

import pytest

from schemas.envelope import Timing
from schemas.errors import Overloaded
from servemesh.admission import HEADROOM, Admission

SUBJECT = "mesh.infer.m.1.normal"


def test_nothing_is_refused_without_a_report() -> None:
    assert Admission().check(SUBJECT, timeout=0.001) is None


def test_a_request_the_queue_could_not_serve_in_time_is_refused() -> None:
    admission = Admission()
    admission.heard(SUBJECT, Timing(worker="w1", ahead=400, rate=100.0))  # 4 s of work ahead
    assert admission.check(SUBJECT, timeout=10.0) is None
    refused = admission.check(SUBJECT, timeout=4.0)
    assert isinstance(refused, Overloaded) and refused.status == 429
    assert refused.data["expected_wait_s"] == pytest.approx(4.0) and "400 requests ahead" in refused.message


def test_rates_of_every_replica_heard_from_add_up() -> None:
    admission = Admission()
    admission.heard(SUBJECT, Timing(worker="w1", ahead=400, rate=100.0))
    admission.heard(SUBJECT, Timing(worker="w2", ahead=400, rate=100.0))  # two replicas: 2 s
    assert admission.check(SUBJECT, timeout=2.0 / HEADROOM + 0.01) is None
    assert admission.check(SUBJECT, timeout=2.0 / HEADROOM - 0.01) is not None


def test_requests_queued_since_the_report_count_too() -> None:
    admission = Admission()
    admission.heard(SUBJECT, Timing(worker="w1", ahead=0, rate=100.0))
    admitted = 0
    while admission.check(SUBJECT, timeout=1.0) is None:
        admission.queued(SUBJECT)
        admitted += 1
    assert admitted == int(HEADROOM * 1.0 * 100) + 1  # up to 0.8 s of work, then refused


def test_max_queue_bounds_the_requests_waiting() -> None:
    admission = Admission()
    admission.heard(SUBJECT, Timing(worker="w1", ahead=9, rate=0.0))  # rate not measured yet
    assert admission.check(SUBJECT, timeout=1.0, max_queue=10) is None
    admission.queued(SUBJECT)
    refused = admission.check(SUBJECT, timeout=1.0, max_queue=10)
    assert isinstance(refused, Overloaded) and refused.data["max_queue"] == 10


def test_an_old_report_refuses_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    admission = Admission()
    admission.heard(SUBJECT, Timing(worker="w1", ahead=10_000, rate=1.0))
    assert admission.check(SUBJECT, timeout=1.0) is not None
    later = time.monotonic() + 3.0
    monkeypatch.setattr(time, "monotonic", lambda: later)
    assert admission.check(SUBJECT, timeout=1.0) is None  # the queue it described has moved on
