"""Router benchmark: cold start from zero replicas, and a load spike until a second replica serves, on real processes.

Run from the repository root: ``python benchmarks/bench_router.py [--quick] [--json-out FILE]``.
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
import platform
import random
import signal
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import numpy as np

from benchmarks import bench_policy
from benchmarks.bench_mesh import Children
from benchmarks.mesh_watch import POLL_S, Failed, Json, Mesh, until
from benchmarks.report import publish
from broker import Connection, NatsServer, Registry, Settings, provision
from broker.server import find_nats_server
from examples.build_models import build_identity_onnx, build_slow_onnx
from router.policy import DEFAULT_CONFIG
from servemesh import MeshClient
from servemesh.local import spawn_router, spawn_worker

VERSION = "1"
WORKERS = ("w1", "w2")
WORKER_MEMORY_MB = 4096
TICK_S = 0.5
# The product default, passed explicitly so that the run says which value it measured.
UPSCALE_DELAY_S = DEFAULT_CONFIG.upscale_delay_s
COLD_OVERHEAD_TARGET_S, SPIKE_OVERHEAD_TARGET_S = 1.0, 2.0
SPIKE_CONCURRENCY, SPIKE_TIMEOUT_S, SLOW_WIDTH = 96, 60.0, 256
_PHASE = random.Random(0)


@dataclass(frozen=True, slots=True)
class Options:
    cold_runs: int
    spike_runs: int
    policy_ticks: int
    json_out: Path | None


@dataclass(frozen=True, slots=True)
class ColdStart:
    model: str
    worker: str
    total_s: float  # client.infer sent → reply, nothing loaded anywhere before
    load_ms: float  # the worker's own load + warm-up + subscribe time, from its heartbeat
    overhead_s: float  # total − load: router tick, lag observation, assignment, pull


@dataclass(frozen=True, slots=True)
class Spike:
    model: str
    worker: str  # the second replica
    serving_s: float  # load start → a heartbeat shows the second replica succeeded > 0
    first_reply_s: float | None  # load start → the client got the second replica's first reply
    load_ms: float
    overhead_s: float  # serving − load
    ok: int
    failed: int
    errors: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Results:
    machine: Json
    cold: list[ColdStart] = field(default_factory=list)
    spikes: list[Spike] = field(default_factory=list)
    policy: Json = field(default_factory=dict)
    checks: list[tuple[str, str, str, str]] = field(default_factory=list)  # name, value, target, verdict
    elapsed_s: float = 0.0


# --- (1) cold start: zero replicas → first reply ---


async def cold_start(mesh: Mesh, client: MeshClient) -> ColdStart:
    name = await mesh.register(
        build_identity_onnx(mesh.repo, f"cold_{uuid.uuid4().hex[:8]}", "float32", shape=(16,)), min_replicas=0
    )
    await until(lambda: mesh.idle(name, replicas=0), 60, f"{name} registered, seen by the router, mesh idle")
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    await tick_phase()
    started = time.monotonic()
    try:
        out = await client.infer(name, {"input": x}, timeout=30)
    except Exception as exc:  # any error is a failed cold start, reported with its type
        raise Failed(f"cold start of {name}: {exc!r}") from exc
    total = time.monotonic() - started
    if not np.array_equal(out["output"], x):
        raise Failed(f"cold start of {name}: the identity model returned a different tensor")
    # The worker beats as soon as a load completes, so its entry is there by now or within a beat.
    await until(lambda: _has_holder(mesh, name), 5, f"a heartbeat showing {name} loaded")
    worker, entry = next(iter((await mesh.holders(name)).items()))
    await mesh.unregister(name)
    load_ms = float(entry["load_ms"])
    return ColdStart(name, worker, total, load_ms, total - load_ms / 1000)


async def tick_phase() -> None:
    """Wait a random part of a router tick, so that runs start at a random phase of the router's loop."""
    # The mesh turns idle in step with the periodic ticks and heartbeats, so without this every run would
    # start at about the same point of a tick, and the results would depend on that luck, not on the router.
    await asyncio.sleep(_PHASE.uniform(0, TICK_S))


async def _has_holder(mesh: Mesh, name: str) -> bool:
    return bool(await mesh.holders(name))


# --- (2) spike: one idle replica, then 96 concurrent requests until a second replica serves ---


