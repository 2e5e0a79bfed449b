"""GPU check (≤ 5 minutes on one GPU): direct onnxruntime-CUDA and torch at batch 1/32/256 beside the mesh serving
the same MLPs (512→4096→512 and a wider 512→16384→512) at concurrency 1/64/256; rows/s, p50/p99, GPU utilisation;
the GPU memory each model was measured to take; two workers on one GPU against one. Goal: mesh ≥ 0.8× direct
onnxruntime at concurrency 256.

Run from the repository root: ``python benchmarks/gpu_check.py [--cell-s S] [--rows N] [--cpu]``. Without a CUDA
device it prints one line, "no CUDA device", and exits 0; ``--cpu`` runs the same checks on the CPU (as a smoke
test of the script: its figures say nothing about GPUs).
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
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
import yaml

from benchmarks.bench_mesh import Children
from benchmarks.loadgen import closed_loop, percentile_ms
from benchmarks.mesh_watch import wait_serving
from broker import Connection, NatsServer, Registry, Settings, provision
from examples.build_models import build_identity_onnx, build_mlp_onnx
from servemesh import MeshClient
from servemesh.local import spawn_worker
from workers.device import Device, DeviceError, resolve_device

MODELS = {"mlp": 4096, "mlp_wide": 16384}  # hidden width; 512 in, 512 out
WIDTH, ECHO = 512, "echo_rows"
BATCHES, CONCURRENCY = (1, 32, 256), (1, 64, 256)
GOAL = 0.8
# On the GPU a replica takes batches of up to this many rows, two in flight (the spec's gpu: batching).
GPU_BATCH = {"max_batch_size": 2048, "max_delay_ms": 1.0, "instances": 2}


@dataclass(frozen=True, slots=True)
class Options:
    cell_s: float
    rows: int  # rows per mesh request
    cpu: bool


@dataclass(frozen=True, slots=True)
class Row:
    path: str
    model: str
    load: int  # batch (direct) or concurrency (mesh)
    rows_per_s: float
    p50_ms: float
    p99_ms: float
    gpu_util: float | None = None
    note: str = ""


class Utilisation:
    """The device's utilisation, sampled every 0.1 s while a cell runs (NVML; None on a CPU)."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self._samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Utilisation:
        if self.device.nvml is not None:
            self._samples, self._stop = [], threading.Event()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        assert self.device.nvml is not None
        while not self._stop.wait(0.1):
            value = self.device.nvml.utilisation(self.device.handle)
            if value is not None:
                self._samples.append(value)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return sum(self._samples) / len(self._samples) if self._samples else None


def _timed(call: Callable[[], object], cell_s: float) -> list[float]:
    for _ in range(3):
        call()  # warm-up: arenas, kernels, graphs
    latencies, end = [], time.perf_counter() + cell_s
    while (t0 := time.perf_counter()) < end:
        call()
        latencies.append(time.perf_counter() - t0)
    return latencies


def _row(path: str, model: str, load: int, rows: int, lat: list[float], util: Utilisation, note: str = "") -> Row:
    rate = rows * len(lat) / sum(lat) if lat else 0.0
    return Row(path, model, load, rate, percentile_ms(lat, 50), percentile_ms(lat, 99), util.mean, note)


def direct_ort(artifact: Path, model: str, device: Device, opts: Options) -> list[Row]:
    providers: list[Any] = ["CPUExecutionProvider"]
    if device.kind == "cuda":
        providers = [("CUDAExecutionProvider", {"device_id": device.index}), "CPUExecutionProvider"]
    session = ort.InferenceSession(str(artifact), providers=providers)
    rows = []
    for batch in BATCHES:
        x = np.random.default_rng(batch).standard_normal((batch, WIDTH)).astype(np.float32)
        with Utilisation(device) as util:
            lat = _timed(lambda x=x: session.run(None, {"input": x}), opts.cell_s)  # type: ignore[misc]
        provider = session.get_providers()[0].removesuffix("ExecutionProvider")
        rows.append(_row(f"direct onnxruntime ({provider})", model, batch, batch, lat, util))
    return rows


