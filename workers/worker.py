"""The worker process: loads models, serves them through ModelServers, heartbeats, drains.

Until the router assigns models, a worker serves every model of the repository it is given
and registers their specs, so clients can resolve them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from broker.connection import Connection
from broker.provision import provision
from broker.registry import Registry
from schemas.errors import MeshError, ModelFailure
from schemas.spec import ModelSpec
from workers.model_server import ModelServer
from workers.repository import read_repository
from workers.runtimes import load_runtime

__all__ = ["Worker", "default_worker_id"]

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 2.0


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def artifact_path(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path))
    raise ModelFailure(f"artifact {uri}: scheme {parsed.scheme!r} is not supported yet", uri=uri)


class Worker:
    def __init__(self, conn: Connection, worker_id: str | None = None) -> None:
        self.conn = conn
        self.id = worker_id or default_worker_id()
        self.servers: dict[str, ModelServer] = {}
        self.failed: dict[str, str] = {}
        self._registry: Registry | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._started = time.time()
        self.ready = False

    async def start(self) -> None:
        await provision(self.conn)
        self._registry = await Registry.open(self.conn)
        self._heartbeat = asyncio.create_task(self._beat(), name="heartbeat")

    async def serve_repository(self, repo: Path) -> None:
        """Register and serve every model in ``repo``; broken models are reported, not fatal."""
        loop = asyncio.get_running_loop()
        specs, errors = await loop.run_in_executor(None, read_repository, repo)
        for error in errors:
            self.failed[error.model] = error.reason
        for spec in specs:
            await self.serve(spec)
        self.ready = True
        await self.beat_now()

    async def serve(self, spec: ModelSpec, register: bool = True) -> None:
        assert self._registry is not None, "start() first"
        if register:
            await self._registry.put_spec(spec)
        for version, vspec in spec.versions.items():
            key = f"{spec.name}:{version}"
            try:
                runtime = await asyncio.get_running_loop().run_in_executor(
                    None, load_runtime, vspec.format, artifact_path(vspec.uri), spec, self.conn.settings.runtime_threads
                )
                server = ModelServer(self.conn, spec, version, runtime, self.id)
                await server.start()
            except MeshError as err:
                log.error("cannot serve %s: %s", key, err.message)
                self.failed[key] = err.message
                continue
            self.servers[key] = server
            self.failed.pop(key, None)

    def status(self) -> dict[str, Any]:
        return {
            "id": self.id, "pid": os.getpid(), "host": socket.gethostname(),
            "started": self._started, "ready": self.ready,
            "models": {key: server.status() for key, server in self.servers.items()}, "failed": self.failed,
        }  # fmt: skip

    async def _beat(self) -> None:
        assert self._registry is not None
        while True:
            try:
                await self._registry.put_heartbeat(self.id, self.status())
            except Exception as exc:  # NATS away: keep serving, beat again later
                log.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def beat_now(self) -> None:
        if self._registry is not None:
            await self._registry.put_heartbeat(self.id, self.status())

    async def drain(self) -> None:
        """Stop pulling everywhere, finish in-flight batches, ack, then leave the registry."""
        await asyncio.gather(*(server.drain() for server in self.servers.values()))
        self.servers.clear()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self._registry is not None and not self.conn.nc.is_closed:
            try:
                await self._registry.remove_worker(self.id)
            except Exception as exc:
                log.info("could not remove heartbeat: %s", exc)