class SpikeLoad:
    """Closed-loop requests from many tasks until stopped; counts failures and notes each worker's first reply."""

    def __init__(self, client: MeshClient, name: str, concurrency: int) -> None:
        self.ok = self.failed = 0
        self.errors: list[str] = []
        self.first_reply_s: dict[str, float] = {}  # worker → seconds from t0 to its first reply
        self._stop = asyncio.Event()
        self.t0 = time.monotonic()
        x = np.ones((1, SLOW_WIDTH), np.float32)
        self._tasks = [asyncio.create_task(self._run(client, name, x)) for _ in range(concurrency)]

    async def _run(self, client: MeshClient, name: str, x: np.ndarray[Any, Any]) -> None:
        while not self._stop.is_set():
            try:
                reply = await client.infer_reply(name, {"input": x}, timeout=SPIKE_TIMEOUT_S)
                if reply.outputs["output"].shape != x.shape:
                    raise Failed(f"output shape {reply.outputs['output'].shape} != input shape {x.shape}")
            except Exception as exc:  # counted here; the run fails on any of them once the load stops
                self.failed += 1
                self.errors.append(repr(exc))
                continue
            self.ok += 1
            self.first_reply_s.setdefault(reply.timing.worker, time.monotonic() - self.t0)

    async def stop(self) -> None:
        """Send no more; wait for the requests already sent."""
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def _second_serving(mesh: Mesh, name: str, first: str, t0: float, timeout: float = 60.0) -> tuple[str, float]:
    """Poll heartbeats until a worker other than ``first`` reports a succeeded request: (worker, seconds since t0)."""
    while (elapsed := time.monotonic() - t0) < timeout:
        for worker, entry in (await mesh.holders(name)).items():
            if worker != first and entry["stats"]["succeeded"] > 0:
                return worker, time.monotonic() - t0
        await asyncio.sleep(POLL_S)
    raise Failed(f"{name}: no second replica served within {elapsed:.0f} s of load")


async def spike(mesh: Mesh, client: MeshClient) -> Spike:
    model_dir = build_slow_onnx(mesh.repo, f"spike_{uuid.uuid4().hex[:8]}", repeats=4000, max_batch_size=1,
                                max_delay_ms=0, d=SLOW_WIDTH)  # fmt: skip
    name = await mesh.register(model_dir, min_replicas=1, max_replicas=2)
    await until(lambda: mesh.idle(name, replicas=1), 120, f"{name}: one replica loaded and idle")
    (first,) = await mesh.holders(name)
    await tick_phase()
    load = SpikeLoad(client, name, SPIKE_CONCURRENCY)
    try:
        second, serving_s = await _second_serving(mesh, name, first, load.t0)
    finally:
        await load.stop()
    load_ms = float((await mesh.holders(name))[second]["load_ms"])
    await mesh.unregister(name)
    return Spike(name, second, serving_s, load.first_reply_s.get(second), load_ms, serving_s - load_ms / 1000,
                 load.ok, load.failed, load.errors[:5])  # fmt: skip


# --- the run: start the processes, measure, judge ---


async def measure(url: str, workdir: Path, opts: Options, results: Results) -> None:
    conn = await Connection.open(Settings.from_url(url), name="bench-router-control")
    try:
        await provision(conn)
        mesh = Mesh(await Registry.open(conn), workdir / "models", WORKERS, VERSION)
        async with await MeshClient.connect(url) as client:
            print(f"(1) cold start from zero replicas, {opts.cold_runs} fresh models", flush=True)
            for _ in range(opts.cold_runs):
                results.cold.append(c := await cold_start(mesh, client))
                print(f"  {c.model} on {c.worker}: {c.total_s:.3f} s = load {c.load_ms:.0f} ms"
                      f" + overhead {c.overhead_s:.3f} s", flush=True)  # fmt: skip
            print(f"(2) spike of {SPIKE_CONCURRENCY} concurrent requests, {opts.spike_runs} fresh models", flush=True)
            for _ in range(opts.spike_runs):
                results.spikes.append(s := await spike(mesh, client))
                reply = f"{s.first_reply_s:.2f} s" if s.first_reply_s is not None else "-"
                print(f"  {s.model} → {s.worker}: serving after {s.serving_s:.2f} s (first reply {reply}),"
                      f" load {s.load_ms:.0f} ms, {s.ok} ok, {s.failed} failed", flush=True)  # fmt: skip
    finally:
        await conn.close()


