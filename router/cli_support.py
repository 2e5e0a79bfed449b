"""What the registry-facing subcommands (models, pipelines, jobs) share."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from broker.connection import Connection
from broker.provision import check_provisioned
from broker.registry import Registry
from broker.settings import Settings

__all__ = ["add_common_flags", "on_registry", "require_provisioned"]

T = TypeVar("T")


async def on_registry(nats_url: str | None, call: Callable[[Registry], Awaitable[T]]) -> T:
    """Connect, check that the mesh is provisioned, run ``call`` on its registry, disconnect."""
    conn = await Connection.open(Settings.from_env(nats_url=nats_url), name="servemesh-cli")
    try:
        await require_provisioned(conn)
        return await call(await Registry.open(conn))
    finally:
        await conn.close()


async def require_provisioned(conn: Connection) -> None:
    """A command-line tool changes no stream or bucket: on a mesh not provisioned yet it says how to
    provision it and exits (``servemesh provision`` is the admin step)."""
    missing, _ = await check_provisioned(conn)
    if missing:
        url = conn.settings.nats_url
        raise SystemExit(f"the mesh at {url} is not provisioned (missing {', '.join(missing)}): "
                         f"run `servemesh provision --nats {url}` as the admin")  # fmt: skip


def add_common_flags(parsers: Iterable[argparse.ArgumentParser]) -> None:
    for parser in parsers:
        parser.add_argument("--json", action="store_true", help="machine-readable output")
        parser.add_argument("--nats", help="NATS URL (default: $SERVEMESH_NATS_URL)")
