"""deploy/k8s: each overlay rendered with `kubectl kustomize` (offline) after deploy/k8s/secrets.sh,
in a copy of deploy/, and every object validated: Kubernetes' own kinds with kubernetes-validate's
schemas (strict: no unknown fields), KEDA's ScaledObject and the Prometheus operator's
ServiceMonitor with models generated from their CRDs (cloudcoil). Then what the objects must say
to each other and to the code: probes, drain and grace period, secrets, policies, the scaler."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, latest_version

from broker.settings import Settings
from schemas.subjects import STREAM_INFER, consumer_name
from servemesh.gateway.core import load_keys
from tests.deploy.tools import DEPLOY, check_nats_config, check_nats_image, run, tool

Doc = dict[str, Any]
# The oldest Kubernetes these manifests are for (StatefulSet PVC retention is GA in 1.32), and the
# newest kubernetes-validate knows.
VERSIONS = ["1.32", latest_version()]
# Seconds a worker may need after SIGTERM beyond its drain: closing its NATS connection and the last
# spans' export (the OTLP exporter's default timeout is 10 s), with room.
AFTER_DRAIN_S = 15


def _crd_models() -> dict[tuple[str, str], Any]:
    from cloudcoil.models.keda.v1alpha1 import ScaledObject
    from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

    return {("keda.sh/v1alpha1", "ScaledObject"): ScaledObject,
            ("monitoring.coreos.com/v1", "ServiceMonitor"): ServiceMonitor}  # fmt: skip


@pytest.fixture(scope="module")
def deploy_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy/ copied without any credentials, then deploy/k8s/secrets.sh run in the copy."""
    copy = tmp_path_factory.mktemp("k8s") / "deploy"
    shutil.copytree(DEPLOY, copy, ignore=shutil.ignore_patterns("*.env", "gateway-keys.yaml", "__pycache__"))
    run(["sh", str(copy / "k8s" / "secrets.sh")])
    return copy


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def overlay(request: pytest.FixtureRequest, deploy_copy: Path) -> tuple[str, list[Doc]]:
    out = run([tool("kubectl"), "kustomize", str(deploy_copy / "k8s" / "overlays" / request.param)])
    docs = [doc for doc in yaml.safe_load_all(out) if doc]
    assert len(docs) > 20, out[:2000]
    return request.param, docs


def _one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _named(docs: list[Doc], kind: str, prefix: str) -> Doc:
    """A generated object (ConfigMap, Secret) by the name before its hash suffix."""
    found = [d for d in docs if d["kind"] == kind and re.fullmatch(rf"{prefix}-[a-z0-9]{{10}}", d["metadata"]["name"])]
    assert len(found) == 1, f"{kind}/{prefix}-*: {len(found)} found"
    return found[0]


