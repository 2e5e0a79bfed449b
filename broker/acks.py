"""Acknowledged publishes in bulk: many JetStream publishes written at once, their acks collected
on one subscription and awaited together under one timeout.

What ``js.publish`` does per message (a request with its own future and timer, a parsed PubAck
object) costs as much as the rest of a job item's trip through a worker; a batch's job results and
pipeline forwards need only "stored, or why not" for each, all at the same moment.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from broker.connection import Connection, pub_ack_error, translate_error
from schemas.errors import DeadlineExceeded, MeshError

__all__ = ["AckedPublisher"]


class AckedPublisher:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._inbox = conn.nc.new_inbox()
        self._sub: Subscription | None = None
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self._tokens = itertools.count()

    async def publish_all(
        self, messages: Sequence[tuple[str, bytes, dict[str, str]]], timeout: float = 5.0
    ) -> list[MeshError | None]:
        """Publish each (subject, payload, headers) to its stream; per message, None once stored,
        else the error (refused, unreachable, or no acknowledgement within ``timeout``)."""
        if self._sub is None:
            self._sub = await self._conn.nc.subscribe(
                f"{self._inbox}.*", cb=self._on_ack, pending_msgs_limit=-1, pending_bytes_limit=-1
            )
        loop = asyncio.get_running_loop()
        tokens: list[str] = []
        outcomes: list[MeshError | None] = [None] * len(messages)
        for i, (subject, payload, headers) in enumerate(messages):
            token = str(next(self._tokens))
            self._waiting[token] = loop.create_future()
            tokens.append(token)
            try:
                await self._conn.nc.publish(subject, payload, reply=f"{self._inbox}.{token}", headers=headers)
            except Exception as exc:
                outcomes[i] = translate_error(exc, f"publish to {subject}")
        futures = [self._waiting[t] for t in tokens]
        try:
            await asyncio.wait(futures, timeout=timeout)
        finally:
            for token in tokens:
                self._waiting.pop(token, None)
        for i, ((subject, _, _), future) in enumerate(zip(messages, futures, strict=True)):
            if outcomes[i] is not None:
                continue
            if not future.done():
                future.cancel()
                outcomes[i] = DeadlineExceeded(f"no acknowledgement from the stream for {subject} within {timeout}s")
            else:
                outcomes[i] = pub_ack_error(future.result(), subject)
        return outcomes

    async def _on_ack(self, msg: Msg) -> None:
        future = self._waiting.get(msg.subject.rsplit(".", 1)[-1])
        if future is not None and not future.done():
            future.set_result(msg)
