"""End-to-end servemesh benchmark: bare NATS echo ceiling, mesh throughput and latency, compute efficiency, memory.

Run from the repository root: ``python benchmarks/bench_mesh.py [--quick] [--loop asyncio|uvloop] [--json-out FILE]``.
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
import select
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# nats directly, outside broker/, only for the bare echo ceiling that must bypass the mesh.
import nats
import numpy as np
import onnxruntime as ort
from nats.aio.client import Client as NatsClient

from benchmarks.cpu import CpuMeter
from benchmarks.loadgen import LoadResult, closed_loop, percentile_ms
from benchmarks.mesh_watch import wait_serving
from benchmarks.report import Check, Report, Row, render, write_json
from broker import Connection, NatsServer, Registry, Settings, provision
from broker.server import find_nats_server
from examples.build_models import build_identity_onnx, build_mlp_onnx
from schemas.envelope import encode_request
from servemesh import MeshClient
from servemesh.local import spawn_worker

ECHO_MODEL, MLP_MODEL, VERSION = "echo_id", "mlp", "1"
ECHO_WIDTH, MLP_WIDTH = 16, 512
WORKER_ID = "bench-1"
ECHO_SUBJECT = "bench.echo"
# Every 97th reply is kept for the correctness check (a prime, so samples walk the whole input pool).
SAMPLE_EVERY, MAX_SAMPLES = 97, 200
# Requests carrying more compute: at 32 rows, a request's compute is several times the mesh's own cost.
ROWS_PER_REQUEST = (8, 32)
# Batches the MLP's replica computes at once, a thread each: on 2 cores shared with the event loop,
# nats-server and the client, two one-thread batches beat one two-thread batch waiting on its straggler.
MLP_INSTANCES = 2
MEMORY_CONCURRENCY, MEMORY_CHUNKS = 64, 10
MIB = 1024 * 1024


class Incorrect(Exception):
    """A wrong answer or a failed request: the benchmark exits non-zero."""


@dataclass(frozen=True, slots=True)
class Options:
    cell_s: float
    warmup_s: float
    memory_requests: int
    loop: str
    storage: str
    json_out: Path | None


class Children:
    """Processes this benchmark started; stopped by PID on the way out, whatever happened."""

    def __init__(self) -> None:
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def add(self, name: str, proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        self._procs.append((name, proc))
        return proc

    def stop_all(self, timeout: float = 20.0) -> None:
        for _name, proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in self._procs:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"{name} (pid {proc.pid}) did not stop on SIGTERM; killing it", file=sys.stderr)
                proc.kill()
                proc.wait()
        self._procs.clear()


def build_models(repo: Path) -> Path:
    """The identity and MLP models; returns the MLP's ONNX file for the direct-onnxruntime runs."""
    build_identity_onnx(repo, ECHO_MODEL, "float32", max_batch_size=64, max_delay_ms=1, shape=(ECHO_WIDTH,))
    build_mlp_onnx(repo, MLP_MODEL, max_batch_size=128, max_delay_ms=2, instances=MLP_INSTANCES)
    return repo / MLP_MODEL / VERSION / "model.onnx"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / MIB
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _to_row(path: str, result: LoadResult, cpu: dict[str, float]) -> Row:
    lat = result.latencies_s
    rps = result.throughput
    return Row(path, result.concurrency, len(lat), rps, rps, percentile_ms(lat, 50), percentile_ms(lat, 99), cpu=cpu)


def _print_row(row: Row) -> None:
    batch = f"  mean batch {row.mean_batch:.1f}" if row.mean_batch is not None else ""
    cpu = "/".join(f"{v:.0f}" for v in row.cpu.values())
    print(
        f"  {row.path:<24} {row.conc:>4}  {row.req_per_s:>9,.0f} req/s  {row.samples_per_s:>9,.0f} samples/s"
        f"  p50 {row.p50_ms:7.2f} ms  p99 {row.p99_ms:7.2f} ms  CPU% {'/'.join(row.cpu)} {cpu}{batch}",
        flush=True,
    )


