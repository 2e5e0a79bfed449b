"""What shadow traffic costs the callers: primary throughput and latency at concurrency 16 with
shadowing off, at 10% and at 100% of requests mirrored to a second version on the same worker,
and what the reports say (mirrored, agreement, the candidate's latency). A 90/10 split with no
shadow is measured too, to tell the cost of mirroring from that of a second version being busy.

Run from the repository root: ``python benchmarks/bench_shadow.py [--quick] [--rounds N]``.
"""

# ruff: noqa: E402
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
from dataclasses import dataclass, field

import numpy as np

from benchmarks.bench_mesh import Children
from benchmarks.loadgen import closed_loop, percentile_ms
from broker import Connection, NatsServer, Registry, Settings, provision
from broker.loop import run
from examples.build_models import build_identity_onnx
from router.shadow import shadow_events
from schemas.shadow import ShadowEvent
from servemesh import MeshClient
from servemesh.local import wait_workers_ready

MODEL, CONCURRENCY = "shadowed", 16
# "split": no shadow, 10% of the traffic served by version 2 instead: what a second busy version on
# the worker costs by itself, apart from mirroring.
MODES = {"off": 0.0, "10%": 10.0, "100%": 100.0, "split": -10.0}


@dataclass
class Cell:
    rps: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    events: list[ShadowEvent] = field(default_factory=list)
    sent: int = 0
    mirrored: int = 0


async def _cell(url: str, registry: Registry, percent: float, seconds: float, cell: Cell) -> None:
    route: dict[str, object] = {"weights": {"1": 1.0}}
    if percent < 0:
        route = {"weights": {"1": 100 + percent, "2": -percent}}
    elif percent:
        route["shadow"] = {"version": "2", "percent": percent}
    await registry.put_route(MODEL, route)
    async with await MeshClient.connect(url) as client:
        x = np.ones((1, 16), np.float32)

        async def send(i: int) -> None:
            cell.sent += 1
            await client.infer(MODEL, {"input": x}, timeout=30)

        result = await closed_loop(send, CONCURRENCY, duration_s=seconds, warmup_s=0.5)
        cell.mirrored += client._shadowing.book.mirrored
        deadline = asyncio.get_running_loop().time() + 30
        while client._shadowing.book.in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
    if result.errors:
        raise RuntimeError(f"{len(result.errors)} failed requests, e.g. {result.errors[0]}")
    cell.rps.append(result.throughput)
    cell.p50.append(percentile_ms(result.latencies_s, 50))
    cell.p99.append(percentile_ms(result.latencies_s, 99))


async def main(rounds: int, seconds: float) -> dict[str, Cell]:
    cells = {mode: Cell() for mode in MODES}
    children = Children()
    with tempfile.TemporaryDirectory(prefix="servemesh-shadow-") as tmp, NatsServer() as server:
        repo = Path(tmp) / "models"
        for version in ("1", "2"):
            build_identity_onnx(repo, MODEL, "float32", version=version, max_batch_size=64, max_delay_ms=1, shape=(16,))
        conn = await Connection.open(Settings.from_url(server.url))
        try:
            await provision(conn)
            registry = await Registry.open(conn)
            env = {**os.environ, "SERVEMESH_LOOP": "uvloop"}
            args = [sys.executable, "-m", "servemesh", "worker", "--models", str(repo), "--id", "w1"]
            args += ["--nats", server.url]
            with open(Path(tmp) / "worker.log", "ab") as log:
                children.add("w1", subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT))
            await wait_workers_ready(registry, ["w1"], 60)
            current: list[ShadowEvent] = []

            async def hear() -> None:
                async for event in shadow_events(conn):
                    current.append(event)

            hearing = asyncio.create_task(hear())
            for i in range(rounds):  # interleaved, so drift in the machine's load hits every mode alike
                for mode, percent in MODES.items():
                    await _cell(server.url, registry, percent, seconds, cells[mode])
                    await asyncio.sleep(0.2)  # the last reports are in flight on core NATS
                    cells[mode].events += current
                    current.clear()
                    print(f"round {i + 1}/{rounds} {mode:>5}: {cells[mode].rps[-1]:8,.0f} req/s", flush=True)
            hearing.cancel()
        finally:
            await conn.close()
            children.stop_all()
    return cells


def report(cells: dict[str, Cell]) -> None:
    base = statistics.median(cells["off"].rps)
    print(f"\nidentity model, concurrency {CONCURRENCY}, candidate version on the same worker; medians of rounds")
    print(f"{'shadow':<7} {'req/s':>8} {'vs off':>7} {'p50 ms':>7} {'p99 ms':>7} {'mirrored':>9} {'agree':>7} "
          f"{'cand p50':>9} {'cand p99':>9}")  # fmt: skip
    for mode, cell in cells.items():
        rps = statistics.median(cell.rps)
        compared = [e for e in cell.events if e.outcome in ("agree", "disagree")]
        agree = sum(e.outcome == "agree" for e in compared) / len(compared) if compared else float("nan")
        shadow_ms = [e.shadow_ms for e in compared if e.shadow_ms is not None]
        cand_p50, cand_p99 = (np.percentile(shadow_ms, (50, 99)) if shadow_ms else (float("nan"),) * 2)
        print(f"{mode:<7} {rps:8,.0f} {rps / base:7.2f} {statistics.median(cell.p50):7.2f} "
              f"{statistics.median(cell.p99):7.2f} {cell.mirrored / max(cell.sent, 1):8.1%} {agree:7.1%} "
              f"{cand_p50:9.2f} {cand_p99:9.2f}")  # fmt: skip
    print("mirrored: share of requests copied to the candidate; agree: of those both versions answered")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s cells")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rounds, seconds = (1, 2.0) if args.quick else (args.rounds, 5.0)
    report(run(main(rounds, seconds), "uvloop"))
