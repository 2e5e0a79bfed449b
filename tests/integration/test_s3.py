"""Model repositories on a real S3 server (SeaweedFS): registration from S3, serving through the
worker's verified cache, and failures that mark the version failed without harming the worker."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import numpy as np
import onnxruntime as ort
import pytest

from broker import NatsServer
from examples.build_models import build_identity_onnx, build_iris_onnx
from schemas.errors import ModelFailure, NoCapacity
from schemas.spec import VersionSpec
from servemesh import MeshClient
from tests.conftest import serving, unique
from tests.integration.cluster import Cluster, eventually
from tests.integration.s3server import WeedServer
from workers.s3_repository import read_s3_repository
from workers.store import ArtifactStore, StoreSettings


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WeedServer]:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "servemesh-test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "servemesh-test")
    server = WeedServer(tmp_path_factory.mktemp("weed")).start()
    try:
        yield server
    finally:
        server.stop()


BUCKET = "servemesh-test"  # one bucket (created when the server starts); each test its own prefix


def _upload(s3: WeedServer, bucket: str, local: Path, prefix: str) -> None:
    client = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1")
    for path in local.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local)}")


def _store(s3: WeedServer, tmp_path: Path, **kw: object) -> ArtifactStore:
    return ArtifactStore(StoreSettings(s3_endpoint_url=s3.endpoint, cache_dir=tmp_path / "cache", **kw))  # type: ignore[arg-type]


async def test_model_from_s3_is_registered_placed_and_served(s3: WeedServer, cluster: Cluster, tmp_path: Path) -> None:
    name, bucket = unique("iris"), BUCKET
    build_iris_onnx(tmp_path / "repo", name=name)
    prefix = unique("repo")
    _upload(s3, bucket, tmp_path / "repo", prefix)
    env = {"SERVEMESH_S3_ENDPOINT_URL": s3.endpoint, "SERVEMESH_CACHE_DIR": str(tmp_path / "cache")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "servemesh", "models", "add-repo", f"s3://{bucket}/{prefix}", "--json",
        "--nats", cluster.server.url, env={**os.environ, **env}, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode == 0 and name in out.decode()
    cluster.router("r1")
    cluster.worker("w1", env=env)
    await eventually(lambda: _has(cluster, name), 60, "loaded from S3")
    x = np.random.default_rng(1).uniform(0, 7, (6, 4)).astype(np.float32)
    async with await MeshClient.connect(cluster.server.url) as client:
        outputs = await client.infer(name, {"input": x})
    session = ort.InferenceSession(
        str(tmp_path / "repo" / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    np.testing.assert_array_equal(outputs["label"], session.run(["label"], {"input": x})[0])
    cached = [p for p in (tmp_path / "cache").iterdir() if p.suffix == ".onnx"]
    assert len(cached) == 1  # the worker's cache holds the artifact


async def _has(cluster: Cluster, name: str) -> bool:
    return bool(await cluster.holders(name))


async def test_cache_hits_and_concurrent_loads_share_one_download(s3: WeedServer, tmp_path: Path) -> None:
    bucket = BUCKET
    blob = os.urandom(3 << 20)
    (tmp_path / "src" / "m" / "1").mkdir(parents=True)
    (tmp_path / "src" / "m" / "1" / "model.onnx").write_bytes(blob)
    prefix = unique("r")
    _upload(s3, bucket, tmp_path / "src", prefix)
    store = _store(s3, tmp_path)
    (spec,), errors = await read_s3_repository(store, f"s3://{bucket}/{prefix}")
    assert not errors and spec.versions["1"].size == len(blob)
    paths = await asyncio.gather(*(store.fetch(spec.versions["1"]) for _ in range(5)))
    assert len(set(paths)) == 1 and paths[0].read_bytes() == blob
    assert store.misses == 5 and store.hits == 0  # five loads asked while one download ran
    assert len([p for p in (tmp_path / "cache").iterdir()]) == 1  # no partial files left behind
    again = await store.fetch(spec.versions["1"])
    assert again == paths[0] and store.hits == 1


async def test_cache_evicts_least_recently_used_beyond_its_budget(s3: WeedServer, tmp_path: Path) -> None:
    bucket = BUCKET
    for name in ("a", "b", "c"):
        (tmp_path / "src" / name / "1").mkdir(parents=True)
        (tmp_path / "src" / name / "1" / "model.onnx").write_bytes(os.urandom(1 << 20))
    prefix = unique("r")
    _upload(s3, bucket, tmp_path / "src", prefix)
    store = _store(s3, tmp_path, cache_max_mb=2)
    specs, _ = await read_s3_repository(store, f"s3://{bucket}/{prefix}")
    by_name = {s.name: s.versions["1"] for s in specs}
    first = await store.fetch(by_name["a"])
    await store.fetch(by_name["b"])
    await store.fetch(by_name["a"])  # a is now the most recently used
    await store.fetch(by_name["c"])
    assert first.exists()
    assert len(list((tmp_path / "cache").iterdir())) == 2  # b went: least recently used


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("missing", "no such key"),
        ("unreachable", "S3 unreachable"),
        ("denied", "access denied"),
        ("corrupt", "sha256"),
        ("truncated", "truncated"),
    ],
)
async def test_fetch_failures_say_why(s3: WeedServer, tmp_path: Path, fault: str, reason: str) -> None:
    bucket = BUCKET
    (tmp_path / "src" / "m" / "1").mkdir(parents=True)
    (tmp_path / "src" / "m" / "1" / "model.onnx").write_bytes(b"0123456789" * 1000)
    prefix = unique("r")
    _upload(s3, bucket, tmp_path / "src", prefix)
    uri = f"s3://{bucket}/{prefix}/m/1/model.onnx"
    vspec = VersionSpec(uri=uri, size=10_000)
    store = _store(s3, tmp_path)
    if fault == "missing":
        vspec = VersionSpec(uri=uri.replace("model.onnx", "absent.onnx"))
    elif fault == "unreachable":
        store = ArtifactStore(StoreSettings(s3_endpoint_url="http://127.0.0.1:9", cache_dir=tmp_path / "cache"))
    elif fault == "denied":
        settings = StoreSettings(s3_endpoint_url=s3.endpoint, cache_dir=tmp_path / "cache",
                                 s3_access_key_id="intruder", s3_secret_access_key="wrong")  # fmt: skip
        store = ArtifactStore(settings)
    elif fault == "corrupt":
        vspec = VersionSpec(uri=uri, sha256="0" * 64)
    else:
        vspec = VersionSpec(uri=uri, size=20_000)
    with pytest.raises(ModelFailure) as err:
        await store.fetch(vspec)
    assert reason in err.value.message
    assert not [p for p in (tmp_path / "cache").iterdir() if p.suffix == ".onnx"]  # nothing half-written kept


async def test_a_version_that_cannot_be_fetched_is_reported_and_the_worker_stays_healthy(
    s3: WeedServer, cluster: Cluster, tmp_path: Path
) -> None:
    name = unique("ghost")
    assert cluster.registry is not None
    from schemas.spec import ModelSpec

    spec = ModelSpec(name=name, versions={"1": VersionSpec(uri=f"s3://nobucket-{name.replace('_', '-')}/x/model.onnx")})
    await cluster.registry.put_spec(spec)
    cluster.router("r1")
    cluster.worker("w1", env={"SERVEMESH_S3_ENDPOINT_URL": s3.endpoint, "SERVEMESH_CACHE_DIR": str(tmp_path / "c")})
    await eventually(lambda: _failed(cluster, name), 30, "the failure shows in the heartbeat")
    beat = (await cluster.registry.heartbeats())["w1"]
    reason = {**beat["failed"], **beat.get("retrying", {})}[f"{name}:1"]  # "retrying" once its backoff is over
    assert "no such bucket" in reason or "no such key" in reason
    assert cluster.procs["w1"].poll() is None  # the worker is alive
    await eventually(lambda: _shown_failed(cluster, name), 15, "models show names the failure")
    async with await MeshClient.connect(cluster.server.url) as client:
        started = asyncio.get_running_loop().time()
        with pytest.raises(NoCapacity) as err:  # at once, not after the 30 s timeout
            await client.infer(name, {"input": np.zeros((1, 4), np.float32)}, timeout=30)
        assert asyncio.get_running_loop().time() - started < 5 and err.value.status == 503
        assert "failed to load" in err.value.message


async def _shown_failed(cluster: Cluster, name: str) -> bool:
    assert cluster.registry is not None
    status = await cluster.registry.get_status(name) or {}
    reason = status.get("versions", {}).get("1", {}).get("failed", {}).get("w1", "")
    return "no such" in reason


async def _failed(cluster: Cluster, name: str) -> bool:
    assert cluster.registry is not None
    beat = (await cluster.registry.heartbeats()).get("w1", {})
    return f"{name}:1" in {**beat.get("failed", {}), **beat.get("retrying", {})}


async def test_job_reads_its_items_from_s3_and_writes_results_there(
    s3: WeedServer, nats_server: NatsServer, tmp_path: Path
) -> None:
    import json

    name = unique("ident")
    build_identity_onnx(tmp_path / "repo", name, "float32", shape=(3,))
    x = np.random.default_rng(9).standard_normal((25, 3)).astype(np.float32)
    np.save(tmp_path / "items.npy", x)
    client = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1")
    prefix = unique("jobs")
    client.upload_file(str(tmp_path / "items.npy"), BUCKET, f"{prefix}/items.npy")
    env = {**os.environ, "SERVEMESH_S3_ENDPOINT_URL": s3.endpoint}
    async with serving(nats_server.url, tmp_path / "repo", [name]):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "servemesh", "jobs", "submit", name, "--input", f"s3://{BUCKET}/{prefix}/items.npy",
            "--output", f"s3://{BUCKET}/{prefix}/out.npz", "--json", "--nats", nats_server.url,
            env=env, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0 and json.loads(out)["done"] == 25
    client.download_file(BUCKET, f"{prefix}/out.npz", str(tmp_path / "out.npz"))
    np.testing.assert_array_equal(np.load(tmp_path / "out.npz")["output"], x)