def _raise_on_errors(what: str, result: LoadResult) -> None:
    if result.errors:
        shown = "; ".join(sorted(set(result.errors))[:5])
        raise Incorrect(f"{what}: {len(result.errors)} request(s) failed: {shown}")


# --- (a) the transport ceiling: bare core request/reply against an echo in another process ---


def start_responder(
    children: Children, url: str, log_path: Path, loop: str, timeout: float = 30.0
) -> subprocess.Popen[bytes]:
    script = Path(__file__).with_name("echo_responder.py")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, str(script), url, ECHO_SUBJECT, loop],
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
        )
    children.add("echo responder", proc)
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.1)[0]:
            line = proc.stdout.readline()
            if line.strip() == b"ready":
                return proc
            if not line:
                break  # end of file: it exited
    raise RuntimeError(f"echo responder not ready (exit code {proc.poll()}); see {log_path}")


async def _raw_echo_cell(nc: NatsClient, payload: bytes, conc: int, opts: Options, meter: CpuMeter) -> Row:
    wrong: list[int] = []

    async def send(i: int) -> None:
        msg = await nc.request(ECHO_SUBJECT, payload, timeout=30)
        if i % SAMPLE_EVERY == 0 and msg.data != payload:
            wrong.append(i)

    meter.start()
    result = await closed_loop(send, conc, duration_s=opts.cell_s, warmup_s=opts.warmup_s)
    cpu = meter.stop()
    _raise_on_errors("raw NATS echo", result)
    if wrong:
        raise Incorrect(f"raw NATS echo returned a different payload for {len(wrong)} sampled request(s)")
    return _to_row("raw NATS echo (ceiling)", result, cpu)


async def measure_raw_echo(url: str, payload: bytes, opts: Options, meter: CpuMeter) -> list[Row]:
    nc = await nats.connect(url, name="bench-loadgen", pending_size=64 * MIB)
    try:
        rows = []
        for conc in (1, 64):
            rows.append(await _raw_echo_cell(nc, payload, conc, opts, meter))
            _print_row(rows[-1])
        return rows
    finally:
        await nc.close()


# --- (b, c, d) the mesh under closed-loop load, one row of input per request ---

Sample = tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]


async def mesh_cell(
    client: MeshClient,
    model: str,
    pool: list[np.ndarray[Any, Any]],
    conc: int,
    opts: Options,
    meter: CpuMeter,
    path: str | None = None,
) -> tuple[Row, list[Sample]]:
    """Throughput and latency of ``model`` at ``conc`` concurrent requests, plus sampled (input, output) pairs."""
    timings: list[tuple[float, float, int]] = []  # the worker's queue_ms, compute_ms, batch size
    samples: list[Sample] = []

    async def send(i: int) -> None:
        x = pool[i % len(pool)]
        reply = await client.infer_reply(model, {"input": x}, timeout=30)
        timings.append((reply.timing.queue_ms, reply.timing.compute_ms, reply.timing.batch_size))
        if i % SAMPLE_EVERY == 0 and len(samples) < MAX_SAMPLES:
            samples.append((x, reply.outputs["output"]))

    meter.start()
    result = await closed_loop(send, conc, duration_s=opts.cell_s, warmup_s=opts.warmup_s)
    row = _to_row(path or f"mesh {model}", result, meter.stop())
    row.samples_per_s = row.req_per_s * pool[0].shape[0]
    _raise_on_errors(f"mesh {model} at concurrency {conc}", result)
    if not samples:
        raise Incorrect(f"mesh {model} at concurrency {conc}: no replies to check")
    row.queue_ms, row.compute_ms, row.mean_batch = (float(v) for v in np.mean(timings, axis=0))
    _print_row(row)
    return row, samples


def check_identity(samples: list[Sample]) -> None:
    for x, y in samples:
        if y.dtype != x.dtype or not np.array_equal(x, y):
            raise Incorrect(f"{ECHO_MODEL} returned {y.dtype}{list(y.shape)} != its input {x.dtype}{list(x.shape)}")


