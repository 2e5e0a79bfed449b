"""One request as a worker receives it: payload, headers, delivery count, and how to settle it."""

from __future__ import annotations

import logging
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from schemas.subjects import (
    HDR_DEADLINE,
    HDR_JOB,
    HDR_JOB_ITEM,
    HDR_MSG_ID,
    HDR_REPLY,
    HDR_REPLY_INBOX,
    HDR_REQUEST_ID,
    HDR_ROUTE,
    is_reply_subject,
)

__all__ = ["Delivery"]

log = logging.getLogger(__name__)

_ACK = b"+ACK"
_NAK = b"-NAK"
_WPI = b"+WPI"
_TERM = b"+TERM"


class Delivery:
    """A JetStream message on loan to a worker until it is acked, nak'ed or terminated.

    Settling publishes on the ack subject without waiting for the server: replies go out
    first, acks right after, both pipelined on the one connection.
    """

    __slots__ = (
        "_msg", "_nc", "deadline_ms", "job", "job_item", "num_delivered", "num_pending", "priority",
        "reply_inbox", "reply_to", "request_id", "route", "span", "stored_ns", "stream_seq",
    )  # fmt: skip

    def __init__(self, nc: NatsClient, msg: Msg, priority: str) -> None:
        self._nc = nc
        self._msg = msg
        self.priority = priority
        headers = msg.headers or {}
        # Subjects a client chose: one nobody can publish to is as good as none (else the publish
        # raises in the middle of a batch).
        self.reply_to: str | None = _subject(headers.get(HDR_REPLY))
        self.reply_inbox: str | None = _subject(headers.get(HDR_REPLY_INBOX))
        # A pipeline stage's message id is "<request id>~<stage subject>": the request's own id comes first.
        msg_id = headers.get(HDR_MSG_ID)
        self.request_id: str | None = msg_id.partition("~")[0] if msg_id else None
        self.route: str | None = headers.get(HDR_ROUTE)  # later pipeline stages, if any
        self.job: str | None = headers.get(HDR_JOB)  # set on the items of a batch job
        self.job_item: str | None = headers.get(HDR_JOB_ITEM)
        self.span: Any = None  # the worker's trace span for this request, when tracing is on
        self.deadline_ms: int | None = _deadline(headers.get(HDR_DEADLINE))
        # num_pending: messages left in the consumer after this one, as the server saw it.
        # stream_seq: where the stream stores this message (0 if unknown), unique per message.
        self.num_delivered, self.stream_seq, self.stored_ns, self.num_pending = _ack_metadata(msg.reply or "")

    @property
    def data(self) -> bytes:
        return self._msg.data

    @property
    def subject(self) -> str:
        return self._msg.subject

    @property
    def headers(self) -> dict[str, str]:
        return self._msg.headers or {}

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
        if self._msg.reply and not self._nc.is_closed:
            await self._nc.publish(self._msg.reply, verb)


def _subject(raw: str | None) -> str | None:
    return raw if raw and is_reply_subject(raw) else None


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
