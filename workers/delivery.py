"""One request as a worker receives it: payload, checked headers, delivery count, and how to settle it.

A delivery holds one unit of its feed's pull credit from the moment it arrives until it is
settled (acked, nak'ed or terminated): settling is what gives the credit back, so a request that
is answered can never keep its feed from pulling more.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Container, Iterable
from typing import Any, Protocol

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from schemas.envelope import decode_request_bundle, encode_error
from schemas.errors import MeshError, ModelFailure
from schemas.headers import RequestHeaders, read_headers, reply_of
from schemas.subjects import (
    HDR_BUNDLE,
    HDR_DELIVERED,
    HDR_JOB,
    HDR_JOB_ITEM,
    HDR_MSG_ID,
    HDR_REQUEST_ID,
    requeue_subject,
    subject_kind,
)

__all__ = ["BundleAck", "Credit", "Delivery", "settle_all", "settle_failed"]

log = logging.getLogger(__name__)

_ACK = b"+ACK"
_NAK = b"-NAK"
_WPI = b"+WPI"
_TERM = b"+TERM"
_NAK_LATER = b'-NAK {"delay": 1000000000}'  # redelivered in a second, not at once
# A bundle's requests ask to reset its ack timer together: once per this many seconds is enough.
_PROGRESS_EVERY_S = 0.5
_NO_HEADERS = RequestHeaders()
_JOB_HEADERS = (HDR_JOB, HDR_JOB_ITEM)


class Credit(Protocol):
    """Whoever pulled a delivery: told once it is settled, so that it may pull more."""

    async def release(self, count: int = 1) -> None: ...


class Delivery:
    """A JetStream message on loan to a worker until it is acked, nak'ed or terminated.

    Settling publishes on the ack subject without waiting for the server: replies go out
    first, acks right after, both pipelined on the one connection. ``invalid`` is the error a
    header earned (answer it and settle; nothing else of the request is to be trusted).
    """

    __slots__ = (
        "_ack_to", "_bundle", "_credit", "_data", "_headers", "_nc", "_subject", "claim_bucket", "deadline_ms",
        "invalid", "job", "job_item", "kind", "num_delivered", "num_pending", "priority", "reply_inbox", "reply_to",
        "request_id", "route", "span", "stored_ns", "stream_seq",
    )  # fmt: skip

    def __init__(self, nc: NatsClient, msg: Msg, priority: str, credit: Credit | None = None) -> None:
        self._nc = nc
        self._subject = msg.subject
        self.kind = subject_kind(msg.subject)
        self._ack_to = msg.reply or ""
        self._bundle: BundleAck | None = None
        self._credit = credit
        self.priority = priority
        # num_pending: messages left in the consumer after this one, as the server saw it.
        # stream_seq: where the stream stores this message (0 if unknown), unique per message.
        self.num_delivered, self.stream_seq, self.stored_ns, self.num_pending = _ack_metadata(self._ack_to)
        self._read(msg.headers or {}, msg.data)

    def _read(self, headers: dict[str, str], data: bytes) -> None:
        self._headers = headers
        self._data = data
        self.span: Any = None  # the worker's trace span for this request, when tracing is on
        try:
            checked = read_headers(headers, self.kind)
            self.invalid: MeshError | None = None
        except MeshError as err:
            checked, self.invalid = _NO_HEADERS, err
        self.reply_to, self.reply_inbox = reply_of(headers) if self.invalid else (checked.reply_to, checked.reply_inbox)
        self.request_id = checked.request_id
        self.deadline_ms = checked.deadline_ms
        self.route = checked.route  # the pipeline stages still ahead, if any
        self.job, self.job_item = checked.job, checked.job_item  # set on the items of a batch job
        self.claim_bucket = checked.claim_bucket
        # Queued again out of a redelivered bundle: the deliveries it had inside the bundle count too.
        self.num_delivered += checked.delivered_before

    @property
    def bundled(self) -> int:
        """How many requests this stream message carries (0: one request, not a bundle)."""
        if self._bundle is not None:
            return 0
        raw = self._headers.get(HDR_BUNDLE)
        return int(raw) if raw and len(raw) <= 6 and raw.isascii() and raw.isdigit() else 0

    @property
    def settled(self) -> bool:
        return self._credit is None and self._bundle is None and self._ack_to == ""

    def unbundle(self) -> list[Delivery]:
        """The requests of a bundle, each settled on its own and holding one unit of credit; the
        bundle is acked once all are (nak'ed if any was). Raises BadInput if it cannot be read."""
        requests = decode_request_bundle(self._data)
        bundle = BundleAck(self._nc, self._ack_to, len(requests))
        members = []
        for headers, data in requests:
            member = object.__new__(Delivery)
            member._nc, member._subject, member._ack_to, member._bundle = self._nc, self._subject, "", bundle
            member._credit, member.kind, member.priority = self._credit, self.kind, self.priority
            member.num_delivered, member.stream_seq = self.num_delivered, self.stream_seq
            member.stored_ns, member.num_pending = self.stored_ns, self.num_pending
            member._read(headers, data)
            members.append(member)
        if members:
            self._credit = None  # its members hold the credit now
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
                asyncio.wait_for(
                    js.publish(requeue_subject(self._subject), data, headers=_requeued(headers, prior, self.kind)), 5.0
                )
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
        if verb != _WPI:
            credit, self._credit = self._credit, None  # settled: its credit is given back once
            if credit is not None:
                await credit.release()
        if self._bundle is not None:
            bundle = self._bundle
            if verb != _WPI:
                self._bundle = None  # settled: a second ack or nak must not count again
            await bundle.settle(verb)
        elif self._ack_to and not self._nc.is_closed:
            ack_to = self._ack_to
            if verb != _WPI:
                self._ack_to = ""
            await self._nc.publish(ack_to, verb)


class BundleAck:
    """The one stream message behind a bundle's requests: acked once every request is settled,
    nak'ed instead if any request was (it comes back whole, and is split into lone requests)."""

    __slots__ = ("_ack_to", "_nak", "_nc", "_open", "_progress_at")

    def __init__(self, nc: NatsClient, ack_to: str, count: int) -> None:
        self._nc, self._ack_to, self._open = nc, ack_to, count
        self._nak = False
        self._progress_at = -1.0

    async def settle(self, verb: bytes, count: int = 1) -> None:
        """``count`` of the bundle's requests are settled with ``verb`` (one in-progress ack at most).
        A request terminated (answered with an error that retrying cannot fix) counts as acked."""
        if not self._ack_to or self._nc.is_closed:
            return
        if verb == _WPI:  # one "still working" per batch, not one per request
            now = time.monotonic()
            if now - self._progress_at >= _PROGRESS_EVERY_S:
                self._progress_at = now
                await self._nc.publish(self._ack_to, _WPI)
            return
        self._nak = self._nak or verb not in (_ACK, _TERM)
        self._open -= count
        if self._open == 0:
            await self._nc.publish(self._ack_to, _NAK if self._nak else _ACK)


async def settle_all(deliveries: Iterable[Delivery], nak: Container[Delivery] = ()) -> None:
    """Ack each of ``deliveries`` (nak those in ``nak``), as :meth:`Delivery.ack` would one by one, with
    one call per bundle and per feed rather than per request: a batch's requests mostly come a
    bundle at a time, from one feed."""
    bundles: dict[BundleAck, list[int]] = {}
    credits: Counter[Credit] = Counter()
    for delivery in deliveries:
        if delivery._credit is not None:
            credits[delivery._credit] += 1
            delivery._credit = None
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
    for credit, count in credits.items():
        await credit.release(count)


async def settle_failed(
    delivery: Delivery,
    error: BaseException,
    answer: Callable[[Delivery, MeshError], Awaitable[None]] | None = None,
) -> None:
    """A delivery whose handling failed: answered with ``error`` (a MeshError as it is, anything else
    as a ModelFailure) by ``answer`` (else by a plain reply), then settled if ``answer`` did not.
    Never raises: it is the last thing between one bad message and a feed that stops pulling."""
    err = error if isinstance(error, MeshError) else ModelFailure("the worker failed handling this request")
    try:
        if answer is not None:
            await answer(delivery, err)
        else:
            await delivery.reply(encode_error(err))
    except Exception:
        log.exception("answering a failed delivery on %s failed too", delivery.subject)
    if not delivery.settled:
        try:
            await delivery.term()
        except Exception:
            log.exception("could not settle a failed delivery on %s", delivery.subject)


def _requeued(headers: dict[str, str], prior: str, kind: str) -> dict[str, str]:
    """A bundled request's own headers, to queue it alone: its id, but no other JetStream header a
    client may have slipped into the bundle (expected sequences, TTLs) to make the stream refuse it,
    nor, from a client's own subject, the job headers that the requeue subject would make trusted."""
    privileged = _JOB_HEADERS if kind == "request" else ()
    kept = {
        k: v for k, v in headers.items()
        if (not k.lower().startswith("nats-") or k == HDR_MSG_ID) and k not in privileged
    }  # fmt: skip
    kept[HDR_DELIVERED] = prior
    return kept


def _ack_metadata(ack_subject: str) -> tuple[int, int, int, int]:
    """(delivery count, stream sequence, stored-at ns, pending), read from the ack subject:
    ``$JS.ACK.[domain.hash.]stream.consumer.delivered.sseq.cseq.ts.pending``."""
    tokens = ack_subject.split(".")
    offset = 4 if len(tokens) == 9 else 6
    try:
        return int(tokens[offset]), int(tokens[offset + 1]), int(tokens[offset + 3]), int(tokens[offset + 4])
    except (IndexError, ValueError):
        return 1, 0, 0, 0
