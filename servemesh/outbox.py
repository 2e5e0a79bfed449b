"""Outbox: a client's requests for one subject, published in the same turn of its event loop, leave
as one stream message (a bundle), stored and acknowledged once; a lone request leaves alone. Why,
and how workers and redeliveries handle bundles: docs/design.md, "Request bundles"."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from broker.connection import Connection, translate_error
from schemas.envelope import encode_request_bundle
from schemas.subjects import HDR_BUNDLE, MAX_BUNDLE, ReplyKind, bundle_limit, inbox_subject, parse_infer_subject
from servemesh.inflight import InFlight

__all__ = ["Outbox"]

log = logging.getLogger(__name__)

# A bundle this large leaves at once, mid-turn (see put).
SEND_AT = 16
# The bundle's framing, per request.
_FRAMING = 32

Waiting = tuple[str, bytes, dict[str, str]]  # request id, payload, headers


class Outbox:
    """``max_batch`` tells a model's largest batch, if known: a bundle is never larger, so that a
    worker's pull credit (``workers/feed.py``), counted in batches, is not overrun by bundles."""

    def __init__(
        self,
        conn: Connection,
        inbox: str,
        pending: InFlight,
        max_batch: Callable[[str], int | None] = lambda model: None,
        coalesce: bool = True,
    ) -> None:
        self._conn = conn
        self._inbox = inbox
        self._pending = pending
        self._max_batch = max_batch
        self.coalesce = coalesce
        self._limit = max(1024, conn.nc.max_payload // 2)
        self._waiting: dict[str, list[Waiting]] = {}
        self._sizes: dict[str, int] = {}  # per subject waiting: the largest bundle it may have
        self._bytes: dict[str, int] = {}  # per subject waiting: the bytes its requests take in a bundle
        self._flush: asyncio.Task[None] | None = None
        self.send_at = SEND_AT

    async def put(self, subject: str, request_id: str, payload: bytes, headers: dict[str, str]) -> None:
        """Queue a request (tracked in ``pending``) to be published at the end of this turn."""
        one = (request_id, payload, headers)
        group = self._waiting.get(subject)
        if group is None:
            self._waiting[subject] = group = []
            self._sizes[subject] = self._bundle_size(subject)
            self._bytes[subject] = 0
        group.append(one)
        self._bytes[subject] += _cost(one)
        if (
            len(group) >= min(self.send_at, self._sizes[subject])
            and self.coalesce
            and self._bytes[subject] <= self._limit
        ):
            # Enough for a bundle: it leaves now, so the stream and a worker start on it while
            # this turn goes on, instead of all of the turn's requests arriving at once at its end.
            del self._waiting[subject], self._sizes[subject], self._bytes[subject]
            await self._publish_bundle(subject, group)
            return
        if self._flush is None:
            # A task's first step runs after the callbacks ready now: the rest of this turn's requests.
            self._flush = asyncio.create_task(self._send())

    def _bundle_size(self, subject: str) -> int:
        try:
            model = parse_infer_subject(subject)[0]
        except ValueError:
            return MAX_BUNDLE
        return bundle_limit(self._max_batch(model) or 0)

    async def _send(self) -> None:
        """End of the turn: what waits leaves."""
        waiting, self._waiting = self._waiting, {}
        sizes, self._sizes, self._bytes = self._sizes, {}, {}
        self._flush = None
        for subject, everyone in waiting.items():
            group = [one for one in everyone if self._pending.is_open(one[0])]  # not given up meanwhile
            for chunk in self._chunks(group, sizes[subject] if self.coalesce else 1):
                if len(chunk) == 1:
                    await self._publish_one(subject, chunk[0])
                else:
                    await self._publish_bundle(subject, chunk)

    def _chunks(self, group: list[Waiting], most: int) -> list[list[Waiting]]:
        chunks: list[list[Waiting]] = [[]]
        if not group:
            return []
        size = 0
        for one in group:
            cost = _cost(one)
            if chunks[-1] and (len(chunks[-1]) >= most or size + cost > self._limit):
                chunks.append([])
                size = 0
            chunks[-1].append(one)
            size += cost
        return chunks

    async def _publish_one(self, subject: str, one: Waiting) -> None:
        request_id, payload, headers = one
        try:
            reply = inbox_subject(self._inbox, ReplyKind.ACK, request_id)
            await self._conn.nc.publish(subject, payload, reply=reply, headers=headers)
        except Exception as exc:
            self._pending.reject(request_id, translate_error(exc, f"queue request on {subject}"))

    async def _publish_bundle(self, subject: str, chunk: list[Waiting]) -> None:
        ids = [request_id for request_id, _, _ in chunk]
        key = f"{ids[0]}+"  # request ids are letters and digits: no request has this id
        self._pending.bundle(key, ids)
        payload = encode_request_bundle([(headers, payload) for _, payload, headers in chunk])
        try:
            reply = inbox_subject(self._inbox, ReplyKind.ACK, key)
            await self._conn.nc.publish(subject, payload, reply=reply, headers={HDR_BUNDLE: str(len(chunk))})
        except Exception as exc:
            error = translate_error(exc, f"queue request on {subject}")
            for request_id in ids:
                self._pending.reject(request_id, error)


def _cost(one: Waiting) -> int:
    """Bytes a request takes in a bundle."""
    return len(one[1]) + sum(len(k) + len(v) for k, v in one[2].items()) + _FRAMING
