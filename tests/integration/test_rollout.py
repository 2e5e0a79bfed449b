"""Versions and rollout: weighted routes split traffic as set, a new version takes traffic only
once it is ready, rollback is one command, and a rollout under load fails no request."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from broker import NatsServer
from servemesh import MeshClient
from tests.conftest import serving, unique
from tests.integration.cluster import Cluster, eventually
from tests.integration.test_pipelines import build_scale
from workers.repository import read_model


def build_versions(repo: Path, name: str, factors: dict[str, float]) -> Path:
    """A model whose version N multiplies its input by factors[N]: replies tell versions apart."""
    for version, factor in factors.items():
        build_scale(repo / "tmp", f"{name}_{version}", factor)
        (repo / name).mkdir(parents=True, exist_ok=True)
        shutil.move(repo / "tmp" / f"{name}_{version}" / "1", repo / name / version)
        (repo / name / "servemesh.yaml").write_text("max_batch_size: 32\nmax_delay_ms: 2\n")
    return repo / name


async def _routes(url: str, *args: str) -> dict:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "servemesh", "routes", *args, "--json", "--nats", url, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    return json.loads(out)


async def _versions_seen(client: MeshClient, name: str, n: int) -> Counter[float]:
    raw = np.ones((1, 4), np.float32)
    replies = await asyncio.gather(*(client.infer(name, {"raw": raw}) for _ in range(n)))
    return Counter(float(r["input"][0, 0]) for r in replies)


async def test_weighted_route_splits_traffic_as_set(
    nats_server: NatsServer, tmp_path: Path, client: MeshClient
) -> None:
    name = unique("ab")
    build_versions(tmp_path, name, {"1": 1.0, "2": 2.0})
    async with serving(nats_server.url, tmp_path, [name]):
        assert (await _versions_seen(client, name, 20)) == Counter({2.0: 20})  # no route: the newest version
        await _routes(nats_server.url, "set", name, "1=70", "2=30")
        await asyncio.sleep(2.1)  # clients re-read routes every 2 s
        seen = Counter[float]()
        for _ in range(10):
            seen += await _versions_seen(client, name, 100)
    # 1,000 draws at 70/30: the standard deviation is 14.5, so ±72 is five of them.
    assert abs(seen[1.0] - 700) < 72 and seen[1.0] + seen[2.0] == 1000


async def test_rollout_moves_traffic_only_when_ready_and_rolls_back_under_load(
    cluster: Cluster, tmp_path: Path
) -> None:
    from tests.conftest import set_config
    from tests.integration.test_router import Load

    name = unique("roll")
    model_dir = build_versions(tmp_path, name, {"1": 1.0})
    set_config(model_dir, memory_mb=60)  # as declared: one version per worker
    assert cluster.registry is not None
    await cluster.registry.put_spec(read_model(model_dir))
    cluster.router("r1")
    # Exactly one version as declared; once version 1 is measured (a few MB), still no room for 60 more.
    cluster.worker("w1", memory_mb=60)
    await eventually(lambda: _ready(cluster, name, "1"), 30, "version 1 ready")
    url = cluster.server.url
    async with await MeshClient.connect(url) as client:
        load = Load(client, name, np.ones((1, 4), np.float32), concurrency=4, pause=0.01, input_name="raw")
        await _routes(url, "set", name, "1=100")  # pin the serving version before adding another
        build_versions(tmp_path, name, {"2": 2.0})
        set_config(model_dir, memory_mb=60)
        await cluster.registry.put_spec(read_model(model_dir))  # no room for it anywhere yet
        await _routes(url, "set", name, "2=100")  # all traffic to version 2, which is not ready
        await asyncio.sleep(2.5)  # clients have re-read the route by now
        assert await _all_from(client, name, 1.0)  # still version 1: the safe-promotion rule
        cluster.worker("w2", memory_mb=100)  # room: version 2 loads there
        await eventually(lambda: _ready(cluster, name, "2"), 30, "version 2 ready")
        await eventually(lambda: _all_from(client, name, 2.0), 15, "traffic moved to version 2")
        back = await _routes(url, "rollback", name)
        assert back["weights"] == {"1": 100.0}
        await eventually(lambda: _all_from(client, name, 1.0), 15, "rolled back to version 1")
        await load.stop()
    assert load.failed == 0 and load.ok > 100, load.errors[:3]


async def _ready(cluster: Cluster, name: str, version: str) -> bool:
    assert cluster.registry is not None
    status = await cluster.registry.get_status(name) or {}
    return bool(status.get("versions", {}).get(version, {}).get("ready"))


async def _all_from(client: MeshClient, name: str, factor: float) -> bool:
    return set(await _versions_seen(client, name, 10)) == {factor}
