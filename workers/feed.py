"""How a model server gets its requests: a :class:`Feed` per priority, opened by a :class:`FeedSource`.
On JetStream, :class:`PullFeed`: a continuous, credit-bounded pull from one durable consumer.

The feed keeps about ``window`` requests either asked for or held (received, not yet released
by the worker), so a busy replica leaves the rest of the queue to its peers. A message may be a
bundle of requests (a client's coalesced publishes): its requests are handed on one by one, and
pulls ask for as many messages as should carry the room left, at the bundle sizes seen lately. Pull
requests long-poll and expire; the server's 408 status tells how many of a request were never
delivered, which keeps the count of outstanding credit exact without a round trip per pull.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from broker.connection import Connection
from broker.loop import TaskSet
from broker.provision import ensure_consumer
from schemas.errors import BadInput, MeshError
from schemas.spec import ModelSpec
from schemas.subjects import MAX_BUNDLE, STREAM_INFER, bundle_limit
from workers.delivery import Delivery, settle_failed

__all__ = ["Feed", "FeedHandlers", "FeedSource", "JetStreamFeeds", "PullFeed", "feed_handlers"]

log = logging.getLogger(__name__)

_PENDING_HDR = "Nats-Pending-Messages"
_ACK_PREFIX = "$JS.ACK."
# Statuses that mean the consumer itself is gone (deleted, or the stream was rebuilt).
_CONSUMER_GONE = frozenset({"404", "409", "503"})
# Requests of an oversized bundle told why it was refused, at most.
_MAX_REFUSALS = 256
_SMOOTHING = 0.1  # weight of the latest message in the running mean of requests per message


class Feed(Protocol):
    """Requests of one model version and priority, handed to ``FeedHandlers.on_delivery`` one at a
    time, at most ``window`` held at once: each delivery's settling releases its credit."""

    priority: str
    upstream: int  # requests left upstream, as the latest delivery told
    per_message: float  # requests per message delivered lately (bundles carry several)
    released_at: float  # monotonic time a delivery was last settled

    async def release(self, count: int = 1) -> None: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True)
class FeedHandlers:
    """What a model server gives each of its feeds."""

    on_delivery: Callable[[Delivery], Awaitable[None]]
    on_error: Callable[[Delivery, MeshError], Awaitable[None]]  # answers a delivery that failed
    on_gone: Callable[[Feed], None]  # told when the feed's source no longer exists
    window: int
    bundle_limit: int


class FeedSource(Protocol):
    """Where a model server's feeds come from (JetStream, or a test's own)."""

    async def open(self, spec: ModelSpec, version: str, priority: str, handlers: FeedHandlers) -> Feed:
        """A started feed."""
        ...

    async def remake(self, spec: ModelSpec, version: str, priority: str) -> None:
        """Make what the feed reads from again (told ``on_gone``); its feed finds it by itself."""
        ...


