"""The gateway as a process: REST and gRPC listeners over one Gateway until SIGTERM/SIGINT. With
``processes`` > 1 the listeners' ports are shared (SO_REUSEPORT) by that many processes."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import Callable

import grpc
from aiohttp import web

from broker.settings import Settings
from servemesh.gateway.core import Gateway, GatewaySettings, KeyFile, load_keys
from servemesh.gateway.grpc_server import add_services, set_serving
from servemesh.gateway.rest import rest_app
from telemetry import tracing
from telemetry.endpoint import HttpEndpoint

__all__ = ["Listening", "check_gateway_settings", "run_gateway"]

log = logging.getLogger(__name__)


class Listening:
    """Where a started gateway listens (ports 0 resolved), told to ``on_listening``."""

    def __init__(self, http: str | None, grpc_target: str | None) -> None:
        self.http, self.grpc = http, grpc_target


def check_gateway_settings(gw: GatewaySettings) -> KeyFile | None:
    """The key file read, and the TLS files checked, before anything starts (ValueError: one line)."""
    if (gw.tls_cert is None) != (gw.tls_key is None):
        raise ValueError("TLS needs a certificate and its key: --tls-cert and --tls-key (or SERVEMESH_GATEWAY_TLS_*)")
    for path in (gw.tls_cert, gw.tls_key):
        if path is not None and not path.is_file():
            raise ValueError(f"{path}: no such file")
    if gw.http_port < 0 and gw.grpc_port < 0:
        raise ValueError("both listeners are off: give an HTTP or a gRPC port")
    if gw.processes > 1 and 0 in (gw.http_port, gw.grpc_port):
        raise ValueError("--processes above 1 needs fixed ports (not 0): the processes share them")
    return load_keys(gw.keys_file) if gw.keys_file is not None else None


async def run_gateway(
    settings: Settings, gw: GatewaySettings, on_listening: Callable[[Listening], None] | None = None
) -> None:
    keys = check_gateway_settings(gw)
    tracing.configure_from_env("servemesh-gateway")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    helpers = _start_helpers(gw, settings)
    gateway = Gateway(settings, keys)
    await gateway.start()
    runner: web.AppRunner | None = None
    server: grpc.aio.Server | None = None
    endpoint = None
    if settings.http_port:
        ready = lambda: gateway.connected  # noqa: E731
        endpoint = await HttpEndpoint(settings.http_port, gateway.metrics.registry, ready, settings.http_host).start()
    try:
        http_url = grpc_target = None
        tls = None
        if gw.tls_cert is not None and gw.tls_key is not None:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(gw.tls_cert, gw.tls_key)
        if gw.http_port >= 0:
            # handler_cancellation: a client that disconnects cancels its handler, and so its request.
            runner = web.AppRunner(rest_app(gateway), access_log=None, handle_signals=False,
                                   handler_cancellation=True)  # fmt: skip
            await runner.setup()
            site = web.TCPSite(runner, gw.host, gw.http_port, ssl_context=tls, reuse_port=_shared(gw))
            await site.start()
            port = runner.addresses[0][1]
            http_url = f"{'https' if tls else 'http'}://{gw.host}:{port}"
        if gw.grpc_port >= 0:
            server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if _shared(gw) else 0),
                                              ("grpc.max_receive_message_length", 256 * 1024 * 1024),
                                              ("grpc.max_send_message_length", 256 * 1024 * 1024)])  # fmt: skip
            checks = add_services(server, gateway)
            address = f"{gw.host}:{gw.grpc_port}"
            if gw.tls_cert is not None and gw.tls_key is not None:
                credentials = grpc.ssl_server_credentials([(gw.tls_key.read_bytes(), gw.tls_cert.read_bytes())])
                port = server.add_secure_port(address, credentials)
            else:
                port = server.add_insecure_port(address)
            await server.start()
            await set_serving(checks, True)
            grpc_target = f"{gw.host}:{port}"
        log.info("gateway listening: REST %s, gRPC %s", http_url or "off", grpc_target or "off")
        if on_listening is not None:
            on_listening(Listening(http_url, grpc_target))
        await stop.wait()
        log.info("gateway stopping")
    finally:
        if server is not None:
            await server.stop(grace=5)
        if runner is not None:
            await runner.cleanup()
        if endpoint is not None:
            await endpoint.close()
        await gateway.close()
        for child in helpers:
            child.terminate()
        for child in helpers:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
        tracing.shutdown()


def _shared(gw: GatewaySettings) -> bool:
    return gw.processes > 1 or gw.share_ports


def _start_helpers(gw: GatewaySettings, settings: Settings) -> list[subprocess.Popen[bytes]]:
    """The other ``processes - 1`` gateway processes, on the same ports (this one's children)."""
    if gw.processes <= 1:
        return []
    own = gw.model_dump(exclude_none=True, exclude={"processes", "share_ports"})
    env = {**os.environ, **{f"SERVEMESH_GATEWAY_{k.upper()}": str(v) for k, v in own.items()},
           "SERVEMESH_GATEWAY_SHARE_PORTS": "1", "SERVEMESH_NATS_URL": settings.nats_url,
           "SERVEMESH_HTTP_HOST": settings.http_host}  # fmt: skip
    args = [sys.executable, "-m", "servemesh", "gateway", "--processes", "1"]
    # Each process its own metrics port (a shared one would answer a scrape from a process at random).
    ports = [settings.http_port + i if settings.http_port else 0 for i in range(1, gw.processes)]
    return [subprocess.Popen(args, env={**env, "SERVEMESH_HTTP_PORT": str(port)}) for port in ports]
