"""The Open Inference Protocol gateway as a user's tools meet it: a real `servemesh gateway` process
on a real mesh, driven by tritonclient (http and grpc) and by raw JSON as curl would send it.
Outputs equal a direct onnxruntime call; every error has its status."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
import yaml
from tritonclient.utils import InferenceServerException

from broker import NatsServer
from examples.build_models import build_identity_onnx
from tests.conftest import serving, set_config, unique, wait_for

ROOT = Path(__file__).resolve().parents[2]
SERVED = ["iris", "identity_float32", "identity_float16", "identity_float64", "identity_int8", "identity_int32",
          "identity_int64", "identity_uint8", "identity_uint64", "identity_bool", "identity_string"]  # fmt: skip


class Gateway:
    def __init__(self, proc: subprocess.Popen[str], http: str, grpc: str) -> None:
        self.proc, self.http, self.grpc = proc, http, grpc

    @property
    def http_host(self) -> str:
        return self.http.removeprefix("http://")


def start_gateway(url: str, *extra: str, env: dict[str, str] | None = None) -> Gateway:
    args = [sys.executable, "-m", "servemesh", "gateway", "--http-port", "0", "--grpc-port", "0", "--nats", url, *extra]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})  # fmt: skip
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(r"gateway: REST (\S+), gRPC (\S+)", line)
        if found:
            return Gateway(proc, found.group(1), found.group(2))
    proc.kill()
    raise AssertionError("the gateway did not start:\n" + "".join(lines))


def stop(gateway: Gateway) -> None:
    gateway.proc.terminate()
    try:
        gateway.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        gateway.proc.kill()
        gateway.proc.wait()


@pytest.fixture
async def mesh(nats_server: NatsServer, model_repo: Path) -> AsyncIterator[Gateway]:
    async with serving(nats_server.url, model_repo, SERVED) as worker:
        await worker.beat_now()  # its models in its heartbeat now, not at its next beat
        gateway = await asyncio.to_thread(start_gateway, nats_server.url)
        try:
            yield gateway
        finally:
            stop(gateway)


def _iris_rows() -> np.ndarray:
    from sklearn.datasets import load_iris

    return load_iris().data[:7].astype(np.float32)


def _direct(model_repo: Path, rows: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(model_repo / "iris" / "1" / "model.onnx"))
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"input": rows}), strict=True))


async def test_tritonclient_http_binary_and_json_match_onnxruntime(mesh: Gateway, model_repo: Path) -> None:
    rows = _iris_rows()
    expected = _direct(model_repo, rows)

    def call() -> None:
        client = triton_http.InferenceServerClient(mesh.http_host)
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("iris")
        meta = client.get_model_metadata("iris")
        assert meta["name"] == "iris" and meta["versions"] == ["1"]
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
        config = client.get_model_config("iris")
        assert config["max_batch_size"] > 0 and config["input"][0]["dims"] == [4]
        for binary in (True, False):
            inp = triton_http.InferInput("input", list(rows.shape), "FP32")
            inp.set_data_from_numpy(rows, binary_data=binary)
            outputs = [triton_http.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "label")]
            result = client.infer("iris", [inp], outputs=outputs, request_id="req-7")
            probabilities = result.as_numpy("probabilities")
            np.testing.assert_allclose(probabilities, expected["probabilities"], rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(result.as_numpy("label"), expected["label"])
            assert result.get_response()["id"] == "req-7"
        client.close()

    await asyncio.to_thread(call)


async def test_tritonclient_grpc_matches_onnxruntime(mesh: Gateway, model_repo: Path) -> None:
    rows = _iris_rows()
    expected = _direct(model_repo, rows)

    def call() -> None:
        client = triton_grpc.InferenceServerClient(mesh.grpc)
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("iris")
        meta = client.get_model_metadata("iris", as_json=True)
        assert meta["name"] == "iris" and meta["inputs"][0]["datatype"] == "FP32"
        assert client.get_server_metadata(as_json=True)["name"] == "servemesh"
        inp = triton_grpc.InferInput("input", list(rows.shape), "FP32")
        inp.set_data_from_numpy(rows)
        result = client.infer("iris", [inp], request_id="g-1")
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected["probabilities"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(result.as_numpy("label"), expected["label"])
        with pytest.raises(InferenceServerException, match="no model") as info:
            client.infer("nope", [inp])
        assert "NOT_FOUND" in str(info.value.status())
        client.close()

    await asyncio.to_thread(call)


DTYPES = {"float32": "FP32", "float16": "FP16", "float64": "FP64", "int8": "INT8", "int32": "INT32",
          "int64": "INT64", "uint8": "UINT8", "uint64": "UINT64", "bool": "BOOL", "string": "BYTES"}  # fmt: skip


def _sample(dtype: str) -> np.ndarray:
    if dtype == "string":
        return np.array([[b"alpha", "\u00e9t\u00e9".encode(), b""]], dtype=object)
    if dtype == "bool":
        return np.array([[True, False, True]])
    info = np.iinfo(dtype) if dtype.startswith(("int", "uint")) else None
    values = [info.min, 0, info.max] if info else [-1.5, 0.0, 65504.0 if dtype == "float16" else 1e300 / 1e290]
    return np.array([values], dtype=dtype)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
async def test_every_datatype_round_trips_over_both_transports(mesh: Gateway, dtype: str) -> None:
    data = _sample(dtype)
    datatype = DTYPES[dtype]

    def call() -> None:
        http = triton_http.InferenceServerClient(mesh.http_host)
        inp = triton_http.InferInput("input", list(data.shape), datatype)
        inp.set_data_from_numpy(data, binary_data=True)
        got = http.infer(f"identity_{dtype}", [inp]).as_numpy("output")
        assert got.dtype == data.dtype or dtype == "string"
        np.testing.assert_array_equal(got, data)
        grpc = triton_grpc.InferenceServerClient(mesh.grpc)
        ginp = triton_grpc.InferInput("input", list(data.shape), datatype)
        ginp.set_data_from_numpy(data)
        np.testing.assert_array_equal(grpc.infer(f"identity_{dtype}", [ginp]).as_numpy("output"), data)
        http.close()
        grpc.close()

    await asyncio.to_thread(call)


async def _post(gateway: Gateway, path: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as http, http.post(gateway.http + path, data=data, headers=headers) as answer:
        raw = await answer.read()
        return answer.status, json.loads(raw) if raw else None


async def _get(gateway: Gateway, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(gateway.http + path, headers=headers) as answer:
        raw = await answer.read()
        return answer.status, json.loads(raw) if raw else None


async def test_raw_json_as_curl_sends_it(mesh: Gateway, model_repo: Path) -> None:
    rows = _iris_rows()[:2]
    expected = _direct(model_repo, rows)
    nested = {"id": "c1", "inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32", "data": rows.tolist()}],
              "outputs": [{"name": "label"}]}  # fmt: skip
    status, doc = await _post(mesh, "/v2/models/iris/infer", nested)
    assert status == 200, doc
    assert doc["id"] == "c1" and doc["model_name"] == "iris" and doc["model_version"] == "1"
    assert [o["name"] for o in doc["outputs"]] == ["label"]
    assert doc["outputs"][0]["data"] == expected["label"].ravel().tolist()
    flat = {"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32", "data": rows.ravel().tolist()}]}
    status, doc = await _post(mesh, "/v2/models/iris/versions/1/infer", flat)
    assert status == 200 and {o["name"] for o in doc["outputs"]} == {"probabilities", "label"}
    zipped = gzip.compress(json.dumps(flat).encode())
    status, doc = await _post(mesh, "/v2/models/iris/infer", zipped, {"Content-Encoding": "gzip"})
    assert status == 200, doc
    assert (await _get(mesh, "/v2"))[1]["name"] == "servemesh"
    # NaN and ±Infinity, as Triton's parser takes them (perf_analyzer's random data has them), both ways.
    tokens = b'{"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [NaN, Infinity, -Infinity]}]}'
    status, doc = await _post(mesh, "/v2/models/identity_float32/infer", tokens)
    assert status == 200, doc
    got = doc["outputs"][0]["data"]
    assert np.isnan(got[0]) and got[1:] == [float("inf"), float("-inf")]
    assert await _get(mesh, "/v2/health/live") == (200, {"live": True})
    assert await _get(mesh, "/v2/health/ready") == (200, {"ready": True})
    assert await _get(mesh, "/v2/models/iris/versions/1/ready") == (200, {"name": "iris", "ready": True})

    async def counted() -> bool:  # the counters come with the workers' heartbeats
        status, stats = await _get(mesh, "/v2/models/iris/stats")
        return status == 200 and stats["model_stats"][0]["inference_stats"]["success"]["count"] >= 3

    await wait_for(counted, 15, "iris's statistics")
    status, index = await _post(mesh, "/v2/repository/index", {})
    assert status == 200 and {"name": "iris", "version": "1", "state": "READY"} in index


async def test_tritonclient_grpc_config_statistics_and_repository(mesh: Gateway) -> None:
    rows = _iris_rows()

    def call() -> None:
        client = triton_grpc.InferenceServerClient(mesh.grpc)
        config = client.get_model_config("iris", as_json=True)["config"]
        assert config["name"] == "iris" and config["platform"] == "onnxruntime_onnx"
        assert config["max_batch_size"] > 0 and config["input"] == [{"name": "input", "data_type": "TYPE_FP32",
                                                                     "dims": ["4"]}]  # fmt: skip
        assert {o["name"] for o in config["output"]} == {"probabilities", "label"}
        inp = triton_grpc.InferInput("input", list(rows.shape), "FP32")
        inp.set_data_from_numpy(rows)
        client.infer("iris", [inp])
        index = client.get_model_repository_index(as_json=True)["models"]
        assert {"name": "iris", "version": "1", "state": "READY"} in index
        client.load_model("iris")  # ready already: returns at once
        for call, args in ((client.get_model_config, ("nope",)), (client.unload_model, ("nope",)),
                           (client.get_inference_statistics, ("nope",))):  # fmt: skip
            with pytest.raises(InferenceServerException) as info:
                call(*args)
            assert "NOT_FOUND" in str(info.value.status()), call
        deadline = time.monotonic() + 15  # the counters come with the workers' heartbeats
        while True:
            stats = client.get_inference_statistics("iris", as_json=True)["model_stats"]
            if stats and int(stats[0]["inference_stats"]["success"].get("count", 0)) >= 1:
                break
            assert time.monotonic() < deadline, stats
            time.sleep(0.3)
        assert stats[0]["name"] == "iris" and stats[0]["version"] == "1"
        client.close()

    await asyncio.to_thread(call)


async def test_repository_extension_over_rest(mesh: Gateway) -> None:
    status, index = await _post(mesh, "/v2/repository/index", {"ready": True})
    assert status == 200 and {"name": "iris", "version": "1", "state": "READY"} in index
    assert all(entry["state"] == "READY" for entry in index)
    assert (await _post(mesh, "/v2/repository/index", b""))[0] == 200  # Triton's clients may send no body
    status, doc = await _post(mesh, "/v2/repository/index", b"[1,")
    assert status == 400 and "JSON" in doc["error"]
    assert (await _post(mesh, "/v2/repository/models/iris/load", {}))[0] == 200
    status, doc = await _post(mesh, "/v2/repository/models/nope/unload", {})
    assert status == 404 and "nope" in doc["error"]
    status, config = await _get(mesh, "/v2/models/iris/config")
    assert status == 200 and config["dynamic_batching"]["max_queue_delay_microseconds"] >= 0


# The KServe SDK pins protobuf below what servemesh's generated gRPC code needs: it gets a venv of its own.
KSERVE = "kserve==0.21.0"
KSERVE_VENV = ROOT / ".servemesh" / "kserve-client-venv"


def _kserve_python() -> Path:
    python = KSERVE_VENV / "bin" / "python"
    stamp = KSERVE_VENV / f".{KSERVE}"
    if not stamp.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(KSERVE_VENV)], check=True, timeout=120)
        done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", KSERVE], capture_output=True,
                              text=True, timeout=900)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        stamp.touch()
    return python


async def test_kserve_sdk_rest_client(mesh: Gateway, model_repo: Path) -> None:
    python = await asyncio.to_thread(_kserve_python)
    rows = _iris_rows()
    expected = _direct(model_repo, rows)
    done = await asyncio.to_thread(subprocess.run, [str(python), str(ROOT / "tests/integration/kserve_client.py"),
                                   mesh.http], input=json.dumps(rows.tolist()), capture_output=True, text=True,
                                   timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["ready"] is True and seen["model_ready"] is True
    for binary in (True, False):
        answer = seen[f"binary={binary}"]
        assert answer["id"] == f"ks-{binary}"
        np.testing.assert_allclose(answer["outputs"]["probabilities"], expected["probabilities"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(answer["outputs"]["label"], expected["label"])
    assert seen["unknown"]["status"] == 404 and "nope" in seen["unknown"]["message"]


def _perf_analyzer() -> tuple[str, dict[str, str]]:
    """tritonclient's perf_analyzer binary and the environment it loads in: it links the CUDA runtime
    (from the nvidia-cuda-runtime-cu12 wheel; no GPU is needed to drive HTTP/gRPC) and libb64 (Debian)."""
    import importlib.util

    binary = Path(sys.executable).parent / "perf_analyzer"
    spec = importlib.util.find_spec("nvidia.cuda_runtime")
    assert binary.exists() and spec is not None, "perf_analyzer comes with the dev extra (tritonclient, CUDA runtime)"
    libs = [str(Path(p) / "lib") for p in spec.submodule_search_locations or ()]
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join([*libs, os.environ.get("LD_LIBRARY_PATH", "")])}
    return str(binary), env


@pytest.mark.parametrize("transport", ["http", "grpc"])
async def test_perf_analyzer_drives_the_gateway(mesh: Gateway, transport: str) -> None:
    binary, env = _perf_analyzer()
    url = mesh.http_host if transport == "http" else mesh.grpc
    args = [binary, "-m", "iris", "-u", url, "-i", transport, "--concurrency-range", "4",
            "--measurement-interval", "2000", "--stability-percentage", "100", "--max-trials", "3"]  # fmt: skip
    done = await asyncio.to_thread(subprocess.run, args, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    found = re.search(r"Concurrency: 4, throughput: ([\d.]+) infer/sec", done.stdout)
    assert found and float(found.group(1)) > 0, done.stdout


@pytest.mark.parametrize(("path", "body", "status", "says"), [
    ("/v2/models/nope/infer", {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [0] * 4}]},
     404, "no model"),
    ("/v2/models/iris/versions/9/infer", {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                                      "data": [0] * 4}]}, 404, "no version"),
    ("/v2/models/iris/infer", {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [0] * 3}]},
     400, "input"),
    ("/v2/models/iris/infer", {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP99", "data": [0] * 4}]},
     400, "FP99"),
    ("/v2/models/iris/infer", {"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [0] * 3}]},
     400, "shape"),
    ("/v2/models/iris/infer", {"inputs": []}, 400, "inputs"),
    ("/v2/models/iris/infer", b"{not json", 400, "JSON"),
    ("/v2/models/iris/infer", {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [0] * 4}],
                               "parameters": {"priority": "urgent"}}, 400, "priority"),
])  # fmt: skip
async def test_errors_have_their_status(mesh: Gateway, path: str, body: Any, status: int, says: str) -> None:
    got, doc = await _post(mesh, path, body)
    assert got == status, doc
    assert says.lower() in doc["error"].lower()


async def test_a_disconnected_http_client_cancels_its_request(nats_server: NatsServer, tmp_path: Path) -> None:
    name = unique("slow")
    build_identity_onnx(tmp_path, name, "float32", shape=(4,), max_batch_size=4, max_delay_ms=1)
    async with serving(nats_server.url, tmp_path, [name]) as worker:
        server = worker.servers[(name, "1")]
        predict = server.runtime.predict

        def slow_predict(inputs: Any) -> Any:
            time.sleep(0.3)
            return predict(inputs)

        server.runtime.predict = slow_predict
        server._row_cost_s = 1.0
        gateway = await asyncio.to_thread(start_gateway, nats_server.url)
        try:
            body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
            assert (await _post(gateway, f"/v2/models/{name}/infer", body))[0] == 200
            rows_before = server.stats.rows
            timeout = aiohttp.ClientTimeout(total=0.4)
            async with aiohttp.ClientSession(timeout=timeout) as http:

                async def give_up() -> None:
                    try:
                        async with http.post(f"{gateway.http}/v2/models/{name}/infer", json=body) as answer:
                            await answer.read()
                    except TimeoutError:
                        pass

                await asyncio.gather(*(give_up() for _ in range(40)))

            async def dropped() -> bool:
                return server.stats.cancelled > 0 and server.in_flight == 0

            await wait_for(dropped, 30, "the abandoned requests dropped")
            # Of 40 abandoned requests, those in a batch before the disconnect computed; the rest not.
            assert server.stats.rows - rows_before + server.stats.cancelled == 40
            assert server.stats.cancelled >= 20
        finally:
            stop(gateway)


@pytest.fixture
def keys_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump({"keys": {"key-a": {"tenant": "tenant_a"}, "key-b": {"tenant": "tenant_b"}}}))
    yield path


async def test_api_keys_scope_tenants(nats_server: NatsServer, tmp_path: Path, keys_file: Path) -> None:
    owned = unique("owned")
    build_identity_onnx(tmp_path, owned, "float32", shape=(4,))
    set_config(tmp_path / owned, tenant="tenant_a")
    async with serving(nats_server.url, tmp_path, [owned]):
        gateway = await asyncio.to_thread(start_gateway, nats_server.url, "--keys", str(keys_file))
        try:
            body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
            path = f"/v2/models/{owned}/infer"
            assert (await _post(gateway, path, body))[0] == 401
            assert (await _post(gateway, path, body, {"Authorization": "Bearer wrong"}))[0] == 401
            status, doc = await _post(gateway, path, body, {"X-API-Key": "key-b"})
            assert status == 403 and owned in doc["error"]
            status, doc = await _post(gateway, path, body, {"Authorization": "Bearer key-a"})
            assert status == 200 and doc["outputs"][0]["data"] == [1, 2, 3, 4]
            _, index = await _post(gateway, "/v2/repository/index", {}, {"X-API-Key": "key-b"})
            assert index == []
        finally:
            stop(gateway)


async def test_gateway_mistakes_are_one_line(nats_server: NatsServer, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("keys: [1, 2]")
    for args, says in (
        (["--keys", str(bad)], "not a key file"),
        (["--keys", str(tmp_path / "missing.yaml")], "no such file"),
        (["--tls-cert", str(bad)], "--tls-key"),
        (["--http-port", "-1", "--grpc-port", "-1"], "both listeners are off"),
        (["--http-port", "70000"], "a port is"),
        (["--http-port", "0", "--processes", "2"], "fixed ports"),
    ):
        done = subprocess.run([sys.executable, "-m", "servemesh", "gateway", "--nats", nats_server.url, *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 2, (args, done.stderr)
        assert says in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


async def test_metrics_count_calls_without_callers_names(nats_server: NatsServer, model_repo: Path) -> None:
    from tests.integration.secure_mesh import free_ports

    (metrics_port,) = free_ports(1)
    async with serving(nats_server.url, model_repo, ["iris"]) as worker:
        await worker.beat_now()
        gateway = await asyncio.to_thread(start_gateway, nats_server.url, "--metrics-port", str(metrics_port))
        try:
            body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}
            assert (await _post(gateway, "/v2/models/iris/infer", body))[0] == 200
            assert (await _post(gateway, "/v2/models/iris/infer", {"inputs": []}))[0] == 400
            assert (await _post(gateway, "/v2/models/secret-probe-7/infer", body))[0] == 404

            def grpc_calls() -> None:
                client = triton_grpc.InferenceServerClient(gateway.grpc)
                inp = triton_grpc.InferInput("input", [1, 4], "FP32")
                inp.set_data_from_numpy(np.array([[5.1, 3.5, 1.4, 0.2]], np.float32))
                client.infer("iris", [inp])
                with pytest.raises(InferenceServerException):
                    client.infer("secret-probe-8", [inp])
                client.close()

            await asyncio.to_thread(grpc_calls)
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{metrics_port}/health/ready") as answer:
                    assert answer.status == 200
                async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as answer:
                    text = await answer.text()
        finally:
            stop(gateway)
    counted = {}
    for line in text.splitlines():
        found = re.match(r"servemesh_gateway_requests_total\{(.*)\} ([\d.]+)$", line)
        if found:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', found.group(1)))
            key = (labels["transport"], labels["endpoint"], labels["model"], labels["status"])
            counted[key] = float(found.group(2))
    assert counted[("rest", "infer", "iris", "200")] == 1
    assert counted[("rest", "infer", "iris", "400")] == 1
    assert counted[("rest", "infer", "", "404")] == 1
    assert counted[("grpc", "infer", "iris", "200")] == 1
    assert counted[("grpc", "infer", "", "404")] == 1
    assert "secret-probe" not in text  # a caller's text never becomes a label
    assert 'servemesh_gateway_request_seconds_count{endpoint="infer",transport="rest"} 3.0' in text


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # a process that ended meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _listens_on(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a listening TCP socket on ``port`` (from /proc: its fds and the socket table)."""
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                listening.add(cols[9])
    owned = {os.readlink(fd).removeprefix("socket:[").removesuffix("]") for fd in Path(f"/proc/{pid}/fd").iterdir()}
    return bool(listening & owned)


