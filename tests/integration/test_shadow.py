"""Shadow traffic: callers always get the primary's reply, the candidate's replies are compared,
and agreement, errors and latency show in `servemesh routes show` and the router's /metrics."""

from __future__ import annotations

import asyncio
import os
import sys
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from broker import Connection, NatsServer, Settings
from examples.build_models import build_identity_onnx
from router.shadow import shadow_events
from schemas.shadow import ShadowEvent
from servemesh import MeshClient
from tests.conftest import serving, unique
from tests.integration.cluster import Cluster, eventually
from tests.integration.test_observability import _free_port, _sample
from tests.integration.test_rollout import _ready, _routes, build_versions
from workers.repository import read_model


async def test_shadow_compares_every_mirror_and_reports_agreement(cluster: Cluster, tmp_path: Path) -> None:
    # Version N multiplies by N: on zeros both versions agree, on ones they differ by exactly 1.
    name = unique("shadow")
    model_dir = build_versions(tmp_path, name, {"1": 1.0, "2": 2.0})
    assert cluster.registry is not None
    await cluster.registry.put_spec(read_model(model_dir))
    port = _free_port()
    cluster.router("r1", env={"SERVEMESH_HTTP_PORT": str(port)})
    cluster.worker("w1")
    for version in ("1", "2"):
        await eventually(lambda v=version: _ready(cluster, name, v), 30, f"version {version} ready")  # type: ignore[misc]
    url = cluster.server.url
    await _routes(url, "set", name, "1=100")
    shown = await _routes(url, "shadow", name, "2", "--percent", "100")
    assert shown["shadow"]["version"] == "2" and shown["weights"] == {"1": 100.0}

    zeros, ones = np.zeros((1, 4), np.float32), np.ones((1, 4), np.float32)
    async with await MeshClient.connect(url) as client:
        replies = await asyncio.gather(*(client.infer(name, {"raw": x}) for x in [zeros] * 25 + [ones] * 15))
    assert all(np.array_equal(r["input"], zeros) for r in replies[:25])  # the primary's (×1), never the ×2
    assert all(np.array_equal(r["input"], ones) for r in replies[25:])

    async def all_compared() -> bool:
        return ((await _routes(url, "show", name)).get("shadow_results") or {}).get("1->2", {}).get("compared") == 40

    await eventually(all_compared, 20, "40 comparisons in the route's status", poll=0.5)
    results = (await _routes(url, "show", name))["shadow_results"]["1->2"]
    assert results["outcomes"] == {"agree": 25, "disagree": 15} and results["agreement"] == round(25 / 40, 4)
    assert results["max_abs_diff"] == 1.0
    assert results["latency_ms"]["primary"]["p50"] > 0 and results["latency_ms"]["shadow"]["p50"] > 0
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    labels = {"model": name, "version": "1", "shadow_version": "2"}
    assert _sample(metrics, "servemesh_shadow_requests_total", **labels, outcome="agree") == 25
    assert _sample(metrics, "servemesh_shadow_requests_total", **labels, outcome="disagree") == 15
    assert _sample(metrics, "servemesh_shadow_agreement_ratio", **labels) == 25 / 40
    assert _sample(metrics, "servemesh_shadow_latency_seconds_count", **labels, side="shadow") == 40
    top = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "servemesh", "top", "--once", "--nats", url,
        stdout=asyncio.subprocess.PIPE, env={**os.environ, "COLUMNS": "220"},
    )  # fmt: skip
    frame = (await asyncio.wait_for(top.communicate(), 60))[0].decode()
    assert "shadow traffic" in frame and f"{name} 1->2" in frame and "62.5" in frame  # agree %

    await _routes(url, "shadow", name, "--off")
    assert "shadow" not in await _routes(url, "show", name)
    async with await MeshClient.connect(url) as client:
        await client.infer(name, {"raw": ones})
        assert client._shadowing.book.mirrored == 0


async def test_a_failing_candidate_never_reaches_callers(nats_server: NatsServer, tmp_path: Path) -> None:
    # Version 2 names its input differently: every mirrored request is a 400 there.
    name = unique("shadowbad")
    build_versions(tmp_path, name, {"1": 3.0})
    _build_renamed_input(tmp_path / name / "2" / "model.onnx")
    url = nats_server.url
    async with (
        serving(url, tmp_path, [name]),
        _mirrored(url, name, 30) as events,
        await MeshClient.connect(url) as client,  # after the route is set: no stale cache
    ):
        raw = np.arange(4, dtype=np.float32).reshape(1, 4)
        sem = asyncio.Semaphore(16)

        async def call() -> np.ndarray:
            async with sem:
                return (await client.infer(name, {"raw": raw}))["input"]

        outputs = await asyncio.gather(*(call() for _ in range(400)))
        book = client._shadowing.book
        await eventually(lambda: _settled(book, events), 15, "every mirror reported")
        mirrored = book.mirrored
    assert all(np.array_equal(out, raw * 3.0) for out in outputs)
    # 400 draws at 30%: the standard deviation is 9.2, so ±46 is five of them.
    assert abs(mirrored - 120) < 46
    assert len(events) == mirrored and {(e.outcome, e.shadow_status) for e in events} == {("shadow_error", 400)}


@asynccontextmanager
async def _mirrored(url: str, name: str, percent: int) -> AsyncIterator[list[ShadowEvent]]:
    """Version 1 serves ``name``, ``percent``% of it is mirrored to version 2; yields the reports."""
    conn = await Connection.open(Settings.from_url(url))
    events: list[ShadowEvent] = []

    async def collect() -> None:
        async for event in shadow_events(conn):
            if event.model == name:
                events.append(event)

    collecting = asyncio.create_task(collect())
    try:
        await _routes(url, "set", name, "1=100")
        await _routes(url, "shadow", name, "2", "--percent", str(percent))
        yield events
    finally:
        collecting.cancel()
        await conn.close()


def _build_renamed_input(path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["features"], ["input"])], "renamed",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    path.parent.mkdir(parents=True)
    onnx.save(model, str(path))


async def _settled(book: object, events: list[ShadowEvent]) -> bool:
    return book.in_flight == 0 and len(events) == book.mirrored  # type: ignore[attr-defined]


async def test_a_large_request_is_mirrored_through_the_claim_check(nats_server: NatsServer, tmp_path: Path) -> None:
    name = unique("shadowbig")
    for version in ("1", "2"):
        build_identity_onnx(tmp_path, name, "float32", version=version)
    big = np.random.default_rng(0).standard_normal((1, 512 * 1024)).astype(np.float32)  # 2 MiB: over max_payload
    url = nats_server.url
    async with (
        serving(url, tmp_path, [name]),
        _mirrored(url, name, 100) as events,
        await MeshClient.connect(url) as client,  # after the route is set: no stale cache
    ):
        out = await client.infer(name, {"input": big}, timeout=20)
        await eventually(lambda: _settled(client._shadowing.book, events), 25, "the mirror reported")
    np.testing.assert_array_equal(out["output"], big)
    assert [(e.outcome, e.max_abs_diff) for e in events] == [("agree", 0.0)]
