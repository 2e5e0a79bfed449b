"""LocalMesh: a whole mesh on one machine — embedded nats-server plus worker processes.

``servemesh up`` and the demo use it. Every child is started and stopped by its PID.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from broker.connection import Connection
from broker.provision import provision
from broker.registry import Registry
from broker.server import NatsServer
from broker.settings import Settings

__all__ = ["LocalMesh", "spawn_worker"]

log = logging.getLogger(__name__)


def spawn_worker(
    url: str, models: Path, worker_id: str, log_path: Path | None = None, extra_env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``servemesh worker`` as a child process (its own process group, so signals stay ours)."""
    cmd = [sys.executable, "-m", "router", "worker", "--models", str(models), "--id", worker_id, "--nats", url]
    env = {**os.environ, **(extra_env or {})}
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - the child owns it
    try:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    finally:
        if log_path:
            out.close()  # type: ignore[union-attr]


async def wait_workers_ready(registry: Registry, worker_ids: list[str], timeout: float) -> None:
    """Until every worker has heartbeated ``ready`` (all its models loaded), or TimeoutError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        beats = await registry.heartbeats()
        if all(beats.get(w, {}).get("ready") for w in worker_ids):
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"workers {worker_ids} not ready after {timeout}s")


class LocalMesh:
    def __init__(
        self, models: Path, workers: int = 1, port: int = -1, state_dir: Path | None = None, storage: str = "file"
    ) -> None:
        self.models = models
        self.n_workers = workers
        self.state_dir = state_dir
        self.settings_storage = storage
        self.server = NatsServer(port=port, store_dir=state_dir / "nats" if state_dir else None)
        self.workers: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def log_dir(self) -> Path:
        return self.server.store_dir

    async def start(self, timeout: float = 120.0) -> LocalMesh:
        self.server.start()
        settings = Settings.from_url(self.url, storage=self.settings_storage)
        conn = await Connection.open(settings)
        try:
            await provision(conn)
            for i in range(self.n_workers):
                worker_id = f"local-{i + 1}"
                self.workers[worker_id] = spawn_worker(
                    self.url, self.models, worker_id, self.log_dir / f"{worker_id}.log",
                    {"SERVEMESH_STORAGE": self.settings_storage},
                )  # fmt: skip
            await wait_workers_ready(await Registry.open(conn), list(self.workers), timeout)
        except BaseException:
            await conn.close()
            self.stop()
            raise
        await conn.close()
        return self

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every worker (they drain), SIGKILL stragglers, then stop nats-server."""
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for worker_id, proc in self.workers.items():
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("worker %s did not drain in %ss; killing it", worker_id, timeout)
                proc.kill()
                proc.wait()
        self.workers.clear()
        self.server.close()

    async def __aenter__(self) -> LocalMesh:
        return await self.start()

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