def direct_torch(artifact: Path, model: str, device: Device, opts: Options) -> list[Row]:
    """The same weights in torch, host arrays in and out as the mesh has them; none where torch is not installed."""
    try:
        import onnx
        import torch
        from onnx import numpy_helper
    except ImportError:
        return []
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(artifact)).graph.initializer}
    dev = torch.device(device.id if device.kind == "cuda" else "cpu")
    w1, b1, w2, b2 = (torch.from_numpy(weights[k].copy()).to(dev) for k in ("W1", "b1", "W2", "b2"))
    rows = []
    for batch in BATCHES:
        x = np.random.default_rng(batch).standard_normal((batch, WIDTH)).astype(np.float32)

        def run(x: np.ndarray[Any, Any] = x) -> object:
            with torch.inference_mode():
                h = torch.relu(torch.from_numpy(x).to(dev) @ w1 + b1)
                return (h @ w2 + b2).cpu().numpy()

        with Utilisation(device) as util:
            lat = _timed(run, opts.cell_s)
        rows.append(_row("direct torch", model, batch, batch, lat, util))
    return rows


def build_repo(repo: Path) -> dict[str, Path]:
    artifacts = {}
    for name, hidden in MODELS.items():
        build_mlp_onnx(repo, name, d_in=WIDTH, hidden=hidden, d_out=WIDTH, max_batch_size=256, max_delay_ms=2)
        artifacts[name] = repo / name / "1" / "model.onnx"
    build_identity_onnx(repo, ECHO, "float32", max_batch_size=256, max_delay_ms=1, shape=(WIDTH,))
    for name in [*MODELS, ECHO]:
        path = repo / name / "servemesh.yaml"
        path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "gpu": GPU_BATCH}))
    return artifacts


async def mesh_cell(client: MeshClient, model: str, conc: int, device: Device, opts: Options, path: str) -> Row:
    pool = [np.random.default_rng(i).standard_normal((opts.rows, WIDTH)).astype(np.float32) for i in range(64)]
    batches: list[int] = []

    async def send(i: int) -> None:
        reply = await client.infer_reply(model, {"input": pool[i % len(pool)]}, timeout=60)
        batches.append(reply.timing.batch_size)

    await closed_loop(send, conc, requests=conc * 2)  # warm-up: every instance and batch size met once
    batches.clear()
    with Utilisation(device) as util:
        result = await closed_loop(send, conc, duration_s=opts.cell_s)
    if result.errors:
        raise RuntimeError(f"{model} @{conc}: {len(result.errors)} request(s) failed: {result.errors[0]}")
    lat = result.latencies_s
    mean_batch = sum(batches) / len(batches) if batches else 0.0
    return Row(path, model, conc, result.throughput * opts.rows, percentile_ms(lat, 50), percentile_ms(lat, 99),
               util.mean, f"mean batch {mean_batch:.1f} requests")  # fmt: skip


async def mesh(url: str, repo: Path, device: Device, opts: Options, children: Children, log_dir: Path,
               rows: list[Row]) -> dict[str, Any]:  # fmt: skip
    """The mesh rows (appended to ``rows`` as they come), the measured memory, and two workers against one."""
    conn = await Connection.open(Settings.from_url(url), name="gpu-check")
    client = await MeshClient.connect(url)
    try:
        await provision(conn)
        registry = await Registry.open(conn)
        env = dict(os.environ)
        wanted = {f"{m}:1" for m in [*MODELS, ECHO]}
        first = children.add("gpu-1", spawn_worker(url, repo, "gpu-1", log_dir / "gpu-1.log", env, device=device.id))
        beat = await wait_serving(registry, first, "gpu-1", wanted)
        measured = {label: m for label, m in beat["measured"].items()}
        rows.append(await mesh_cell(client, ECHO, 256, device, opts, "mesh identity (its ceiling)"))
        print(_format(rows[-1]), flush=True)
        for model in MODELS:
            for conc in CONCURRENCY:
                rows.append(await mesh_cell(client, model, conc, device, opts, "mesh, 1 worker"))
                print(_format(rows[-1]), flush=True)
        second = children.add("gpu-2", spawn_worker(url, repo, "gpu-2", log_dir / "gpu-2.log", env, device=device.id))
        await wait_serving(registry, second, "gpu-2", wanted)
        rows.append(await mesh_cell(client, "mlp", 256, device, opts, "mesh, 2 workers on 1 device"))
        print(_format(rows[-1]), flush=True)
        return measured
    finally:
        await client.close()
        await conn.close()


