"""deploy/compose: the compose file as Debian's docker-compose renders it (`docker-compose config`,
which checks it against the compose schema and fills in every variable), and the stack it
describes: what a laptop mesh needs, each piece wired to the next."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.settings import Settings
from tests.deploy.tools import DEPLOY, check_nats_config, check_nats_image, run, tool

COMPOSE = DEPLOY / "compose" / "compose.yaml"


@pytest.fixture(scope="module")
def rendered() -> dict[str, Any]:
    out = run([tool("docker-compose"), "-f", str(COMPOSE), "config"], cwd=COMPOSE.parent)
    config = yaml.safe_load(out)
    assert isinstance(config, dict) and config.get("services")
    return config


def _roles(config: dict[str, Any], role: str) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in config["services"].items()
            if svc.get("image", "").startswith("servemesh:") and svc.get("command", [None])[0] == role}  # fmt: skip


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Bind mounts, target → source (docker-compose writes them as strings or objects)."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume["source"], volume["target"]
        mounts[target] = Path(source)
    return mounts


def _seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text))


def test_compose_renders_with_docker_compose(rendered: dict[str, Any]) -> None:
    run([tool("docker-compose"), "-f", str(COMPOSE), "config", "--quiet"], cwd=COMPOSE.parent)
    assert {"prometheus", "grafana", "otel-collector", "gateway", "provision"} <= set(rendered["services"])


def test_a_three_node_jetstream_cluster_of_the_official_image(rendered: dict[str, Any]) -> None:
    nodes = {n: s for n, s in rendered["services"].items() if s.get("image", "").split(":")[0] == "nats"}
    assert sorted(nodes) == ["nats-1", "nats-2", "nats-3"]
    for name, node in nodes.items():
        # The configs CI checks with nats-server -t, at the version the tests run.
        check_nats_image(node["image"])
        args = node["command"]
        assert args[args.index("--name") + 1] == name
        routes = args[args.index("--routes") + 1].split(",")
        assert sorted(re.sub(r".*@", "", r) for r in routes) == ["nats-1:6222", "nats-2:6222", "nats-3:6222"]
        mounts = _mounts(node)
        assert mounts["/etc/nats/servemesh.conf"].resolve() == (DEPLOY / "nats" / "container.conf").resolve()
        assert mounts["/etc/nats/accounts.conf"].resolve() == (DEPLOY / "nats" / "accounts.conf").resolve()
        assert "nats" in node["networks"]["mesh"]["aliases"]  # one name for the three


def test_two_routers_two_workers_one_gateway_on_the_cluster(rendered: dict[str, Any]) -> None:
    assert len(_roles(rendered, "router")) == 2 and len(_roles(rendered, "worker")) == 2
    assert len(_roles(rendered, "gateway")) == 1
    processes = {**_roles(rendered, "router"), **_roles(rendered, "worker"), **_roles(rendered, "gateway")}
    for name, svc in processes.items():
        env = svc["environment"]
        assert env["SERVEMESH_NATS_URL"] == "nats://nats:4222", name
        assert env.get("SERVEMESH_USER") and env.get("SERVEMESH_PASSWORD"), f"{name} connects without credentials"
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318", name
        assert svc["depends_on"]["provision"]["condition"] == "service_completed_successfully", name
    provision = rendered["services"]["provision"]
    assert provision["command"] == ["provision"] and provision["environment"]["SERVEMESH_REPLICAS"] == "3"
    for worker in _roles(rendered, "worker").values():
        assert worker["environment"]["SERVEMESH_USER"] == "worker"
        assert worker["environment"]["SERVEMESH_INBOX_PREFIX"] == "_INBOX.worker"  # accounts.conf's grant


def test_workers_get_the_time_their_drain_takes(rendered: dict[str, Any]) -> None:
    for name, worker in _roles(rendered, "worker").items():
        drain = float(worker["environment"].get("SERVEMESH_DRAIN_TIMEOUT_S", Settings().drain_timeout_s))
        assert _seconds(worker["stop_grace_period"]) >= drain + 10, f"{name}: SIGKILL before the drain ends"


def test_prometheus_scrapes_every_servemesh_process_that_serves_metrics(rendered: dict[str, Any]) -> None:
    prometheus = yaml.safe_load((DEPLOY / "compose" / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    processes = {**_roles(rendered, "router"), **_roles(rendered, "worker"), **_roles(rendered, "gateway")}
    for name, svc in processes.items():
        port = svc["environment"].get("SERVEMESH_HTTP_PORT")
        assert port, f"{name} serves no /metrics (SERVEMESH_HTTP_PORT unset)"
        assert f"{name}:{port}" in targets, f"{name}:{port} is not scraped"


def test_grafana_provisions_the_dashboard_and_prometheus(rendered: dict[str, Any]) -> None:
    mounts = _mounts(rendered["services"]["grafana"])
    provisioning = mounts["/etc/grafana/provisioning"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "servemesh.yaml").read_text())["providers"]
    dashboards = mounts[provider["options"]["path"]]
    assert (dashboards / "servemesh.json").is_file()
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090" and source["uid"] == "prometheus"
    assert '"uid": "prometheus"' in (dashboards / "servemesh.json").read_text()


def test_the_collector_receives_what_the_processes_send(rendered: dict[str, Any]) -> None:
    collector = yaml.safe_load((DEPLOY / "compose" / "otel" / "collector.yaml").read_text())
    http = collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert http.endswith(":4318")
    pipeline = collector["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"] and set(pipeline["exporters"]) <= set(collector["exporters"])


def test_each_node_starts_from_its_command_line_and_environment(rendered: dict[str, Any], tmp_path: Path) -> None:
    for name in ("nats-1", "nats-2", "nats-3"):
        node = rendered["services"][name]
        files = {target.removeprefix("/etc/nats/"): source.read_text()
                 for target, source in _mounts(node).items() if target.startswith("/etc/nats/")}  # fmt: skip
        check_nats_config(files, node["command"], {k: str(v) for k, v in node["environment"].items()}, tmp_path / name)
