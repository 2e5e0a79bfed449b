"""A mesh of separate processes for router tests: routers and workers spawned and stopped by PID."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from broker import Connection, NatsServer, Registry, Settings, provision
from router.observe import STALE_AFTER_S
from servemesh.local import spawn_router, spawn_worker

# Fast control loops so that tests see scaling within seconds.
ROUTER_ENV = {
    "SERVEMESH_ROUTER_UPSCALE_DELAY_S": "0.5",
    "SERVEMESH_ROUTER_DOWNSCALE_DELAY_S": "3",
    "SERVEMESH_ROUTER_IDLE_EVICT_AFTER_S": "1",
}


class Cluster:
    def __init__(self, server: NatsServer, logs: Path) -> None:
        self.server = server
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.conn: Connection | None = None
        self.registry: Registry | None = None

    async def open(self) -> Cluster:
        self.conn = await Connection.open(Settings.from_url(self.server.url))
        await provision(self.conn)
        self.registry = await Registry.open(self.conn)
        return self

    def router(self, name: str, env: dict[str, str] | None = None) -> None:
        log = self.logs / f"{name}.log"
        self.procs[name] = spawn_router(self.server.url, name, log, {**ROUTER_ENV, **(env or {})}, tick_s=0.25)

    def worker(self, name: str, memory_mb: int = 4096, labels: str = "", env: dict[str, str] | None = None) -> None:
        log = self.logs / f"{name}.log"
        self.procs[name] = spawn_worker(self.server.url, None, name, log, env, memory_mb=memory_mb, labels=labels)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(sig)
        proc.wait(30)

    async def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.conn is not None:
            await self.conn.close()

    async def beats(self) -> dict[str, Any]:
        assert self.registry is not None
        return await self.registry.heartbeats()

    async def holders(self, model: str, version: str = "1") -> set[str]:
        """Live workers (fresh heartbeat) that have the version loaded and serving."""
        now = time.time()
        return {
            w
            for w, b in (await self.beats()).items()
            if f"{model}:{version}" in b.get("models", {}) and now - b.get("time", 0) < STALE_AFTER_S
        }

    async def leader(self) -> str | None:
        assert self.conn is not None
        kv = await self.conn.js.key_value("mesh-leader")
        try:
            entry = await kv.get("router")
        except Exception:
            return None
        return entry.value.decode() if entry.value else None


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str, poll: float = 0.1) -> float:
    """Wait until ``check`` holds; returns the seconds it took, or fails the test with ``what``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if await check():
            return time.monotonic() - start
        await asyncio.sleep(poll)
    raise AssertionError(f"not within {timeout}s: {what}")
