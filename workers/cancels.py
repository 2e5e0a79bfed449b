"""Requests their callers gave up on: a client that cancels a request says so on
``mesh.cancel.<model>`` (its id), and every worker keeps the ids it heard for a while. A
cancelled request still in the stream is acked on arrival without being computed; one waiting
in a forming batch leaves it; a pipeline stops at its next stage (a stage keeps the request's
id). Request ids start with a random NUID per client, so only their sender can name them."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from broker.connection import Connection
from schemas.subjects import CANCEL_PREFIX

__all__ = ["Cancellations"]

log = logging.getLogger(__name__)

# An id is remembered this long (longer than requests wait) and at most this many at once.
_KEEP_S = 300.0
_MOST = 200_000
_ID_MAX = 128


class Cancellations:
    def __init__(self) -> None:
        self._ids: OrderedDict[str, float] = OrderedDict()  # id -> when heard, oldest first
        self._sub: Subscription | None = None

    async def start(self, conn: Connection) -> None:
        try:
            self._sub = await conn.nc.subscribe(f"{CANCEL_PREFIX}.>", cb=self._on_cancel)
        except Exception as exc:  # no right to: requests are computed even when cancelled
            log.warning("cancellations unavailable: %s", exc)

    async def stop(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception as exc:  # connection closing anyway
                log.debug("unsubscribing from cancellations: %s", exc)

    async def _on_cancel(self, msg: Msg) -> None:
        now = time.monotonic()
        for raw in msg.data.split(b"\n")[:4096]:
            if 0 < len(raw) <= _ID_MAX and raw.isascii():
                self._ids[raw.decode()] = now
                self._ids.move_to_end(raw.decode())
        while self._ids and (len(self._ids) > _MOST or now - next(iter(self._ids.values())) > _KEEP_S):
            self._ids.popitem(last=False)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._ids
