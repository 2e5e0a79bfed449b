"""What tracing costs: mesh throughput at concurrency 64 with tracing off, and on with the SDK's
``parentbased_traceidratio`` sampler at 1%, 10% and 100% (client and worker traced alike, the SDK's
BatchSpanProcessor and OTLP/HTTP exporter posting to a local sink), side by side in one run.

Run from the repository root: ``python benchmarks/bench_tracing.py [--quick] [--rounds N] [--model identity|mlp]``.
"""

# ruff: noqa: E402
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import argparse
import os
import statistics
import subprocess
import tempfile

import numpy as np

from benchmarks.bench_mesh import Children
from benchmarks.cpu import CpuMeter, main_thread
from benchmarks.loadgen import closed_loop
from benchmarks.otlp_sink import Sink
from broker import Connection, NatsServer, Registry, Settings, provision
from broker.loop import run
from examples.build_models import build_identity_onnx, build_mlp_onnx
from servemesh import MeshClient
from servemesh.local import wait_workers_ready
from telemetry import tracing

CONCURRENCY = 64
WIDTHS = {"identity": 16, "mlp": 512}
# Sampling ratio of each traced mode (parentbased_traceidratio); "off": tracing not configured.
RATIOS = {"1%": 0.01, "10%": 0.1, "100%": 1.0}
MODES = ("off", *RATIOS)


def _otel_env(sink_url: str, mode: str) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": sink_url, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": str(RATIOS[mode])}  # fmt: skip


def _worker_id(mode: str) -> str:
    return "w-" + mode.replace("%", "pct")


def _spawn_worker(mode: str, url: str, repo: Path, log: Path, sink_url: str) -> subprocess.Popen[bytes]:
    untraced_env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env = {**untraced_env, "SERVEMESH_LOOP": "uvloop", **(_otel_env(sink_url, mode) if mode in RATIOS else {})}
    args = [sys.executable, "-m", "servemesh", "worker", "--models", str(repo), "--id", _worker_id(mode), "--nats", url]
    with open(log, "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)


async def _cell(mode: str, url: str, seconds: float, model: str, meter: CpuMeter) -> tuple[float, float]:
    """Requests per second of one closed-loop cell, this process traced (or not) like the worker, and the
    CPU time per request of client, nats-server and worker together (µs; less swayed by other load)."""
    async with await MeshClient.connect(url) as client:
        x = np.ones((1, WIDTHS[model]), np.float32)

        async def send(i: int) -> None:
            await client.infer(model, {"input": x}, timeout=30)

        await closed_loop(send, CONCURRENCY, duration_s=0.5)  # warm-up
        meter.start()
        result = await closed_loop(send, CONCURRENCY, duration_s=seconds)
        cpu = meter.stop()
    if result.errors:
        raise RuntimeError(f"{mode}: {len(result.errors)} failed requests, e.g. {result.errors[0]}")
    busy = sum(cpu[k] for k in meter.pids) / 100  # cores
    us = {k: v / 100 / result.throughput * 1e6 for k, v in cpu.items()}
    split = " / ".join(f"{us[k]:.0f}" + (f" ({us[main_thread(k)]:.0f})" if k != "nats" else "") for k in meter.pids)
    print(f"    CPU µs/request, client (main thread) / nats-server / worker (main thread): {split}", flush=True)
    return result.throughput, busy / result.throughput * 1e6


def _client_mode(mode: str, sink_url: str) -> None:
    tracing.disable()
    if mode in RATIOS:
        # Only for as long as configuring takes: left in the environment, the settings would reach the
        # workers of later untraced rounds too.
        variables = _otel_env(sink_url, mode)
        os.environ.update(variables)
        try:
            tracing.configure_from_env("bench-client")
        finally:
            for name in variables:
                os.environ.pop(name, None)


async def _round(
    mode: str, server: NatsServer, repo: Path, logs: Path, sink_url: str, seconds: float, model: str
) -> tuple[float, float]:
    children = Children()
    url = server.url
    assert server.proc is not None
    try:
        proc = children.add(mode, _spawn_worker(mode, url, repo, logs / f"{mode}.log", sink_url))
        pids = {"client": os.getpid(), "nats": server.proc.pid, "worker": proc.pid}
        meter = CpuMeter(pids, main_threads=("client", "worker"))
        conn = await Connection.open(Settings.from_url(url))
        await wait_workers_ready(await Registry.open(conn), [_worker_id(mode)], 60)
        await conn.close()
        _client_mode(mode, sink_url)
        rps, cpu_us = await _cell(mode, url, seconds, model, meter)
        print(f"  {mode:<9} {rps:9,.0f} req/s  {cpu_us:6.1f} µs CPU/request  (worker pid {proc.pid})", flush=True)
        return rps, cpu_us
    finally:
        tracing.shutdown()
        tracing.disable()
        children.stop_all()


async def main(rounds: int, seconds: float, model: str) -> dict[str, list[tuple[float, float]]]:
    sink = Sink()
    try:
        return await _rounds(sink, rounds, seconds, model)
    finally:
        print(f"the OTLP sink received {sink.stop()}")


async def _rounds(sink: Sink, rounds: int, seconds: float, model: str) -> dict[str, list[tuple[float, float]]]:
    results: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="servemesh-trace-") as tmp, NatsServer() as server:
        repo, logs = Path(tmp) / "models", Path(tmp)
        if model == "mlp":
            build_mlp_onnx(repo, model, max_batch_size=128, max_delay_ms=2)
        else:
            build_identity_onnx(repo, model, "float32", max_batch_size=64, max_delay_ms=1, shape=(16,))
        conn = await Connection.open(Settings.from_url(server.url))
        await provision(conn)
        await conn.close()
        for i in range(rounds):  # interleaved, so drift in the machine's load hits every mode alike
            print(f"round {i + 1}/{rounds}", flush=True)
            # Each round starts with another mode: server state grows as a run goes on (the stream's
            # de-duplication window, for one), so a fixed order would favour whichever mode comes first.
            for mode in MODES[i % len(MODES) :] + MODES[: i % len(MODES)]:
                results[mode].append(await _round(mode, server, repo, logs, sink.url, seconds, model))
    return results


