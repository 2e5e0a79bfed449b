"""The HTTP endpoint of a worker or router: ``/metrics`` (prometheus_client's exposition of the
process's registry, text or OpenMetrics as the scraper asks), ``/health/live`` and ``/health/ready``
for Kubernetes probes. aiohttp serves it on the process's event loop, so a scrape reads the
process's state between two of its steps, never beside them."""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

__all__ = ["HttpEndpoint", "check_ready"]

log = logging.getLogger(__name__)


class HttpEndpoint:
    def __init__(
        self, port: int, registry: CollectorRegistry, ready: Callable[[], bool], host: str = "127.0.0.1"
    ) -> None:
        self.port = port
        self.host = host
        self._registry = registry
        self._ready = ready
        self._runner: web.AppRunner | None = None

    async def start(self) -> HttpEndpoint:
        app = web.Application()
        app.add_routes([web.get("/metrics", self._metrics), web.get("/health/live", _live),
                        web.get("/health/ready", self._readiness)])  # fmt: skip
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self.port = self._runner.addresses[0][1]  # port 0 asks for any free one
        log.info("HTTP endpoint on %s:%d (/metrics, /health/live, /health/ready)", self.host, self.port)
        return self

    async def _metrics(self, request: web.Request) -> web.Response:
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encode(self._registry), headers={"Content-Type": content_type})

    async def _readiness(self, request: web.Request) -> web.Response:
        return web.Response(text="ready\n") if self._ready() else web.Response(status=503, text="not ready\n")

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def _live(request: web.Request) -> web.Response:
    return web.Response(text="live\n")


def check_ready(port: int, host: str = "127.0.0.1", timeout: float = 3.0) -> bool:
    """For ``--check``: is the process on ``port`` ready? (False when it does not answer.)"""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{host}:{port}/health/ready", timeout=timeout) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False
