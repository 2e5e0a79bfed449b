"""What the registry-facing subcommands (models, pipelines, jobs) share."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from broker.connection import Connection
from broker.provision import provision
from broker.registry import Registry
from broker.settings import Settings

__all__ = ["add_common_flags", "on_registry"]

T = TypeVar("T")


async def on_registry(nats_url: str | None, call: Callable[[Registry], Awaitable[T]]) -> T:
    """Connect, make sure the mesh is provisioned, run ``call`` on its registry, disconnect."""
    conn = await Connection.open(Settings.from_env(nats_url=nats_url), name="servemesh-cli")
    try:
        await provision(conn)
        return await call(await Registry.open(conn))
    finally:
        await conn.close()


def add_common_flags(parsers: Iterable[argparse.ArgumentParser]) -> None:
    for parser in parsers:
        parser.add_argument("--json", action="store_true", help="machine-readable output")
        parser.add_argument("--nats", help="NATS URL (default: $SERVEMESH_NATS_URL)")
