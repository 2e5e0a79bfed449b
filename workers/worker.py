"""The worker: loads model versions into ModelServers, heartbeats what it holds, and either
serves a fixed repository or follows the assignment the leader router writes for it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from broker.connection import Connection
from broker.provision import wait_provisioned
from broker.registry import Json, Registry
from broker.storage import StorageNews, StorageReport
from schemas.errors import MeshError
from schemas.spec import ModelSpec
from schemas.subjects import STREAM_INFER
from workers.cancels import Cancellations
from workers.device import CPU_DEVICE, Device
from workers.footprint import Measured, MemoryMeter, rss_bytes
from workers.jobs import JobBook
from workers.model_server import ModelServer
from workers.repository import read_repository
from workers.runtimes import load_runtime, runtime_threads
from workers.store import ArtifactStore
from workers.tenancy import Tenancy

__all__ = ["Worker", "default_worker_id"]

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 1.0
_RETRY_MIN_S, _RETRY_MAX_S = 1.0, 60.0

Key = tuple[str, str]  # (model, version)


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Worker:
    def __init__(
        self,
        conn: Connection,
        worker_id: str | None = None,
        memory_mb: int = 4096,
        labels: dict[str, str] | None = None,
        store: ArtifactStore | None = None,
        device: Device = CPU_DEVICE,
        gpu_memory_mb: int = 0,
    ) -> None:
        self.conn = conn
        self.store = store or ArtifactStore()
        self.id = worker_id or default_worker_id()
        self.memory_mb = memory_mb
        self.device = device
        self.gpu_memory_mb = gpu_memory_mb if device.kind != "cpu" else 0
        self.labels = {**device.labels, **(labels or {})}  # its own labels win over the device's
        self.meter = MemoryMeter(device)
        self.measured: dict[Key, Measured] = {}  # footprint of every version loaded here, as last measured
        self.servers: dict[Key, ModelServer] = {}
        self.failed: dict[str, str] = {}
        self.cached: set[Key] = set()  # versions loaded here before: their artifacts are on local disk
        self._loaded = False  # every model it should serve is loaded
        self.stalls: dict[str, str] = {}  # model:version → why it is not serving, as last checked
        self._storage = StorageNews(conn, self._on_storage)  # the routers' word on which streams store writes
        self._storage_told: set[str] = set()
        self._retry: dict[Key, tuple[float, float]] = {}  # key → (retry at, current backoff)
        self._registry: Registry | None = None
        self._job_book: JobBook | None = None
        self._tenancy = Tenancy(None)
        self.cancels = Cancellations()  # requests their callers gave up on
        self._tasks: list[asyncio.Task[None]] = []
        self._started = time.time()
        self._rates: dict[Key, tuple[float, int, float]] = {}
        self._desired: list[Json] = []
        self._changed = asyncio.Event()
        self.managed = False  # True once it follows the router's assignments

    @property
    def ready(self) -> bool:
        """Serving: every model it should serve loaded, none that stopped answering its queue, and the
        inference stream storing writes (as the routers last said)."""
        return self._loaded and not self.stalls and STREAM_INFER not in self.storage_problems()

    def storage_problems(self) -> dict[str, str]:
        """Streams that store no writes, by the routers' latest report (while it is fresh)."""
        return self._storage.problems()

    def _on_storage(self, report: StorageReport) -> None:
        for stream, why in report.unwritable.items():
            if stream not in self._storage_told:
                log.error("stream %s %s: not ready while it lasts", stream, why)
        self._storage_told = set(report.unwritable)

    def check_stalls(self) -> dict[str, str]:
        after = self.conn.settings.stall_after_s
        stalls = {server.key: why for server in self.servers.values() if (why := server.stalled(after))}
        for key in stalls.keys() - self.stalls.keys():
            log.error("%s is not serving: %s", key, stalls[key])
        for key in self.stalls.keys() - stalls.keys():
            log.info("%s is serving again", key)
        self.stalls = stalls
        return stalls

    @property
    def registry(self) -> Registry:
        assert self._registry is not None, "start() first"
        return self._registry

    async def start(self) -> None:
        await wait_provisioned(self.conn, f"worker {self.id}")
        await self._storage.start()
        self._registry = await Registry.open(self.conn)
        self._job_book = JobBook(self._registry)
        self._tenancy = Tenancy(self._registry)
        await self.cancels.start(self.conn)
        self._tasks.append(asyncio.create_task(self._beat(), name="heartbeat"))

    # -- serving a fixed repository ---------------------------------------------------------------

    async def serve_repository(self, repo: Path) -> None:
        """Register and serve every model in ``repo``; broken models are reported, not fatal."""
        specs, errors = await asyncio.get_running_loop().run_in_executor(None, read_repository, repo)
        for error in errors:
            self.failed[error.model] = error.reason
        for spec in specs:
            await self.serve(spec)
        self._loaded = True
        await self.beat_now()

    async def serve(self, spec: ModelSpec, register: bool = True) -> None:
        """Serve every version of ``spec`` (registering it first, so clients can resolve it). Versions
        others registered for the same model stay registered: a repository only adds its own."""
        if register:
            existing = await self.registry.get_spec(spec.name)
            registered = spec
            if existing is not None:
                registered = spec.model_copy(update={"versions": {**existing.versions, **spec.versions}})
            await self.registry.put_spec(registered)
        for version in spec.versions:
            await self.load(spec, version, spec.priorities)

    # -- loading and unloading one version ------------------------------------------------------

    async def load(self, spec: ModelSpec, version: str, priorities: Sequence[str]) -> bool:
        """Load, warm up, then start pulling; a failure is recorded and retried with backoff."""
        key, label = (spec.name, version), f"{spec.name}:{version}"
        spec = spec.on_device(self.device.kind)  # a GPU's batching, where the spec has one
        vspec = spec.versions[version]
        threads = runtime_threads(self.conn.settings.runtime_threads, spec.instances)
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            artifact = await self.store.fetch(vspec)
            before = await loop.run_in_executor(None, self.meter.sample)
            runtime = await loop.run_in_executor(None, load_runtime, vspec.format, artifact, spec, threads,
                                                 self.device.id)  # fmt: skip
            server = ModelServer(self.conn, spec, version, runtime, self.id, priorities, self._job_book, self._tenancy,
                                 cancels=self.cancels)  # fmt: skip
            await server.start()  # warms up: the runtime's arenas are as large as a batch makes them
            self.measured[key] = self.meter.measure(before, await loop.run_in_executor(None, self.meter.sample))
        except MeshError as err:
            wait = min(_RETRY_MAX_S, self._retry.get(key, (0.0, _RETRY_MIN_S / 2))[1] * 2)
            self._retry[key] = (time.monotonic() + wait, wait)
            self.failed[label] = err.message
            log.error("cannot serve %s (retry in %.0fs): %s", label, wait, err.message)
            return False
        server.load_ms = (time.monotonic() - started) * 1000
        m = self.measured[key]
        log.info("loaded %s on %s in %.0f ms: %d MiB host, %d MiB GPU", label, self.device.id, server.load_ms,
                 m.host_mb, m.gpu_mb)  # fmt: skip
        self.servers[key] = server
        self.cached.add(key)
        self.failed.pop(label, None)
        self._retry.pop(key, None)
        return True

    async def unload(self, key: Key) -> None:
        server = self.servers.pop(key)
        await server.drain()

    # -- following the router's assignment ------------------------------------------------------

    async def follow_assignments(self) -> None:
        """Serve what the leader router assigns this worker, from now until drain()."""
        self.managed = True
        self._tasks.append(asyncio.create_task(self._watch(), name="assignment-watch"))
        self._tasks.append(asyncio.create_task(self._reconcile_loop(), name="reconcile"))

    async def _watch(self) -> None:
        while True:
            try:
                async for units in self.registry.watch_assignment(self.id):
                    self._desired = units or []
                    self._changed.set()
            except Exception as exc:  # the watch dies with the connection; the loop restarts it
                log.info("assignment watch interrupted: %s", exc)
            await asyncio.sleep(1.0)

    async def _reconcile_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=_RETRY_MIN_S)
            self._changed.clear()
            try:
                await self.apply(self._desired)
            except Exception:
                log.exception("reconciling the assignment failed; trying again")

    async def apply(self, units: list[Json]) -> None:
        """Make the loaded set equal ``units``: drain and unload what went, load what came."""
        desired: dict[Key, list[str]] = {(u["model"], u["version"]): list(u["priorities"]) for u in units}
        for key in [k for k in self.servers if k not in desired]:
            log.info("unassigned %s:%s; draining", *key)
            await self.unload(key)
        for key, priorities in desired.items():
            server = self.servers.get(key)
            if server is not None:
                if set(server.priorities) != set(priorities):
                    await server.set_priorities(priorities)
                continue
            if self._retry.get(key, (0.0, 0.0))[0] > time.monotonic():
                continue
            spec = await self.registry.get_spec(key[0])
            if spec is None or key[1] not in spec.versions:
                self.failed[f"{key[0]}:{key[1]}"] = "not registered"
                continue
            await self.load(spec, key[1], priorities)
        was_loaded, self._loaded = self._loaded, all(key in self.servers for key in desired)
        if self._loaded != was_loaded or desired:
            await self.beat_now()

    # -- heartbeat and drain -------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        held = [self.measured[key] for key in self.servers if key in self.measured]
        stalls = self.check_stalls()
        return {
            "id": self.id, "pid": os.getpid(), "host": socket.gethostname(), "started": self._started,
            "time": time.time(),
            "ready": self.ready, "managed": self.managed, "labels": self.labels,
            "device": self.device.status(), "rss_mb": rss_bytes() // (1024 * 1024),
            "memory_mb": self.memory_mb, "memory_used_mb": sum(m.host_mb for m in held),
            "gpu_memory_mb": self.gpu_memory_mb, "gpu_memory_used_mb": sum(m.gpu_mb for m in held),
            "models": {server.key: {**server.status(), **self._rates_of(key, server), **self._memory_of(key)}
                       for key, server in self.servers.items()},
            "measured": {f"{m}:{v}": measured.as_json() for (m, v), measured in self.measured.items()},
            "cached": sorted(f"{m}:{v}" for m, v in self.cached), "stalled": stalls,
            "storage": self.storage_problems(), **self._failures(),
        }  # fmt: skip

    def _memory_of(self, key: Key) -> dict[str, Any]:
        measured = self.measured.get(key)
        return {"memory": {"host_mb": measured.host_mb, "gpu_mb": measured.gpu_mb}} if measured else {}

    def _failures(self) -> dict[str, dict[str, str]]:
        """Load failures: "failed" while backing off, then "retrying". The router places nothing
        where a load failed; once the backoff is over it may assign the version here again, which
        is how a load that failed (S3 down, say) is retried, with growing backoff."""
        now = time.monotonic()
        due = {f"{m}:{v}" for (m, v), (retry_at, _) in self._retry.items() if retry_at <= now}
        return {
            "failed": {label: why for label, why in self.failed.items() if label not in due},
            "retrying": {label: why for label, why in self.failed.items() if label in due},
        }

    def _rates_of(self, key: Key, server: ModelServer) -> dict[str, float]:
        """Requests completed per second and the busy fraction since the previous heartbeat."""
        now, done, busy = (
            time.monotonic(),
            server.stats.succeeded + sum(server.stats.errors.values()),
            server.stats.busy_s,
        )
        then, done_before, busy_before = self._rates.get(key, (now, done, busy))
        self._rates[key] = (now, done, busy)
        elapsed = now - then
        if elapsed <= 0:
            return {"rps": 0.0, "busy": 0.0}
        return {
            "rps": round((done - done_before) / elapsed, 2),
            "busy": round(min(1.0, (busy - busy_before) / elapsed), 3),
        }

    async def _beat(self) -> None:
        while True:
            try:
                await self.beat_now()
            except Exception as exc:  # NATS away: keep serving, beat again later
                log.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def beat_now(self) -> None:
        if self._registry is not None:
            await self._registry.put_heartbeat(self.id, self.status())

    async def drain(self) -> None:
        """Stop pulling everywhere, finish in-flight batches, ack, then leave the registry."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(server.drain() for server in self.servers.values()))
        self.servers.clear()
        await self.cancels.stop()
        if self._registry is not None and not self.conn.nc.is_closed:
            try:
                await self._registry.remove_worker(self.id)
            except Exception as exc:
                log.info("could not remove heartbeat: %s", exc)
