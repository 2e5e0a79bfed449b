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
from workers.device import CPU_DEVICE, Device
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
    device: Device = CPU_DEVICE,
    gpu_memory_mb: int = 0,
) -> None:
    """``models`` set: serve that repository as it is; unset: follow the router's assignments. ``device`` as
    resolved by :func:`workers.device.resolve_device`, ``gpu_memory_mb`` by :func:`workers.device.gpu_budget_mb`."""
    tracing.configure_from_env("servemesh-worker")
    if device.kind == "cuda":
        _open_context(device)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Until the server answers: a worker may well start before NATS does (a pod, a supervisor).
    conn = await Connection.open(settings, name=f"servemesh-worker-{worker_id or ''}", wait_s=None)
    worker = Worker(conn, worker_id, memory_mb=memory_mb, labels=labels, store=ArtifactStore(StoreSettings.from_env()),
                    device=device, gpu_memory_mb=gpu_memory_mb)  # fmt: skip
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
            log.info("worker %s following its assignment on %s (memory %d MiB, GPU memory %d MiB, labels %s)",
                     worker.id, device.id, memory_mb, worker.gpu_memory_mb, worker.labels)  # fmt: skip
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


def _open_context(device: Device) -> None:
    """The device's CUDA context before any model loads, so that its cost is not measured as the first model's."""
    from workers.cuda import CudaUnavailable, driver

    try:
        driver().primary_context(device.index)
    except CudaUnavailable as exc:
        log.warning("%s: could not open its CUDA context ahead of the first model: %s", device.id, exc)
