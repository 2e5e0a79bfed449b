"""The Grafana dashboard (deploy/compose/grafana/dashboards/servemesh.json) against what servemesh
really exports: a router, a worker and a gateway run as processes, serve traffic (good requests, a
bad one, shadow mirrors, one through the gateway), and their /metrics are scraped. Every metric a
panel or variable queries must be exported by one of them, and every label it names must be on that
metric."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from schemas.errors import BadInput
from servemesh import MeshClient
from tests.conftest import unique
from tests.deploy.promql import dashboard_queries, parse
from tests.integration.cluster import Cluster, eventually
from tests.integration.secure_mesh import free_ports
from tests.integration.test_gateway import start_gateway, stop
from tests.integration.test_rollout import _ready, _routes, build_versions
from workers.repository import read_model

DASHBOARD = Path(__file__).parents[2] / "deploy" / "compose" / "grafana" / "dashboards" / "servemesh.json"


class Exported:
    """Metric names (families and their samples: ``_total``, ``_bucket``...) and the labels seen on each."""

    def __init__(self) -> None:
        self.labels: dict[str, set[str]] = {}
        self.sampled: set[str] = set()

    def add(self, text: str) -> None:
        for family in text_string_to_metric_families(text):
            self.labels.setdefault(family.name, set())
            if family.type == "counter":
                self.labels.setdefault(family.name + "_total", set())
            for sample in family.samples:
                self.labels.setdefault(sample.name, set()).update(sample.labels)
                self.sampled.add(sample.name)


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


@pytest.fixture
async def exported(cluster: Cluster, tmp_path: Path) -> Exported:
    name = unique("dash")
    model_dir = build_versions(tmp_path, name, {"1": 1.0, "2": 1.0})  # two versions that agree
    assert cluster.registry is not None
    await cluster.registry.put_spec(read_model(model_dir))
    worker_port, router_port = free_ports(2)
    cluster.router("r1", env={"SERVEMESH_HTTP_PORT": str(router_port)})
    cluster.worker("w1", env={"SERVEMESH_HTTP_PORT": str(worker_port)})
    for version in ("1", "2"):
        await eventually(lambda v=version: _ready(cluster, name, v), 60, f"version {version} ready")  # type: ignore[misc]
    url = cluster.server.url
    await _routes(url, "set", name, "1=100")
    await _routes(url, "shadow", name, "2", "--percent", "100")
    async with await MeshClient.connect(url) as client:
        await asyncio.gather(*(client.infer(name, {"raw": np.ones((1, 4), np.float32)}) for _ in range(20)))
        with pytest.raises(BadInput):
            await client.infer(name, {"raw": np.ones((1, 5), np.float32)})

    async def shadow_tallied() -> bool:
        return "servemesh_shadow_agreement_ratio{" in _scrape(router_port)

    await eventually(shadow_tallied, 30, "the router's shadow agreement for the mirrored requests", poll=0.5)
    (gateway_port,) = free_ports(1)
    gateway = await asyncio.to_thread(start_gateway, url, "--metrics-port", str(gateway_port))
    try:
        body = json.dumps({"inputs": [{"name": "raw", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]}]})
        request = urllib.request.Request(f"{gateway.http}/v2/models/{name}/infer", body.encode(), method="POST")
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert answer.status == 200
        gateway_metrics = _scrape(gateway_port)
    finally:
        stop(gateway)
    seen = Exported()
    seen.add(_scrape(worker_port))
    seen.add(_scrape(router_port))
    seen.add(gateway_metrics)
    return seen


async def test_every_metric_the_dashboard_queries_is_exported(exported: Exported) -> None:
    queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
    assert len(queries) >= 15, "the dashboard's panels were not found"
    for query in queries:
        assert query.metrics, f"{query.where}: no metric in {query.expr!r}"
        unknown = sorted(m for m in query.metrics if m not in exported.labels)
        assert not unknown, f"{query.where}: {unknown} not exported by any servemesh process ({query.expr!r})"
        known = set().union(*(exported.labels[m] for m in query.metrics))
        if all(m in exported.sampled for m in query.metrics):  # labels are seen only on samples
            missing = sorted(query.labels - known - {"le"})
            assert not missing, f"{query.where}: labels {missing} are on none of {sorted(query.metrics)}"
    # The panels the deployment story promises, each present.
    asked = set().union(*(q.metrics for q in queries))
    promised = ["router_lag_messages", "router_replicas_desired", "router_replicas_ready",
                "inference_request_success_total", "inference_request_failure_total",
                "inference_queue_duration_seconds_bucket", "inference_compute_duration_seconds_bucket",
                "inference_batch_size_bucket", "shadow_agreement_ratio", "gateway_requests_total",
                "gateway_request_seconds_bucket"]  # fmt: skip
    for name in (f"servemesh_{p}" for p in promised):
        assert name in asked, f"the dashboard has no panel on {name}"


def test_the_query_parser_finds_names_and_labels() -> None:
    query = parse("t", 'histogram_quantile(0.99, sum by (le, model) (rate(a_bucket{model=~"$model", x!="b{c}"}[5m])))'
                  " / on(model) group_left b_total + c")  # fmt: skip
    assert query.metrics == {"a_bucket", "b_total", "c"}
    assert query.labels == {"le", "model", "x"}
