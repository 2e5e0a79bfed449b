"""Batch-job benchmark: a large job against request/reply on the same model, client memory, pipeline overhead.

Run from the repository root: ``python benchmarks/bench_jobs.py [--quick] [--json-out FILE]``.
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
import contextlib
import os
import platform
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper

from benchmarks.bench_mesh import Children, Incorrect
from benchmarks.cpu import CpuMeter
from benchmarks.job_watch import JobRun, RssWatch, follow_job, verify_results
from benchmarks.loadgen import LoadResult, closed_loop, percentile_ms
from benchmarks.mesh_watch import wait_serving
from benchmarks.report import Check, Row, publish
from broker import Connection, NatsServer, Registry, Settings, provision
from broker.loop import run as run_on_loop
from broker.server import find_nats_server
from examples.build_models import IR_VERSION, OPSET, build_identity_onnx
from servemesh import MeshClient
from servemesh.jobs import Job
from servemesh.local import spawn_worker
from workers.repository import read_model

Json = dict[str, Any]
Array = np.ndarray[Any, Any]

JOB_MODEL, STAGE_A, STAGE_B, VERSION = "jobecho", "stageA", "stageB", "1"
# Registered but served by no worker: a job for it measures the submitter alone.
SINK_MODEL = "jobsink"
WIDTH, MAX_BATCH, MAX_DELAY_MS = 16, 64, 1
WORKER_ID, LOOP = "bench-1", "uvloop"
CONCURRENCY = 64
# Inputs cycle through a pool of distinct rows, so the generator stays flat and a result filed under the
# wrong index shows; every 97th result is compared (a prime, so samples walk the whole pool).
POOL_SIZE, SAMPLE_EVERY = 1024, 97
POLL_S, STALL_S = 0.25, 60.0
# Under the stream's 10,000-message limit per subject, so the no-worker run never waits on a full queue.
SINK_ITEMS = 9_000
RATIO_TARGET, RSS_GROWTH_TARGET_MIB = 0.8, 50.0


@dataclass(frozen=True, slots=True)
class Options:
    cell_s: float
    warmup_s: float
    items: int
    json_out: Path | None


@dataclass(slots=True)
class Results:
    machine: Json
    rows: list[Row] = field(default_factory=list)
    job: JobRun | None = None
    checks: list[Check] = field(default_factory=list)
    elapsed_s: float = 0.0


# --- models: the job's identity model, two chainable stages, and one no worker serves ---


def build_stage(repo: Path, name: str, input_name: str, output_name: str) -> Path:
    """An Identity float32 [batch, 16] model whose tensor names chain it after (or before) another stage."""
    shape: list[int | str] = ["batch", WIDTH]
    graph = helper.make_graph(
        [helper.make_node("Identity", [input_name], [output_name])], name,
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, shape)],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="bench_jobs")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    (repo / name / VERSION).mkdir(parents=True)
    onnx.save(model, str(repo / name / VERSION / "model.onnx"))
    config = {
        "format": "onnx", "max_batch_size": MAX_BATCH, "max_delay_ms": MAX_DELAY_MS,
        "inputs": [{"name": input_name, "dtype": "float32", "shape": [WIDTH]}],
        "outputs": [{"name": output_name, "dtype": "float32", "shape": [WIDTH]}],
    }  # fmt: skip
    (repo / name / "servemesh.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return repo / name


def build_models(workdir: Path) -> None:
    """The worker's repository under ``models/``; the sink model apart, under ``unserved/``."""
    repo = workdir / "models"
    build_identity_onnx(repo, JOB_MODEL, "float32", max_batch_size=MAX_BATCH, max_delay_ms=MAX_DELAY_MS,
                        shape=(WIDTH,))  # fmt: skip
    build_stage(repo, STAGE_A, "input", "x")
    build_stage(repo, STAGE_B, "x", "y")
    build_identity_onnx(workdir / "unserved", SINK_MODEL, "float32", max_batch_size=MAX_BATCH, shape=(WIDTH,))


def input_pool() -> list[Array]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((1, WIDTH)).astype(np.float32) for _ in range(POOL_SIZE)]


def job_items(pool: list[Array], count: int) -> Iterator[dict[str, Array]]:
    """Item i is pool row i mod POOL_SIZE: nothing is materialised, so the client's memory is the mesh's doing."""
    return ({"input": pool[i % len(pool)]} for i in range(count))