class JetStreamFeeds:
    """Feeds on the inference stream: a durable pull consumer per model version and priority."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    async def open(self, spec: ModelSpec, version: str, priority: str, handlers: FeedHandlers) -> Feed:
        name = await self._consumer(spec, version, priority)
        feed = PullFeed(
            self._conn, STREAM_INFER, name, priority, handlers.on_delivery, handlers.window,
            on_error=handlers.on_error, bundle_limit=handlers.bundle_limit, on_gone=handlers.on_gone,
        )  # fmt: skip
        await feed.start()
        return feed

    async def remake(self, spec: ModelSpec, version: str, priority: str) -> None:
        await asyncio.wait_for(self._consumer(spec, version, priority), 5.0)

    async def _consumer(self, spec: ModelSpec, version: str, priority: str) -> str:
        return await ensure_consumer(self._conn.js, spec.name, version, priority, ack_wait_s=spec.ack_wait_s,
                                     max_attempts=spec.max_attempts)  # fmt: skip


def feed_handlers(
    spec: ModelSpec,
    on_delivery: Callable[[Delivery], Awaitable[None]],
    on_error: Callable[[Delivery, MeshError], Awaitable[None]],
    on_gone: Callable[[Feed], None],
) -> FeedHandlers:
    # Room for the batch being computed and the next one forming, and no more.
    window = 2 * max(1, spec.max_batch_size)
    return FeedHandlers(on_delivery, on_error, on_gone, window, bundle_limit(spec.max_batch_size))


class PullFeed:
    def __init__(
        self,
        conn: Connection,
        stream: str,
        consumer: str,
        priority: str,
        on_delivery: Callable[[Delivery], Awaitable[None]],
        window: int,
        expires_s: float = 2.0,
        *,
        on_error: Callable[[Delivery, MeshError], Awaitable[None]] | None = None,
        bundle_limit: int = MAX_BUNDLE,
        on_gone: Callable[[Feed], None] | None = None,
    ) -> None:
        self._conn = conn
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.consumer = consumer
        self.priority = priority
        self._on_delivery = on_delivery
        self._on_error = on_error  # answers a delivery that failed (else it is only settled)
        self._on_gone = on_gone  # told when the consumer no longer exists
        self.bundle_limit = bundle_limit
        self.window = max(1, window)
        self._expires_ns = int(expires_s * 1e9)
        self._expires_s = expires_s
        self.outstanding = 0  # asked for, not yet delivered or expired
        self.held = 0  # delivered, not yet released
        self.upstream = 0  # requests left in the stream as the latest delivery (or expired pull) told
        self.released_at = time.monotonic()  # when a delivery was last settled: this feed's progress
        self._inbox = ""
        self._sub: Subscription | None = None
        self._stopping = False
        self._last_heard = time.monotonic()
        self._watchdog: asyncio.Task[None] | None = None
        self._retry_at = 0.0
        # Requests per message delivered lately (bundles carry several). It starts at the largest a
        # bundle may be (half the window: a batch), so that a first pull cannot overrun the window.
        self._per_message = max(1.0, self.window / 2)
        self._requeues = TaskSet()
        # The same mean for reports (the router turns lag in messages into requests with it): from 1.
        self.per_message = 1.0

    async def start(self) -> None:
        nc = self._conn.nc
        self._inbox = nc.new_inbox()
        self._sub = await nc.subscribe(self._inbox, cb=self._on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1)
        self._conn.on_reconnect.append(self._reset)
        self._watchdog = asyncio.create_task(self._watch(), name=f"feed-watch-{self.consumer}")
        await self._pull()

    async def release(self, count: int = 1) -> None:
        """The worker finished with ``count`` deliveries: room for more."""
        self.held -= count
        self.released_at = time.monotonic()
        await self._pull()

    async def _pull(self) -> None:
        # Messages may carry several requests each (bundles): ask for as many messages as should
        # bring the requests there is room for, at the sizes seen lately.
        per_message = max(1.0, self._per_message)
        want = int((self.window - self.held) / per_message) - self.outstanding
        if not self.held and not self.outstanding:
            want = max(want, 1)
        # Top up in chunks once something is already asked for: fewer, larger pull requests.
        if want <= 0 or self._stopping or (self.outstanding and want < self.window / per_message / 2):
            return
        if time.monotonic() < self._retry_at or self._conn.nc.is_closed:
            return
        self.outstanding += want
        body = json.dumps({"batch": want, "expires": self._expires_ns}).encode()
        try:
            await self._conn.nc.publish(self._next_subject, body, reply=self._inbox)
        except Exception as exc:  # disconnected: the reconnect hook asks again
            self.outstanding -= want
            log.debug("pull on %s failed: %s", self.consumer, exc)

    async def _on_msg(self, msg: Msg) -> None:
        self._last_heard = time.monotonic()
        # A delivery always comes with its ack subject; the server's status messages (timeouts, idle
        # heartbeats) never do. Telling them apart by headers would let a published "Status" header
        # pass a request off as a heartbeat, never to be answered, acked or counted.
        if not (msg.reply or "").startswith(_ACK_PREFIX):
            await self._on_status(msg)
            return
        self.outstanding = max(0, self.outstanding - 1)
        # Held from here until settled: every delivery holding credit is counted, and settling it
        # (whatever path it takes) gives the credit back.
        self.held += 1
        delivery = Delivery(self._conn.nc, msg, self.priority, credit=self)
        self.upstream = delivery.num_pending
        if self._stopping:
            # Asked for before the drain began: hand it straight back to the queue.
            await delivery.nak()
            return
        if delivery.bundled:
            await self._on_bundle(delivery)
            return
        self._per_message += _SMOOTHING * (1 - self._per_message)
        self.per_message += _SMOOTHING * (1 - self.per_message)
        await self._hand_on(delivery)

    async def _hand_on(self, delivery: Delivery) -> None:
        """The worker takes the delivery. Whatever goes wrong there, the delivery is answered and
        settled, so that its credit comes back: no message can stop this feed from pulling."""
        try:
            await self._on_delivery(delivery)
        except Exception as exc:
            log.exception("%s: a delivery failed unexpectedly", self.consumer)
            await settle_failed(delivery, exc, self._on_error)

    async def _on_status(self, msg: Msg) -> None:
        headers = msg.headers or {}
        status = headers.get("Status")
        if status == "100":  # idle heartbeat
            return
        pending = headers.get(_PENDING_HDR)
        if pending is not None and pending.isascii() and pending.isdigit():
            self.outstanding = max(0, self.outstanding - int(pending))
            if status == "408":  # a pull that expired short of its batch: nothing left for us to take
                self.upstream = 0
        else:
            # 404/409/503 without a count: the request is gone as a whole; start afresh, not in a loop.
            log.info("consumer %s answered %s %s", self.consumer, status, headers.get("Description", ""))
            self.outstanding = 0
            self._retry_at = time.monotonic() + 0.5
            if status in _CONSUMER_GONE and self._on_gone is not None:
                self._on_gone(self)
        await self._pull()

    async def _on_bundle(self, delivery: Delivery) -> None:
        """A stream message carrying several requests: each is handed on alone. Redelivered, it is
        split into lone requests queued again, so that each is charged its own attempts."""
        if delivery.num_delivered > 1:
            self._requeues.spawn(delivery.requeue(self._conn.js), name=f"requeue-{self.consumer}")
            await self._pull()
            return
        try:
            members = delivery.unbundle()
            if not members:
                raise BadInput("unreadable request bundle: it holds no request")
        except MeshError as err:  # nobody to answer: its callers time out, nothing else is affected
            log.warning("dropping an unreadable bundle on %s: %s", self.consumer, err.message)
            await delivery.term()
            await self._pull()
            return
        self._per_message += _SMOOTHING * (len(members) - self._per_message)
        self.per_message += _SMOOTHING * (len(members) - self.per_message)
        self.held += len(members) - 1  # the bundle's one unit of credit is now one per request
        if len(members) > self.bundle_limit:
            await self._refuse_bundle(members)
            return
        for member in members:
            await self._hand_on(member)

    async def _refuse_bundle(self, members: list[Delivery]) -> None:
        """A bundle larger than the model's batch (no servemesh client sends one): refused whole, each
        request told so (up to a bound: answering costs, and its sender broke the protocol)."""
        log.warning("refusing a bundle of %d requests on %s (at most %d)", len(members), self.consumer,
                    self.bundle_limit)  # fmt: skip
        error = BadInput(f"a bundle of {len(members)} requests; this model takes at most {self.bundle_limit}")
        for i, member in enumerate(members):
            if i >= _MAX_REFUSALS:
                member.reply_to = None
            await settle_failed(member, error, self._on_error)

    async def _reset(self) -> None:
        # Pull requests do not survive a reconnect.
        self.outstanding = 0
        self._retry_at = 0.0
        await self._pull()

    async def _watch(self) -> None:
        while not self._stopping:
            await asyncio.sleep(0.5)
            silent = time.monotonic() - self._last_heard
            if self.outstanding and silent > self._expires_s + 3.0:
                log.info("pull requests on %s went unanswered; asking again", self.consumer)
                self._last_heard = time.monotonic()
                await self._reset()
            else:
                await self._pull()

    async def stop(self) -> None:
        """Ask for nothing more. Dropping the inbox's interest ends our open pull requests on the
        server; draining the subscription hands back (nak) whatever was already on its way."""
        self._stopping = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._reset in self._conn.on_reconnect:
            self._conn.on_reconnect.remove(self._reset)
        nc = self._conn.nc
        if self._sub is not None and not (nc.is_closed or nc.is_draining):
            try:
                await self._sub.drain()  # type: ignore[no-untyped-call]
            except Exception as exc:  # connection lost meanwhile: the server forgets the pulls anyway
                log.info("draining feed %s: %s", self.consumer, exc)
        await self._requeues.join()  # a redelivered bundle being queued again as lone requests: let it finish
        self.outstanding = 0
