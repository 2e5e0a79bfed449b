"""Two checkouts of servemesh side by side: the request path (client + worker) of each, on one
nats-server, the same models and load, rounds interleaved so that both see the same machine.

Run from the repository root::

    git worktree add /tmp/before <commit>
    python benchmarks/bench_ab.py /tmp/before . [--models identity mlp] [--rounds 3] [--seconds 5]

Each cell runs one worker from that checkout and a closed loop of ``--concurrency`` callers from
the same checkout (each in its own process, with the checkout first on its path), and prints
req/s, p50 and p99; the last table gives each checkout's median over rounds and the ratio.
"""

# ruff: noqa: E402
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import argparse
import json
import os
import statistics
import subprocess
import tempfile

from broker import Connection, NatsServer, Settings, provision
from broker.loop import run
from examples.build_models import build_identity_onnx, build_mlp_onnx

WIDTHS = {"identity": 16, "mlp": 512}

# The caller side of a cell: the checkout's own client, run with the checkout as its working directory.
_CALLERS = r"""
import asyncio, json, sys, time
import numpy as np
try:
    from servemesh import MeshClient
except ImportError:  # a checkout from before servemesh/ existed
    from broker import MeshClient

async def main(url, model, width, seconds, concurrency):
    async with await MeshClient.connect(url) as client:
        x = np.ones((1, width), np.float32)
        deadline = time.monotonic() + 60
        while True:  # until the worker serves the model
            try:
                await client.infer(model, {"input": x}, timeout=5)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        latencies = []

        async def caller(until, keep):
            while time.monotonic() < until:
                started = time.perf_counter()
                await client.infer(model, {"input": x}, timeout=30)
                if keep:
                    latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(caller(time.monotonic() + 1.0, False) for _ in range(concurrency)))
        began = time.monotonic()
        await asyncio.gather(*(caller(began + seconds, True) for _ in range(concurrency)))
        elapsed = time.monotonic() - began
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3
    print(json.dumps({"rps": len(latencies) / elapsed, "p50": pick(0.5), "p99": pick(0.99)}))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])))
"""


def _worker_module(tree: Path) -> str:
    """The module that starts a worker in that checkout (the CLI moved into servemesh/)."""
    return "servemesh" if (tree / "servemesh" / "__main__.py").exists() else "router"


def _cell(
    tree: Path, url: str, repo: Path, model: str, seconds: float, concurrency: int, log: Path
) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    worker_args = [sys.executable, "-m", _worker_module(tree), "worker", "--models", str(repo), "--nats", url]
    with open(log, "ab") as out:
        worker = subprocess.Popen(worker_args, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        args = [sys.executable, "-c", _CALLERS, url, model, str(WIDTHS[model]), str(seconds), str(concurrency)]
        done = subprocess.run(args, cwd=tree, env=env, capture_output=True, text=True, timeout=seconds + 120)
        if done.returncode != 0:
            raise RuntimeError(f"{tree} {model}: callers failed: {done.stderr.strip()[-500:]}")
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


async def _provision(url: str) -> None:
    conn = await Connection.open(Settings(nats_url=url))
    try:
        await provision(conn)
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path, help="the checkout to compare against")
    parser.add_argument("after", type=Path, help="the checkout under test")
    parser.add_argument("--models", nargs="+", choices=sorted(WIDTHS), default=["identity", "mlp"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    for name, tree in trees.items():
        if not (tree / "broker" / "__init__.py").exists():
            parser.error(f"{name}: {tree} is not a servemesh checkout")
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "models"
        build_identity_onnx(repo, "identity", "float32", max_batch_size=64, max_delay_ms=1, shape=(WIDTHS["identity"],))
        build_mlp_onnx(repo, "mlp", max_batch_size=128, max_delay_ms=2)
        log = Path(tmp) / "workers.log"
        cells: dict[tuple[str, str], list[dict[str, float]]] = {}
        with NatsServer(store_dir=Path(tmp) / "js") as server:
            run(_provision(server.url))
            print(f"{'round':>5}  {'model':<9} {'checkout':<7} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7}", flush=True)
            for round_ in range(1, args.rounds + 1):
                order = list(trees) if round_ % 2 else list(reversed(trees))  # neither always goes first
                for model in args.models:
                    for name in order:
                        cell = _cell(trees[name], server.url, repo, model, args.seconds, args.concurrency, log)
                        cells.setdefault((model, name), []).append(cell)
                        print(f"{round_:>5}  {model:<9} {name:<7} {cell['rps']:>8.0f} {cell['p50']:>7.2f} "
                              f"{cell['p99']:>7.2f}", flush=True)  # fmt: skip
        print(f"\nmedian of {args.rounds} rounds, concurrency {args.concurrency}")
        head = ("model", "before req/s", "after req/s", "after/before", "p99 before", "after")
        print(f"{head[0]:<9} {head[1]:>12} {head[2]:>12} {head[3]:>12} {head[4]:>10} {head[5]:>7}")
        for model in args.models:
            b = {k: statistics.median(c[k] for c in cells[(model, "before")]) for k in ("rps", "p99")}
            a = {k: statistics.median(c[k] for c in cells[(model, "after")]) for k in ("rps", "p99")}
            print(f"{model:<9} {b['rps']:>12.0f} {a['rps']:>12.0f} {a['rps'] / b['rps']:>12.3f} "
                  f"{b['p99']:>10.2f} {a['p99']:>7.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
