"""What both transports of the gateway share: who the caller is (API key → tenant → that tenant's
own NATS client), model metadata, readiness and statistics read from the registry, the model
repository extension, and inference through the public client. The mesh's error tree maps onto
HTTP statuses and gRPC codes here, in one place."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from broker.connection import Connection
from broker.registry import Registry
from broker.settings import Settings
from schemas.errors import BadInput, Forbidden, MeshError, UnknownModel
from schemas.spec import ModelSpec, TensorSpec
from schemas.subjects import PRIORITIES, claims_bucket_of
from servemesh.client import MeshClient
from servemesh.gateway.metrics import GatewayMetrics

__all__ = ["Caller", "Gateway", "GatewaySettings", "Unauthenticated", "grpc_code", "model_config", "platform_of"]

log = logging.getLogger(__name__)

# A worker whose heartbeat is older than this no longer makes its models ready.
_FRESH_S = 10.0
# Triton's priorities are integers, 1 the highest; servemesh's names, in that order.
_TRITON_PRIORITY = {1: "high", 2: "normal", 3: "low"}
_DEFAULT_TIMEOUT_S = 30.0
_SPEC_TTL_S = 1.0
_PLATFORMS = {"onnx": "onnxruntime_onnx", "torchscript": "pytorch_libtorch", "torch_export": "pytorch_export"}


class Unauthenticated(MeshError):
    """No API key, or one the gateway does not know (HTTP 401, gRPC UNAUTHENTICATED)."""

    status = 401
    code = "unauthenticated"


_GRPC_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
               429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}  # fmt: skip


def grpc_code(error: MeshError) -> str:
    """The ``grpc.StatusCode`` name for a mesh error (INTERNAL for what has no closer one)."""
    return _GRPC_CODES.get(error.status, "INTERNAL")


class GatewaySettings(BaseSettings):
    """``SERVEMESH_GATEWAY_*``: where the gateway listens and whom it lets in."""

    model_config = SettingsConfigDict(env_prefix="SERVEMESH_GATEWAY_", extra="ignore")

    host: str = "127.0.0.1"
    http_port: int = 8000  # 0: any free port; -1: no REST listener
    grpc_port: int = 8001  # 0: any free port; -1: no gRPC listener
    keys_file: Path | None = None  # API keys per tenant (see KeyFile); unset: no key asked for
    tls_cert: Path | None = None  # both set: HTTPS and gRPC over TLS
    tls_key: Path | None = None
    processes: int = 1
    share_ports: bool = False  # set for the helper processes of one with processes > 1


class _Key(BaseModel):
    """One API key's tenant and that tenant's NATS credentials (the same the server checks)."""

    model_config = ConfigDict(extra="forbid")

    tenant: str
    user: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None
    creds_file: str | None = None
    nkey_seed: SecretStr | None = None
    inbox_prefix: str | None = None


class KeyFile(BaseModel):
    """``keys:`` maps each API key to its tenant and NATS credentials::

    keys:
      "k-3f9...": {tenant: tenant_a, user: tenant_a, password: "...", inbox_prefix: _INBOX.tenant_a}
    """

    model_config = ConfigDict(extra="forbid")

    keys: dict[str, _Key]


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a tenant (None: the gateway runs without keys) and its client."""

    tenant: str | None
    client: MeshClient


def load_keys(path: Path) -> KeyFile:
    try:
        raw = yaml.safe_load(path.read_text())
        return KeyFile.model_validate(raw)
    except OSError as exc:
        raise ValueError(f"{path}: {(exc.strerror or str(exc)).lower()}") from None
    except (yaml.YAMLError, ValidationError) as exc:
        raise ValueError(f"{path}: not a key file ({str(exc).splitlines()[0]})") from None