def _format(row: Row) -> str:
    util = f"{row.gpu_util:5.0f}%" if row.gpu_util is not None else "     -"
    return (f"  {row.path:<32} {row.model:<9} {row.load:>4}  {row.rows_per_s:>12,.0f} rows/s  p50 {row.p50_ms:8.2f} ms"
            f"  p99 {row.p99_ms:8.2f} ms  GPU {util}  {row.note}")  # fmt: skip


def verdicts(rows: list[Row]) -> list[str]:
    by = {(r.path, r.model, r.load): r for r in rows}
    lines = []
    for model in MODELS:
        direct = [r for r in rows if r.path.startswith("direct onnxruntime") and (r.model, r.load) == (model, 256)]
        served = by.get(("mesh, 1 worker", model, 256))
        if direct and served:
            ratio = served.rows_per_s / direct[0].rows_per_s if direct[0].rows_per_s else 0.0
            verdict = "PASS" if ratio >= GOAL else "FAIL"
            lines.append(f"  {model}: mesh @256 / direct onnxruntime batch 256 = {ratio:.2f} (goal ≥ {GOAL}) {verdict}")
    one, two = by.get(("mesh, 1 worker", "mlp", 256)), by.get(("mesh, 2 workers on 1 device", "mlp", 256))
    if one and two:
        lines.append(f"  mlp @256: two workers on one device / one = {two.rows_per_s / one.rows_per_s:.2f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell-s", type=float, default=3.0, help="seconds each cell measures")
    parser.add_argument("--rows", type=int, default=32, help="rows per mesh request")
    parser.add_argument("--cpu", action="store_true", help="run the checks on the CPU (a smoke test of this script)")
    args = parser.parse_args(argv)
    opts = Options(args.cell_s if not args.cpu else min(args.cell_s, 1.0), args.rows, args.cpu)
    try:
        device = resolve_device("cpu" if opts.cpu else "auto", os.environ.get("CUDA_VISIBLE_DEVICES"))
    except DeviceError as exc:
        print(f"no CUDA device ({exc})")
        return 0
    if device.kind == "cpu" and not opts.cpu:
        print("no CUDA device (or no onnxruntime CUDA provider: the gpu extra); --cpu runs the checks on the CPU")
        return 0
    started = time.monotonic()
    on = f"{device.id} ({device.name})" if device.kind == "cuda" else "the CPU (a smoke test: no GPU figures)"
    print(f"gpu check on {on}; {opts.rows} rows per mesh request, {opts.cell_s:g} s cells")
    children, server = Children(), None
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="servemesh-gpu-check-") as tmp:
        workdir = Path(tmp)
        try:
            artifacts = build_repo(workdir / "models")
            print("direct (batch):", flush=True)
            for model, artifact in artifacts.items():
                for row in [*direct_ort(artifact, model, device, opts), *direct_torch(artifact, model, device, opts)]:
                    rows.append(row)
                    print(_format(row), flush=True)
            print("mesh (concurrency):", flush=True)
            server = NatsServer().start()
            measured = asyncio.run(mesh(server.url, workdir / "models", device, opts, children, workdir, rows))
        except Exception:
            for log in sorted(workdir.glob("gpu-*.log")):
                print(f"--- {log.name} ---", *log.read_text(errors="replace").splitlines()[-20:], sep="\n",
                      file=sys.stderr)  # fmt: skip
            raise
        finally:
            children.stop_all()
            if server is not None:
                server.close()
    print("measured memory per model (host RSS / GPU deltas after load and warm-up, MiB):")
    for label, m in sorted(measured.items()):
        print(f"  {label:<12} host {m['host_mb']:>6}  GPU {m['gpu_mb']:>6}")
    print("verdicts:", *verdicts(rows), sep="\n")
    print(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