def check_mlp(session: ort.InferenceSession, samples: list[Sample]) -> None:
    inputs = np.concatenate([x for x, _ in samples])
    (expected,) = session.run(None, {"input": inputs})
    try:
        np.testing.assert_allclose(np.concatenate([y for _, y in samples]), expected, rtol=1e-5, atol=1e-5)
    except AssertionError as exc:
        raise Incorrect(f"mesh {MLP_MODEL} outputs differ from a direct session.run:\n{exc}") from None


# --- (c) the same MLP on onnxruntime in this process, the compute ceiling ---


def direct_row(session: ort.InferenceSession, batch: int, opts: Options, meter: CpuMeter) -> Row:
    x = np.random.default_rng(batch).standard_normal((batch, MLP_WIDTH)).astype(np.float32)
    feed = {"input": x}
    warm_until = time.perf_counter() + opts.warmup_s
    while time.perf_counter() < warm_until:
        session.run(None, feed)
    latencies: list[float] = []
    meter.start()
    start = time.perf_counter()
    end = start + opts.cell_s
    while (t0 := time.perf_counter()) < end:
        session.run(None, feed)
        latencies.append(time.perf_counter() - t0)
    cpu = meter.stop()
    p50, p99 = percentile_ms(latencies, 50), percentile_ms(latencies, 99)
    # Throughput from the median run, not the count: on a shared machine other load stalls some runs, and the
    # ceiling should be what this model does on this CPU, so that the mesh/direct ratio is not flattered.
    runs_per_s = 1000 / p50
    row = Row("direct onnxruntime mlp", batch, len(latencies), runs_per_s, runs_per_s * batch, p50, p99, float(batch))
    row.cpu = cpu
    _print_row(row)
    return row


# --- (e) worker memory across many requests ---


async def _memory_chunk(client: MeshClient, pool: list[np.ndarray[Any, Any]], offset: int, count: int) -> float:
    wrong: list[int] = []

    async def send(i: int) -> None:
        x = pool[(offset + i) % len(pool)]
        y = (await client.infer(ECHO_MODEL, {"input": x}, timeout=30))["output"]
        if i % SAMPLE_EVERY == 0 and not np.array_equal(x, y):
            wrong.append(offset + i)

    result = await closed_loop(send, MEMORY_CONCURRENCY, requests=count)
    _raise_on_errors("memory run", result)
    if wrong:
        raise Incorrect(f"{ECHO_MODEL} returned wrong outputs for requests {wrong[:5]}")
    return result.window_s


async def measure_memory(client: MeshClient, pool: list[np.ndarray[Any, Any]], pid: int, total: int) -> dict[str, Any]:
    before = rss_mib(pid)
    print(f"  memory: worker RSS {before:.1f} MiB before {total:,} requests", flush=True)
    chunk = total // MEMORY_CHUNKS
    progress: list[tuple[int, float]] = []
    elapsed = 0.0
    for n in range(MEMORY_CHUNKS):
        elapsed += await _memory_chunk(client, pool, n * chunk, chunk)
        progress.append(((n + 1) * chunk, rss_mib(pid)))
        print(f"  memory: {progress[-1][0]:>7,}/{total:,} requests, worker RSS {progress[-1][1]:.1f} MiB", flush=True)
    after, sent = progress[-1][1], chunk * MEMORY_CHUNKS
    return {
        "requests": sent, "concurrency": MEMORY_CONCURRENCY, "req_per_s": sent / elapsed,
        "rss_before_mib": before, "rss_after_mib": after, "growth_pct": (after - before) / before * 100,
        "progress": progress,
    }  # fmt: skip


# --- the run: start everything, measure, check, judge ---


def _multi_row_path(rows: int) -> str:
    return f"mesh mlp, {rows} rows"


