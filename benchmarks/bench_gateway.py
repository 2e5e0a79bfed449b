"""The Open Inference Protocol gateway under load, beside its ceiling: a bare HTTP echo on the same
server stack (aiohttp), then the gateway on the identity model and on the MLP 512→4096→512 (one
row per request), over REST JSON, REST binary (Triton's extension) and gRPC, at concurrency 1 and
64. Prints req/s, p50, p99 and CPU µs per request by process (load generator, gateway, worker,
nats-server), all in one run.

Run from the repository root: ``python benchmarks/bench_gateway.py [--seconds 3] [--quick] [--mlserver PATH]``;
MLServer goes in an environment of its own: ``python -m venv /tmp/mls && /tmp/mls/bin/pip install mlserver
onnxruntime "uvloop<0.22"`` (MLServer 1.7 fails on uvloop 0.22+), then ``--mlserver /tmp/mls/bin/mlserver``.
The load generator is this file too (``--load``), in a process of its own; with ``--perf-analyzer`` the
gateway's rows are driven by Triton's perf_analyzer instead (the binary in the tritonclient wheel, random
inputs from the model's configuration; MLServer serves no configuration, so it keeps this file's).
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
import json
import os
import resource
import socket
import subprocess
import tempfile
import time
from typing import Any

import numpy as np

from benchmarks.bench_mesh import Children
from benchmarks.cpu import CpuMeter

WIDTH = {"identity": 16, "mlp": 512, "echo": 16}  # the echo carries an identity request
_HEADER_LENGTH = "Inference-Header-Content-Length"


# -- the load generator (its own process) --------------------------------------------------------


def _rest_body(model: str, binary: bool) -> tuple[bytes, dict[str, str]]:
    row = np.random.default_rng(0).standard_normal((1, WIDTH[model])).astype(np.float32)
    tensor: dict[str, Any] = {"name": "input", "shape": [1, WIDTH[model]], "datatype": "FP32"}
    if not binary:
        doc = {"inputs": [{**tensor, "data": row.ravel().tolist()}]}
        return json.dumps(doc).encode(), {"Content-Type": "application/json"}
    raw = row.tobytes()
    head = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}],
                       "parameters": {"binary_data_output": True}}).encode()  # fmt: skip
    return head + raw, {"Content-Type": "application/octet-stream", _HEADER_LENGTH: str(len(head))}


async def _load(target: str, kind: str, model: str, concurrency: int, seconds: float) -> dict[str, float]:
    if kind == "grpc":
        import grpc

        from servemesh.gateway.proto import grpc_predict_v2_pb2 as pb
        from servemesh.gateway.proto import grpc_predict_v2_pb2_grpc as pb_grpc

        row = np.random.default_rng(0).standard_normal((1, WIDTH[model])).astype(np.float32)
        request = pb.ModelInferRequest(model_name=model, raw_input_contents=[row.tobytes()])
        request.inputs.add(name="input", datatype="FP32", shape=[1, WIDTH[model]])
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            async def call() -> bool:
                await stub.ModelInfer(request)
                return True

            return await _closed_loop(call, concurrency, seconds)
    import aiohttp

    body, headers = _rest_body(model, kind == "binary")
    url = f"{target}/v2/models/{model}/infer" if model != "echo" else f"{target}/echo"
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def call() -> bool:
            async with http.post(url, data=body, headers=headers) as answer:
                await answer.read()
                return answer.status == 200

        return await _closed_loop(call, concurrency, seconds)


async def _closed_loop(call: Any, concurrency: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    failed = [0]

    async def caller(until: float, keep: bool) -> None:
        while time.monotonic() < until:
            started = time.perf_counter()
            try:
                ok = await call()
            except Exception:
                ok = False
            if keep:
                latencies.append(time.perf_counter() - started)
                failed[0] += not ok

    await asyncio.gather(*(caller(time.monotonic() + 0.5, False) for _ in range(concurrency)))  # warm-up
    print("measuring", flush=True)
    began, cpu = time.monotonic(), time.process_time()
    await asyncio.gather(*(caller(began + seconds, True) for _ in range(concurrency)))
    elapsed, cpu = time.monotonic() - began, time.process_time() - cpu
    latencies.sort()

    def pick(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3 if latencies else float("nan")

    return {"rps": len(latencies) / elapsed, "p50": pick(0.5), "p99": pick(0.99), "failed": failed[0],
            "n": len(latencies), "cpu_percent": cpu / elapsed * 100}  # fmt: skip


# -- the bare echo (its own process): the same server stack, no mesh ------------------------------


def _echo(port: int) -> None:
    from aiohttp import web

    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read(), content_type=request.content_type)

    app = web.Application()
    app.router.add_post("/echo", echo)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# -- the run ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port} after {timeout}s")


def _cell(target: str, kind: str, model: str, concurrency: int, seconds: float,
          pids: dict[str, int]) -> dict[str, Any]:  # fmt: skip
    args = [sys.executable, __file__, "--load", target, kind, model, str(concurrency), str(seconds)]
    load = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    assert load.stdout is not None
    meter = CpuMeter(pids)  # the load generator measures its own
    first = load.stdout.readline()  # "measuring": the warm-up is over
    if "measuring" not in first:
        raise RuntimeError(f"load generator: {first}")
    meter.start()
    out, _ = load.communicate(timeout=seconds + 120)
    cpu = meter.stop()
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    cpu["loadgen"] = result["cpu_percent"]
    if result["rps"]:
        result["cpu_us"] = {name: cpu[name] / 100 / result["rps"] * 1e6 for name in [*pids, "loadgen"]}
    return result


def _perf_analyzer_cell(target: str, kind: str, model: str, concurrency: int, seconds: float,
                        pids: dict[str, int]) -> dict[str, Any]:  # fmt: skip
    """One cell with perf_analyzer as the load generator: its CSV gives req/s and p50/p99 (µs), its rusage its CPU."""
    import nvidia.cuda_runtime  # the CUDA runtime perf_analyzer links (no GPU is used)

    libs = os.pathsep.join(str(Path(p) / "lib") for p in nvidia.cuda_runtime.__path__)
    binary = Path(sys.executable).parent / "perf_analyzer"
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "out.csv"
        protocol = "grpc" if kind == "grpc" else "http"
        args = [str(binary), "-m", model, "-u", target.removeprefix("http://"), "-i", protocol,
                "--concurrency-range", str(concurrency), "--measurement-interval", str(int(seconds * 1000)),
                "--max-trials", "10", "--stability-percentage", "50", "-f", str(csv)]  # fmt: skip
        if kind != "grpc":
            args += [f"--input-tensor-format={kind}", f"--output-tensor-format={kind}"]
        meter = CpuMeter(pids)
        meter.start()
        started, before = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "LD_LIBRARY_PATH": libs})  # fmt: skip
        out = proc.communicate(timeout=seconds * 10 + 120)[0]
        cpu = meter.stop()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the ended children's: perf_analyzer's is new
        if proc.returncode != 0 or not csv.exists():
            raise RuntimeError(f"perf_analyzer failed:\n{out}")
        head, values = csv.read_text().splitlines()[:2]
        row = dict(zip(head.split(","), values.split(","), strict=False))
    rps = float(row["Inferences/Second"])
    spent = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    cpu["loadgen"] = spent / (time.monotonic() - started) * 100
    p50, p99 = float(row["p50 latency"]) / 1000, float(row["p99 latency"]) / 1000
    result: dict[str, Any] = {"rps": rps, "p50": p50, "p99": p99, "failed": 0}
    if rps:
        result["cpu_us"] = {name: cpu[name] / 100 / rps * 1e6 for name in [*pids, "loadgen"]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true", help="1 s cells")
    parser.add_argument("--load", nargs=5, metavar=("TARGET", "KIND", "MODEL", "CONCURRENCY", "SECONDS"),
                        help=argparse.SUPPRESS)  # fmt: skip
    parser.add_argument("--echo", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mlserver", type=Path, help="the `mlserver` command of an environment with mlserver and "
                        "onnxruntime: MLServer serves the same MLP (adaptive batching) in the same run")  # fmt: skip
    parser.add_argument("--perf-analyzer", action="store_true",
                        help="drive the gateway with Triton's perf_analyzer (tritonclient's binary)")  # fmt: skip
    args = parser.parse_args()
    if args.load:
        target, kind, model, concurrency, seconds = args.load
        print(json.dumps(asyncio.run(_load(target, kind, model, int(concurrency), float(seconds)))), flush=True)
        return
    if args.echo:
        _echo(args.echo)
        return
    seconds = 1.0 if args.quick else args.seconds
    from broker import NatsServer
    from examples.build_models import build_identity_onnx, build_mlp_onnx

    children = Children()
    with tempfile.TemporaryDirectory(prefix="servemesh-gw-") as tmp, NatsServer() as server:
        repo = Path(tmp) / "models"
        build_identity_onnx(repo, "identity", "float32", max_batch_size=64, max_delay_ms=1, shape=(16,))
        build_mlp_onnx(repo, "mlp", max_batch_size=128, max_delay_ms=2)
        env = {**os.environ, "SERVEMESH_LOOP": "uvloop"}
        subprocess.run([sys.executable, "-m", "servemesh", "provision", "--nats", server.url], check=True,
                       capture_output=True, cwd=REPO_ROOT)  # fmt: skip
        logs = Path(tmp)
        try:
            with open(logs / "worker.log", "ab") as log:
                worker = children.add("worker", subprocess.Popen(
                    [sys.executable, "-m", "servemesh", "worker", "--models", str(repo), "--nats", server.url],
                    stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT))  # fmt: skip
            http_port, grpc_port, echo_port = _free_port(), _free_port(), _free_port()
            with open(logs / "gateway.log", "ab") as log:
                gateway = children.add("gateway", subprocess.Popen(
                    [sys.executable, "-m", "servemesh", "gateway", "--http-port", str(http_port), "--grpc-port",
                     str(grpc_port), "--nats", server.url], stdout=log, stderr=subprocess.STDOUT, env=env,
                    cwd=REPO_ROOT))  # fmt: skip
            echo = children.add("echo", subprocess.Popen([sys.executable, __file__, "--echo", str(echo_port)],
                                                         cwd=REPO_ROOT))  # fmt: skip
            for port in (http_port, grpc_port, echo_port):
                _wait_port(port)
            _wait_served(f"http://127.0.0.1:{http_port}")
            assert server.proc is not None
            rows = []
            echo_pids = {"echo": echo.pid}
            mesh_pids = {"gateway": gateway.pid, "worker": worker.pid, "nats": server.proc.pid}
            if args.mlserver:
                rows += _mlserver_rows(args.mlserver, repo / "mlp" / "1" / "model.onnx", Path(tmp), seconds, children)
            for concurrency in (1, 64):
                for kind in ("json", "binary"):
                    rows.append(("echo", kind, concurrency, _cell(f"http://127.0.0.1:{echo_port}", kind, "echo",
                                                                  concurrency, seconds, echo_pids)))  # fmt: skip
                for model in ("identity", "mlp"):
                    for kind in ("json", "binary", "grpc"):
                        target = f"127.0.0.1:{grpc_port}" if kind == "grpc" else f"http://127.0.0.1:{http_port}"
                        cell = _perf_analyzer_cell if args.perf_analyzer else _cell
                        rows.append((model, kind, concurrency, cell(target, kind, model, concurrency, seconds,
                                                                    mesh_pids)))  # fmt: skip
                        _say(rows[-1])
        finally:
            children.stop_all()
    _table(rows)


def _mlserver_rows(mlserver: Path, onnx: Path, tmp: Path, seconds: float,
                   children: Children) -> list[tuple[str, str, int, dict[str, Any]]]:  # fmt: skip
    """MLServer on the same ONNX MLP with its adaptive batching (the same batch limits as the mesh's)."""
    folder = tmp / "mlserver"
    (folder / "mlp").mkdir(parents=True)
    http_port, grpc_port, metrics_port = _free_port(), _free_port(), _free_port()
    ports = {"http_port": http_port, "grpc_port": grpc_port, "metrics_port": metrics_port}
    (folder / "settings.json").write_text(json.dumps({**ports, "parallel_workers": 1}))
    (folder / "mlp" / "model-settings.json").write_text(json.dumps({
        "name": "mlp", "implementation": "onnx_runtime.OnnxRuntime", "max_batch_size": 128, "max_batch_time": 0.002,
        "parameters": {"uri": str(onnx)},
    }))  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "benchmarks" / "mlserver")}
    with open(tmp / "mlserver.log", "ab") as log:
        proc = children.add("mlserver", subprocess.Popen([str(mlserver), "start", str(folder)], stdout=log,
                                                         stderr=subprocess.STDOUT, env=env))  # fmt: skip
    _wait_port(http_port, 120)
    _wait_served(f"http://127.0.0.1:{http_port}", ("mlp",), 120)
    rows = []
    for concurrency in (1, 64):
        for kind in ("json", "grpc"):
            target = f"127.0.0.1:{grpc_port}" if kind == "grpc" else f"http://127.0.0.1:{http_port}"
            rows.append(("mlserver", kind, concurrency, _cell(target, kind, "mlp", concurrency, seconds,
                                                             {"mlserver": proc.pid})))  # fmt: skip
            _say(rows[-1])
    proc.terminate()
    return rows