# --- request/reply cells: the baseline, and the pipeline stages ---


def _raise_on_errors(what: str, result: LoadResult) -> None:
    if result.errors:
        shown = "; ".join(sorted(set(result.errors))[:5])
        raise Incorrect(f"{what}: {len(result.errors)} request(s) failed: {shown}")


async def rr_cell(
    client: MeshClient, label: str, model: str | list[str], output: str, pool: list[Array], conc: int,
    opts: Options, meter: CpuMeter,
) -> Row:  # fmt: skip
    """Closed-loop MeshClient.infer at ``conc`` for one cell; sampled outputs must equal their inputs."""
    wrong: list[int] = []

    async def send(i: int) -> None:
        x = pool[i % len(pool)]
        y = (await client.infer(model, {"input": x}, timeout=30))[output]
        if i % SAMPLE_EVERY == 0 and (y.dtype != x.dtype or not np.array_equal(x, y)):
            wrong.append(i)

    meter.start()
    result = await closed_loop(send, conc, duration_s=opts.cell_s, warmup_s=opts.warmup_s)
    cpu = meter.stop()
    _raise_on_errors(f"{label} at concurrency {conc}", result)
    if wrong:
        raise Incorrect(f"{label}: {len(wrong)} sampled replies differ from their inputs, e.g. request {wrong[0]}")
    lat, rps = result.latencies_s, result.throughput
    row = Row(label, conc, len(lat), rps, rps, percentile_ms(lat, 50), percentile_ms(lat, 99), cpu=cpu)
    print(f"  {label:<32} @{conc:<3} {rps:>9,.0f} req/s  p50 {row.p50_ms:7.2f} ms  p99 {row.p99_ms:7.2f} ms"
          f"  CPU% {_cpu(cpu)}", flush=True)  # fmt: skip
    return row


async def measure_pipeline(client: MeshClient, pool: list[Array], opts: Options, meter: CpuMeter) -> list[Row]:
    """Stage A alone, then A → B: latency at concurrency 1, throughput at 64."""
    rows = []
    for label, model, output in (
        (f"{STAGE_A} alone", STAGE_A, "x"),
        (f"pipeline {STAGE_A} → {STAGE_B}", [STAGE_A, STAGE_B], "y"),
    ):
        for conc in (1, CONCURRENCY):
            rows.append(await rr_cell(client, label, model, output, pool, conc, opts, meter))
    return rows


# --- the job ---


async def _queued_after(job: Job, t0: float) -> float:
    await job.submitted()
    return time.monotonic() - t0


async def run_job(mesh: Mesh, pool: list[Array], items: int) -> tuple[JobRun, Job]:
    """Submit ``items`` from a generator and wait for "done", watching this process's memory meanwhile."""
    watch, meter = RssWatch(), mesh.pids.meter()
    meter.start()
    t0 = time.monotonic()
    job = await mesh.client.submit_job(JOB_MODEL, job_items(pool, items))
    submitter = asyncio.create_task(_queued_after(job, t0))
    try:
        progress = await follow_job(mesh.conn, job, JOB_MODEL, items, t0, submitter, POLL_S, STALL_S)
    finally:
        rss = watch.stop()
    seconds = time.monotonic() - t0
    cpu = meter.stop()
    queued_s = await submitter
    print(f"  job done: {items:,} items in {seconds:.1f} s ({items / seconds:,.0f} items/s), all queued after"
          f" {queued_s:.1f} s; client RSS {rss['start']:.0f} → peak {rss['peak']:.0f} MiB", flush=True)  # fmt: skip
    return JobRun(items, seconds, queued_s, rss, cpu, progress), job


async def submit_alone(client: MeshClient, pool: list[Array], items: int, meter: CpuMeter) -> tuple[float, Json]:
    """Items/s and CPU of the submitter with nothing else running: a job for a model no worker serves."""
    meter.start()
    t0 = time.monotonic()
    job = await client.submit_job(SINK_MODEL, job_items(pool, items))
    count = await job.submitted()
    rate, cpu = count / (time.monotonic() - t0), meter.stop()
    await job.cancel()  # its items stay queued for no one; the server goes away with the run
    print(f"  submitter alone (no worker): {count:,} items queued at {rate:,.0f} items/s, CPU% {_cpu(cpu)}", flush=True)
    return rate, cpu


