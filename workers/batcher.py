"""BatchQueue: the dynamic batcher's decisions, with time as an input and no I/O.

A batch is due when it is full (``max_rows``), when nothing more is waiting upstream to join
it, or ``max_delay_s`` after its oldest request arrived. Requests leave in priority order
(high, normal, low), but every ``aging_s`` a request waits lifts it one priority level, so
low priority is slowed under load, never starved.
Requests past their deadline are handed back as expired and never reach the model. A request
put ``alone`` (one suspected of crashing its worker) leaves in a batch of its own, at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["BatchQueue", "Queued"]

T = TypeVar("T")


@dataclass(slots=True)
class Queued(Generic[T]):
    item: T
    rows: int
    rank: int  # 0 = highest priority
    arrived: float
    deadline: float | None
    alone: bool = False


class BatchQueue(Generic[T]):
    def __init__(self, max_rows: int, max_delay_s: float, levels: int = 3, aging_s: float = 0.5) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        self.max_rows = max_rows
        self.max_delay_s = max_delay_s
        self.aging_s = aging_s
        self._levels: list[deque[Queued[T]]] = [deque() for _ in range(levels)]
        self.rows = 0
        self._alone = 0  # queued requests that go alone: the batch ahead of them cannot grow past them

    def __len__(self) -> int:
        return sum(len(level) for level in self._levels)

    def put(
        self, item: T, rows: int, rank: int, now: float, deadline: float | None = None, alone: bool = False
    ) -> None:
        self._levels[rank].append(Queued(item, rows, rank, now, deadline, alone))
        self._alone += alone
        self.rows += rows

    def due_at(self, more_coming: bool = True) -> float | None:
        """When the next batch should leave: now if full or if nothing more is on its way
        (``more_coming`` false: waiting would only add latency), else oldest arrival + max delay."""
        heads = [level[0].arrived for level in self._levels if level]
        if not heads:
            return None
        if self.rows >= self.max_rows or not more_coming or self._alone:
            return float("-inf")
        return min(heads) + self.max_delay_s

    def take(self, now: float) -> tuple[list[T], list[T]]:
        """(the next batch, the requests whose deadline passed)."""
        expired = self._expire(now)
        batch: list[T] = []
        rows = 0
        while True:
            level = self._pick(now)
            if level is None:
                break
            head = level[0]
            if batch and (rows + head.rows > self.max_rows or head.alone):
                break
            level.popleft()
            self.rows -= head.rows
            self._alone -= head.alone
            rows += head.rows
            batch.append(head.item)
            if rows >= self.max_rows or head.alone:
                break
        return batch, expired

    def drain_all(self) -> list[T]:
        items = [q.item for level in self._levels for q in level]
        for level in self._levels:
            level.clear()
        self.rows = self._alone = 0
        return items

    def _pick(self, now: float) -> deque[Queued[T]] | None:
        best: deque[Queued[T]] | None = None
        best_key = (float("inf"), float("inf"))
        for level in self._levels:
            if level:
                head = level[0]
                key = (head.rank - (now - head.arrived) / self.aging_s, head.arrived)
                if key < best_key:
                    best, best_key = level, key
        return best

    def _expire(self, now: float) -> list[T]:
        expired: list[T] = []
        for i, level in enumerate(self._levels):
            if any(q.deadline is not None and q.deadline <= now for q in level):
                keep: deque[Queued[T]] = deque()
                for q in level:
                    if q.deadline is not None and q.deadline <= now:
                        expired.append(q.item)
                        self.rows -= q.rows
                        self._alone -= q.alone
                    else:
                        keep.append(q)
                self._levels[i] = keep
        return expired