def _wait_served(url: str, models: tuple[str, ...] = ("identity", "mlp"), timeout: float = 60.0) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    for model in models:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/v2/models/{model}/ready", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{model} not ready through the gateway after {timeout}s")
            time.sleep(0.2)


def _say(row: tuple[str, str, int, dict[str, Any]]) -> None:
    model, kind, concurrency, cell = row
    print(f"  {model:<9} {kind:<7} c={concurrency:<3} {cell['rps']:8.0f} req/s  p50 {cell['p50']:6.2f} ms  "
          f"p99 {cell['p99']:6.2f} ms  failed {cell['failed']}", flush=True)  # fmt: skip


def _table(rows: list[tuple[str, str, int, dict[str, Any]]]) -> None:
    print("\n| target | protocol | concurrency | req/s | p50 ms | p99 ms | CPU µs/request: loadgen / server / "
          "worker / nats |")
    print("|---|---|---|---|---|---|---|")
    for model, kind, concurrency, cell in rows:
        cpu = cell.get("cpu_us", {})
        server = cpu.get("echo", cpu.get("gateway", cpu.get("mlserver", 0.0)))
        split = " / ".join(f"{v:.0f}" for v in (cpu.get("loadgen", 0.0), server, cpu.get("worker", 0.0),
                                                 cpu.get("nats", 0.0)))  # fmt: skip
        label = {"echo": "bare aiohttp echo", "mlserver": "MLServer → mlp"}.get(model, f"gateway → {model}")
        print(f"| {label} | {kind} | {concurrency} | {cell['rps']:,.0f} | {cell['p50']:.2f} | {cell['p99']:.2f} | "
              f"{split} |" + (f" ({cell['failed']} failed)" if cell["failed"] else ""))  # fmt: skip


if __name__ == "__main__":
    main()