def ratio_checks(rows: list[Row], memory: dict[str, Any]) -> list[Check]:
    by = {(r.path, r.conc): r for r in rows}
    mesh_echo, raw = by[("mesh echo_id", 64)], by[("raw NATS echo (ceiling)", 64)]
    value = mesh_echo.req_per_s / raw.req_per_s
    checks = [Check("mesh echo_id / raw NATS echo, req/s @64", value, f"{value:.2f}", ">= 0.40", value >= 0.4)]
    for conc in (64, 128):
        mesh = by[("mesh mlp", conc)]
        value = mesh.samples_per_s / by[("direct onnxruntime mlp", conc)].samples_per_s
        name = f"mesh mlp @{conc} / direct ORT batch {conc}, samples/s"
        checks.append(Check(name, value, f"{value:.2f}", ">= 0.50", value >= 0.5))
        formed = max(1, round(mesh.mean_batch or 1))
        value = mesh.samples_per_s / by[("direct onnxruntime mlp", formed)].samples_per_s
        name = f"mesh mlp @{conc} / direct ORT at its mean batch {formed}"
        checks.append(Check(name, value, f"{value:.2f}", "(>= 0.50)", None))
    for per_request in ROWS_PER_REQUEST:
        multi = by.get((_multi_row_path(per_request), 64))
        if multi is not None:
            rows = max(1, round((multi.mean_batch or 1) * per_request))
            value = multi.samples_per_s / by[("direct onnxruntime mlp", rows)].samples_per_s
            name = f"mesh mlp, {per_request} rows/request @64 / direct ORT at its mean batch {rows} rows"
            checks.append(Check(name, value, f"{value:.2f}", "(info)", None))
    growth = memory["growth_pct"]
    name = f"worker RSS growth over {memory['requests']:,} requests"
    checks.append(Check(name, growth, f"{growth:+.1f}%", "< 10%", growth < 10))
    return checks


@dataclass(frozen=True, slots=True)
class Pids:
    """The processes whose CPU each row reports: this load generator, nats-server, the echo and the worker."""

    client: int
    nats: int
    echo: int
    worker: int

    def meter(self, server: int | None) -> CpuMeter:
        pids = {"client": self.client, "nats": self.nats}
        return CpuMeter(pids | {"server": server} if server is not None else pids)


async def measure_mesh(url: str, mlp_path: Path, pids: Pids, opts: Options, report: Report) -> None:
    rng = np.random.default_rng(0)
    echo_pool = [rng.standard_normal((1, ECHO_WIDTH)).astype(np.float32) for _ in range(1024)]
    mlp_pool = [rng.standard_normal((1, MLP_WIDTH)).astype(np.float32) for _ in range(256)]
    print("(a) raw NATS core request/reply echo, same payload as a mesh echo_id request", flush=True)
    report.rows += await measure_raw_echo(url, encode_request({"input": echo_pool[0]}), opts, pids.meter(pids.echo))
    session = ort.InferenceSession(str(mlp_path), providers=["CPUExecutionProvider"])
    meter = pids.meter(pids.worker)
    client = await MeshClient.connect(url)
    try:
        print("(b) mesh, identity model [1,16] float32", flush=True)
        for conc in (1, 64):
            row, samples = await mesh_cell(client, ECHO_MODEL, echo_pool, conc, opts, meter)
            check_identity(samples)
            report.rows.append(row)
        print("(c) mesh, MLP 512→4096→512, one row per request", flush=True)
        for conc in (1, 64, 128):
            row, samples = await mesh_cell(client, MLP_MODEL, mlp_pool, conc, opts, meter)
            check_mlp(session, samples)
            report.rows.append(row)
        formed = {max(1, round(r.mean_batch or 1)) for r in report.rows if r.path == "mesh mlp" and r.conc > 1}
        for per_request in ROWS_PER_REQUEST:
            print(f"(c) mesh, MLP, {per_request} rows per request (a request carrying more compute)", flush=True)
            pool = [np.concatenate(mlp_pool[i : i + per_request]) for i in range(0, 256, per_request)]
            path = _multi_row_path(per_request)
            row, samples = await mesh_cell(client, MLP_MODEL, pool, 64, opts, meter, path=path)
            check_mlp(session, samples)
            report.rows.append(row)
            formed.add(max(1, round((row.mean_batch or 1) * per_request)))
        print("(c) direct onnxruntime MLP in this process, default threads", flush=True)
        for batch in sorted({1, 64, 128} | formed):
            report.rows.append(await asyncio.to_thread(direct_row, session, batch, opts, pids.meter(None)))
        print("(e) worker memory", flush=True)
        report.memory = await measure_memory(client, echo_pool, pids.worker, opts.memory_requests)
    finally:
        await client.close()
    report.checks = ratio_checks(report.rows, report.memory)


