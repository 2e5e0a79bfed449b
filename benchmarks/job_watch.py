"""A batch job as a benchmark sees it from the client: polls of its progress and queue, this process's memory,
and the check that every result came back once and right."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks.bench_mesh import Incorrect, rss_mib
from broker import Connection
from router.lag import read_lag
from servemesh.jobs import Job

__all__ = ["JobRun", "Progress", "RssWatch", "follow_job", "verify_results"]

Array = np.ndarray[Any, Any]
RSS_EVERY_S = 0.05


@dataclass(frozen=True, slots=True)
class Progress:
    """One poll of a running job."""

    t: float  # seconds since submit_job
    submitted: int  # as the job record says (the submitter updates it about once a second)
    done: int
    queued: int  # items in the model's queue (stored, not yet acknowledged by the worker)


@dataclass(slots=True)
class JobRun:
    """One job, from submit_job to the state "done", with what the client saw on the way."""

    items: int
    seconds: float  # submit → status "done"
    queued_s: float  # submit → every item acknowledged by the stream (job.submitted())
    rss_mib: dict[str, float]  # this process: start, peak, end
    cpu: dict[str, float]
    progress: list[Progress]
    worker: dict[str, dict[str, Any]] = field(default_factory=dict)  # how the worker batched, by phase
    read_s: float = 0.0  # reading every result back after "done"
    alone_items_per_s: float = 0.0  # the submitter with no worker running
    alone_cpu: dict[str, float] = field(default_factory=dict)

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds

    def worker_rates(self) -> tuple[float | None, float | None]:
        """Items finished per second with items waiting: (while the submitter still ran, after it finished)."""
        # With items waiting the worker never starves, so the polls of an empty queue are left out.
        busy = [p for p in self.progress if p.queued > 0]
        return _slope([p for p in busy if p.t < self.queued_s]), _slope([p for p in busy if p.t >= self.queued_s])

    def queue_while_submitting(self) -> tuple[int, int]:
        """(fewest, most) items waiting in the model's queue at the polls before the last item was queued."""
        depths = [p.queued for p in self.progress[1:] if p.t < self.queued_s] or [0]
        return min(depths), max(depths)


def _slope(polls: list[Progress]) -> float | None:
    if len(polls) < 2 or polls[-1].t <= polls[0].t:
        return None
    return (polls[-1].done - polls[0].done) / (polls[-1].t - polls[0].t)


class RssWatch:
    """This process's RSS, sampled in the background from creation to ``stop()``: start, peak, end."""

    def __init__(self) -> None:
        self.start = self.peak = rss_mib(os.getpid())
        self._task = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, rss_mib(os.getpid()))
            await asyncio.sleep(RSS_EVERY_S)

    def stop(self) -> dict[str, float]:
        self._task.cancel()
        end = rss_mib(os.getpid())
        return {"start": self.start, "peak": max(self.peak, end), "end": end}


async def queue_depth(conn: Connection, model: str) -> int:
    """Items in ``model``'s queues, every version and priority."""
    lag = await read_lag(conn.js, time.time())
    return sum(v.messages for (m, _, _), v in lag.items() if m == model)


async def follow_job(
    conn: Connection, job: Job, model: str, total: int, t0: float, submitter: asyncio.Task[Any],
    poll_s: float, stall_s: float,
) -> list[Progress]:  # fmt: skip
    """Poll the job's status until "done", printing a line per ~10%; Incorrect on failures or a stall."""
    progress: list[Progress] = []
    next_mark, last_change = 0.1, time.monotonic()
    while True:
        status = await job.status()
        now = time.monotonic()
        if submitter.done() and submitter.exception() is not None:
            raise Incorrect(f"job {job.id}: submitting failed: {submitter.exception()!r}")
        if status.failed or status.state == "cancelled":
            raise Incorrect(f"job {job.id}: state {status.state}, {status.failed} item(s) failed")
        if not progress or status.done > progress[-1].done:
            last_change = now
        progress.append(Progress(now - t0, status.submitted, status.done, await queue_depth(conn, model)))
        if status.state == "done":
            return progress
        if now - last_change > stall_s:
            raise Incorrect(f"job {job.id}: no item finished for {stall_s:g} s ({status.done:,}/{total:,} done)")
        if status.done >= next_mark * total:
            print(f"  job {status.done / total:4.0%}: {status.done:>8,} done, {progress[-1].queued:>6,} in the queue,"
                  f" {now - t0:6.1f} s, {status.rate:8,.0f} items/s", flush=True)  # fmt: skip
            next_mark = (int(status.done / total * 10) + 1) / 10
        await asyncio.sleep(poll_s)


async def verify_results(
    job: Job, total: int, output: str, expected: Callable[[int], Array], sample_every: int
) -> float:
    """Every index 0..total-1 exactly once, no errors, sampled outputs equal to ``expected(index)``; seconds to read."""
    status = await job.status()
    if status.done != total or status.failed:
        # The stream counts stored messages: a duplicate result would show as done > total.
        raise Incorrect(f"job {job.id}: {status.done:,} results and {status.failed} failures stored for {total:,}")
    seen = bytearray(total)  # one byte per index keeps the check itself flat
    dup = out_of_range = errors = wrong = 0
    t0 = time.monotonic()
    async for result in job.results(follow=False):
        i = result.index
        if not 0 <= i < total:
            out_of_range += 1
            continue
        dup += seen[i]
        seen[i] = 1
        if result.error is not None or result.reply is None:
            errors += 1
        elif i % sample_every == 0 and not np.array_equal(result.reply.outputs[output], expected(i)):
            wrong += 1
    read_s = time.monotonic() - t0
    missing = total - sum(seen)
    if missing or dup or out_of_range or errors or wrong:
        raise Incorrect(f"job {job.id} results: {missing} missing, {dup} duplicated, {out_of_range} out of range,"
                        f" {errors} errors, {wrong} sampled outputs differ from their inputs")  # fmt: skip
    print(f"  results: {total:,} indices exactly once, {len(range(0, total, sample_every))} sampled outputs as"
          f" expected, read in {read_s:.1f} s", flush=True)  # fmt: skip
    return read_s
