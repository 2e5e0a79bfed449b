"""Replies read from a subject of one's choosing: the other half of fire-and-forget requests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from broker.claims import Claims
from broker.connection import Connection
from schemas.envelope import Reply, claim_of, decode_reply
from schemas.errors import MeshError
from schemas.subjects import HDR_REQUEST_ID

__all__ = ["Result", "results_on"]


@dataclass(frozen=True, slots=True)
class Result:
    request_id: str | None
    reply: Reply | None = None
    error: MeshError | None = None


async def results_on(conn: Connection, subject: str) -> AsyncIterator[Result]:
    """Each reply published to ``subject``, decoded; errors come as values, never raised."""
    sub = await conn.nc.subscribe(subject)
    claims = Claims(conn)
    try:
        async for msg in sub.messages:
            request_id = (msg.headers or {}).get(HDR_REQUEST_ID)
            try:
                data = msg.data
                if claim_of(data) is not None:  # a large reply, handed over through the object store
                    data = await claims.resolve(data, take=True)
                yield Result(request_id, reply=decode_reply(data))
            except MeshError as err:
                yield Result(request_id, error=err)
    finally:
        await sub.unsubscribe()
