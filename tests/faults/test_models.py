"""Model loading faults under load: the S3 server is down while a model loads (the worker
retries with backoff and serves once S3 is back), and a model whose load always fails
(requests fail fast with a typed 503 while the worker keeps serving its other models)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from broker import Connection, Registry
from servemesh import MeshClient
from tests.conftest import unique, wait_for
from tests.faults.conftest import holders, identity_repo
from tests.faults.fleet import Fleet
from tests.faults.load import Load
from tests.faults.proxy import TcpProxy
from tests.faults.report import record
from tests.integration.s3server import WeedServer
from workers.repository import read_model
from workers.s3_repository import read_s3_repository
from workers.store import ArtifactStore, StoreSettings

BUCKET = "servemesh-test"  # made by WeedServer when it starts


@pytest.fixture
def s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WeedServer]:
    # SeaweedFS and every client (the worker processes too) share this identity.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "servemesh-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "servemesh-test")
    server = WeedServer(tmp_path / "weed").start()
    try:
        yield server
    finally:
        server.stop()


async def _failed_on(conn: Connection, worker: str, key: str) -> bool:
    beat = (await (await Registry.open(conn)).heartbeats()).get(worker, {})
    return key in beat.get("failed", {}) or key in beat.get("retrying", {})


async def test_s3_down_while_a_model_loads(
    s3: WeedServer, conn: Connection, client: MeshClient, fleet: Fleet, tmp_path: Path
) -> None:
    model = identity_repo(tmp_path / "repo")
    prefix = unique("repo")
    uploader = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1")
    for path in (tmp_path / "repo" / model).rglob("*"):
        if path.is_file():
            uploader.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(tmp_path / 'repo')}")
    store = ArtifactStore(StoreSettings(s3_endpoint_url=s3.endpoint, cache_dir=tmp_path / "registrar-cache"))
    (spec,), _ = await read_s3_repository(store, f"s3://{BUCKET}/{prefix}")
    await (await Registry.open(conn)).put_spec(spec)
    # Workers reach S3 through a proxy that the test takes down: the server itself keeps its data.
    proxy = TcpProxy("127.0.0.1", s3.s3_port)
    env = {"SERVEMESH_S3_ENDPOINT_URL": proxy.url, "SERVEMESH_CACHE_DIR": str(tmp_path / "worker-cache")}
    fleet.router("r1")
    fleet.worker("w1", env=env)
    started = time.monotonic()
    async with Load(client, model, callers=8, timeout=10) as load:
        await wait_for(lambda: _failed_on(conn, "w1", f"{model}:1"), 30, "the load failing while S3 is down")
        await proxy.up()
        back_at = time.monotonic()

        async def serving() -> bool:
            return await holders(conn, model) == {"w1"}

        await wait_for(serving, 60, "the model loaded once S3 is back")
        loaded_s = time.monotonic() - back_at
        await load.answers(1000, 30, "answers once the model is loaded")
    await proxy.down()
    tally = load.tally
    record("S3 down while a model loads", tally, time.monotonic() - started,
           loaded_after_s3_back_s=round(loaded_s, 1))  # fmt: skip
    assert tally.lost == 0 and tally.wrong == 0 and not tally.untyped
    # While no replica could load it: queued (then answered, or 504 at the caller's deadline)
    # or refused at once as not loadable anywhere (503).
    assert set(tally.failed) <= {503, 504}, tally.errors
    assert fleet.alive("w1")


async def test_model_whose_load_always_fails(
    conn: Connection, client: MeshClient, fleet: Fleet, tmp_path: Path
) -> None:
    good = identity_repo(tmp_path / "repo")
    broken = identity_repo(tmp_path / "repo")
    (tmp_path / "repo" / broken / "1" / "model.onnx").write_bytes(b"not an onnx model")
    registry = await Registry.open(conn)
    for name in (good, broken):
        await registry.put_spec(read_model(tmp_path / "repo" / name))
    fleet.router("r1")
    fleet.worker("w1")

    async def good_served() -> bool:
        return await holders(conn, good) == {"w1"}

    await wait_for(good_served, 60, "the good model served")
    started = time.monotonic()
    async with Load(client, good, callers=8) as good_load, Load(client, broken, callers=8, timeout=5) as broken_load:
        await wait_for(lambda: _failed_on(conn, "w1", f"{broken}:1"), 30, "the broken model's load failing")
        await good_load.answers(1000, 30, "answers from the good model")
        await broken_load_fails_fast(broken_load)
    tally = broken_load.tally
    record("model whose load always fails", tally, time.monotonic() - started,
           good_model_answered=good_load.tally.answered, good_model_failed=good_load.tally.failed_total)  # fmt: skip
    assert tally.lost == 0 and not tally.untyped and tally.answered == 0
    assert set(tally.failed) <= {503, 504}, tally.errors
    assert tally.failed[503] > 0  # once the failure is known, refused at once: "not loaded anywhere"
    assert good_load.tally.lost == 0 and good_load.tally.failed_total == 0, good_load.tally.errors
    assert fleet.alive("w1")


async def broken_load_fails_fast(load: Load) -> None:
    """Until the router reports the failure, requests wait in the queue; then they fail at once."""
    start = time.monotonic()
    while load.tally.failed[503] < 100:
        assert time.monotonic() - start < 30, f"requests for the broken model not refused: {load.tally.errors}"
        await asyncio.sleep(0.05)
