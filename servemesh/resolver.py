"""Where a request goes: a model, a registered pipeline or listed stages, each stage's version
drawn from its weighted route; registry reads are cached briefly and outlive a registry that
stops answering."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from nats.js.errors import BucketNotFoundError

from broker.connection import Connection, translate_error
from broker.registry import Registry
from schemas.errors import BadInput, MeshError, MeshUnavailable, NoCapacity, UnknownModel
from schemas.shadow import ShadowConfig
from schemas.spec import ModelSpec
from schemas.subjects import check_name, infer_subject
from servemesh.routes import choose, default_weights, effective_weights, ready_counts
from servemesh.shadowing import shadow_config

__all__ = ["Plan", "Resolver"]

_SPEC_TTL_S = 2.0
# With a cached plan to fall back on, a registry read may take this long before the cache is used.
_STALE_AFTER_S = 1.0

Plan = tuple[tuple[str, dict[str, float]], ...]  # per stage: model, weight of each version
_PlanKey = tuple[tuple[str, ...], str | None]  # stages as named, version asked for


def _subjects(plan: Plan, priority: str) -> tuple[str, ...]:
    """The subject of each stage; a stage with several versions draws one by weight."""
    return tuple(
        infer_subject(name, next(iter(weights)) if len(weights) == 1 else choose(weights), priority)
        for name, weights in plan
    )


class Resolver:
    """Resolves names against the registry. ``shadows`` gets each model's shadow settings as its
    route is read (the client mirrors by them)."""

    def __init__(self, conn: Connection, shadows: dict[str, ShadowConfig | None]) -> None:
        self._conn = conn
        self._shadows = shadows
        self._registry: Registry | None = None
        self._specs: dict[str, tuple[float, ModelSpec]] = {}
        self._plans: dict[_PlanKey, tuple[float, Plan]] = {}
        self._reading: dict[_PlanKey, asyncio.Future[Plan]] = {}  # plans being read, one read per plan
        # Routes of plans without a weighted choice, per priority, with the time of the plan they come from.
        self._fixed_routes: dict[tuple[_PlanKey, str], tuple[float, tuple[str, ...]]] = {}

    async def route(self, model: str | Sequence[str], version: str | None, priority: str) -> tuple[str, ...]:
        """The subjects a request passes through: one model, a named pipeline, or listed stages.
        A stage named without a version follows its weighted route, drawn per request."""
        return _subjects(await self.plan(model, version), priority)

    def cached_route(self, model: str | Sequence[str], version: str | None, priority: str) -> tuple[str, ...] | None:
        """What :meth:`route` returns, without waiting, when the plan is cached and fresh; else None."""
        key = ((model,) if isinstance(model, str) else tuple(model), version)
        cached = self._plans.get(key)
        if cached is None or time.monotonic() - cached[0] >= _SPEC_TTL_S:
            return None
        fixed = self._fixed_routes.get((key, priority))
        if fixed is not None and fixed[0] == cached[0]:  # made from this very plan
            return fixed[1]
        route = _subjects(cached[1], priority)
        if all(len(weights) == 1 for _, weights in cached[1]):  # no draw: the same route every time
            self._fixed_routes[(key, priority)] = (cached[0], route)
        return route

    async def plan(self, model: str | Sequence[str], version: str | None) -> Plan:
        """Per stage: the model and the weights of its versions (registry and routes read, cached briefly)."""
        names = (model,) if isinstance(model, str) else tuple(model)
        key = (names, version)
        cached = self._plans.get(key)
        now = time.monotonic()
        if cached is not None and now - cached[0] < _SPEC_TTL_S:
            return cached[1]
        if not names:
            raise BadInput("a pipeline needs at least one stage")
        for stage in names:  # each becomes a subject token: refused here, never sent
            name, _, pinned = stage.partition(":")
            try:
                check_name(name, pinned or version)
            except ValueError as exc:
                raise BadInput(str(exc), model=name) from None
        # One read per plan, whoever asks meanwhile waits on it: under load, thousands of requests would
        # otherwise each read the registry at the moment the cached plan ages out.
        return await asyncio.shield(self._refresh(key, names, version))

    def _refresh(self, key: _PlanKey, names: tuple[str, ...], version: str | None) -> asyncio.Future[Plan]:
        """The read of ``key``'s plan in flight, started if there is none."""
        reading = self._reading.get(key)
        if reading is None:
            reading = self._reading[key] = asyncio.ensure_future(self._reread(key, names, version))
            reading.add_done_callback(lambda done: self._read_done(key, done))
        return reading

    def _read_done(self, key: _PlanKey, done: asyncio.Future[Plan]) -> None:
        self._reading.pop(key, None)
        if not done.cancelled():
            done.exception()  # retrieved: a refresh nobody awaits must not log "never retrieved"

    async def _reread(self, key: _PlanKey, names: tuple[str, ...], version: str | None) -> Plan:
        cached = self._plans.get(key)
        started = time.monotonic()
        try:
            plan = await asyncio.wait_for(self._read_plan(names, version), _STALE_AFTER_S if cached else None)
        except MeshError as exc:
            if cached is None or not isinstance(exc, MeshUnavailable):
                self._plans.pop(key, None)  # gone or refused now: the next request learns it
                raise
            plan = cached[1]  # the registry is unreachable for now: the last plan still routes
        except Exception as exc:
            if cached is None:
                raise translate_error(exc, f"look up {', '.join(names)}") from exc
            plan = cached[1]
        self._plans[key] = (started, plan)
        return plan

    async def _read_plan(self, names: tuple[str, ...], version: str | None) -> Plan:
        if len(names) == 1 and ":" not in names[0]:
            stages = await self._pipeline(names[0])
            if stages is not None:
                names, version = tuple(stages), None
        plan = []
        for stage in names:
            name, _, pinned = stage.partition(":")
            plan.append((name, await self._weights(name, pinned or version)))
        return tuple(plan)

    async def _weights(self, model: str, version: str | None) -> dict[str, float]:
        spec = await self.spec(model)
        if version is not None:
            if version not in spec.versions:
                raise UnknownModel(f"model {model!r} has no version {version!r}", model=model, version=version)
            await self._check_loadable(model, version)
            return {version: 1.0}
        registry = await self.registry()
        route = await registry.get_route(model)
        self._shadows[model] = shadow_config(route)
        ready = ready_counts(await registry.get_status(model))
        if route is None or not route.get("weights"):  # no route, or one that only shadows
            target = spec.resolve_version(None)
            weights = default_weights(target, spec.versions, ready)
            if weights == {target: 1.0}:
                await self._check_loadable(model, target)
            return weights
        weights = effective_weights(route.get("weights", {}), route.get("previous") or {}, ready)
        weights = {v: w for v, w in weights.items() if v in spec.versions}
        if not weights:
            raise UnknownModel(f"model {model!r}: its route names no registered version", model=model)
        return weights

    async def _check_loadable(self, model: str, version: str) -> None:
        """Fail fast, rather than wait out the timeout, for a version that failed to load everywhere it went."""
        status = await (await self.registry()).get_status(model)
        version_status = (status or {}).get("versions", {}).get(version, {})
        failed = version_status.get("failed") or {}
        if failed and not version_status.get("ready"):
            worker, reason = next(iter(failed.items()))
            raise NoCapacity(
                f"{model}:{version} is not loaded anywhere: it failed to load ({reason} on {worker})",
                model=model, version=version, failures=failed,
            )  # fmt: skip

    async def _pipeline(self, name: str) -> list[str] | None:
        """The stages of a registered pipeline ``name``, unless a model of that name exists."""
        registry = await self.registry()
        if await registry.get_spec(name) is not None:
            return None
        return await registry.get_pipeline(name)

    async def registry(self) -> Registry:
        try:
            if self._registry is None:
                self._registry = await Registry.open(self._conn)
        except BucketNotFoundError:
            raise UnknownModel("no model registry on this NATS yet (is a worker running?)") from None
        return self._registry

    def max_queue(self, model: str) -> int | None:
        """The model's max_queue as last read (no lookup), or None."""
        cached = self._specs.get(model)
        return cached[1].max_queue if cached is not None else None

    def max_batch(self, model: str) -> int | None:
        """The model's max_batch_size as last read (no lookup), or None if never read."""
        cached = self._specs.get(model)
        return cached[1].max_batch_size if cached is not None else None

    async def spec(self, model: str) -> ModelSpec:
        cached = self._specs.get(model)
        now = time.monotonic()
        if cached is not None and now - cached[0] < _SPEC_TTL_S:
            return cached[1]
        registry = await self.registry()
        try:
            spec = await registry.get_spec(model)
        except Exception as exc:
            raise translate_error(exc, f"look up model {model!r}") from exc
        if spec is None:
            raise UnknownModel(f"model {model!r} is not registered", model=model)
        self._specs[model] = (now, spec)
        return spec