def _container(doc: Doc, name: str) -> Doc:
    return next(c for c in doc["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def _env(docs: list[Doc], container: Doc) -> dict[str, str]:
    """A container's environment as the pod would have it: envFrom ConfigMaps, then env (values and
    secretKeyRefs resolved from the rendered Secrets; fieldRefs as a placeholder)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(_one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "secretKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["secretKeyRef"]
            secret = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == ref["name"]]
            if not secret and ref.get("optional"):
                continue
            assert secret, f"{var['name']}: no Secret {ref['name']}"
            env[var["name"]] = base64.b64decode(secret[0]["data"][ref["key"]]).decode()
        else:
            env[var["name"]] = "placeholder-" + var["valueFrom"]["fieldRef"]["fieldPath"].replace(".", "-")
    return env


def _expand(args: list[str], env: dict[str, str]) -> list[str]:
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg) for arg in args]


def test_rendering_without_credentials_says_which_file_is_missing(tmp_path: Path) -> None:
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy, ignore=shutil.ignore_patterns("*.env", "gateway-keys.yaml"))
    done = subprocess.run([tool("kubectl"), "kustomize", str(copy / "k8s" / "overlays" / "cpu")],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode != 0 and "secrets/" in done.stderr


def test_every_object_validates(overlay: tuple[str, list[Doc]]) -> None:
    name, docs = overlay
    crds = _crd_models()
    for doc in docs:
        where = f"{name}: {doc['kind']}/{doc['metadata']['name']}"
        model = crds.get((doc["apiVersion"], doc["kind"]))
        if model is not None:
            parsed = model.model_validate(doc)
            # The models ignore unknown fields: one lost on the way back was not in the CRD's schema.
            assert parsed.model_dump(mode="json", by_alias=True, exclude_unset=True) == doc, f"{where}: unknown fields"
            continue
        for version in VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{where} against Kubernetes {version}: {path}: {exc.message}")
            except SchemaNotFoundError:
                pytest.fail(f"{where}: no schema for {doc['apiVersion']} {doc['kind']} to validate it against")


def test_the_kinds_the_deployment_needs(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    assert all(d["metadata"].get("namespace") == "servemesh" for d in docs if d["kind"] != "Namespace")
    nats = _one(docs, "StatefulSet", "nats")
    assert nats["spec"]["replicas"] == 3
    check_nats_image(_container(nats, "nats")["image"])
    routers = _one(docs, "Deployment", "servemesh-router")
    assert routers["spec"]["replicas"] == 2
    for workload in (routers, _one(docs, "Deployment", "servemesh-gateway"), nats):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget"
                   and d["spec"]["selector"]["matchLabels"].items() <= labels.items()]  # fmt: skip
        assert budgets, f"{workload['metadata']['name']} has no PodDisruptionBudget"
    service = _one(docs, "Service", "servemesh-gateway")
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {"http": (8000, "http"), "grpc": (8001, "grpc")}
    env = _env(docs, _container(_one(docs, "Deployment", "servemesh-gateway"), "gateway"))
    assert (env["SERVEMESH_GATEWAY_HTTP_PORT"], env["SERVEMESH_GATEWAY_GRPC_PORT"]) == ("8000", "8001")
    assert _env(docs, _container(_one(docs, "Job", "servemesh-provision"), "provision"))["SERVEMESH_REPLICAS"] == "3"


def test_workers_one_gpu_each_on_gpu_nodes(overlay: tuple[str, list[Doc]]) -> None:
    name, docs = overlay
    worker = _one(docs, "StatefulSet", "servemesh-worker")
    pod = worker["spec"]["template"]["spec"]
    container = _container(worker, "worker")
    limits = container["resources"]["limits"]
    others = [_container(_one(docs, "Deployment", "servemesh-router"), "router"),
              _container(_one(docs, "Deployment", "servemesh-gateway"), "gateway")]  # fmt: skip
    assert all(c["image"] == "servemesh:cpu" for c in others)
    if name == "gpu":
        assert limits["nvidia.com/gpu"] == 1 and container["image"] == "servemesh:gpu"
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert container["args"][container["args"].index("--device") + 1] == "cuda:0"
    else:
        assert "nvidia.com/gpu" not in limits and "nodeSelector" not in pod and container["image"] == "servemesh:cpu"
    assert "replicas" not in worker["spec"], "KEDA sets the workers' count; an apply must not reset it"


def test_a_worker_drains_within_its_grace_period_and_probes_with_check(
    overlay: tuple[str, list[Doc]], tmp_path: Path
) -> None:
    _, docs = overlay
    worker = _one(docs, "StatefulSet", "servemesh-worker")
    container = _container(worker, "worker")
    env = _env(docs, container)
    drain = float(env.get("SERVEMESH_DRAIN_TIMEOUT_S", Settings().drain_timeout_s))
    grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert drain + AFTER_DRAIN_S <= grace, f"SIGKILL {grace} s after SIGTERM, before a {drain} s drain and its close"
    probe = container["readinessProbe"]["exec"]["command"]
    assert probe == ["servemesh", "worker", "--check"]
    port = int(env["SERVEMESH_HTTP_PORT"])
    assert {"name": "metrics", "containerPort": port} in container["ports"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "metrics"}
    # The probe as the kubelet runs it, with the pod's settings, where no worker listens: "not ready"
    # and exit 1 (not a usage error). tests/integration/test_observability.py covers a ready worker.
    free = {k: v for k, v in env.items() if k.startswith("SERVEMESH_")} | {"SERVEMESH_HTTP_PORT": "1"}
    done = subprocess.run([sys.executable, "-m", "servemesh", *probe[1:]], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", **free}, cwd=tmp_path, timeout=60)  # fmt: skip
    assert (done.returncode, done.stdout.strip()) == (1, "not ready"), done.stderr


def test_every_role_has_its_own_credentials(overlay: tuple[str, list[Doc]], deploy_copy: Path) -> None:
    _, docs = overlay
    users = {
        "servemesh-router": ("router", "admin"), "servemesh-gateway": ("gateway", "admin"),
        "servemesh-worker": ("worker", "worker"), "servemesh-provision": ("provision", "admin"),
    }  # fmt: skip
    for workload in (d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job")):
        name = workload["metadata"]["name"]
        if name in users:
            container, user = users[name]
            env = _env(docs, _container(workload, container))
            assert env["SERVEMESH_USER"] == user and len(env["SERVEMESH_PASSWORD"]) >= 32, name
            assert env["SERVEMESH_INBOX_PREFIX"] == f"_INBOX.{user}", name
    # Every password variable of accounts.conf is set on the NATS nodes, each from its own Secret.
    accounts = (DEPLOY / "nats" / "accounts.conf").read_text()
    wanted = set(re.findall(r"\$(MESH_\w+_PASSWORD)", accounts)) | {"MESH_ROUTE_PASSWORD"}
    refs = {v["name"]: v["valueFrom"]["secretKeyRef"]["name"] for v in _container(_one(docs, "StatefulSet", "nats"),
            "nats")["env"] if "secretKeyRef" in v.get("valueFrom", {})}  # fmt: skip
    assert set(refs) == wanted and len(set(refs.values())) == len(refs)
    # The gateway's key file is one servemesh reads: an API key per tenant, with that tenant's NATS user.
    keys_secret = _named(docs, "Secret", "servemesh-gateway-keys")
    keys_file = deploy_copy / "keys.yaml"
    keys_file.write_bytes(base64.b64decode(keys_secret["data"]["keys.yaml"]))
    tenants = {entry.tenant: entry for entry in load_keys(keys_file).keys.values()}
    assert set(tenants) == set(re.findall(r"\{user: (\w+), password: \$\w+, permissions: \$TENANT_\w+\}", accounts))
    for tenant, entry in tenants.items():
        secret = _named(docs, "Secret", f"nats-{tenant.replace('_', '-')}")
        assert entry.user == tenant and entry.password is not None and entry.inbox_prefix == f"_INBOX.{tenant}"
        assert entry.password.get_secret_value() == base64.b64decode(secret["data"]["password"]).decode()


def test_the_nats_nodes_start_from_the_rendered_configuration(overlay: tuple[str, list[Doc]], tmp_path: Path) -> None:
    _, docs = overlay
    nats = _one(docs, "StatefulSet", "nats")
    container = _container(nats, "nats")
    (volume,) = [v for v in nats["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"]
    files = _one(docs, "ConfigMap", volume["configMap"]["name"])["data"]
    assert {m["mountPath"] for m in container["volumeMounts"] if m["name"] == "config"} == {"/etc/nats"}
    env = _env(docs, container)
    args = _expand(container["args"], env)
    check_nats_config(files, args, env, tmp_path)
    assert "sync_interval: always" in files["servemesh.conf"]
    routes = args[args.index("--routes") + 1].split(",")
    assert sorted(r.rsplit("@", 1)[1] for r in routes) == [f"nats-{i}.nats-headless:6222" for i in range(3)]
    assert _one(docs, "Service", "nats-headless")["spec"]["clusterIP"] == "None"


def test_prometheus_scrapes_every_router_worker_and_gateway(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    monitor = _one(docs, "ServiceMonitor", "servemesh")
    wanted = monitor["spec"]["selector"]["matchLabels"].items()
    services = [d for d in docs if d["kind"] == "Service" and wanted <= d["metadata"].get("labels", {}).items()]
    ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    for name in ("servemesh-router", "servemesh-worker", "servemesh-gateway"):
        kind = "StatefulSet" if name == "servemesh-worker" else "Deployment"
        pod_labels = _one(docs, kind, name)["spec"]["template"]["metadata"]["labels"]
        chosen = [s for s in services if s["spec"]["selector"].items() <= pod_labels.items()]
        assert chosen, f"no monitored Service selects {name}"
        assert ports & {p["name"] for s in chosen for p in s["spec"]["ports"]}, f"{name}: port not scraped"


def _selects(selector: Doc, labels: dict[str, str]) -> bool:
    if not set(selector.get("matchLabels", {}).items()) <= set(labels.items()):
        return False
    for expr in selector.get("matchExpressions", []):
        has = labels.get(expr["key"])
        if (expr["operator"] == "In" and has not in expr["values"]) or (
            expr["operator"] == "NotIn" and has in expr["values"]) or (expr["operator"] == "Exists" and has is None):
            return False
    return True


def _allowed(policies: list[Doc], target: dict[str, str], port: int, source: dict[str, str], ns: dict[str, str],
             same_namespace: bool) -> bool:  # fmt: skip
    """Whether NetworkPolicies let a pod (``source``, in a namespace labelled ``ns``) reach ``target`` on ``port``."""
    applying = [p for p in policies if _selects(p["spec"]["podSelector"], target)]
    if not applying:
        return True
    for policy in applying:
        for rule in policy["spec"].get("ingress", []):
            if rule.get("ports") and port not in {p["port"] for p in rule["ports"]}:
                continue
            peers = rule.get("from")
            if not peers:
                return True
            for peer in peers:
                if "namespaceSelector" in peer and _selects(peer["namespaceSelector"], ns) and (
                        "podSelector" not in peer or _selects(peer["podSelector"], source)):
                    return True
                if "namespaceSelector" not in peer and same_namespace and _selects(peer["podSelector"], source):
                    return True
    return False


def test_network_policies_let_through_what_the_mesh_needs_and_no_more(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert any(p["spec"]["podSelector"] == {} and p["spec"]["policyTypes"] == ["Ingress"] for p in policies)
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in docs
            if d["kind"] in ("Deployment", "StatefulSet", "Job")}  # fmt: skip
    here = {"kubernetes.io/metadata.name": "servemesh"}

    def allowed(target: str, port: int, source: str | None = None, ns: dict[str, str] | None = None) -> bool:
        return _allowed(policies, pods[target], port, pods.get(source or "", {}), ns or here, ns is None)

    for client in ("servemesh-router", "servemesh-worker", "servemesh-gateway", "servemesh-provision"):
        assert allowed("nats", 4222, client), f"{client} cannot reach NATS"
    assert allowed("nats", 6222, "nats") and not allowed("nats", 6222, "servemesh-worker")
    assert allowed("nats", 8222, ns={"kubernetes.io/metadata.name": "keda"})  # KEDA's scaler
    assert not allowed("nats", 8222, "servemesh-gateway")
    assert allowed("nats", 4222, ns={"servemesh.io/client": "true", "kubernetes.io/metadata.name": "apps"})
    assert not allowed("nats", 4222, ns={"kubernetes.io/metadata.name": "elsewhere"})
    for scraped in ("servemesh-router", "servemesh-worker", "servemesh-gateway"):
        assert allowed(scraped, 9090, ns={"kubernetes.io/metadata.name": "monitoring"})
        assert not allowed(scraped, 9090, "servemesh-worker" if scraped == "servemesh-gateway" else "servemesh-gateway")
    assert not allowed("servemesh-gateway", 9090, ns={"kubernetes.io/metadata.name": "ingress"})
    assert allowed("servemesh-gateway", 8000, ns={"kubernetes.io/metadata.name": "ingress"})
    assert allowed("servemesh-gateway", 8001, ns={"kubernetes.io/metadata.name": "ingress"})


def test_keda_scales_workers_on_the_lag_of_servemesh_consumers(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    scaled = _one(docs, "ScaledObject", "servemesh-worker")
    assert scaled["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet",
                                                "name": "servemesh-worker"}  # fmt: skip
    accounts = (DEPLOY / "nats" / "accounts.conf").read_text()
    account = re.search(r"accounts\s*\{\s*#[^\n]*\n(?:\s*#[^\n]*\n)*\s*(\w+)\s*\{", accounts)
    assert account, "no account in accounts.conf"
    required = {"natsServerMonitoringEndpoint", "account", "stream", "consumer", "lagThreshold"}
    for trigger in scaled["spec"]["triggers"]:
        meta = trigger["metadata"]
        assert trigger["type"] == "nats-jetstream"
        assert required <= set(meta) <= required | {"activationLagThreshold", "useHttps"}, sorted(meta)
        assert meta["account"] == account.group(1) and meta["stream"] == STREAM_INFER
        model, version, priority = re.fullmatch(r"infer_([^_]+)_([^_]+)_(high|normal|low)", meta["consumer"]).groups()  # type: ignore[union-attr]
        assert consumer_name(model, version, priority) == meta["consumer"]
        host, port = meta["natsServerMonitoringEndpoint"].split(":")
        assert host == "nats-headless.servemesh.svc.cluster.local"
        assert int(port) in {p["port"] for p in _one(docs, "Service", "nats-headless")["spec"]["ports"]}
        assert float(meta["lagThreshold"]) > 0
