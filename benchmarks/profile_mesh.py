"""Where a mesh request's CPU goes: closed-loop load on one model while py-spy samples the worker and the client.

Run from the repository root: ``python benchmarks/profile_mesh.py [--model echo|mlp] [--conc 64] [--seconds 8]``
(needs ``pip install py-spy``). Prints, per process, the functions with the most samples, by own time and by
inclusive time; the collapsed stacks stay in ``--out`` for a flame graph.
"""

# ruff: noqa: E402
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse
import asyncio
import os
import shutil
import subprocess
import tempfile
from collections import Counter

import numpy as np

from benchmarks.bench_mesh import Children, build_models
from benchmarks.loadgen import closed_loop
from benchmarks.mesh_watch import wait_serving
from benchmarks.otlp_sink import Sink
from broker import Connection, NatsServer, Registry, Settings, provision
from broker.loop import run
from servemesh import MeshClient
from servemesh.local import spawn_worker

MODELS = {"echo": ("echo_id", 16), "mlp": ("mlp", 512)}


def summarize(path: Path, top: int) -> str:
    """Own and inclusive sample counts per function from py-spy's collapsed ("raw") output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [f.split(" (")[0] + " (" + f.rsplit("/", 1)[-1] if " (" in f else f for f in stack.split(";")]
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    lines = [f"{path.name}: {total} samples"]
    for title, counter in (("own", own), ("inclusive", inclusive)):
        lines.append(f"  -- by {title} time --")
        lines += [f"  {n / total:6.1%}  {name}" for name, n in counter.most_common(top)]
    return "\n".join(lines)


def _trace_to_sink() -> Sink:
    """Trace every request (the mesh's own recorder) into a local OTLP/HTTP sink, workers started later too."""
    from telemetry import tracing

    sink = Sink()
    os.environ.update({"OTEL_EXPORTER_OTLP_ENDPOINT": sink.url, "OTEL_TRACES_SAMPLER": "always_on"})
    tracing.configure_from_env("profile-client")
    return sink


async def main(model: str, conc: int, seconds: float, out: Path, top: int, traced: bool) -> None:
    name, width = MODELS[model]
    children = Children()
    sink = _trace_to_sink() if traced else None
    with tempfile.TemporaryDirectory(prefix="servemesh-prof-") as tmp, NatsServer() as server:
        build_models(Path(tmp) / "models")
        conn = await Connection.open(Settings.from_url(server.url))
        try:
            await provision(conn)
            env = {"SERVEMESH_LOOP": "uvloop", **os.environ}
            worker = children.add("worker", spawn_worker(server.url, Path(tmp) / "models", "prof-1", None, env))
            beat = await wait_serving(await Registry.open(conn), worker, "prof-1", {f"{name}:1"})
            pool = [np.random.default_rng(i).standard_normal((1, width)).astype(np.float32) for i in range(64)]
            async with await MeshClient.connect(server.url) as client:

                async def send(i: int) -> None:
                    await client.infer(name, {"input": pool[i % len(pool)]}, timeout=30)

                await closed_loop(send, conc, duration_s=1.0)  # warm up
                spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
                args = ["record", "--duration", str(int(seconds)), "--rate", "500", "--format", "raw", "--nonblocking"]
                spies = [
                    subprocess.Popen([spy, *args, "--pid", str(pid), "-o", str(out / f"{who}.txt")])
                    for who, pid in (("worker", beat["pid"]), ("client", os.getpid()))
                ]
                result = await closed_loop(send, conc, duration_s=seconds + 1.0)
                for spy in spies:
                    await asyncio.to_thread(spy.wait)
            print(f"{name} at concurrency {conc}: {result.throughput:,.0f} req/s while sampled")
        finally:
            await conn.close()
            children.stop_all()
            if sink is not None:
                print(f"the OTLP sink received {sink.stop()}")
    for who in ("worker", "client"):
        print(summarize(out / f"{who}.txt", top))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="echo")
    parser.add_argument("--conc", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--trace", action="store_true", help="trace every request (OTLP to a local sink)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "servemesh-profile")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    run(main(args.model, args.conc, args.seconds, args.out, args.top, args.trace), "uvloop")
