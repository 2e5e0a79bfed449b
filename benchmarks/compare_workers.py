"""Worker variants side by side: the same client load against workers started from different source trees or
settings, interleaved round by round so that drift in a shared machine's load hits every variant alike.

Run from the repository root:
``python benchmarks/compare_workers.py --variant base=/tmp/base-tree --variant new=.``
(``--variant t2=.:SERVEMESH_RUNTIME_THREADS=2`` adds settings).
A variant is ``NAME=SOURCE_DIR[:ENV=VALUE,...]``; the client is always this tree. Prints the median of each cell.
"""

# ruff: noqa: E402
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse
import os
import statistics
import tempfile
from dataclasses import dataclass

import numpy as np

from benchmarks.bench_mesh import Children, build_models
from benchmarks.cpu import CpuMeter
from benchmarks.loadgen import closed_loop
from benchmarks.mesh_watch import wait_serving
from broker import Connection, NatsServer, Registry, Settings, provision
from broker.loop import run
from servemesh import MeshClient
from servemesh.local import spawn_worker


def _io(pid: int) -> dict[str, int]:
    pairs = (line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return {k: int(v) for k, v in pairs}


def _stat(pid: int) -> tuple[int, int]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


CELLS = (("echo_id", 16, 64), ("mlp", 512, 64), ("mlp", 512, 128))


@dataclass(frozen=True)
class Variant:
    name: str
    source: Path
    env: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> Variant:
        name, _, rest = text.partition("=")
        source, _, env = rest.partition(":")
        pairs = dict(item.split("=", 1) for item in env.split(",") if item)
        return cls(name, Path(source).resolve(), pairs)


async def _round(variant: Variant, url: str, repo: Path, seconds: float, cells: list[tuple[str, int, int]]) -> dict:
    children = Children()
    env = {"SERVEMESH_LOOP": "uvloop", "PYTHONPATH": str(variant.source), **variant.env}
    conn = await Connection.open(Settings.from_url(url))
    out: dict[str, tuple[float, float]] = {}
    try:
        worker = children.add("worker", spawn_worker(url, repo, f"cmp-{variant.name}", None, env))
        beat = await wait_serving(await Registry.open(conn), worker, f"cmp-{variant.name}", {"echo_id:1", "mlp:1"})
        meter = CpuMeter({"client": os.getpid(), "worker": beat["pid"]})
        async with await MeshClient.connect(url) as client:
            for model, width, conc in cells:
                pool = [np.random.default_rng(i).standard_normal((1, width)).astype(np.float32) for i in range(64)]

                async def send(i: int, model: str = model, pool: list = pool) -> None:
                    await client.infer(model, {"input": pool[i % len(pool)]}, timeout=30)

                io0, st0 = _io(beat["pid"]), _stat(beat["pid"])
                meter.start()
                result = await closed_loop(send, conc, duration_s=seconds, warmup_s=0.5)
                cpu = meter.stop()
                io1, st1 = _io(beat["pid"]), _stat(beat["pid"])
                n = result.completed or 1
                writes, reads = (io1["syscw"] - io0["syscw"]) / n, (io1["syscr"] - io0["syscr"]) / n
                sys_share = (st1[1] - st0[1]) / max(1, (st1[0] - st0[0]) + (st1[1] - st0[1]))
                if result.errors:
                    raise RuntimeError(f"{variant.name} {model}@{conc}: {result.errors[:3]}")
                rps = result.throughput
                out[f"{model}@{conc}"] = (rps, cpu["worker"] / 100 / rps * 1e6)
                worker_us = out[f"{model}@{conc}"][1]
                print(f"  {variant.name:<10} {model}@{conc:<4} {rps:9,.0f} req/s  worker {worker_us:5.1f} "
                      f"µs CPU/req  client {cpu['client'] / 100 / rps * 1e6:5.1f}  machine {cpu['machine']:.0f}%"
                      f"  worker writes/req {writes:.2f} reads/req {reads:.2f} sys {sys_share:.0%}",
                      flush=True)  # fmt: skip
    finally:
        await conn.close()
        children.stop_all()
    return out


async def main(variants: list[Variant], rounds: int, seconds: float, cells: list[tuple[str, int, int]]) -> None:
    results: dict[str, dict[str, list[tuple[float, float]]]] = {v.name: {} for v in variants}
    with tempfile.TemporaryDirectory(prefix="servemesh-cmp-") as tmp, NatsServer() as server:
        repo = Path(tmp) / "models"
        build_models(repo)
        conn = await Connection.open(Settings.from_url(server.url))
        await provision(conn)
        await conn.close()
        for i in range(rounds):
            print(f"round {i + 1}/{rounds}", flush=True)
            order = variants if i % 2 == 0 else variants[::-1]
            for variant in order:
                for cell, value in (await _round(variant, server.url, repo, seconds, cells)).items():
                    results[variant.name].setdefault(cell, []).append(value)
    print(f"\n{'variant':<10} {'cell':<12} {'median req/s':>12} {'worker µs/req':>14}  runs")
    for name, by_cell in results.items():
        for cell, values in by_cell.items():
            rps = statistics.median(v[0] for v in values)
            cpu = statistics.median(v[1] for v in values)
            runs = ", ".join(f"{v[0]:,.0f}" for v in values)
            print(f"{name:<10} {cell:<12} {rps:12,.0f} {cpu:14.1f}  {runs}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", type=Variant.parse, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--cells", default="echo_id@64,mlp@64,mlp@128")
    args = parser.parse_args()
    widths = {"echo_id": 16, "mlp": 512}
    chosen = [(m, widths[m], int(c)) for m, c in (cell.split("@") for cell in args.cells.split(","))]
    run(main(args.variant, args.rounds, args.seconds, chosen), "uvloop")
