"""Attempts charged to a request: how many times a worker computed it alone after a redelivery.

A worker that crashes takes down every request it held, the one that crashed it and the ones
merely waiting beside it; JetStream counts a delivery against each. Counting deliveries would
fail innocent requests once a poison request has crashed workers a few times. So a redelivered
request is computed alone, and only then charged an attempt, here, before the computation starts:
a crash during it is the request's own.
"""

from __future__ import annotations

import asyncio
import logging

from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from broker.connection import Connection
from schemas.subjects import BUCKET_ATTEMPTS

__all__ = ["Attempts"]

log = logging.getLogger(__name__)

# Counting an attempt waits on the server at most this long.
_TIMEOUT_S = 2.0


class Attempts:
    def __init__(self, kv: KeyValue | None) -> None:
        self._kv = kv

    @classmethod
    async def open(cls, conn: Connection) -> Attempts:
        try:
            return cls(await conn.js.key_value(BUCKET_ATTEMPTS))
        except Exception as exc:  # no bucket or no right to it: attempts are counted by deliveries
            log.warning("attempt counts unavailable (%s): redelivered requests are charged per delivery", exc)
            return cls(None)

    async def charge(self, stream_seq: int, deliveries: int) -> int:
        """Charge one more attempt to the message at ``stream_seq``; returns its attempts so far,
        this one included (the first, in a batch, is counted too). Where the count cannot be kept,
        ``deliveries`` stands in for it."""
        if self._kv is None or not stream_seq:
            return deliveries
        try:
            alone = await asyncio.wait_for(self._count(str(stream_seq)), _TIMEOUT_S)
        except Exception as exc:  # a lost race, a flaky or silent store: err on the side of the count we know
            log.warning("could not count an attempt of message %d: %s", stream_seq, exc)
            return deliveries
        return 1 + alone

    async def _count(self, key: str) -> int:
        assert self._kv is not None
        try:
            entry = await self._kv.get(key)
            alone = int(entry.value or b"0") + 1
            await self._kv.update(key, str(alone).encode(), last=entry.revision)
        except KeyNotFoundError:
            alone = 1
            await self._kv.create(key, b"1")
        return alone
