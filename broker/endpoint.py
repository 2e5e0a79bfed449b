"""The HTTP endpoint of a worker or router: ``/metrics`` (Prometheus text), ``/health/live`` and
``/health/ready`` for Kubernetes probes. A few lines of asyncio; scrapes never touch the hot path."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

__all__ = ["HttpEndpoint", "check_ready"]

log = logging.getLogger(__name__)

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class HttpEndpoint:
    def __init__(
        self, port: int, metrics: Callable[[], bytes], ready: Callable[[], bool], host: str = "127.0.0.1"
    ) -> None:
        self.port = port
        self.host = host
        self._metrics = metrics
        self._ready = ready
        self._server: asyncio.Server | None = None

    async def start(self) -> HttpEndpoint:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]  # port 0 asks for any free one
        log.info("HTTP endpoint on %s:%d (/metrics, /health/live, /health/ready)", self.host, self.port)
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            method, path, *_ = request.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            status, body, kind = self._route(method, path.split("?", 1)[0])
            head = f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
            writer.write(head.encode() + b"Connection: close\r\n\r\n" + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ValueError, ConnectionError):
            pass  # a half-open or garbled probe: nothing to answer
        finally:
            writer.close()

    def _route(self, method: str, path: str) -> tuple[int, bytes, str]:
        if method != "GET":
            return 405, b"GET only\n", "text/plain"
        if path == "/metrics":
            return 200, self._metrics(), "text/plain; version=0.0.4; charset=utf-8"
        if path == "/health/live":
            return 200, b"live\n", "text/plain"
        if path == "/health/ready":
            return (200, b"ready\n", "text/plain") if self._ready() else (503, b"not ready\n", "text/plain")
        return 404, b"no such path\n", "text/plain"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def check_ready(port: int, host: str = "127.0.0.1", timeout: float = 3.0) -> bool:
    """For ``--check``: is the process on ``port`` ready? (False when it does not answer.)"""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{host}:{port}/health/ready", timeout=timeout) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False