# --- the run: start the worker, measure, judge ---


@dataclass(frozen=True, slots=True)
class Pids:
    client: int
    nats: int
    worker: int

    def meter(self) -> CpuMeter:
        return CpuMeter({"client": self.client, "nats": self.nats, "worker": self.worker})


@dataclass(frozen=True, slots=True)
class Mesh:
    """What the measurements talk to: the client, a control connection and registry, the processes' pids."""

    client: MeshClient
    conn: Connection
    registry: Registry
    pids: Pids


async def serving_stats(registry: Registry, timeout: float = 5.0) -> Json:
    """JOB_MODEL's counters from the worker's first heartbeat written from now on (one a second)."""
    # Heartbeats carry wall-clock stamps written by the worker, hence time.time() here.
    since, deadline = time.time(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        beat = (await registry.heartbeats()).get(WORKER_ID, {})
        if beat.get("time", 0.0) > since:
            return dict(beat["models"][f"{JOB_MODEL}:{VERSION}"]["stats"])
        await asyncio.sleep(0.1)
    raise RuntimeError(f"no heartbeat from {WORKER_ID} within {timeout:g} s")


def batch_profile(before: Json, after: Json, seconds: float) -> Json:
    """How the worker batched over a phase of ``seconds``: batches, mean size, compute and wall ms per batch."""
    batches = max(1, after["batches"] - before["batches"])
    return {"batches": batches, "mean_batch": (after["rows"] - before["rows"]) / batches,
            "compute_ms_per_batch": (after["busy_s"] - before["busy_s"]) * 1000 / batches,
            "wall_ms_per_batch": seconds * 1000 / batches}  # fmt: skip


async def measure_baseline(mesh: Mesh, pool: list[Array], opts: Options, results: Results) -> Json:
    print(f"(1) baseline: request/reply {JOB_MODEL} at concurrency {CONCURRENCY}", flush=True)
    before = await serving_stats(mesh.registry)
    results.rows.append(await rr_cell(mesh.client, f"request/reply {JOB_MODEL}", JOB_MODEL, "output", pool,
                                      CONCURRENCY, opts, mesh.pids.meter()))  # fmt: skip
    return batch_profile(before, await serving_stats(mesh.registry), opts.warmup_s + opts.cell_s)


async def measure_all(mesh: Mesh, opts: Options, results: Results) -> None:
    pool = input_pool()
    rr_profile = await measure_baseline(mesh, pool, opts, results)
    print(f"(2) job: {opts.items:,} items of {JOB_MODEL} from a generator", flush=True)
    before = await serving_stats(mesh.registry)
    job_run, job = await run_job(mesh, pool, opts.items)
    after = await serving_stats(mesh.registry)
    job_run.worker = {"request/reply": rr_profile, "job": batch_profile(before, after, job_run.seconds)}
    results.job = job_run
    job_run.read_s = await verify_results(job, opts.items, "output", lambda i: pool[i % len(pool)], SAMPLE_EVERY)
    job_run.alone_items_per_s, job_run.alone_cpu = await submit_alone(mesh.client, pool, SINK_ITEMS, mesh.pids.meter())
    print(f"(3) pipeline overhead: {STAGE_A} alone vs {STAGE_A} → {STAGE_B}", flush=True)
    results.rows += await measure_pipeline(mesh.client, pool, opts, mesh.pids.meter())


@contextlib.contextmanager
def cancelled_on_sigterm() -> Iterator[None]:
    """Inside the event loop SIGTERM cancels the current task, so that its finally blocks close connections."""
    # A KeyboardInterrupt raised from a plain signal handler would land in whichever transport callback runs.
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _interrupt)  # removing the loop's handler left the default (exit at once)


