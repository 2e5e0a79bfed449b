"""The servemesh demo: build two example models, start an embedded mesh (nats-server + worker),
send real requests, and print predictions with per-request timing. Run: ``make demo``."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker import Registry
from examples.build_models import build_digits_export, build_iris_mm_onnx, build_iris_onnx
from schemas.errors import MeshError
from servemesh import MeshClient
from servemesh.local import LocalMesh


def _timing(t: object) -> str:
    return f"queue {t.queue_ms:6.2f} ms  compute {t.compute_ms:6.2f} ms  batch {t.batch_size:3d}  on {t.worker}"  # type: ignore[attr-defined]


async def _iris(client: MeshClient) -> None:
    from sklearn.datasets import load_iris

    data = load_iris()
    names = list(data.target_names)
    print("\niris (ONNX) — one request per flower:")
    for i in (0, 60, 120, 25, 75, 140):
        x = data.data[i : i + 1].astype(np.float32)
        reply = await client.infer_reply("iris", {"input": x})
        label = int(reply.outputs["label"][0])
        p = float(reply.outputs["probabilities"][0, label])
        print(
            f"  flower {i:3d}: {names[label]:<10} p={p:.3f} (true: {names[data.target[i]]:<10}) {_timing(reply.timing)}"
        )
    print("\niris — 150 concurrent requests (the worker batches them):")
    start = time.perf_counter()
    replies = await asyncio.gather(
        *(client.infer_reply("iris", {"input": data.data[i : i + 1].astype(np.float32)}) for i in range(150))
    )
    elapsed = time.perf_counter() - start
    correct = sum(int(r.outputs["label"][0]) == data.target[i] for i, r in enumerate(replies))
    sizes = [r.timing.batch_size for r in replies]
    print(f"  {len(replies)} replies in {elapsed * 1000:.0f} ms, accuracy {correct / len(replies):.3f}, "
          f"batch sizes {min(sizes)}..{max(sizes)} (mean {np.mean(sizes):.1f})")  # fmt: skip


async def _digits(client: MeshClient) -> None:
    from sklearn.datasets import load_digits

    data = load_digits()
    print("\ndigits (torch.export) — a batch of 8 images in one request:")
    x = data.data[:8].astype(np.float32)
    reply = await client.infer_reply("digits", {"pixels": x})
    print(f"  predicted {reply.outputs['label'].tolist()}")
    print(f"  true      {data.target[:8].tolist()}")
    print(f"  {_timing(reply.timing)}")


async def _placed(registry: Registry, name: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """The router's status of ``name`` once it has heard every version is ready (it writes it each tick)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = await registry.get_status(name) or {}
        versions = status.get("versions") or {}
        if (versions and all(st.get("ready") for st in versions.values())) or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.1)


async def _placement(url: str) -> None:
    from broker import Connection, Settings

    conn = await Connection.open(Settings.from_url(url))
    try:
        registry = await Registry.open(conn)
        print("\nplacement (decided by the router from the registry, heartbeats and queue lag):")
        for name in ("iris", "digits"):
            status = await _placed(registry, name)
            for version, st in status.get("versions", {}).items():
                decision = st.get("last_decision") or {}
                print(f"  {name}:{version} ready on {', '.join(st.get('ready', [])) or '-'}"
                      f" — {decision.get('action', '?')}: {decision.get('reason', '')}")  # fmt: skip
    finally:
        await conn.close()


async def _errors(client: MeshClient) -> None:
    print("\ntyped errors:")
    for label, call in (
        ("wrong dtype", client.infer("iris", {"input": np.zeros((1, 4), np.float64)})),
        ("unknown model", client.infer("no_such_model", {"input": np.zeros((1, 4), np.float32)})),
    ):
        try:
            await call
        except MeshError as err:
            print(f"  {label:<14} → {type(err).__name__} {err.status}: {err.message}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _over_http(port: int) -> None:
    """One request through the Open Inference Protocol gateway, as curl or any KServe v2 client sends it."""
    body = {"id": "demo-1", "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                        "data": [5.9, 3.0, 5.1, 1.8]}], "outputs": [{"name": "label"}]}  # fmt: skip
    url = f"http://127.0.0.1:{port}/v2/models/iris/infer"
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        doc = json.loads(answer.read())
    print(f"\nover HTTP (KServe v2): POST {url}")
    print(f"  → model {doc['model_name']} version {doc['model_version']}: label {doc['outputs'][0]['data']}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--state", default=".servemesh", help="where models, JetStream data and logs go")
    parser.add_argument("--port", type=int, default=-1, help="nats port (-1: any free port)")
    args = parser.parse_args()
    repo = Path(args.state) / "models"
    print(f"building example models in {repo} (first run trains them) ...")
    for build, artifact in ((build_iris_onnx, "iris/1/model.onnx"), (build_digits_export, "digits/1/model.pt2"),
                            (build_iris_mm_onnx, "iris_mm/1/model.onnx")):  # fmt: skip
        if not (repo / artifact).exists():
            build(repo)
    print("starting the embedded mesh: nats-server (JetStream) + router + 1 worker ...")
    gateway = (_free_port(), _free_port())
    mesh = LocalMesh(repo, workers=1, port=args.port, state_dir=Path(args.state) / "run", storage="memory",
                     gateway=gateway)  # fmt: skip
    await mesh.start()
    try:
        print(f"mesh up at {mesh.url}")
        async with await MeshClient.connect(mesh.url) as client:
            await _placement(mesh.url)
            await _iris(client)
            await _digits(client)
            await _errors(client)
        await asyncio.to_thread(_over_http, gateway[0])
    finally:
        mesh.stop()
    print("\nmesh stopped (worker drained, router released its lease, nats-server stopped).")


if __name__ == "__main__":
    asyncio.run(main())
