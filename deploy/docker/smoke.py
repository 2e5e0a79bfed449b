"""Smoke run of an installed servemesh: ``servemesh up`` on an identity model (embedded nats-server,
router, worker, gateway), then one request through the CLI (MeshClient) and one through the gateway's
REST listener, each checked against its input. Needs only what the image installs (no onnx package:
the model is written here). The image build runs it (deploy/docker/Dockerfile) and so does CI
(tests/deploy/test_install.py), each with the interpreter of the environment under test:

    /opt/servemesh/bin/python deploy/docker/smoke.py
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

MODEL = "smoke"
ROW = [5.1, 3.5, 1.4, 0.2]
READY_WITHIN_S = 90.0


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, value: int | bytes | str) -> bytes:
    """One protobuf field: a varint (int) or a length-delimited one (bytes, str, nested message)."""
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def identity_onnx(width: int) -> bytes:
    """ONNX ModelProto of ``output = Identity(input)``, float32 [batch, width] (onnx.proto field numbers)."""
    dims = _field(1, _field(2, "batch")) + _field(1, _field(1, width))  # TensorShapeProto.dim (param, value)
    tensor = _field(1, _field(1, 1) + _field(2, dims))  # TypeProto.tensor_type: elem_type FLOAT, shape

    def value_info(name: str) -> bytes:
        return _field(1, name) + _field(2, tensor)

    node = _field(1, "input") + _field(2, "output") + _field(4, "Identity")
    graph = _field(1, node) + _field(2, MODEL) + _field(11, value_info("input")) + _field(12, value_info("output"))
    opset = _field(2, 13)  # the default domain, opset 13
    return _field(1, 8) + _field(2, "servemesh-smoke") + _field(7, graph) + _field(8, opset)  # IR version 8


def write_repository(repo: Path) -> None:
    (repo / MODEL / "1").mkdir(parents=True)
    (repo / MODEL / "1" / "model.onnx").write_bytes(identity_onnx(len(ROW)))
    (repo / MODEL / "servemesh.yaml").write_text(
        "format: onnx\nmin_replicas: 1\nmax_batch_size: 8\nmax_delay_ms: 1\n"
        f"inputs:\n  - {{name: input, dtype: float32, shape: [{len(ROW)}]}}\n"
        f"outputs:\n  - {{name: output, dtype: float32, shape: [{len(ROW)}]}}\n"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _servemesh(*args: str) -> list[str]:
    return [sys.executable, "-m", "servemesh", *args]


def _installed(work: Path) -> str:
    """Where the servemesh under test comes from (run outside any source tree, as every command here is)."""
    where = subprocess.run([sys.executable, "-c", "import servemesh; print(servemesh.__file__)"], cwd=work,
                           capture_output=True, text=True, check=True)  # fmt: skip
    return str(Path(where.stdout.strip()).parent)


def _wait_ready(up: subprocess.Popen[str], lines: list[str]) -> str:
    """The NATS URL that ``servemesh up`` prints once its models are ready (or SystemExit)."""
    assert up.stdout is not None
    found: list[str] = []
    done = threading.Event()

    def read() -> None:
        assert up.stdout is not None
        for line in up.stdout:
            lines.append(line.rstrip())
            match = re.match(r"servemesh up: nats at (\S+); (\d+) of (\d+) model version\(s\) ready", line)
            if match:
                if match.group(2) == match.group(3) == "1":
                    found.append(match.group(1))
                done.set()
        done.set()

    threading.Thread(target=read, daemon=True).start()
    if not done.wait(READY_WITHIN_S) or not found:
        raise SystemExit("smoke: servemesh up did not get ready:\n  " + "\n  ".join(lines[-20:]))
    return found[0]


def _check_cli(url: str, work: Path) -> str:
    np.save(work / "row.npy", np.array([ROW], np.float32))
    done = subprocess.run(_servemesh("infer", MODEL, "--input", f"input={work / 'row.npy'}", "--json", "--nats", url),
                          capture_output=True, text=True, timeout=60, cwd=work)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"smoke: servemesh infer failed ({done.returncode}): {done.stderr.strip()}")
    reply = json.loads(done.stdout)
    if not np.allclose(reply["outputs"]["output"], [ROW]):
        raise SystemExit(f"smoke: servemesh infer answered {reply['outputs']}, not the input back")
    return f"CLI: answered by {MODEL}:{reply['version']} on {reply['timing']['worker']}"


def _check_rest(http_port: int) -> str:
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, len(ROW)], "datatype": "FP32", "data": ROW}]})
    request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v2/models/{MODEL}/infer", body.encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as response:
        reply = json.loads(response.read())
    (output,) = reply["outputs"]
    if not np.allclose(output["data"], ROW):
        raise SystemExit(f"smoke: the gateway answered {output}, not the input back")
    return f"REST: {output['name']} {output['datatype']}{output['shape']}"


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="servemesh-smoke-") as tmp:
        work = Path(tmp)
        write_repository(work / "models")
        print(f"smoke: servemesh from {_installed(work)}", flush=True)
        http_port, grpc_port = _free_port(), _free_port()
        up = subprocess.Popen(
            _servemesh("up", "--models", str(work / "models"), "--port", "-1", "--state-dir", str(work / "state"),
                       "--gateway-http-port", str(http_port), "--gateway-grpc-port", str(grpc_port)),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            cwd=work,
        )  # fmt: skip
        lines: list[str] = []
        started = time.monotonic()
        try:
            url = _wait_ready(up, lines)
            print(f"smoke: servemesh up ready in {time.monotonic() - started:.1f} s at {url}", flush=True)
            print(f"smoke: {_check_cli(url, work)}", flush=True)
            print(f"smoke: {_check_rest(http_port)}", flush=True)
        finally:
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(timeout=30)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()
                print("smoke: servemesh up did not stop within 30 s of SIGTERM", file=sys.stderr)
                return 1
    print("smoke: ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
