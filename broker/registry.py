"""The mesh's shared state in NATS KV: model specs, worker heartbeats, assignments, router status.

Values are JSON (specs: the ModelSpec wire form). Nothing here lives only in process memory.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from broker.connection import Connection
from schemas.spec import ModelSpec
from schemas.subjects import (
    BUCKET_ASSIGNMENTS,
    BUCKET_JOBS,
    BUCKET_MODELS,
    BUCKET_PIPELINES,
    BUCKET_ROUTES,
    BUCKET_STATUS,
    BUCKET_WORKERS,
)

__all__ = ["Registry"]

Json = dict[str, Any]


class _Bucket:
    def __init__(self, js: JetStreamContext, name: str, kv: KeyValue) -> None:
        self.js, self.name, self.kv = js, name, kv


class Registry:
    def __init__(
        self,
        models: _Bucket,
        workers: _Bucket,
        assignments: _Bucket,
        status: _Bucket,
        pipelines: _Bucket,
        jobs: _Bucket,
        routes: _Bucket,
    ) -> None:
        self._jobs = jobs
        self._routes = routes
        self._models = models
        self._workers = workers
        self._assignments = assignments
        self._status = status
        self._pipelines = pipelines
        self.conn: Connection | None = None  # the connection it was opened on

    @classmethod
    async def open(cls, conn: Connection) -> Registry:
        js = conn.js
        names = (
            BUCKET_MODELS, BUCKET_WORKERS, BUCKET_ASSIGNMENTS, BUCKET_STATUS, BUCKET_PIPELINES, BUCKET_JOBS,
            BUCKET_ROUTES,
        )  # fmt: skip
        registry = cls(*[_Bucket(js, name, await js.key_value(name)) for name in names])
        registry.conn = conn
        return registry

    # -- model specs ---------------------------------------------------------------------------

    async def put_spec(self, spec: ModelSpec) -> None:
        await self._models.kv.put(spec.name, spec.model_dump_json().encode())

    async def get_spec(self, name: str) -> ModelSpec | None:
        value = await _get(self._models, name)
        return None if value is None else ModelSpec.model_validate_json(value)

    async def delete_spec(self, name: str) -> None:
        await self._models.kv.delete(name)

    async def list_specs(self) -> list[ModelSpec]:
        return [ModelSpec.model_validate_json(v) for v in (await _all(self._models)).values()]

    # -- worker heartbeats (the bucket's TTL removes dead workers) --------------------------------

    async def put_heartbeat(self, worker_id: str, status: Json) -> None:
        await self._workers.kv.put(worker_id, json.dumps(status).encode())

    async def heartbeats(self) -> dict[str, Json]:
        return {k: json.loads(v) for k, v in (await _all(self._workers)).items()}

    async def remove_worker(self, worker_id: str) -> None:
        await self._workers.kv.delete(worker_id)

    # -- assignments (written by the leader router only) -----------------------------------------

    async def put_assignment(self, worker_id: str, units: list[Json]) -> None:
        await self._assignments.kv.put(worker_id, json.dumps({"units": units}).encode())

    async def get_assignment(self, worker_id: str) -> list[Json] | None:
        value = await _get(self._assignments, worker_id)
        return None if value is None else list(json.loads(value)["units"])

    async def assignments(self) -> dict[str, list[Json]]:
        return {k: list(json.loads(v)["units"]) for k, v in (await _all(self._assignments)).items()}

    async def delete_assignment(self, worker_id: str) -> None:
        await self._assignments.kv.delete(worker_id)

    async def watch_assignment(self, worker_id: str) -> AsyncIterator[list[Json] | None]:
        """Yields the worker's assignment now and on every change (None: no assignment)."""
        watcher = await self._assignments.kv.watch(worker_id)
        try:
            async for entry in watcher:
                if entry is None:
                    continue  # "caught up" marker
                if entry.operation is not None or not entry.value:
                    yield None
                else:
                    yield list(json.loads(entry.value)["units"])
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]

    # -- router status per model (replicas, lag, last decision) ------------------------------------

    async def put_status(self, model: str, status: Json) -> None:
        await self._status.kv.put(model, json.dumps(status).encode())

    async def get_status(self, model: str) -> Json | None:
        value = await _get(self._status, model)
        return None if value is None else dict(json.loads(value))

    async def delete_status(self, model: str) -> None:
        await self._status.kv.delete(model)

    # -- named pipelines ----------------------------------------------------------------------------

    async def put_pipeline(self, name: str, stages: list[str]) -> None:
        await self._pipelines.kv.put(name, json.dumps({"stages": stages}).encode())

    async def get_pipeline(self, name: str) -> list[str] | None:
        value = await _get(self._pipelines, name)
        return None if value is None else list(json.loads(value)["stages"])

    async def pipelines(self) -> dict[str, list[str]]:
        return {k: list(json.loads(v)["stages"]) for k, v in (await _all(self._pipelines)).items()}

    async def delete_pipeline(self, name: str) -> None:
        await self._pipelines.kv.delete(name)

    # -- weighted routes: which versions a request naming only the model goes to ------------------

    async def put_route(self, model: str, route: Json) -> None:
        await self._routes.kv.put(model, json.dumps(route).encode())

    async def get_route(self, model: str) -> Json | None:
        value = await _get(self._routes, model)
        return None if value is None else dict(json.loads(value))

    async def delete_route(self, model: str) -> None:
        await self._routes.kv.delete(model)

    # -- batch jobs --------------------------------------------------------------------------------

    async def put_job(self, job_id: str, record: Json) -> None:
        await self._jobs.kv.put(job_id, json.dumps(record).encode())

    async def get_job(self, job_id: str) -> Json | None:
        value = await _get(self._jobs, job_id)
        return None if value is None else dict(json.loads(value))

    async def jobs(self) -> dict[str, Json]:
        return {k: dict(json.loads(v)) for k, v in (await _all(self._jobs)).items()}


async def _get(bucket: _Bucket, key: str) -> bytes | None:
    try:
        entry = await bucket.kv.get(key)
    except KeyNotFoundError:
        return None
    if entry.value is None or entry.operation is not None:
        return None  # deleted or purged
    return entry.value


async def _all(bucket: _Bucket) -> dict[str, bytes]:
    """Every live key's value. Keys come from one stream-info call rather than ``kv.keys()``,
    which builds a consumer per call and can come back empty under load — and an empty registry
    read as "every model was deleted" would unload the mesh."""
    info = await bucket.js.stream_info(f"KV_{bucket.name}", subjects_filter=f"$KV.{bucket.name}.>")
    prefix = len(f"$KV.{bucket.name}.")
    values = {}
    for subject in info.state.subjects or {}:
        value = await _get(bucket, subject[prefix:])
        if value:
            values[subject[prefix:]] = value
    return values