async def measure(url: str, nats_pid: int, workdir: Path, children: Children, opts: Options, results: Results) -> None:
    conn = await Connection.open(Settings.from_url(url), name="bench-jobs-control")
    try:
        with cancelled_on_sigterm():
            await provision(conn)
            registry = await Registry.open(conn)
            await registry.put_spec(await asyncio.to_thread(read_model, workdir / "unserved" / SINK_MODEL))
            # The worker runs the same event loop as this load generator.
            proc = spawn_worker(url, workdir / "models", WORKER_ID, workdir / "worker.log", {"SERVEMESH_LOOP": LOOP})
            children.add("worker", proc)
            models = {f"{m}:{VERSION}" for m in (JOB_MODEL, STAGE_A, STAGE_B)}
            beat = await wait_serving(registry, proc, WORKER_ID, models)
            pids = Pids(os.getpid(), nats_pid, int(beat["pid"]))
            async with await MeshClient.connect(url) as client:
                await measure_all(Mesh(client, conn, registry, pids), opts, results)
    finally:
        await conn.close()


def judge(results: Results) -> None:
    """The targets: job throughput against request/reply, client memory; the rest is shown for information."""
    assert results.job is not None
    job, by = results.job, {(r.path, r.conc): r for r in results.rows}
    baseline = by[(f"request/reply {JOB_MODEL}", CONCURRENCY)]
    ratio = job.items_per_s / baseline.req_per_s
    growth = job.rss_mib["peak"] - job.rss_mib["start"]
    flat = growth < RSS_GROWTH_TARGET_MIB
    a1, p1 = by[(f"{STAGE_A} alone", 1)], by[(f"pipeline {STAGE_A} → {STAGE_B}", 1)]
    a64, p64 = by[(f"{STAGE_A} alone", CONCURRENCY)], by[(f"pipeline {STAGE_A} → {STAGE_B}", CONCURRENCY)]
    added, tput = p1.p50_ms - a1.p50_ms, p64.req_per_s / a64.req_per_s
    results.checks = [
        Check(f"job / request-reply @{CONCURRENCY}, items/s per req/s", ratio, f"{ratio:.2f}",
              f">= {RATIO_TARGET}", ratio >= RATIO_TARGET),
        Check(f"job results: {job.items:,} indices exactly once, outputs = inputs", job.items, "all", "all", True),
        Check("client RSS peak growth during the job", growth, f"{growth:+.1f} MiB ({'flat' if flat else 'NOT flat'})",
              f"< {RSS_GROWTH_TARGET_MIB:g} MiB", flat),
        *job_diagnostics(job),
        Check("pipeline: added p50 per extra stage @1", added, f"{added:+.2f} ms", "-", None),
        Check(f"pipeline / {STAGE_A} alone, req/s @{CONCURRENCY}", tput, f"{tput:.2f}", "-", None),
    ]  # fmt: skip


def job_diagnostics(job: JobRun) -> list[Check]:
    """Where a job's time goes: the submitter alone, the worker with and without the submitter, reading back."""
    alone = job.alone_items_per_s
    while_submitting, after = job.worker_rates()
    return [
        Check("job: submitter alone (no worker), items/s", alone,
              f"{alone:,.0f} ({_us_per_item(job.alone_cpu, alone)} µs CPU/item)", "-", None),
        Check("job: worker, items waiting, submitter still running, items/s", while_submitting or float("nan"),
              f"{while_submitting:,.0f}" if while_submitting else "-", "-", None),
        Check("job: worker, items waiting, all items queued, items/s", after or float("nan"),
              f"{after:,.0f}" if after else "-", "-", None),
        Check("job: reading every result back, items/s", job.items / job.read_s, f"{job.items / job.read_s:,.0f}",
              "-", None),
    ]  # fmt: skip


# --- the output ---


def _cpu(cpu: dict[str, float]) -> str:
    return "/".join(f"{cpu.get(k, float('nan')):.0f}" for k in ("client", "nats", "worker", "machine"))


def _us_per_item(cpu: dict[str, float], rate: float) -> str:
    """CPU microseconds per request or item, client/nats/worker: which process each one costs most."""
    return "/".join(f"{cpu[k] * 1e4 / rate:.0f}" for k in ("client", "nats", "worker"))


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in [headers, ["-" * w for w in widths], *rows]]  # fmt: skip


def _verdict(passed: bool | None) -> str:
    return "info" if passed is None else ("PASS" if passed else "FAIL")