async def run(opts: Options, server: NatsServer, workdir: Path, mlp_path: Path, children: Children) -> Report:
    report = Report(machine=machine_info(opts))
    url = server.url
    conn = await Connection.open(Settings.from_url(url, storage=opts.storage), name="bench-control")
    try:
        await provision(conn)
        registry = await Registry.open(conn)
        # Every process of the run — load generator, worker, echo responder — uses the same event loop.
        env = {"SERVEMESH_STORAGE": opts.storage, "SERVEMESH_LOOP": opts.loop, **dict(os.environ)}
        worker = children.add("worker", spawn_worker(url, workdir / "models", WORKER_ID, workdir / "worker.log", env))
        echo = await asyncio.to_thread(start_responder, children, url, workdir / "responder.log", opts.loop)
        beat = await wait_serving(registry, worker, WORKER_ID, {f"{ECHO_MODEL}:{VERSION}", f"{MLP_MODEL}:{VERSION}"})
        assert server.proc is not None
        pids = Pids(client=os.getpid(), nats=server.proc.pid, echo=echo.pid, worker=beat["pid"])
        await measure_mesh(url, mlp_path, pids, opts, report)
    finally:
        await conn.close()
    return report


def machine_info(opts: Options) -> dict[str, Any]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    version = subprocess.run([find_nats_server(), "--version"], capture_output=True, text=True, check=False)
    return {
        "nproc": len(os.sched_getaffinity(0)), "cpu": cpu, "python": platform.python_version(),
        "platform": platform.platform(), "onnxruntime": ort.__version__, "numpy": np.__version__,
        "nats_server": version.stdout.strip() or "nats-server ?", "loop": opts.loop, "storage": opts.storage,
        "cell_s": opts.cell_s, "warmup_s": opts.warmup_s, "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 s cells and 20,000 memory requests")
    parser.add_argument(
        "--loop", choices=["asyncio", "uvloop"], default="uvloop", help="event loop of every process in the run"
    )
    parser.add_argument("--storage", choices=["file", "memory"], default="file", help="JetStream storage")
    parser.add_argument("--json-out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    return Options(
        cell_s=2.0 if args.quick else 5.0, warmup_s=0.5, memory_requests=20_000 if args.quick else 100_000,
        loop=args.loop, storage=args.storage, json_out=args.json_out,
    )  # fmt: skip


def _print_log_tail(path: Path, lines: int = 30) -> None:
    if path.exists():
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        print(f"--- last {len(tail)} lines of {path.name} ---", *tail, sep="\n", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.loop == "uvloop":
        import uvloop

        uvloop.install()
    started = time.monotonic()
    children = Children()
    server: NatsServer | None = None
    with tempfile.TemporaryDirectory(prefix="servemesh-bench-") as tmp:
        workdir = Path(tmp)
        try:
            print("building models…", flush=True)
            mlp_path = build_models(workdir / "models")
            server = NatsServer().start()
            report = asyncio.run(run(opts, server, workdir, mlp_path, children))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except Exception as exc:
            _print_log_tail(workdir / "worker.log")
            if isinstance(exc, Incorrect):
                print(f"\nINCORRECT: {exc}", file=sys.stderr)
                return 1
            raise
        finally:
            children.stop_all()
            if server is not None:
                server.close()
    report.elapsed_s = time.monotonic() - started
    print()
    print(render(report))
    if opts.json_out is not None:
        write_json(report, opts.json_out)
        print(f"results written to {opts.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
