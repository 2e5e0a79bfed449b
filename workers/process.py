"""The worker as a process: connect, serve a repository, drain on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from broker.connection import Connection
from broker.settings import Settings
from workers.worker import Worker

__all__ = ["run_worker"]

log = logging.getLogger(__name__)


async def run_worker(settings: Settings, models: Path, worker_id: str | None = None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    conn = await Connection.open(settings, name=f"servemesh-worker-{worker_id or ''}")
    worker = Worker(conn, worker_id)
    try:
        await worker.start()
        await worker.serve_repository(models)
        log.info("worker %s ready: %s", worker.id, ", ".join(worker.servers) or "no models")
        await stop.wait()
        log.info("worker %s draining", worker.id)
        await worker.drain()
    finally:
        await conn.close()
