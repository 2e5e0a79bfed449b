"""The model registry and worker heartbeats, kept in NATS KV (never in process memory alone)."""

from __future__ import annotations

import json
from typing import Any

from nats.js.errors import KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue

from broker.connection import Connection
from schemas.spec import ModelSpec
from schemas.subjects import BUCKET_MODELS, BUCKET_WORKERS

__all__ = ["Registry"]


class Registry:
    def __init__(self, models: KeyValue, workers: KeyValue) -> None:
        self._models = models
        self._workers = workers

    @classmethod
    async def open(cls, conn: Connection) -> Registry:
        return cls(await conn.js.key_value(BUCKET_MODELS), await conn.js.key_value(BUCKET_WORKERS))

    async def put_spec(self, spec: ModelSpec) -> None:
        await self._models.put(spec.name, spec.model_dump_json().encode())

    async def get_spec(self, name: str) -> ModelSpec | None:
        try:
            entry = await self._models.get(name)
        except KeyNotFoundError:
            return None
        if entry.value is None or entry.operation is not None:
            return None  # deleted or purged
        return ModelSpec.model_validate_json(entry.value)

    async def delete_spec(self, name: str) -> None:
        await self._models.delete(name)

    async def list_specs(self) -> list[ModelSpec]:
        specs = []
        for name in await _keys(self._models):
            spec = await self.get_spec(name)
            if spec is not None:
                specs.append(spec)
        return specs

    async def put_heartbeat(self, worker_id: str, status: dict[str, Any]) -> None:
        await self._workers.put(worker_id, json.dumps(status).encode())

    async def heartbeats(self) -> dict[str, dict[str, Any]]:
        """The live workers (their heartbeats expire with the bucket's TTL)."""
        beats: dict[str, dict[str, Any]] = {}
        for key in await _keys(self._workers):
            try:
                entry = await self._workers.get(key)
            except KeyNotFoundError:
                continue
            if entry.value:
                beats[key] = json.loads(entry.value)
        return beats

    async def remove_worker(self, worker_id: str) -> None:
        await self._workers.delete(worker_id)


async def _keys(kv: KeyValue) -> list[str]:
    try:
        return list(await kv.keys())
    except NoKeysError:
        return []
