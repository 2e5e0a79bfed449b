"""Overload: a flood at 2× and 10× what one worker computes, with default settings. Is the excess
refused at once (429), does goodput stay at capacity, does high priority keep its latency?

Run from the repository root: ``python benchmarks/bench_overload.py [--flood-s 10] [--timeout 5]``.

First the worker's capacity is measured closed-loop (enough callers to keep its batches full), and
the load generator's own ceiling is shown beside it (an open-loop stream of requests the client
refuses itself, nothing sent). Then each cell sends requests open-loop, at a fixed rate whatever
happens to earlier ones, each with the client's default timeout, while a trickle of high-priority
requests measures what a latency-sensitive caller sees meanwhile.
"""

# examples/ and benchmarks/ are not installed packages, so the repository root goes on sys.path before they import.
# ruff: noqa: E402
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse
import asyncio
import json
import signal
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from benchmarks.loadgen import closed_loop, percentile_ms
from benchmarks.mesh_watch import wait_serving
from broker import Connection, NatsServer, Registry, Settings, provision
from examples.build_models import build_slow_onnx
from schemas.errors import MeshError
from servemesh import MeshClient
from servemesh.local import spawn_worker

MODEL, WORKER_ID, WIDTH = "heavy", "overload-1", 256
HIGH_RATE = 20.0  # high-priority requests per second during every cell


@dataclass
class Cell:
    name: str
    offered_per_s: float
    sent: int = 0
    answered: int = 0  # within their timeout, correct
    by_status: Counter[int] = field(default_factory=Counter)
    refusal_s: list[float] = field(default_factory=list)  # time to a 429
    expiry_s: list[float] = field(default_factory=list)  # time to a 504
    latency_s: list[float] = field(default_factory=list)  # answered requests
    answered_at: list[float] = field(default_factory=list)  # seconds into the flood
    high_latency_s: list[float] = field(default_factory=list)
    high_failed: int = 0
    window_s: float = 0.0
    achieved_per_s: float = 0.0  # what the generator really offered
    busy: float = 0.0  # share of the flood the worker's model was computing (its heartbeat's busy_s)

    @property
    def goodput(self) -> float:
        return sum(1 for t in self.answered_at if t <= self.window_s) / self.window_s

    def row(self, capacity: float, at_1x: float | None) -> dict[str, Any]:
        # Answers within the flood's window, per second of it: what the mesh delivered while flooded.
        goodput = self.goodput
        failed = sum(self.by_status.values())
        return {
            "cell": self.name, "offered/s": round(self.achieved_per_s), "sent": self.sent,
            "429 share": f"{self.by_status[429] / max(1, self.sent):.1%}",
            "p50 to 429 ms": round(percentile_ms(self.refusal_s, 50), 2) if self.refusal_s else "-",
            "504 share": f"{self.by_status[504] / max(1, self.sent):.1%}",
            "other errors": failed - self.by_status[429] - self.by_status[504],
            "goodput/s": round(goodput), "goodput/capacity": f"{goodput / capacity:.0%}",
            "goodput/1x": f"{goodput / at_1x:.0%}" if at_1x else "-",
            "p50 ok ms": round(percentile_ms(self.latency_s, 50), 1),
            "high p50 ms": round(percentile_ms(self.high_latency_s, 50), 1),
            "high p99 ms": round(percentile_ms(self.high_latency_s, 99), 1),
            "high failed": self.high_failed, "model busy": f"{self.busy:.0%}",
        }  # fmt: skip


def _inputs(i: int) -> dict[str, np.ndarray[Any, Any]]:
    return {"input": np.full((1, WIDTH), (i % 97) / 97, np.float32)}


async def capacity(client: MeshClient, seconds: float) -> float:
    async def send(i: int) -> None:
        await client.infer(MODEL, _inputs(i), timeout=30)

    result = await closed_loop(send, 64, duration_s=seconds, warmup_s=1.0)
    if result.errors:
        raise RuntimeError(f"capacity run failed: {result.errors[:3]}")
    return result.throughput


async def generator_ceiling(client: MeshClient, seconds: float) -> float:
    """Requests per second this process can offer open-loop when each is refused at once (an unknown
    priority: refused before anything is sent), i.e. the generator's own cost per request."""
    count = 0

    async def one() -> None:
        nonlocal count
        try:
            await client.infer(MODEL, _inputs(0), priority="none")
        except MeshError:
            count += 1

    return await _open_loop(one, 1e9, seconds) / seconds


async def _open_loop(call: Any, rate: float, seconds: float) -> int:
    """Start ``call()`` ``rate`` times per second for ``seconds`` (whatever earlier calls do); returns
    how many were started. Each tick starts what the elapsed time is owed, so slow ticks catch up."""
    started, tasks = 0, set()
    begin = time.perf_counter()
    while (now := time.perf_counter()) - begin < seconds:
        owed = min(int((now - begin) * rate) - started, 2000)
        for _ in range(owed):
            task = asyncio.ensure_future(call())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        started += max(0, owed)
        await asyncio.sleep(0.001)
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
    return started