class Gateway:
    """One per gateway process. Clients are opened on first use, one per tenant, and kept."""

    def __init__(self, settings: Settings, keys: KeyFile | None = None) -> None:
        self.metrics = GatewayMetrics()
        self._settings = settings
        self._keys = keys
        self._clients: dict[str | None, asyncio.Task[MeshClient]] = {}
        self._admin: Connection | None = None
        self._registry: Registry | None = None
        self._specs: dict[str, tuple[float, ModelSpec | None]] = {}  # model → (read at, spec)

    async def start(self) -> None:
        """Connect the gateway's own connection (registry reads: metadata, readiness, statistics)."""
        self._admin = await Connection.open(self._settings, name="servemesh-gateway", wait_s=None)
        self._registry = await Registry.open(self._admin)
        if self._keys is None:
            await self._client_of(None)

    async def close(self) -> None:
        for task in self._clients.values():
            if task.done() and not task.cancelled() and task.exception() is None:
                await task.result().close()
            else:
                task.cancel()
        if self._admin is not None:
            await self._admin.close()

    @property
    def connected(self) -> bool:
        return self._admin is not None and self._admin.nc.is_connected

    # -- who is calling ------------------------------------------------------------------------

    async def caller(self, key: str | None) -> Caller:
        """The caller an API key (or bearer token) names; Unauthenticated without a known one."""
        if self._keys is None:
            return Caller(None, await self._client_of(None))
        if not key:
            raise Unauthenticated("an API key is needed: send `Authorization: Bearer <key>` or `X-API-Key: <key>`")
        for known, entry in self._keys.keys.items():
            if hmac.compare_digest(known.encode(), key.encode()):
                return Caller(entry.tenant, await self._client_of(known))
        raise Unauthenticated("unknown API key")

    async def _client_of(self, key: str | None) -> MeshClient:
        task = self._clients.get(key)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = self._clients[key] = asyncio.ensure_future(MeshClient.connect(settings=self._settings_of(key)))
        return await asyncio.shield(task)

    def _settings_of(self, key: str | None) -> Settings:
        if key is None or self._keys is None:
            return self._settings
        entry = self._keys.keys[key]
        own = {name: getattr(entry, name) for name in ("user", "password", "token", "creds_file", "nkey_seed")}
        own = {name: value for name, value in own.items() if value is not None}
        if entry.inbox_prefix:
            own["inbox_prefix"] = entry.inbox_prefix
        # Large payloads go through the tenant's own claims bucket (workers refuse any other for its models).
        own["claim_bucket"] = claims_bucket_of(entry.tenant)
        # Credentials are the tenant's alone: none of the gateway's own are carried over.
        base = self._settings.model_dump(exclude={"user", "password", "token", "creds_file", "nkey_seed"})
        return Settings.model_validate({**base, **own})

    # -- models ----------------------------------------------------------------------------------

    @property
    def registry(self) -> Registry:
        assert self._registry is not None, "start() first"
        return self._registry

    async def spec(self, caller: Caller, model: str, version: str | None = None) -> ModelSpec:
        """The model's spec, if the caller may see it: another tenant's model is a 403 that tells
        nothing of it but its name, which the caller gave."""
        spec = await self._spec_of(model) if _plausible(model) else None
        if spec is None:
            raise UnknownModel(f"no model {model!r}", model=model)
        if caller.tenant is not None and spec.tenant != caller.tenant:
            raise Forbidden(f"model {model!r} is not {caller.tenant}'s", model=model)
        if version is not None and version not in spec.versions:
            raise UnknownModel(f"model {model!r} has no version {version!r}", model=model, version=version)
        return spec

    async def _spec_of(self, model: str) -> ModelSpec | None:
        """The registry's spec, read at most once per ``_SPEC_TTL_S`` per model (a read per request
        would cost each a round trip to NATS); a registry change shows within that."""
        now = time.monotonic()
        cached = self._specs.get(model)
        if cached is not None and now - cached[0] < _SPEC_TTL_S:
            return cached[1]
        spec = await self.registry.get_spec(model)
        if len(self._specs) > 4096:
            self._specs.clear()
        self._specs[model] = (now, spec)
        return spec

    async def models(self, caller: Caller) -> list[ModelSpec]:
        specs = await self.registry.list_specs()
        return [s for s in specs if caller.tenant is None or s.tenant == caller.tenant]

    async def ready_versions(self, spec: ModelSpec) -> dict[str, int]:
        """Ready replicas per version, from fresh worker heartbeats."""
        counts = {version: 0 for version in spec.versions}
        now = time.time()
        for beat in (await self.registry.heartbeats()).values():
            if now - float(beat.get("time", 0)) > _FRESH_S:
                continue
            for unit in beat.get("models", {}).values():
                if unit.get("model") == spec.name and unit.get("version") in counts:
                    counts[unit["version"]] += 1
        return counts

    async def stats(self, spec: ModelSpec) -> dict[str, dict[str, Any]]:
        """Per version: the mesh's counters summed over the workers that serve it now."""
        totals: dict[str, dict[str, Any]] = {}
        for beat in (await self.registry.heartbeats()).values():
            for unit in beat.get("models", {}).values():
                if unit.get("model") != spec.name:
                    continue
                st = unit.get("stats", {})
                total = totals.setdefault(unit["version"], {"success": 0, "fail": 0, "batches": 0, "rows": 0,
                                                            "queued": 0, "queue_s": 0.0, "compute_s": 0.0})  # fmt: skip
                total["success"] += int(st.get("succeeded", 0))
                total["fail"] += sum(int(n) for n in st.get("errors", {}).values())
                total["batches"] += int(st.get("batches", 0))
                total["rows"] += int(st.get("rows", 0))
                total["compute_s"] += float(st.get("busy_s", 0.0))
                total["queued"] += int(st.get("queued", 0))
                total["queue_s"] += float(st.get("queue_total_s", 0.0))
        return totals

    async def statistics(self, caller: Caller, model: str | None, version: str | None) -> list[dict[str, Any]]:
        """Triton's statistics documents: one model's (``version``: only that one's) or every visible model's."""
        specs = [await self.spec(caller, model, version)] if model else await self.models(caller)
        out = []
        zero = {"success": 0, "fail": 0, "batches": 0, "rows": 0, "queued": 0, "queue_s": 0.0, "compute_s": 0.0}
        for spec in specs:
            counted = await self.stats(spec)
            for ver in sorted(spec.versions):  # every version, as Triton lists each loaded one (perf_analyzer needs it)
                if version not in (None, ver):
                    continue
                totals = counted.get(ver, zero)
                # Compute time is the batches' busy time shared out over their requests (Triton's
                # compute counts are per request, and perf_analyzer wants input, infer and output equal).
                answered = totals["success"] + totals["fail"]
                out.append({
                    "name": spec.name, "version": ver, "inference_count": totals["rows"],
                    "execution_count": totals["batches"],
                    "inference_stats": {
                        "success": {"count": totals["success"]}, "fail": {"count": totals["fail"]},
                        "queue": {"count": totals["queued"], "ns": int(totals["queue_s"] * 1e9)},
                        "compute_input": {"count": answered},
                        "compute_infer": {"count": answered, "ns": int(totals["compute_s"] * 1e9)},
                        "compute_output": {"count": answered},
                    },
                })  # fmt: skip
        return out

    async def index(self, caller: Caller, ready_only: bool = False) -> list[dict[str, str]]:
        """The repository extension's index: each version of each model the caller may see, READY or not."""
        out = []
        for spec in await self.models(caller):
            ready = await self.ready_versions(spec)
            for ver in sorted(spec.versions):
                state = "READY" if ready.get(ver) else "UNAVAILABLE"
                if state == "READY" or not ready_only:
                    out.append({"name": spec.name, "version": ver, "state": state})
        return out

    async def load(self, caller: Caller, model: str, timeout: float = 60.0) -> None:
        """The repository extension's load: at least one replica, and wait until one is ready."""
        spec = await self.spec(caller, model)
        if spec.min_replicas < 1:
            await self.registry.put_spec(spec.model_copy(update={"min_replicas": 1}))
            self._specs.pop(model, None)
        deadline = time.monotonic() + timeout
        while not any((await self.ready_versions(spec)).values()):
            if time.monotonic() > deadline:
                raise MeshError(f"model {model!r} did not become ready within {timeout:.0f}s", model=model)
            await asyncio.sleep(0.2)

    async def unload(self, caller: Caller, model: str) -> None:
        """The repository extension's unload: scale to zero (the router unloads its replicas)."""
        spec = await self.spec(caller, model)
        if caller.tenant is not None:
            raise Forbidden("a tenant may not unload models; the mesh's operator does", model=model)
        await self.registry.put_spec(spec.model_copy(update={"min_replicas": 0}))
        self._specs.pop(model, None)

    # -- inference -------------------------------------------------------------------------------

    async def infer(
        self, caller: Caller, spec: ModelSpec, version: str | None, inputs: Mapping[str, np.ndarray[Any, Any]],
        parameters: Mapping[str, Any],
    ) -> tuple[str, dict[str, np.ndarray[Any, Any]]]:  # fmt: skip
        """(version that answered, outputs). Without ``version`` the model's route decides (canary,
        shadow), as :meth:`MeshClient.infer` does. Cancelling this cancels the mesh request."""
        checked = {name: _fit(spec, name, array) for name, array in inputs.items()}
        reply = await caller.client.infer_reply(
            spec.name, checked, version=version, priority=priority_of(parameters), timeout=timeout_of(parameters)
        )
        return reply.timing.version or version or "", dict(reply.outputs)


