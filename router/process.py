"""The router as a process: lead or stand by until SIGTERM/SIGINT, then release the lease.

Policy knobs come from ``SERVEMESH_ROUTER_*`` (e.g. ``SERVEMESH_ROUTER_DOWNSCALE_DELAY_S=60``).
"""

from __future__ import annotations

import asyncio
import signal

from pydantic_settings import BaseSettings, SettingsConfigDict

from broker.connection import Connection
from broker.settings import Settings
from router.metrics import router_metrics
from router.policy import PolicyConfig
from router.service import Router
from telemetry import tracing
from telemetry.endpoint import HttpEndpoint

__all__ = ["RouterSettings", "run_router"]


class RouterSettings(BaseSettings):
    """Overrides of PolicyConfig's timing knobs; unset ones keep the policy's defaults."""

    model_config = SettingsConfigDict(env_prefix="SERVEMESH_ROUTER_", extra="ignore")

    target_lag_age_s: float | None = None
    upscale_delay_s: float | None = None
    downscale_delay_s: float | None = None
    idle_evict_after_s: float | None = None
    load_grace_s: float | None = None

    def policy(self) -> PolicyConfig:
        return PolicyConfig(**{k: v for k, v in self.model_dump().items() if v is not None})


async def run_router(
    settings: Settings, router_id: str | None = None, tick_s: float = 0.5, config: PolicyConfig | None = None
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tracing.configure_from_env("servemesh-router")
    conn = await Connection.open(settings, name=f"servemesh-router-{router_id or ''}", wait_s=None)
    router = Router(conn, router_id, config=config or RouterSettings().policy(), tick_s=tick_s)
    endpoint = None
    if settings.http_port:
        # Ready = connected: a standby is as ready as the leader, it waits for the lease.
        endpoint = HttpEndpoint(
            settings.http_port, router_metrics(router), lambda: conn.nc.is_connected, host=settings.http_host
        )
        await endpoint.start()
    try:
        await router.run(stop)
    finally:
        if endpoint is not None:
            await endpoint.close()
        await conn.close()
        tracing.shutdown()
