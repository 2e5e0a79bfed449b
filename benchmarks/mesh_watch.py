"""A running mesh as a benchmark sees it through the registry: registrations, heartbeats, waits on conditions."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml

from broker import Registry
from router.observe import STALE_AFTER_S
from servemesh.local import wait_workers_ready
from workers.repository import read_model

__all__ = ["POLL_S", "Failed", "Json", "Mesh", "until", "wait_serving"]

Json = dict[str, Any]
POLL_S = 0.05


async def wait_serving(
    registry: Registry, proc: subprocess.Popen[bytes], worker_id: str, models: set[str], timeout: float = 120.0
) -> Json:
    """Until the worker process heartbeats ready serving ``models`` ("name:version"); returns its heartbeat."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with code {proc.returncode} before it was ready")
        try:
            await wait_workers_ready(registry, [worker_id], 1.0)
            break
        except TimeoutError:
            if time.monotonic() > deadline:
                raise
    beat: Json = (await registry.heartbeats())[worker_id]
    missing = models - set(beat.get("models", {}))
    if missing or beat.get("failed") or beat["pid"] != proc.pid:
        raise RuntimeError(f"worker pid {beat['pid']} not serving {sorted(missing)}; failed: {beat.get('failed')}")
    return beat


class Failed(Exception):
    """A request failed or the mesh never reached a state it should: the benchmark exits non-zero."""


class Mesh:
    """Registers models and reads heartbeats and router status through the registry."""

    def __init__(self, registry: Registry, repo: Path, workers: tuple[str, ...], version: str = "1") -> None:
        self.registry = registry
        self.workers = workers
        self.version = version
        self.repo = repo
        self.registered: set[str] = set()

    async def register(self, model_dir: Path, **config: Any) -> str:
        """Override keys of the model's servemesh.yaml, then register it (as ``servemesh models add`` would)."""
        path = model_dir / "servemesh.yaml"
        path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **config}))
        await self.registry.put_spec(await asyncio.to_thread(read_model, model_dir))
        self.registered.add(model_dir.name)
        return model_dir.name

    async def unregister(self, name: str) -> None:
        # Each run starts from a mesh holding nothing of earlier runs, so runs do not share CPU or memory.
        await self.registry.delete_spec(name)
        self.registered.discard(name)

    async def live_beats(self) -> dict[str, Json]:
        # Heartbeat times are wall-clock stamps written by other processes, hence time.time() here.
        now = time.time()
        return {w: b for w, b in (await self.registry.heartbeats()).items() if now - b.get("time", 0) < STALE_AFTER_S}

    async def holders(self, name: str) -> dict[str, Json]:
        """Live workers serving ``name``, with the model's heartbeat entry (load_ms, stats, in_flight…)."""
        key = f"{name}:{self.version}"
        return {w: b["models"][key] for w, b in (await self.live_beats()).items() if key in b.get("models", {})}

    async def idle(self, name: str, replicas: int) -> bool:
        """Both workers ready and idle, nothing of earlier runs loaded, and the router placed ``name`` as asked."""
        beats = await self.live_beats()
        if set(beats) != set(self.workers) or not all(b.get("ready") for b in beats.values()):
            return False
        loaded = [m for b in beats.values() for m in b.get("models", {}).values()]
        if any(m["in_flight"] or m["model"] not in self.registered for m in loaded):
            return False
        status = (await self.registry.get_status(name)) or {}
        version = status.get("versions", {}).get(self.version)
        return version is not None and len(version["ready"]) == replicas and version["desired"] == version["ready"]


async def until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    """Wait until ``check`` holds; the seconds it took, or Failed naming ``what``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if await check():
            return time.monotonic() - start
        await asyncio.sleep(POLL_S)
    raise Failed(f"not within {timeout:g} s: {what}")