def off_path_us(n: int = 200_000) -> float:
    """CPU time of the hooks a request meets with tracing off, counting a whole batch's hooks for every
    request (batches of one): client send and end, the worker's checks, its batch's spans. Measured in
    place, where a throughput comparison cannot see below the machine's noise."""
    import timeit

    tracing.disable()
    headers: dict[str, str] = {}

    def request() -> None:
        span = tracing.start_send("mesh.infer.m.1.normal", "r", headers)  # client
        if tracing.enabled():  # worker: on delivery, then per batch
            pass
        process = tracing.start_process("m", "1", "w", ()) if tracing.enabled() else None
        tracing.end(tracing.start_infer(process, "m", 1))
        tracing.end(process)
        tracing.end(span, None)  # client

    empty = timeit.timeit(lambda: None, number=n)
    return (timeit.timeit(request, number=n) - empty) / n * 1e6


def report(results: dict[str, list[tuple[float, float]]], model: str) -> None:
    rps = {mode: statistics.median(v[0] for v in values) for mode, values in results.items()}
    cpu = {mode: statistics.median(v[1] for v in values) for mode, values in results.items()}
    print(f"\nmodel {model}: {'mode':<6} {'median req/s':>13} {'CPU µs/req':>11} {'cost (req/s)':>13} "
          f"{'cost (CPU)':>11}  runs (req/s)")  # fmt: skip
    for mode in MODES:
        by_rps, by_cpu = 1 - rps[mode] / rps["off"], cpu[mode] / cpu["off"] - 1
        runs = ", ".join(f"{v[0]:,.0f}" for v in results[mode])
        print(f"{'':<7}{mode:<6} {rps[mode]:13,.0f} {cpu[mode]:11.1f} {by_rps:13.1%} {by_cpu:+11.1%}  {runs}")
    print("CPU µs/req: client + nats-server + worker CPU time per request (export threads included).")
    hooks = off_path_us()
    print(f"tracing off, the hooks measured in place: {hooks:.2f} µs per request, {hooks / cpu['off']:.2%} of its CPU "
          "(target ≤ 1%); target at 10% on the MLP: ≤ 5%")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s cells")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", choices=sorted(WIDTHS), default="identity")
    args = parser.parse_args()
    rounds, seconds = (1, 2.0) if args.quick else (args.rounds, 5.0)
    print(f"model {args.model}, concurrency {CONCURRENCY}, {seconds:g} s per cell", flush=True)
    report(run(main(rounds, seconds, args.model), "uvloop"), args.model)
