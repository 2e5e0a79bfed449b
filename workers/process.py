"""The worker as a process: connect, serve (a repository, or what the router assigns), drain on
SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from broker.connection import Connection
from broker.settings import Settings
from telemetry import tracing
from telemetry.endpoint import HttpEndpoint
from workers.metrics import worker_metrics
from workers.store import ArtifactStore, StoreSettings
from workers.worker import Worker

__all__ = ["run_worker"]

log = logging.getLogger(__name__)


async def run_worker(
    settings: Settings,
    models: Path | None = None,
    worker_id: str | None = None,
    memory_mb: int = 4096,
    labels: dict[str, str] | None = None,
) -> None:
    """``models`` set: serve that repository as it is; unset: follow the router's assignments."""
    tracing.configure_from_env("servemesh-worker")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Until the server answers: a worker may well start before NATS does (a pod, a supervisor).
    conn = await Connection.open(settings, name=f"servemesh-worker-{worker_id or ''}", wait_s=None)
    worker = Worker(conn, worker_id, memory_mb=memory_mb, labels=labels, store=ArtifactStore(StoreSettings.from_env()))
    endpoint = None
    if settings.http_port:
        endpoint = HttpEndpoint(
            settings.http_port, worker_metrics(worker), lambda: worker.ready, host=settings.http_host
        )
        await endpoint.start()
    try:
        await worker.start()
        if models is not None:
            await worker.serve_repository(models)
            log.info("worker %s ready: %s", worker.id, ", ".join(s.key for s in worker.servers.values()) or "none")
        else:
            await worker.follow_assignments()
            log.info("worker %s following its assignment (memory %d MiB, labels %s)", worker.id, memory_mb, labels)
        await stop.wait()
        log.info("worker %s draining", worker.id)
        try:
            await asyncio.wait_for(worker.drain(), settings.drain_timeout_s)
        except TimeoutError:
            log.error("worker %s did not finish draining in %.0fs; what it holds is redelivered elsewhere",
                      worker.id, settings.drain_timeout_s)  # fmt: skip
    finally:
        if endpoint is not None:
            await endpoint.close()
        await conn.close()
        tracing.shutdown()
