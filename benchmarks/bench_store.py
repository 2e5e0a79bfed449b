"""Artifact fetching: the worker's S3 store against a plain single download of the same object,
and a cache hit against a cold load (fetch + runtime load). Runs SeaweedFS on loopback.

Run from the repository root: ``python benchmarks/bench_store.py [--mb 256]``.
"""

# ruff: noqa: E402
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import argparse
import asyncio
import os
import statistics
import tempfile
import time

import boto3

from broker.loop import run
from examples.build_models import build_mlp_onnx
from schemas.spec import ModelSpec, VersionSpec
from tests.integration.s3server import WeedServer
from workers.runtimes import load_runtime
from workers.store import ArtifactStore, StoreSettings

BUCKET = "servemesh-test"  # created by WeedServer when it starts
MIB = 1 << 20


def _plain_download(endpoint: str, key: str, dest: Path) -> float:
    """Seconds for one get_object streamed to disk, as `aws s3 cp` does for a single object."""
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    started = time.perf_counter()
    body = client.get_object(Bucket=BUCKET, Key=key)["Body"]
    with dest.open("wb") as out:
        for chunk in iter(lambda: body.read(MIB), b""):
            out.write(chunk)
    return time.perf_counter() - started


async def _store_fetch(store: ArtifactStore, vspec: VersionSpec) -> float:
    started = time.perf_counter()
    await store.fetch(vspec)
    return time.perf_counter() - started


async def measure(server: WeedServer, work: Path, size_mb: int, rounds: int) -> list[tuple[str, str]]:
    client = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1")
    blob_key = "bench/blob.bin"
    client.put_object(Bucket=BUCKET, Key=blob_key, Body=os.urandom(size_mb * MIB))
    plain, ours = [], []
    for i in range(rounds):
        plain.append(await asyncio.to_thread(_plain_download, server.endpoint, blob_key, work / f"plain{i}"))
        store = ArtifactStore(StoreSettings(s3_endpoint_url=server.endpoint, cache_dir=work / f"cache{i}"))
        ours.append(await _store_fetch(store, VersionSpec(uri=f"s3://{BUCKET}/{blob_key}")))
    p, o = statistics.median(plain), statistics.median(ours)
    rows = [("plain single download (median)", f"{size_mb / p:,.0f} MiB/s"),
            ("servemesh store fetch, cold cache (median)", f"{size_mb / o:,.0f} MiB/s"),
            ("store / plain throughput", f"{p / o:.2f} (verify + atomic rename included)")]  # fmt: skip
    return rows + await _cache_rows(server, work, client)


async def _cache_rows(server: WeedServer, work: Path, client: object) -> list[tuple[str, str]]:
    model_dir = build_mlp_onnx(work / "repo", "mlp", d_in=512, hidden=4096, d_out=512)
    artifact = model_dir / "1" / "model.onnx"
    client.upload_file(str(artifact), BUCKET, "bench/mlp/1/model.onnx")  # type: ignore[attr-defined]
    vspec = VersionSpec(uri=f"s3://{BUCKET}/bench/mlp/1/model.onnx", size=artifact.stat().st_size)
    spec = ModelSpec(name="mlp", versions={"1": vspec})
    store = ArtifactStore(StoreSettings(s3_endpoint_url=server.endpoint, cache_dir=work / "model-cache"))

    async def load() -> float:
        started = time.perf_counter()
        path = await store.fetch(vspec)
        await asyncio.to_thread(load_runtime, "onnx", path, spec)
        return time.perf_counter() - started

    cold = await load()
    warm = statistics.median([await load() for _ in range(3)])
    size = artifact.stat().st_size / MIB
    return [(f"model load, cold (fetch {size:.0f} MiB + runtime)", f"{cold * 1000:,.0f} ms"),
            ("model load, cache hit (median of 3)", f"{warm * 1000:,.0f} ms"),
            ("cache hit speed-up", f"{cold / warm:.1f}x (store hits {store.hits}, misses {store.misses})")]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256, help="size of the object fetched")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "servemesh-bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "servemesh-bench")
    with tempfile.TemporaryDirectory(prefix="servemesh-store-") as tmp:
        server = WeedServer(Path(tmp) / "weed").start()
        try:
            rows = run(measure(server, Path(tmp), args.mb, args.rounds), "asyncio")
        finally:
            server.stop()
    width = max(len(name) for name, _ in rows)
    print(f"\nservemesh artifact store — {args.mb} MiB object, {os.cpu_count()} CPUs, SeaweedFS on loopback")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