def start_mesh(children: Children, url: str, workdir: Path) -> None:
    """One router and two router-managed workers, each a child process logging to ``workdir``."""
    env = {"SERVEMESH_ROUTER_UPSCALE_DELAY_S": str(UPSCALE_DELAY_S)}
    children.add("router r1", spawn_router(url, "r1", workdir / "r1.log", env, tick_s=TICK_S))
    for w in WORKERS:
        children.add(f"worker {w}", spawn_worker(url, None, w, workdir / f"{w}.log", memory_mb=WORKER_MEMORY_MB))


def measure_policy(ticks: int) -> Json:
    """bench_policy's 1,000-model / 100-worker mesh, run here before the mesh processes compete for CPU."""
    print(f"(3) placement policy tick, 1,000 models on 100 workers, {ticks} ticks", flush=True)
    return {"models": 1_000, "workers": 100, "ticks": ticks, **bench_policy.run(1_000, 100, ticks)}


def _stats(values: Sequence[float]) -> tuple[float, float]:
    return statistics.median(values), max(values)


def judge(results: Results) -> None:
    checks: list[tuple[str, str, str, str]] = []

    def add(name: str, value: float, unit: str, target: float | None = None) -> None:
        verdict = "info" if target is None else ("PASS" if value <= target else "FAIL")
        shown = f"{value:.3f} s" if unit == "s" else f"{value:.1f} {unit}" if unit == "ms" else f"{value:.0f}"
        checks.append((name, shown, "-" if target is None else f"≤ {target:g} {unit}".rstrip(), verdict))

    for label, (p50, top) in [
        ("cold start, send → reply", _stats([c.total_s for c in results.cold])),
        ("cold start, model load (worker load_ms)", _stats([c.load_ms / 1000 for c in results.cold])),
    ]:
        add(f"{label}, p50", p50, "s")
        add(f"{label}, max", top, "s")
    p50, top = _stats([c.overhead_s for c in results.cold])
    add("cold start overhead = total − load, p50", p50, "s", COLD_OVERHEAD_TARGET_S)
    add("cold start overhead = total − load, max", top, "s", COLD_OVERHEAD_TARGET_S)
    _judge_spikes(results, add)
    policy = results.policy
    add(f"policy tick p99, {policy['models']:,} models / {policy['workers']} workers", policy["p99"], "ms",
        bench_policy.TARGET_MS)  # fmt: skip
    results.checks = checks


def _judge_spikes(results: Results, add: Callable[..., None]) -> None:
    spikes = results.spikes
    for label, values in [
        ("spike → 2nd replica serving (heartbeat)", [s.serving_s for s in spikes]),
        ("spike → 2nd replica's first reply (client)", [s.first_reply_s for s in spikes if s.first_reply_s]),
        ("spike, 2nd replica load (worker load_ms)", [s.load_ms / 1000 for s in spikes]),
    ]:
        if values:
            p50, top = _stats(values)
            add(f"{label}, p50", p50, "s")
            add(f"{label}, max", top, "s")
    # Judged on the client's clock: the new replica's first reply (reply.timing.worker) marks it
    # serving; heartbeats, one a second, trail that moment by up to a second.
    by_reply = [s.first_reply_s - s.load_ms / 1000 for s in spikes if s.first_reply_s is not None]
    if len(by_reply) < len(spikes):
        add("spikes whose new replica never answered a request", len(spikes) - len(by_reply), "", 0)
    if by_reply:
        p50, top = _stats(by_reply)
        add("spike overhead = new replica's first reply − load, p50", p50, "s", SPIKE_OVERHEAD_TARGET_S)
        add("spike overhead = new replica's first reply − load, max", top, "s", SPIKE_OVERHEAD_TARGET_S)
    p50, top = _stats([s.overhead_s for s in spikes])
    add("spike overhead by heartbeat = serving − load, p50", p50, "s")
    failed = sum(s.failed for s in spikes)
    add(f"failed requests (of {failed + sum(s.ok for s in spikes):,} under spike load)", failed, "", 0)


# --- the output ---


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in [headers, ["-" * w for w in widths], *rows]]  # fmt: skip


