"""ReplySender: sends what one batch produced — replies, bundled for the same client, and the
outputs of pipeline stages forwarded to their next stage.

A client that sets ``Mesh-Reply-Inbox`` accepts a bundle of replies as one message on its
inbox; one message instead of many saves the server a route and the client a parse per
request. Bundles stay well under the server's max payload; lone replies go out as usual.
A forward is a JetStream publish, acknowledged before the request that produced it is acked,
so a stage's output is never lost between stages; its message id makes a redelivered stage
forward only once.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from typing import Any

from broker.connection import Connection, translate_error
from schemas.envelope import encode_bundle
from schemas.errors import MeshError
from schemas.subjects import (
    HDR_DEADLINE,
    HDR_JOB_ITEM,
    HDR_MSG_ID,
    HDR_REPLY,
    HDR_REPLY_INBOX,
    HDR_ROUTE,
    bundle_subject,
    job_result_subject,
)
from telemetry import tracing
from workers.delivery import Delivery

__all__ = ["ReplySender"]

log = logging.getLogger(__name__)

# What a forwarded request keeps of its predecessor: where the answer goes and by when.
_CARRIED = frozenset({HDR_REPLY, HDR_REPLY_INBOX, HDR_DEADLINE})


class ReplySender:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._nc = conn.nc
        self._limit = max(1024, self._nc.max_payload // 2)
        self._single: list[tuple[Delivery, bytes]] = []
        self._bundles: defaultdict[str, list[tuple[str, bytes]]] = defaultdict(list)
        self._forwards: list[tuple[Delivery, bytes]] = []
        self._job_results: list[tuple[Delivery, bytes, bool]] = []
        self.unsaved: list[Delivery] = []
        self._parent: Any = None  # job items whose result could not be stored: not to be acked

    def forward(self, delivery: Delivery, request: bytes, parent: Any = None) -> None:
        """Queue ``request`` (this stage's outputs as inputs) for the next stage on the route; ``parent``:
        the trace span of the batch that computed it (its send span goes under it)."""
        self._forwards.append((delivery, request))
        self._parent = parent

    def add(self, delivery: Delivery, payload: bytes, ok: bool = True) -> None:
        if delivery.job:
            self._job_results.append((delivery, payload, ok))
            return
        inbox, reply_to = delivery.reply_inbox, delivery.reply_to
        if inbox and reply_to and reply_to.startswith(inbox + "."):
            # Bundled replies are keyed by the last token of the reply subject the client chose.
            self._bundles[inbox].append((reply_to.rsplit(".", 1)[-1], payload))
        else:
            self._single.append((delivery, payload))

    async def send(self) -> list[tuple[Delivery, MeshError]]:
        """Send everything; returns the forwards the next stage's stream refused (to answer as errors)."""
        refused = []
        if self._forwards:
            outcomes = await asyncio.gather(*(self._forward(d, r) for d, r in self._forwards))
            refused = [(d, err) for (d, _), err in zip(self._forwards, outcomes, strict=True) if err is not None]
        if self._job_results:
            stored = await asyncio.gather(*(self._store(d, p, ok) for d, p, ok in self._job_results))
            self.unsaved = [d for (d, _, _), done in zip(self._job_results, stored, strict=True) if not done]
        for delivery, payload in self._single:
            await delivery.reply(payload)
        for inbox, replies in self._bundles.items():
            await self._send_bundle(inbox, replies)
        self._single.clear()
        self._bundles.clear()
        self._forwards.clear()
        self._job_results.clear()
        return refused

    async def _store(self, delivery: Delivery, payload: bytes, ok: bool) -> bool:
        """A job item's result, stored durably (acked by the stream) and once per item."""
        assert delivery.job is not None
        headers = {HDR_MSG_ID: f"{delivery.job}:{delivery.job_item}", HDR_JOB_ITEM: delivery.job_item or ""}
        try:
            await self._conn.publish_acked(job_result_subject(delivery.job, ok), payload, headers, timeout=5.0)
        except Exception as exc:  # left unacked, the item comes back and is computed again
            log.warning("could not store result %s of job %s: %s", delivery.job_item, delivery.job, exc)
            return False
        return True

    async def _forward(self, delivery: Delivery, request: bytes) -> MeshError | None:
        assert delivery.route
        subject, rest = delivery.route[0], delivery.route[1:]
        headers = {HDR_MSG_ID: f"{delivery.request_id}~{subject}"}
        for name, value in delivery.headers.items():
            if name in _CARRIED:
                headers[name] = value
        if rest:
            headers[HDR_ROUTE] = ",".join(rest)
        # The next stage joins the same trace: a send span under this batch's, or (not sampled) its context.
        span = tracing.start_send(subject, headers[HDR_MSG_ID], headers, self._parent) if self._parent else None
        if span is None:
            tracing.inject(delivery.headers, headers)
        try:
            await self._conn.publish_acked(subject, request, headers, timeout=5.0)
        except Exception as exc:
            err = translate_error(exc, f"forward to {subject}")
            tracing.end(span, err)
            return err
        tracing.end(span)
        return None

    async def _send_bundle(self, inbox: str, replies: list[tuple[str, bytes]]) -> None:
        chunk: list[tuple[str, bytes]] = []
        size = 0
        for request_id, payload in replies:
            if chunk and size + len(payload) > self._limit:
                await self._nc.publish(bundle_subject(inbox), encode_bundle(chunk))
                chunk, size = [], 0
            chunk.append((request_id, payload))
            size += len(payload) + len(request_id) + 8
        if chunk:
            await self._nc.publish(bundle_subject(inbox), encode_bundle(chunk))