async def _busy_s(registry: Registry) -> float:
    beat = (await registry.heartbeats())[WORKER_ID]
    return float(beat["models"][f"{MODEL}:1"]["stats"]["busy_s"])


async def flood(
    client: MeshClient, registry: Registry, name: str, rate: float, seconds: float, timeout: float
) -> Cell:
    cell = Cell(name, rate)
    busy_before = await _busy_s(registry)

    async def one() -> None:
        i = cell.sent
        cell.sent += 1
        t0 = time.perf_counter()
        try:
            out = await client.infer(MODEL, _inputs(i), timeout=timeout)
        except MeshError as err:
            cell.by_status[err.status] += 1
            (cell.refusal_s if err.status == 429 else cell.expiry_s if err.status == 504 else []).append(
                time.perf_counter() - t0
            )
            return
        if out["output"].shape != (1, WIDTH):
            raise AssertionError("wrong output shape")
        cell.answered += 1
        cell.latency_s.append(time.perf_counter() - t0)
        cell.answered_at.append(time.perf_counter() - begin)

    async def high() -> None:
        t0 = time.perf_counter()
        try:
            await client.infer(MODEL, _inputs(1), priority="high", timeout=timeout)
        except MeshError:
            cell.high_failed += 1
            return
        cell.high_latency_s.append(time.perf_counter() - t0)

    begin = time.perf_counter()
    sent, _ = await asyncio.gather(_open_loop(one, rate, seconds), _open_loop(high, HIGH_RATE, seconds))
    cell.window_s = seconds
    cell.achieved_per_s = sent / seconds
    await asyncio.sleep(1.5)  # a heartbeat or more after the last answer
    cell.busy = (await _busy_s(registry) - busy_before) / (time.perf_counter() - begin)
    return cell


def _print(rows: list[dict[str, Any]]) -> None:
    headers = list(rows[0])
    table = [[str(r[h]) for h in headers] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    for t in table:
        print("  ".join(c.rjust(w) for c, w in zip(t, widths, strict=True)))


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="servemesh-overload-") as tmp, NatsServer() as server:
        repo = Path(tmp) / "models"
        # ~10 ms per batch of 8 on one core: a capacity the generator can flood 10 times over.
        build_slow_onnx(repo, MODEL, d=WIDTH, repeats=args.repeats, max_batch_size=8, max_delay_ms=1)
        conn = await Connection.open(Settings.from_url(server.url))
        await provision(conn)
        worker = spawn_worker(server.url, repo, WORKER_ID, Path(tmp) / "worker.log")
        try:
            registry = await Registry.open(conn)
            await wait_serving(registry, worker, WORKER_ID, {f"{MODEL}:1"})
            async with await MeshClient.connect(server.url) as client:
                cap = await capacity(client, args.capacity_s)
                ceiling = await generator_ceiling(client, 2.0)
                print(f"capacity (closed loop, 64 callers): {cap:,.0f} req/s; "
                      f"generator ceiling (refused at once): {ceiling:,.0f} req/s", flush=True)  # fmt: skip
                cells = []
                for factor in args.factors:
                    name = f"{factor:g}x"
                    cells.append(await flood(client, registry, name, factor * cap, args.flood_s, args.timeout))
                    print(f"  {cells[-1].name}: done", flush=True)
                    await asyncio.sleep(args.timeout + 1)  # what is left in the queue expires or is answered
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
            await conn.close()
    at_1x = next((c.goodput for c in cells if c.name == "1x"), None)
    rows = [c.row(cap, at_1x) for c in cells]
    print(f"\nflood {args.flood_s:g} s per cell, request timeout {args.timeout:g} s (the client's default), "
          f"high priority at {HIGH_RATE:g} req/s throughout; capacity {cap:,.0f} req/s")  # fmt: skip
    _print(rows)
    if args.json_out:
        args.json_out.write_text(json.dumps({"capacity": cap, "ceiling": ceiling, "rows": rows,
                                             "cells": [asdict(c) for c in cells]}, default=str))  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flood-s", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=5.0, help="each request's timeout (the client's default)")
    parser.add_argument("--capacity-s", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=1000, help="layers of the model: its cost per batch")
    # 1x: offered exactly the closed-loop capacity, open-loop; what an open-loop generator on this
    # machine gets without overload, the fair base for the flooded cells.
    parser.add_argument("--factors", type=float, nargs="+", default=[1.0, 2.0, 10.0])
    parser.add_argument("--json-out", type=Path)
    asyncio.run(main(parser.parse_args()))
