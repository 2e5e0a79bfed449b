"""BatchQueue decisions on a synthetic clock: fill, delay, priority, aging, deadlines."""

from __future__ import annotations

import pytest

from workers.batcher import BatchQueue

HIGH, NORMAL, LOW = 0, 1, 2


def test_batch_is_due_when_full_or_after_max_delay_from_the_first() -> None:
    q: BatchQueue[str] = BatchQueue(max_rows=4, max_delay_s=0.010)
    assert q.due_at() is None
    q.put("a", 1, NORMAL, now=1.000)
    q.put("b", 1, NORMAL, now=1.004)
    assert q.due_at() == pytest.approx(1.010)
    q.put("c", 2, NORMAL, now=1.005)
    assert q.due_at() == float("-inf")  # 4 rows: full
    assert q.take(1.005) == (["a", "b", "c"], [])
    assert len(q) == 0 and q.rows == 0


def test_take_respects_max_rows_and_keeps_the_rest() -> None:
    q: BatchQueue[int] = BatchQueue(max_rows=5, max_delay_s=0)
    for i in range(4):
        q.put(i, 2, NORMAL, now=0)
    assert q.take(0)[0] == [0, 1]
    assert q.take(0)[0] == [2, 3]


def test_a_request_larger_than_max_rows_still_leaves_alone() -> None:
    q: BatchQueue[str] = BatchQueue(max_rows=2, max_delay_s=0)
    q.put("big", 3, NORMAL, now=0)
    q.put("small", 1, NORMAL, now=0)
    assert q.take(0)[0] == ["big"]
    assert q.take(0)[0] == ["small"]


def test_priority_order_high_then_normal_then_low() -> None:
    q: BatchQueue[str] = BatchQueue(max_rows=3, max_delay_s=0, aging_s=10)
    q.put("low", 1, LOW, now=0.0)
    q.put("normal", 1, NORMAL, now=0.1)
    q.put("high1", 1, HIGH, now=0.2)
    q.put("high2", 1, HIGH, now=0.3)
    assert q.take(0.3)[0] == ["high1", "high2", "normal"]
    assert q.take(0.3)[0] == ["low"]


def test_low_priority_is_not_starved_by_a_stream_of_high() -> None:
    q: BatchQueue[str] = BatchQueue(max_rows=1, max_delay_s=0, aging_s=0.5)
    q.put("low", 1, LOW, now=0.0)
    served = []
    for step in range(100):
        now = step * 0.05
        q.put(f"high{step}", 1, HIGH, now=now)
        served.extend(q.take(now)[0])
    assert "low" in served
    # Waiting 2 × aging_s lifts low to high's level; it leaves within about that time.
    assert served.index("low") <= int(1.0 / 0.05) + 2


def test_expired_requests_are_returned_not_batched() -> None:
    q: BatchQueue[str] = BatchQueue(max_rows=4, max_delay_s=0)
    q.put("late", 1, NORMAL, now=0, deadline=0.5)
    q.put("ok", 1, NORMAL, now=0, deadline=5.0)
    q.put("forever", 1, LOW, now=0)
    batch, expired = q.take(1.0)
    assert expired == ["late"]
    assert batch == ["ok", "forever"]
    assert q.rows == 0


def test_batch_leaves_at_once_when_nothing_more_is_coming() -> None:
    q: BatchQueue[str] = BatchQueue(max_rows=8, max_delay_s=0.010)
    q.put("only", 1, NORMAL, now=1.0)
    assert q.due_at(more_coming=True) == pytest.approx(1.010)
    assert q.due_at(more_coming=False) == float("-inf")


def test_a_request_put_alone_leaves_in_a_batch_of_its_own_at_once() -> None:
    queue: BatchQueue[str] = BatchQueue(max_rows=8, max_delay_s=1.0)
    queue.put("a", 1, rank=1, now=0.0)
    queue.put("suspect", 1, rank=1, now=0.0, alone=True)
    queue.put("b", 1, rank=1, now=0.0)
    assert queue.due_at(more_coming=True) == float("-inf")  # no waiting for more to join it
    assert queue.take(0.0)[0] == ["a"]
    assert queue.take(0.0)[0] == ["suspect"]
    assert queue.take(0.0)[0] == ["b"]