async def test_processes_share_the_ports(mesh: Gateway, nats_server: NatsServer) -> None:
    from tests.integration.secure_mesh import free_ports

    http_port, grpc_port = free_ports(2)
    args = [sys.executable, "-m", "servemesh", "gateway", "--nats", nats_server.url, "--processes", "3",
            "--http-port", str(http_port), "--grpc-port", str(grpc_port)]  # fmt: skip
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    gateway = Gateway(proc, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}")
    try:

        async def all_listening() -> bool:
            pids = [proc.pid, *_children(proc.pid)]
            return len(pids) == 3 and all(_listens_on(p, port) for p in pids for port in (http_port, grpc_port))

        await wait_for(all_listening, 60, "three gateway processes on both ports")
        body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}
        for _ in range(30):  # new connections each time: the kernel spreads them over the processes
            status, doc = await _post(gateway, "/v2/models/iris/infer", body)
            assert status == 200, doc
        client = triton_grpc.InferenceServerClient(gateway.grpc)
        assert await asyncio.to_thread(client.is_model_ready, "iris")
        client.close()
        children = _children(proc.pid)
    finally:
        stop(gateway)
    assert proc.returncode == 0
    for child in children:  # the first process stops the others
        assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]


async def test_both_listeners_speak_tls(nats_server: NatsServer, model_repo: Path, tmp_path: Path) -> None:
    import ssl

    import grpc

    certs = tmp_path / "tls"
    subprocess.run(["sh", str(ROOT / "deploy" / "nats" / "make-dev-certs.sh"), str(certs)], check=True,
                   capture_output=True)  # fmt: skip
    async with serving(nats_server.url, model_repo, ["iris"]) as worker:
        await worker.beat_now()
        gateway = await asyncio.to_thread(start_gateway, nats_server.url, "--tls-cert", str(certs / "server.pem"),
                                          "--tls-key", str(certs / "server-key.pem"))  # fmt: skip
        try:
            assert gateway.http.startswith("https://")
            trusted = ssl.create_default_context(cafile=str(certs / "ca.pem"))
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{gateway.http}/v2/models/iris/ready", ssl=trusted) as answer:
                    assert answer.status == 200
                with pytest.raises(aiohttp.ClientConnectorCertificateError):
                    await http.get(f"{gateway.http}/v2", ssl=ssl.create_default_context())  # not our CA
            credentials = grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes())
            port = gateway.grpc.rsplit(":", 1)[1]
            async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
                from grpc_health.v1 import health_pb2, health_pb2_grpc

                answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            stop(gateway)
