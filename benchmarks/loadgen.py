"""Closed-loop load: N asyncio tasks each sending requests back to back, every request timed."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

__all__ = ["LoadResult", "closed_loop", "percentile_ms"]

# Stop a cell early rather than spin on a mesh that only answers with errors.
_MAX_ERRORS = 100


@dataclass(slots=True)
class LoadResult:
    concurrency: int
    window_s: float  # the measured window (after warm-up)
    completed: int  # requests that finished inside the window
    latencies_s: list[float]  # of requests started inside the window
    errors: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.completed / self.window_s if self.window_s > 0 else 0.0


def percentile_ms(latencies_s: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(latencies_s), q) * 1000) if latencies_s else float("nan")


async def closed_loop(
    send: Callable[[int], Awaitable[None]],
    concurrency: int,
    duration_s: float | None = None,
    requests: int | None = None,
    warmup_s: float = 0.0,
) -> LoadResult:
    """Run ``send(i)`` from ``concurrency`` tasks until ``duration_s`` has passed or ``requests`` were sent.

    ``i`` numbers requests from 0, so callers can pick distinct inputs and sample replies.
    """
    if (duration_s is None) == (requests is None):
        raise ValueError("give exactly one of duration_s and requests")
    counter = itertools.count()
    start = time.perf_counter()
    measure_from = start + warmup_s
    end = measure_from + duration_s if duration_s is not None else float("inf")
    latencies: list[float] = []
    completions: list[float] = []
    errors: list[str] = []

    async def client() -> None:
        while len(errors) < _MAX_ERRORS:
            t0 = time.perf_counter()
            i = next(counter)
            if t0 >= end or (requests is not None and i >= requests):
                return
            try:
                await send(i)
            except Exception as exc:  # counted and reported; the caller decides whether that is fatal
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            t1 = time.perf_counter()
            if t0 >= measure_from:
                latencies.append(t1 - t0)
            if measure_from <= t1 <= end:
                completions.append(t1)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    window = (end if duration_s is not None else time.perf_counter()) - measure_from
    return LoadResult(concurrency, window, len(completions), latencies, errors)