def priority_of(parameters: Mapping[str, Any]) -> str:
    """``parameters.priority``: Triton's integers (1 = highest, 0 = the default) or servemesh's names."""
    value = parameters.get("priority", 0)
    if isinstance(value, str) and value in PRIORITIES:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if value == 0:
            return "normal"
        if value in _TRITON_PRIORITY:
            return _TRITON_PRIORITY[value]
        return "low" if value > 3 else "high"
    raise BadInput(f"parameters.priority: give 1 (highest) to 3, or one of {', '.join(PRIORITIES)}; not {value!r}")


def timeout_of(parameters: Mapping[str, Any]) -> float:
    """``parameters.timeout``: microseconds, as Triton's (0 or unset: the gateway's default)."""
    value = parameters.get("timeout", 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise BadInput(f"parameters.timeout: microseconds, a number ≥ 0; not {value!r}")
    return float(value) / 1e6 if value else _DEFAULT_TIMEOUT_S


def _fit(spec: ModelSpec, name: str, array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """BYTES arrive as bytes objects; a model that takes strings gets them decoded."""
    if array.dtype != object:
        return array
    wanted = next((t for t in spec.inputs if t.name == name), None)
    if wanted is not None and wanted.dtype == "str":
        try:
            return np.array([b.decode() for b in array.ravel()], dtype=str).reshape(array.shape)
        except (UnicodeDecodeError, AttributeError):
            raise BadInput(f"input {name!r}: the model takes UTF-8 strings") from None
    return array


def _plausible(model: str) -> bool:
    return 0 < len(model) <= 128 and all(c.isalnum() or c in "_-" for c in model)


def platform_of(spec: ModelSpec, wanted: str | None) -> str:
    """Triton's platform name for the format of a model's version (the default version's without one)."""
    fmt = spec.versions[wanted or spec.resolve_version(None)].format
    return _PLATFORMS.get(fmt, fmt)


def model_config(spec: ModelSpec) -> dict[str, Any]:
    """Triton's model configuration document (what perf_analyzer and tritonclient read), in its JSON form."""
    batched = spec.max_batch_size > 0

    def tensors(meta: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"name": t["name"], "data_type": "TYPE_STRING" if t["datatype"] == "BYTES" else f"TYPE_{t['datatype']}",
                 "dims": t["shape"][1:] if batched else t["shape"]} for t in meta]  # fmt: skip

    config: dict[str, Any] = {
        "name": spec.name, "platform": platform_of(spec, None), "backend": "servemesh",
        "max_batch_size": spec.max_batch_size,
        "input": tensors(tensor_metadata(spec.inputs, batched)),
        "output": tensors(tensor_metadata(spec.outputs, batched)),
        "instance_group": [{"count": spec.instances, "kind": "KIND_AUTO"}],
    }  # fmt: skip
    if batched:
        config["dynamic_batching"] = {"max_queue_delay_microseconds": int(spec.max_delay_ms * 1000)}
    return config


def tensor_metadata(tensors: list[TensorSpec], batched: bool) -> list[dict[str, Any]]:
    """Inputs or outputs as OIP metadata: datatype and shape, -1 for a variable dimension (the batch too)."""
    from servemesh.gateway.tensors import numpy_dtype, oip_datatype

    out = []
    for t in tensors:
        datatype = "BYTES" if t.dtype in ("bytes", "str") else oip_datatype(np.dtype(t.dtype))
        numpy_dtype(datatype)  # every datatype the mesh names is one OIP has
        out.append({"name": t.name, "datatype": datatype, "shape": ([-1] if batched else []) + list(t.shape)})
    return out