def render(results: Results) -> str:
    m = results.machine
    out = [
        f"servemesh router benchmark — {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}, {m['nats_server']},"
        f" load average at start {m['loadavg']}",
        f"1 router (tick {TICK_S:g} s, upscale_delay_s {UPSCALE_DELAY_S:g} s = product default), "
        f"{len(WORKERS)} managed workers ({WORKER_MEMORY_MB} MB each), separate processes",
        "",
    ]
    out += _table(["cold start model", "worker", "total s", "load ms", "overhead s"],
                  [[c.model, c.worker, f"{c.total_s:.3f}", f"{c.load_ms:.0f}", f"{c.overhead_s:.3f}"]
                   for c in results.cold])  # fmt: skip
    out.append("")
    out += _table(["spike model", "2nd replica", "serving s", "first reply s", "load ms", "overhead s", "ok", "failed"],
                  [[s.model, s.worker, f"{s.serving_s:.2f}", f"{s.first_reply_s:.2f}" if s.first_reply_s else "-",
                    f"{s.load_ms:.0f}", f"{s.overhead_s:.2f}", str(s.ok), str(s.failed)]
                   for s in results.spikes])  # fmt: skip
    out += ["", *_table(["measurement", "value", "target", "result"], [list(c) for c in results.checks])]
    out += [
        f"notes: cold start and spike times include 0–{TICK_S:g} s until the next router tick (each run starts at a"
        " random phase of it);",
        f"       the spike time also includes the policy's wait for {UPSCALE_DELAY_S:g} s of sustained lag"
        " (upscale_delay_s) before it adds a replica, unless the backlog is urgent (4× its target).",
        "       'serving' is seen through heartbeats, sent once a second by each worker, so it can trail the second",
        "       replica's first reply (seen by the client) by up to that second.",
        f"       policy tick: {results.policy['ticks']} ticks of bench_policy's synthetic mesh"
        " (run benchmarks/bench_policy.py for the larger meshes).",
        "",
        f"total time {results.elapsed_s:.0f} s",
    ]
    return "\n".join(out)


def machine_info() -> Json:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    version = subprocess.run([find_nats_server(), "--version"], capture_output=True, text=True, check=False)
    return {
        "nproc": len(os.sched_getaffinity(0)), "cpu": cpu, "python": platform.python_version(),
        "platform": platform.platform(), "nats_server": version.stdout.strip() or "nats-server ?",
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()), "tick_s": TICK_S,
        "upscale_delay_s": UPSCALE_DELAY_S,
    }  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 cold starts, 1 spike, 20 policy ticks")
    parser.add_argument("--json-out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        return Options(cold_runs=2, spike_runs=1, policy_ticks=20, json_out=args.json_out)
    return Options(cold_runs=5, spike_runs=3, policy_ticks=50, json_out=args.json_out)


def _print_log_tails(workdir: Path, lines: int = 20) -> None:
    for path in sorted(workdir.glob("*.log")):
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        print(f"--- last {len(tail)} lines of {path.name} ---", *tail, sep="\n", file=sys.stderr)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM takes the same way out as Ctrl-C, so the children are stopped either way.
    raise KeyboardInterrupt


def run(opts: Options, results: Results) -> None:
    """Start nats-server, the router and the workers; measure; stop every child by PID whatever happened."""
    children = Children()
    server: NatsServer | None = None
    with tempfile.TemporaryDirectory(prefix="servemesh-bench-router-") as tmp:
        workdir = Path(tmp)
        try:
            server = NatsServer().start()
            start_mesh(children, server.url, workdir)
            asyncio.run(measure(server.url, workdir, opts, results))
        except Failed:
            _print_log_tails(workdir)
            raise
        finally:
            children.stop_all()
            if server is not None:
                server.close()


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    results = Results(machine=machine_info())
    results.policy = measure_policy(opts.policy_ticks)
    try:
        run(opts, results)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Failed as exc:
        print(f"\nFAILED: {exc}", file=sys.stderr)
        return 1
    results.elapsed_s = time.monotonic() - started
    judge(results)
    publish(render(results), results, opts.json_out)
    if any(s.failed for s in results.spikes):
        errors = [e for s in results.spikes for e in s.errors]
        print(f"\nFAILED: requests failed under spike load, e.g. {errors[:3]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
