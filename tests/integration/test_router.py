"""The router with workers and routers as separate processes: placement, autoscaling, scale to
zero, LRU eviction, leader failover and worker loss — with no failed or lost requests."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from examples.build_models import build_identity_onnx, build_mlp_onnx, build_slow_onnx
from servemesh import MeshClient
from tests.conftest import set_config, unique
from tests.integration.cluster import Cluster, eventually
from workers.repository import read_model


async def _cli(*args: str) -> dict:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "servemesh", *args, "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


async def _register(cluster: Cluster, model_dir: Path, **overrides: object) -> str:
    set_config(model_dir, **overrides)
    assert cluster.registry is not None
    await cluster.registry.put_spec(read_model(model_dir))
    return model_dir.name


class Load:
    """Closed-loop requests in the background; counts answers and failures."""

    def __init__(
        self, client: MeshClient, model: str, x: np.ndarray, concurrency: int, pause: float = 0.0,
        input_name: str = "input",
    ) -> None:  # fmt: skip
        self.pause = pause
        self.input_name = input_name
        self.ok = self.failed = 0
        self.errors: list[str] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._run(client, model, x)) for _ in range(concurrency)]

    async def _run(self, client: MeshClient, model: str, x: np.ndarray) -> None:
        while not self._stop.is_set():
            try:
                out = await client.infer(model, {self.input_name: x}, timeout=60)
                assert next(iter(out.values())).shape == x.shape
                self.ok += 1
            except Exception as exc:
                self.failed += 1
                self.errors.append(repr(exc))
            if self.pause:
                await asyncio.sleep(self.pause)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def test_registered_model_is_placed_served_and_shown(cluster: Cluster, tmp_path: Path) -> None:
    name = unique("ident")
    model_dir = build_identity_onnx(tmp_path / "repo", name, "float32", shape=(3,))
    cluster.router("r1")
    for w in ("w1", "w2", "w3"):
        cluster.worker(w)
    added = await _cli("models", "add", name, "--from", str(model_dir), "--min-replicas", "2", "--max-replicas", "3",
                       "--instances", "2", "--nats", cluster.server.url)  # fmt: skip
    assert added["added"] == name
    assert (await _cli("models", "show", name, "--nats", cluster.server.url))["spec"]["instances"] == 2
    await eventually(lambda: _count(cluster, name, 2), 30, "two replicas placed")
    async with await MeshClient.connect(cluster.server.url) as client:
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        np.testing.assert_array_equal((await client.infer(name, {"input": x}))["output"], x)
    holders = await cluster.holders(name)
    assert len(holders) == 2  # spread: never two replicas on one worker
    await eventually(lambda: _shown_ready(cluster, name, holders), 10, "models show lists the ready workers")
    listed = await _cli("models", "list", "--nats", cluster.server.url)
    assert any(m["name"] == name and m["ready"] == {"1": 2} for m in listed)
    top = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "servemesh", "top", "--once", "--nats", cluster.server.url,
        stdout=asyncio.subprocess.PIPE, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    frame = (await asyncio.wait_for(top.communicate(), 60))[0].decode()
    assert f"{name}:1" in frame and "2/2" in frame  # replicas wanted/ready
    assert all(w in frame for w in ("w1", "w2", "w3"))


async def _count(cluster: Cluster, name: str, n: int) -> bool:
    return len(await cluster.holders(name)) == n


async def _shown_ready(cluster: Cluster, name: str, holders: set[str]) -> bool:
    shown = await _cli("models", "show", name, "--nats", cluster.server.url)
    version = shown["status"].get("1", {})
    return set(version.get("ready", [])) == holders and version.get("last_decision") is not None


async def test_load_spike_scales_out_then_back_in(cluster: Cluster, tmp_path: Path) -> None:
    name = await _register(
        cluster, build_slow_onnx(tmp_path, unique("slow"), repeats=4000, max_batch_size=1, max_delay_ms=0),
        min_replicas=1, max_replicas=3,
    )  # fmt: skip
    cluster.router("r1")
    cluster.router("r2")
    for w in ("w1", "w2", "w3"):
        cluster.worker(w)
    await eventually(lambda: _count(cluster, name, 1), 30, "one replica at rest")
    x = np.ones((1, 256), np.float32)
    async with await MeshClient.connect(cluster.server.url) as client:
        load = Load(client, name, x, concurrency=96)
        took = await eventually(lambda: _at_least(cluster, name, 2), 20, "a second replica under load")
        await asyncio.sleep(1.0)
        await load.stop()
        # A trickle keeps flowing while the spare replica is drained and unloaded. One caller (~4 req/s)
        # keeps it well under the 70% of one replica's measured capacity that scaling in asks for,
        # even when a loaded machine measured that capacity low during the spike.
        trickle = Load(client, name, x, concurrency=1, pause=0.2)
        await eventually(lambda: _count(cluster, name, 1), 30, "back to one replica once the spike is over")
        await trickle.stop()
    assert load.failed == 0 and trickle.failed == 0, (load.errors + trickle.errors)[:3]
    assert load.ok > 100 and trickle.ok > 0
    print(f"scale-out after {took:.1f}s of load")


async def _at_least(cluster: Cluster, name: str, n: int) -> bool:
    return len(await cluster.holders(name)) >= n


async def test_scale_to_zero_then_cold_start_on_first_request(cluster: Cluster, tmp_path: Path) -> None:
    name = await _register(
        cluster, build_identity_onnx(tmp_path, unique("zero"), "float32", shape=(2,)), min_replicas=0
    )
    cluster.router("r1")
    cluster.worker("w1")
    await asyncio.sleep(2.0)
    assert await cluster.holders(name) == set()  # nothing loaded while nobody asks
    async with await MeshClient.connect(cluster.server.url) as client:
        start = time.monotonic()
        x = np.array([[1.0, 2.0]], np.float32)
        np.testing.assert_array_equal((await client.infer(name, {"input": x}, timeout=30))["output"], x)
        cold = time.monotonic() - start
    await eventually(lambda: _holders_are(cluster, name, {"w1"}), 10, "the cold-started replica on w1")
    assert cold < 10, f"cold start took {cold:.1f}s"


async def test_idle_model_is_evicted_lru_when_the_worker_is_full(cluster: Cluster, tmp_path: Path) -> None:
    a, b = unique("a"), unique("b")
    for name in (a, b):
        # 15 MiB of weights, which onnxruntime's packed copies make about 90 MiB once loaded, as the worker
        # measures: the router plans with the declared 100 MB until then, with the measurement after.
        await _register(cluster, build_mlp_onnx(tmp_path, name, d_in=2, hidden=1_000_000, d_out=2),
                        min_replicas=0, memory_mb=100)  # fmt: skip
    cluster.router("r1")
    cluster.worker("w1", memory_mb=140)  # room for one of the two, declared or measured
    x = np.zeros((1, 2), np.float32)
    async with await MeshClient.connect(cluster.server.url) as client:
        await client.infer(a, {"input": x}, timeout=30)
        await eventually(lambda: _holders_are(cluster, a, {"w1"}), 10, "a loaded on w1")
        await asyncio.sleep(1.5)  # a is now idle
        await client.infer(b, {"input": x}, timeout=30)
        await eventually(lambda: _holders_are(cluster, b, {"w1"}), 10, "b loaded on w1")
        assert await cluster.holders(a) == set()  # the heartbeat that shows b no longer shows a
        await eventually(lambda: _last_action(cluster, a, "evict"), 10, "models show names the eviction")
        await client.infer(a, {"input": x}, timeout=30)  # and back: b, idle by now, makes room
        await eventually(lambda: _holders_are(cluster, a, {"w1"}), 10, "a back on w1")


async def test_a_model_measured_smaller_than_declared_leaves_room_for_another(cluster: Cluster, tmp_path: Path) -> None:
    a, b = unique("a"), unique("b")
    for name in (a, b):  # declared at 60 MB each; an identity model measures a few MB once loaded
        await _register(cluster, build_identity_onnx(tmp_path, name, "float32", shape=(2,)),
                        min_replicas=0, memory_mb=60)  # fmt: skip
    cluster.router("r1")
    cluster.worker("w1", memory_mb=100)  # as declared, room for one of the two
    x = np.zeros((1, 2), np.float32)
    async with await MeshClient.connect(cluster.server.url) as client:
        await client.infer(a, {"input": x}, timeout=30)
        await eventually(lambda: _holders_are(cluster, a, {"w1"}), 10, "a loaded on w1")
        await asyncio.sleep(1.5)  # a is idle: as declared, b would evict it
        await client.infer(b, {"input": x}, timeout=30)
        await eventually(lambda: _holders_are(cluster, b, {"w1"}), 10, "b loaded on w1")
        assert await cluster.holders(a) == {"w1"}  # planned with a's measured footprint, not its 60 MB


async def test_killing_the_leader_router_fails_no_request(cluster: Cluster, tmp_path: Path) -> None:
    name = await _register(cluster, build_identity_onnx(tmp_path, unique("ha"), "float32", shape=(2,)))
    cluster.router("r1")
    await eventually(lambda: _is_leader(cluster, "r1"), 10, "r1 leads")
    cluster.router("r2")
    cluster.worker("w1")
    cluster.worker("w2")
    await eventually(lambda: _count(cluster, name, 1), 30, "placed")
    async with await MeshClient.connect(cluster.server.url) as client:
        load = Load(client, name, np.ones((1, 2), np.float32), concurrency=8)
        await asyncio.sleep(0.5)
        cluster.kill("r1")
        took = await eventually(lambda: _is_leader(cluster, "r2"), 10, "the standby takes over")
        # The new leader acts: a model registered now gets placed.
        late = await _register(cluster, build_identity_onnx(tmp_path, unique("late"), "float32", shape=(2,)))
        await eventually(lambda: _count(cluster, late, 1), 15, "the new leader places a new model")
        # With no router at all, workers keep serving what they were assigned.
        cluster.kill("r2")
        served = load.ok
        await asyncio.sleep(1.5)
        await load.stop()
    assert took < 5.0
    assert load.failed == 0 and load.ok > served > 0, load.errors[:3]


async def _last_action(cluster: Cluster, model: str, action: str) -> bool:
    assert cluster.registry is not None
    status = await cluster.registry.get_status(model) or {}
    return (status.get("versions", {}).get("1", {}).get("last_decision") or {}).get("action") == action


async def _is_leader(cluster: Cluster, name: str) -> bool:
    return await cluster.leader() == name


async def test_killed_worker_is_replaced_and_no_request_is_lost(cluster: Cluster, tmp_path: Path) -> None:
    name = await _register(
        cluster, build_identity_onnx(tmp_path, unique("survive"), "float32", shape=(2,)), ack_wait_s=2.0
    )
    cluster.router("r1")
    cluster.worker("w1")
    cluster.worker("w2")
    await eventually(lambda: _count(cluster, name, 1), 30, "placed")
    (victim,) = await cluster.holders(name)
    async with await MeshClient.connect(cluster.server.url) as client:
        load = Load(client, name, np.ones((1, 2), np.float32), concurrency=16)
        await asyncio.sleep(0.5)
        cluster.kill(victim)
        survivor = {"w1", "w2"} - {victim}
        took = await eventually(lambda: _holders_are(cluster, name, survivor), 20, "re-placed on the survivor")
        await asyncio.sleep(0.5)
        await load.stop()
    assert load.failed == 0 and load.ok > 0, load.errors[:3]
    assert took < 10


async def _holders_are(cluster: Cluster, name: str, expected: set[str]) -> bool:
    return await cluster.holders(name) == expected
