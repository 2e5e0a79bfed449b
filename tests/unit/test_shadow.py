"""Shadow traffic without a server: comparing replies, the client's book of mirrors, the router's tally."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest
from pydantic import ValidationError

from router.shadow import ShadowTally
from schemas.envelope import Reply, Timing, encode_error, encode_outputs
from schemas.errors import BadInput, DeadlineExceeded
from schemas.shadow import ShadowConfig, ShadowEvent, decode_event, encode_event
from servemesh.shadowing import ShadowBook, compare, verdict

CONFIG = ShadowConfig(version="2", percent=100)


def _reply(**outputs: np.ndarray) -> Reply:
    return Reply(outputs, Timing())


def test_floats_agree_within_tolerance_and_report_the_largest_difference() -> None:
    a = np.array([[1.0, 2.0, np.nan]], np.float32)
    assert compare({"y": a}, {"y": a + 1e-7}, rtol=1e-4, atol=1e-6)[0]
    agree, diff = compare({"y": a}, {"y": a + np.float32(0.5)}, rtol=1e-4, atol=1e-6)
    assert not agree and diff == pytest.approx(0.5)
    assert compare({"y": a}, {"y": a.astype(np.float64) + 1e-3}, rtol=1e-2, atol=0)[0]


def test_names_shapes_integers_and_strings_must_match_exactly() -> None:
    ints = np.array([1, 2, 3], np.int64)
    assert compare({"y": ints}, {"y": ints.copy()}, 0, 0) == (True, 0.0)
    assert compare({"y": ints}, {"y": ints + 1}, 1.0, 1.0)[0] is False  # tolerances are for floats
    assert compare({"y": ints}, {"z": ints}, 0, 0) == (False, None)
    assert compare({"y": ints}, {"y": ints.reshape(3, 1)}, 0, 0) == (False, None)
    words = np.array(["a", "b"], dtype=object)
    assert compare({"w": words}, {"w": words.copy()}, 0, 0)[0]
    assert not compare({"w": words}, {"w": np.array(["a", "c"], dtype=object)}, 0, 0)[0]


def test_verdict_names_what_happened() -> None:
    primary = _reply(y=np.zeros(2, np.float32))
    assert verdict(primary, _reply(y=np.zeros(2, np.float32)), CONFIG) == ("agree", 0.0, None)
    assert verdict(primary, _reply(y=np.ones(2, np.float32)), CONFIG) == ("disagree", 1.0, None)
    assert verdict(primary, BadInput("no"), CONFIG) == ("shadow_error", None, 400)
    assert verdict(primary, None, CONFIG) == ("shadow_timeout", None, None)
    assert verdict(DeadlineExceeded("late"), primary, CONFIG)[0] == "primary_error"


def test_config_bounds_and_event_wire_round_trip() -> None:
    with pytest.raises(ValidationError):
        ShadowConfig(version="2", percent=0)
    with pytest.raises(ValidationError):
        ShadowConfig(version="2", percent=101)
    event = ShadowEvent(model="m", version="1", shadow_version="2", outcome="agree", primary_ms=1.5, shadow_ms=2.0)
    assert decode_event(encode_event(event)) == event
    with pytest.raises(BadInput):
        decode_event(b"\xc1 not msgpack")
    with pytest.raises(BadInput):
        decode_event(encode_event(event).replace(b"agree", b"whoop"))


def test_draws_mirror_the_set_share_and_stop_at_the_limit() -> None:
    book = ShadowBook(lambda _: None, limit=10, rng=random.Random(7))
    draws = sum(book.draw(ShadowConfig(version="2", percent=25)) for _ in range(10_000))
    assert abs(draws - 2_500) < 5 * (10_000 * 0.25 * 0.75) ** 0.5


async def test_book_reports_once_both_replies_are_in_whatever_their_order() -> None:
    events: list[ShadowEvent] = []
    book = ShadowBook(events.append, limit=2)
    book.open("a", "m", "1", CONFIG, timeout=5)
    book.open("b", "m", "1", CONFIG, timeout=5)
    assert not book.draw(CONFIG) and book.skipped == 1  # full: the third is not mirrored
    timing = Timing()
    book.shadow_reply("a", encode_outputs({"y": np.ones(2, np.float32)}, timing))
    assert events == []
    book.primary_done("a", _reply(y=np.ones(2, np.float32)))
    book.primary_done("b", _reply(y=np.ones(2, np.float32)))
    book.shadow_reply("b", encode_error(BadInput("bad"), timing))
    book.shadow_reply("b", encode_outputs({"y": np.ones(2, np.float32)}, timing))  # a duplicate: ignored
    assert [(e.outcome, e.shadow_status) for e in events] == [("agree", None), ("shadow_error", 400)]
    assert all(e.primary_ms is not None and e.shadow_ms is not None for e in events)
    assert book.in_flight == 0


async def test_a_mirror_with_no_reply_is_reported_as_a_timeout() -> None:
    events: list[ShadowEvent] = []
    book = ShadowBook(events.append)
    book.open("a", "m", "1", CONFIG, timeout=-0.95)  # fires right after the grace period's start
    book.primary_done("a", _reply(y=np.zeros(1, np.float32)))
    await asyncio.sleep(0.2)
    assert [e.outcome for e in events] == ["shadow_timeout"] and book.in_flight == 0


def test_tally_counts_outcomes_agreement_and_latency_of_compared_requests() -> None:
    tally = ShadowTally()
    for i in range(10):
        outcome = "agree" if i < 7 else "disagree"
        tally.add(ShadowEvent(model="m", version="1", shadow_version="2", outcome=outcome,
                              primary_ms=float(i), shadow_ms=float(10 + i), max_abs_diff=0.1 * i))  # fmt: skip
    tally.add(ShadowEvent(model="m", version="1", shadow_version="2", outcome="shadow_error", shadow_status=500))
    tally.add(ShadowEvent(model="m", version="1", shadow_version="2", outcome="shadow_timeout", primary_ms=3.0))
    summary = tally.by_model()["m"]["1->2"]
    assert summary["mirrored"] == 12 and summary["compared"] == 10 and summary["agreement"] == 0.7
    assert summary["outcomes"] == {"agree": 7, "disagree": 3, "shadow_error": 1, "shadow_timeout": 1}
    assert summary["shadow_errors"] == {"500": 1}
    assert summary["max_abs_diff"] == pytest.approx(0.9)
    assert summary["latency_ms"]["primary"]["p50"] == 5.0 and summary["latency_ms"]["shadow"]["p99"] == 19.0
    assert tally.tallies[("m", "1", "2")].latency["shadow"].count == 10
