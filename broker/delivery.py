"""One request as a worker receives it: payload, headers, delivery count, and how to settle it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Container, Iterable
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from schemas.envelope import decode_request_bundle
from schemas.errors import MeshError
from schemas.subjects import (
    HDR_BUNDLE,
    HDR_DEADLINE,
    HDR_DELIVERED,
    HDR_JOB,
    HDR_JOB_ITEM,
    HDR_MSG_ID,
    HDR_REPLY,
    HDR_REPLY_INBOX,
    HDR_REQUEST_ID,
    HDR_ROUTE,
    is_reply_subject,
    requeue_subject,
)

__all__ = ["BundleAck", "Delivery", "settle_all"]

log = logging.getLogger(__name__)

_ACK = b"+ACK"
_NAK = b"-NAK"
_WPI = b"+WPI"
_TERM = b"+TERM"
_NAK_LATER = b'-NAK {"delay": 1000000000}'  # redelivered in a second, not at once
# A bundle's requests ask to reset its ack timer together: once per this many seconds is enough.
_PROGRESS_EVERY_S = 0.5


class Delivery:
    """A JetStream message on loan to a worker until it is acked, nak'ed or terminated.

    Settling publishes on the ack subject without waiting for the server: replies go out
    first, acks right after, both pipelined on the one connection.
    """

    __slots__ = (
        "_ack_to", "_bundle", "_data", "_headers", "_nc", "_subject", "deadline_ms", "job", "job_item",
        "num_delivered", "num_pending", "priority", "reply_inbox", "reply_to", "request_id", "route", "span",
        "stored_ns", "stream_seq",
    )  # fmt: skip

    def __init__(self, nc: NatsClient, msg: Msg, priority: str) -> None:
        self._nc = nc
        self._subject = msg.subject
        self._ack_to = msg.reply or ""
        self._bundle: BundleAck | None = None
        self.priority = priority
        # num_pending: messages left in the consumer after this one, as the server saw it.
        # stream_seq: where the stream stores this message (0 if unknown), unique per message.
        self.num_delivered, self.stream_seq, self.stored_ns, self.num_pending = _ack_metadata(self._ack_to)
        self._read(msg.headers or {}, msg.data)
        # Queued again out of a redelivered bundle: the deliveries it had inside the bundle count too.
        prior = self._headers.get(HDR_DELIVERED)
        if prior and len(prior) <= 6 and prior.isascii() and prior.isdigit():
            self.num_delivered += int(prior)

    def _read(self, headers: dict[str, str], data: bytes) -> None:
        self._headers = headers
        self._data = data
        # Subjects a client chose: one nobody can publish to is as good as none (else the publish
        # raises in the middle of a batch).
        self.reply_inbox: str | None = _inbox(headers.get(HDR_REPLY_INBOX))
        self.reply_to: str | None = _reply_subject(headers.get(HDR_REPLY), self.reply_inbox)
        # A pipeline stage's message id is "<request id>~<stage subject>": the request's own id comes first.
        msg_id = headers.get(HDR_MSG_ID)
        self.request_id: str | None = msg_id.partition("~")[0] if msg_id else None
        self.route: str | None = headers.get(HDR_ROUTE)  # later pipeline stages, if any
        self.job: str | None = headers.get(HDR_JOB)  # set on the items of a batch job
        self.job_item: str | None = headers.get(HDR_JOB_ITEM)
        self.span: Any = None  # the worker's trace span for this request, when tracing is on
        self.deadline_ms: int | None = _deadline(headers.get(HDR_DEADLINE))

    @property
    def bundled(self) -> int:
        """How many requests this stream message carries (0: one request, not a bundle)."""
        if self._bundle is not None:
            return 0
        raw = self._headers.get(HDR_BUNDLE)
        return int(raw) if raw and len(raw) <= 6 and raw.isascii() and raw.isdigit() else 0

    def unbundle(self) -> list[Delivery]:
        """The requests of a bundle, each settled on its own; the bundle is acked once all are
        (nak'ed if any was). Raises BadInput if the bundle cannot be read."""
        requests = decode_request_bundle(self._data)
        bundle = BundleAck(self._nc, self._ack_to, len(requests))
        members = []
        for headers, data in requests:
            member = object.__new__(Delivery)
            member._nc, member._subject, member._ack_to, member._bundle = self._nc, self._subject, "", bundle
            member.priority = self.priority
            member.num_delivered, member.stream_seq = self.num_delivered, self.stream_seq
            member.stored_ns, member.num_pending = self.stored_ns, self.num_pending
            member._read(headers, data)
            members.append(member)
        return members

    async def requeue(self, js: JetStreamContext) -> bool:
        """Queue a redelivered bundle's requests again one by one (each keeps its id, so a copy the
        stream already holds is dropped, and counts the deliveries it had), then ack the bundle.
        A request that may have crashed a worker is thus computed alone, like any redelivered one.
        False (and the bundle nak'ed, to come back later) if the stream refused any of them."""
        try:
            members = decode_request_bundle(self._data)
        except MeshError as err:  # nobody to answer: its callers time out, nothing else is affected
            log.warning("dropping an unreadable bundle from %s: %s", self._subject, err.message)
            await self._settle(_TERM)
            return False
        prior = str(self.num_delivered - 1)
        results = await asyncio.gather(
            *(
                js.publish(requeue_subject(self._subject), data, headers=_requeued(headers, prior))
                for headers, data in members
            ),
            return_exceptions=True,
        )
        refused = [r for r in results if isinstance(r, BaseException)]
        if refused:
            log.warning("could not queue %d of a bundle's %d requests again (%s); it comes back later",
                        len(refused), len(members), refused[0])  # fmt: skip
            await self._settle(_NAK_LATER)
            return False
        await self._settle(_ACK)
        return True

    @property
    def data(self) -> bytes:
        return self._data

    @property
    def subject(self) -> str:
        return self._subject

    @property
    def headers(self) -> dict[str, str]:
        return self._headers

    async def reply(self, payload: bytes) -> None:
        """Publish to the reply subject, if any; never raises, so one request cannot fail its batch."""
        if self.reply_to:
            headers = {HDR_REQUEST_ID: self.request_id} if self.request_id else None
            try:
                await self._nc.publish(self.reply_to, payload, headers=headers)
            except Exception as exc:  # e.g. too large for max_payload, or the connection is closed
                log.warning("could not reply to %s: %s", self.reply_to, exc)

    async def ack(self) -> None:
        await self._settle(_ACK)

    async def nak(self) -> None:
        await self._settle(_NAK)

    async def in_progress(self) -> None:
        """Reset the server's ack timer for a request still being computed."""
        await self._settle(_WPI)

    async def term(self) -> None:
        await self._settle(_TERM)

    async def _settle(self, verb: bytes) -> None:
        if self._bundle is not None:
            bundle = self._bundle
            if verb != _WPI:
                self._bundle = None  # settled: a second ack or nak must not count again
            await bundle.settle(verb)
        elif self._ack_to and not self._nc.is_closed:
            await self._nc.publish(self._ack_to, verb)


class BundleAck:
    """The one stream message behind a bundle's requests: acked once every request is settled,
    nak'ed instead if any request was (it comes back whole, and is split into lone requests)."""

    __slots__ = ("_ack_to", "_nak", "_nc", "_open", "_progress_at")

    def __init__(self, nc: NatsClient, ack_to: str, count: int) -> None:
        self._nc, self._ack_to, self._open = nc, ack_to, count
        self._nak = False
        self._progress_at = -1.0

    async def settle(self, verb: bytes, count: int = 1) -> None:
        """``count`` of the bundle's requests are settled with ``verb`` (one in-progress ack at most)."""
        if not self._ack_to or self._nc.is_closed:
            return
        if verb == _WPI:  # one "still working" per batch, not one per request
            now = time.monotonic()
            if now - self._progress_at >= _PROGRESS_EVERY_S:
                self._progress_at = now
                await self._nc.publish(self._ack_to, _WPI)
            return
        self._nak = self._nak or verb != _ACK
        self._open -= count
        if self._open == 0:
            await self._nc.publish(self._ack_to, _NAK if self._nak else _ACK)


async def settle_all(deliveries: Iterable[Delivery], nak: Container[Delivery] = ()) -> None:
    """Ack each of ``deliveries`` (nak those in ``nak``), as :meth:`Delivery.ack` would one by one, with
    one call per bundle rather than per request: a batch's requests mostly come a bundle at a time."""
    bundles: dict[BundleAck, list[int]] = {}
    for delivery in deliveries:
        bundle, failed = delivery._bundle, delivery in nak
        if bundle is None:
            await delivery._settle(_NAK if failed else _ACK)
            continue
        delivery._bundle = None  # settled: a second ack or nak must not count again
        counts = bundles.get(bundle)
        if counts is None:
            counts = bundles[bundle] = [0, 0]
        counts[failed] += 1
    for bundle, (acks, naks) in bundles.items():
        await bundle.settle(_NAK if naks else _ACK, acks + naks)


def _requeued(headers: dict[str, str], prior: str) -> dict[str, str]:
    """A bundled request's own headers, to queue it alone: its id, but no other JetStream header a
    client may have slipped into the bundle (expected sequences, TTLs) to make the stream refuse it."""
    kept = {k: v for k, v in headers.items() if not k.lower().startswith("nats-") or k == HDR_MSG_ID}
    kept[HDR_DELIVERED] = prior
    return kept


_INBOXES: dict[str, bool] = {}  # reply inboxes seen, and whether a reply can be published under them


def _inbox(raw: str | None) -> str | None:
    """A client's reply inbox, checked once per inbox (its requests all carry the same)."""
    if not raw:
        return None
    ok = _INBOXES.get(raw)
    if ok is None:
        if len(_INBOXES) >= 4096:
            _INBOXES.clear()
        ok = _INBOXES[raw] = is_reply_subject(raw)
    return raw if ok else None


def _reply_subject(raw: str | None, inbox: str | None) -> str | None:
    """The subject a request's reply goes to; under the client's (checked) inbox, only the rest is checked."""
    if not raw:
        return None
    if inbox is not None and len(raw) > len(inbox) + 1 and raw[len(inbox)] == "." and raw.startswith(inbox):
        return raw if len(raw) <= 1024 and is_reply_subject(raw[len(inbox) + 1 :]) else None
    return raw if is_reply_subject(raw) else None


def _deadline(raw: str | None) -> int | None:
    """Milliseconds since the epoch, or None: a deadline no one can read is no deadline.
    ASCII only (``"²".isdigit()``, yet int() refuses it), and short enough to be a time that
    converts to a float (thousands of digits would not)."""
    if raw and len(raw) <= 15 and raw.isascii() and raw.isdigit():
        return int(raw)
    return None


def _ack_metadata(ack_subject: str) -> tuple[int, int, int, int]:
    """(delivery count, stream sequence, stored-at ns, pending), read from the ack subject:
    ``$JS.ACK.[domain.hash.]stream.consumer.delivered.sseq.cseq.ts.pending``."""
    tokens = ack_subject.split(".")
    offset = 4 if len(tokens) == 9 else 6
    try:
        return int(tokens[offset]), int(tokens[offset + 1]), int(tokens[offset + 3]), int(tokens[offset + 4])
    except (IndexError, ValueError):
        return 1, 0, 0, 0