def render(results: Results) -> str:
    m, job = results.machine, results.job
    assert job is not None
    out = [
        f"servemesh batch-job benchmark — {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}, {m['nats_server']},"
        f" load average at start {m['loadavg']}",
        f"1 worker process, {LOOP} in every process, JetStream file storage; identity float32 [{WIDTH}] models,"
        f" max_batch_size {MAX_BATCH}, max_delay_ms {MAX_DELAY_MS}; {m['cell_s']:g} s per request/reply cell",
        "",
    ]
    rows = [[r.path, str(r.conc), f"{r.requests:,}", f"{r.req_per_s:,.0f}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}",
             _cpu(r.cpu), _us_per_item(r.cpu, r.req_per_s)] for r in results.rows]  # fmt: skip
    rows.insert(1, [f"job {JOB_MODEL}, {job.items:,} items", "256*", f"{job.items:,}", f"{job.items_per_s:,.0f}",
                    "-", "-", _cpu(job.cpu), _us_per_item(job.cpu, job.items_per_s)])  # fmt: skip
    out += _table(["path", "conc", "requests", "req/s", "p50 ms", "p99 ms", "CPU% client/nats/worker/all",
                   "CPU µs/req c/n/w"], rows)  # fmt: skip
    rss, (fewest, most) = job.rss_mib, job.queue_while_submitting()
    out += [
        f"* the job submitter keeps up to 256 publishes in flight; its time runs from submit_job to status \"done\""
        f" (polled every {POLL_S:g} s).",
        f"  all items were queued after {job.queued_s:.1f} s, the model's queue holding {fewest:,}–{most:,} items at"
        f" the polls before; client RSS start {rss['start']:.1f} MiB, peak {rss['peak']:.1f} MiB, end"
        f" {rss['end']:.1f} MiB.",
        *(f"  worker, {JOB_MODEL} {what}: {w['batches']:,} batches, mean batch {w['mean_batch']:.1f},"
          f" {w['compute_ms_per_batch']:.3f} ms compute and {w['wall_ms_per_batch']:.2f} ms wall per batch"
          for what, w in job.worker.items()),
        "  CPU%: 100 = one core; all = every process on the machine (all minus the rest = load not ours).",
        "",
        *_table(["measurement", "value", "target", "result"],
                [[c.name, c.shown, c.target, _verdict(c.passed)] for c in results.checks]),
        "",
        f"total time {results.elapsed_s:.0f} s",
    ]  # fmt: skip
    return "\n".join(out)


def machine_info(opts: Options) -> Json:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    version = subprocess.run([find_nats_server(), "--version"], capture_output=True, text=True, check=False)
    return {
        "nproc": len(os.sched_getaffinity(0)), "cpu": cpu, "python": platform.python_version(),
        "platform": platform.platform(), "nats_server": version.stdout.strip() or "nats-server ?", "loop": LOOP,
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()), "cell_s": opts.cell_s, "items": opts.items,
    }  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 s request/reply cells and a 20,000-item job")
    parser.add_argument("--json-out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    return Options(cell_s=2.0 if quick else 5.0, warmup_s=0.5, items=20_000 if quick else 100_000,
                   json_out=args.json_out)  # fmt: skip


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM takes the same way out as Ctrl-C, so the worker and nats-server are stopped either way.
    raise KeyboardInterrupt


def _print_log_tail(path: Path, lines: int = 30) -> None:
    if path.exists():
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        print(f"--- last {len(tail)} lines of {path.name} ---", *tail, sep="\n", file=sys.stderr)


def run(opts: Options, results: Results) -> None:
    """Build the models, start nats-server and the worker, measure; stop every child by PID whatever happened."""
    children = Children()
    server: NatsServer | None = None
    with tempfile.TemporaryDirectory(prefix="servemesh-bench-jobs-") as tmp:
        workdir = Path(tmp)
        try:
            print("building models…", flush=True)
            build_models(workdir)
            server = NatsServer().start()
            assert server.proc is not None
            run_on_loop(measure(server.url, server.proc.pid, workdir, children, opts, results), LOOP)
        except Exception:
            _print_log_tail(workdir / "worker.log")
            raise
        finally:
            children.stop_all()
            if server is not None:
                server.close()


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    results = Results(machine=machine_info(opts))
    try:
        run(opts, results)
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C, or SIGTERM (see cancelled_on_sigterm)
        print("interrupted", file=sys.stderr)
        return 130
    except Incorrect as exc:
        print(f"\nINCORRECT: {exc}", file=sys.stderr)
        return 1
    results.elapsed_s = time.monotonic() - started
    judge(results)
    publish(render(results), results, opts.json_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
