"""ReplySender: publishes the replies of one batch, bundling those bound for the same client.

A client that sets ``Mesh-Reply-Inbox`` accepts a bundle of replies as one message on its
inbox; one message instead of many saves the server a route and the client a parse per
request. Bundles stay well under the server's max payload; lone replies go out as usual.
"""

from __future__ import annotations

from collections import defaultdict

from nats.aio.client import Client as NatsClient

from broker.delivery import Delivery
from schemas.envelope import encode_bundle
from schemas.subjects import bundle_subject

__all__ = ["ReplySender"]


class ReplySender:
    def __init__(self, nc: NatsClient) -> None:
        self._nc = nc
        self._limit = max(1024, nc.max_payload // 2)
        self._single: list[tuple[Delivery, bytes]] = []
        self._bundles: defaultdict[str, list[tuple[str, bytes]]] = defaultdict(list)

    def add(self, delivery: Delivery, payload: bytes) -> None:
        if delivery.reply_inbox and delivery.request_id:
            self._bundles[delivery.reply_inbox].append((delivery.request_id, payload))
        else:
            self._single.append((delivery, payload))

    async def send(self) -> None:
        for delivery, payload in self._single:
            await delivery.reply(payload)
        for inbox, replies in self._bundles.items():
            await self._send_bundle(inbox, replies)
        self._single.clear()
        self._bundles.clear()

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
