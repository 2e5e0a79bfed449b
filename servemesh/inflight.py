"""Requests a client has in flight: each waits for its reply by id, is published again while the
stream has not acknowledged it (a lost publish, a stream between leaders, a reconnect), and
fails at its deadline with what went wrong."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import logging
import math
from collections.abc import Coroutine
from typing import Any

from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from broker.connection import OUT_OF_STORAGE, Connection, pub_ack_error
from broker.loop import TaskSet
from schemas.errors import DeadlineExceeded, MeshError, MeshUnavailable
from schemas.subjects import HDR_MSG_ID, ReplyKind, inbox_subject

__all__ = ["InFlight", "Pending"]

log = logging.getLogger(__name__)

# A request the stream has not acknowledged is published again after these delays (then every
# last one) until its deadline: a publish can be lost with a node, or meet a stream between
# leaders. The request id makes the stream drop any copy it already stored.
_REPUBLISH_S = (0.25, 0.5, 1.0, 2.0)
# After a reconnect, how often to ask again whether the stream still holds a request.
_RECHECK_S = 1.0


class Pending:
    __slots__ = ("ack", "bundle", "deadline", "future", "headers", "payload", "publishes", "queued", "refused",
                 "subject", "timeout")  # fmt: skip

    def __init__(
        self, future: asyncio.Future[bytes], subject: str, timeout: float, payload: bytes, headers: dict[str, str],
        deadline: float,
    ) -> None:  # fmt: skip
        self.future = future
        self.subject = subject
        self.timeout = timeout
        self.payload = payload  # kept until the stream acknowledges it, to publish again after a reconnect
        self.headers = headers
        self.queued = False
        self.ack = b""  # the stream's acknowledgement: where the request is stored
        self.publishes = 1
        self.refused: MeshError | None = None  # the stream's latest refusal, if it was unavailable
        self.deadline = deadline  # in the loop's time
        self.bundle: str | None = None  # the key of the bundle it was published in, if any


class InFlight:
    """Pending requests by id. Acks come to ``<inbox>.a.<id>``; replies are handed to :meth:`resolve`.

    No timer per request (two timers cost a request ~4 µs to arm and cancel): deadlines wait in a heap
    under one timer set for the earliest, and requests not yet acknowledged are looked over by one timer
    every ``_REPUBLISH_S[0]`` while there are any. An answered request's deadline stays in the heap until
    it comes up or the heap is rebuilt from the requests still pending.
    """

    def __init__(self, conn: Connection, inbox: str) -> None:
        self._conn, self._inbox = conn, inbox
        self._pending: dict[str, Pending] = {}
        # Bundles published (one stream message, one acknowledgement): their requests, and how many are open.
        self._bundles: dict[str, tuple[list[str], list[int]]] = {}
        self._again = itertools.count()
        self._background = TaskSet()
        self._deadlines: list[tuple[float, str]] = []  # heap of (deadline, request id)
        self._expiry: asyncio.TimerHandle | None = None
        self._expiry_at = math.inf
        self._unacked: dict[str, float] = {}  # request id -> when to publish it again
        self._sweep: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def open(
        self, request_id: str, subject: str, payload: bytes, headers: dict[str, str], timeout: float, remaining: float
    ) -> Pending:
        """Track a request about to be published; it expires ``remaining`` seconds from now."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = now + max(0.0, remaining)
        pending = Pending(loop.create_future(), subject, timeout, payload, headers, deadline)
        self._pending[request_id] = pending
        heapq.heappush(self._deadlines, (deadline, request_id))
        if deadline < self._expiry_at:
            self._arm_expiry(loop, deadline)
        self._unacked[request_id] = now + _REPUBLISH_S[0]
        if self._sweep is None:
            self._sweep = loop.call_later(_REPUBLISH_S[0], self._republish_due)
        return pending

    def close(self, request_id: str) -> None:
        pending = self._pending.pop(request_id)
        if pending.bundle is not None:
            _, still_open = self._bundles[pending.bundle]
            still_open[0] -= 1
            if not still_open[0]:
                del self._bundles[pending.bundle]
        self._unacked.pop(request_id, None)
        if len(self._deadlines) > 2 * len(self._pending) + 1024:  # mostly answered requests: keep the live ones
            self._deadlines = [(p.deadline, rid) for rid, p in self._pending.items()]
            heapq.heapify(self._deadlines)

    def resolve(self, request_id: str, data: bytes) -> None:
        pending = self._pending.get(request_id)
        if pending is not None and not pending.future.done():  # else late or duplicate (at-least-once)
            pending.future.set_result(data)

    def bundle(self, key: str, request_ids: list[str]) -> None:
        """``request_ids`` are published as one bundle, acknowledged on ``<inbox>.a.<key>``."""
        self._bundles[key] = (request_ids, [len(request_ids)])
        for request_id in request_ids:
            self._pending[request_id].bundle = key

    def is_open(self, request_id: str) -> bool:
        """Whether the request still waits for its reply (its caller may have given up meanwhile)."""
        pending = self._pending.get(request_id)
        return pending is not None and not pending.future.done()

    def reject(self, request_id: str, error: MeshError) -> None:
        """The request could not be published at all."""
        pending = self._pending.get(request_id)
        if pending is not None and not pending.future.done():
            pending.future.set_exception(error)

    def on_ack(self, request_id: str, msg: Msg) -> None:
        bundle = self._bundles.get(request_id)
        if bundle is None:
            self._ack(request_id, msg)
        elif pub_ack_error(msg) is None:  # a bundle's acknowledgement holds for each of its requests
            for member in bundle[0]:
                self._stored(member, msg.data)
        else:  # each is failed with an error of its own
            for member in bundle[0]:
                self._ack(member, msg)

    def _stored(self, request_id: str, ack: bytes) -> None:
        pending = self._pending.get(request_id)
        if pending is not None and not pending.future.done():
            pending.queued = True
            pending.ack = ack
            self._unacked.pop(request_id, None)

    def _ack(self, request_id: str, msg: Msg) -> None:
        pending = self._pending.get(request_id)
        if pending is None or pending.future.done():
            return
        error = pub_ack_error(msg, pending.subject)
        if error is None:
            self._stored(request_id, msg.data)
        elif isinstance(error, MeshUnavailable) and error.data.get("err_code") != OUT_OF_STORAGE:
            pending.refused = error  # e.g. no stream leader during an election: publishing again may work
        else:
            pending.future.set_exception(error)  # a full queue (429) is answered at once: load shedding

    def fail(self, error: MeshError, subject: str | None = None) -> None:
        """Fail the requests not yet queued (on ``subject``, in any case; or all) with ``error``."""
        for pending in self._pending.values():
            if pending.future.done() or pending.queued:
                continue
            if subject is None or pending.subject.lower() == subject.lower():
                pending.future.set_exception(error)

    def cancel_all(self) -> None:
        """The client is closing: every caller still waiting is cancelled, and no timer is left behind."""
        for pending in self._pending.values():
            pending.future.cancel()
        for timer in (self._expiry, self._sweep):
            if timer is not None:
                timer.cancel()
        self._expiry, self._expiry_at, self._sweep = None, math.inf, None
        self._deadlines.clear()
        self._unacked.clear()

    def _arm_expiry(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry, self._expiry_at = loop.call_at(when, self._expire_due), when

    def _expire_due(self) -> None:
        """Fail every request whose deadline has come, then wait for the next one still pending."""
        self._expiry, self._expiry_at = None, math.inf
        loop = asyncio.get_running_loop()
        now, deadlines = loop.time(), self._deadlines
        while deadlines and (deadlines[0][0] <= now or deadlines[0][1] not in self._pending):
            _, request_id = heapq.heappop(deadlines)
            self._expire(request_id)
        if deadlines:
            self._arm_expiry(loop, deadlines[0][0])

    def _expire(self, request_id: str) -> None:
        pending = self._pending.get(request_id)
        if pending is not None and not pending.future.done():
            if pending.refused is not None and not pending.queued:
                pending.future.set_exception(pending.refused)  # unavailable until the end: say so
                return
            what = "no reply" if pending.queued else "the stream did not acknowledge the request"
            pending.future.set_exception(
                DeadlineExceeded(f"{pending.subject}: {what} within {pending.timeout:.3g}s", request_id=request_id)
            )

    def _republish_due(self) -> None:
        """Publish again each request whose time has come that the stream has not acknowledged yet."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for request_id, when in list(self._unacked.items()):
            if when <= now:
                self._republish(request_id, now)
        self._sweep = loop.call_later(_REPUBLISH_S[0], self._republish_due) if self._unacked else None

    def _republish(self, request_id: str, now: float) -> None:
        pending = self._pending.get(request_id)
        if pending is None or pending.future.done() or pending.queued:
            self._unacked.pop(request_id, None)
            return
        self._spawn(self._publish(request_id, pending))
        delay = _REPUBLISH_S[min(pending.publishes, len(_REPUBLISH_S) - 1)]
        pending.publishes += 1
        self._unacked[request_id] = now + delay

    async def _publish(self, request_id: str, pending: Pending, headers: dict[str, str] | None = None) -> None:
        try:
            ack_to, headers = inbox_subject(self._inbox, ReplyKind.ACK, request_id), headers or pending.headers
            await self._conn.nc.publish(pending.subject, pending.payload, reply=ack_to, headers=headers)
        except Exception as exc:  # disconnected: the next attempt, or the reconnect, publishes it
            log.debug("could not publish %s again: %s", request_id, exc)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._background.spawn(coro)

    async def after_reconnect(self) -> None:
        self._spawn(self._recover())

    async def _recover(self) -> None:
        """Requests in flight across a reconnect: a publish written just before the connection
        broke may never have reached the stream, and a reply sent while we were away is gone. The
        first are published again under the same id (the stream drops a copy it already stored);
        the second, once the stream no longer holds them, are queued again under a new id (the
        reply still comes to the same request id; a late original is ignored as a duplicate).
        Where the stream cannot tell yet (a cluster electing a leader), it is asked again."""
        unsure = list(self._pending)
        while unsure:
            live = [(rid, p) for rid in unsure if (p := self._pending.get(rid)) is not None and not p.future.done()]
            held = await asyncio.gather(*(self._still_queued(p) for _, p in live))
            unsure = []
            for (request_id, pending), still in zip(live, held, strict=True):
                if still is None:
                    unsure.append(request_id)
                elif not still:
                    headers = pending.headers
                    if pending.queued:
                        headers = {**headers, HDR_MSG_ID: f"{request_id}~again{next(self._again)}"}
                    await self._publish(request_id, pending, headers)
            if unsure:
                await asyncio.sleep(_RECHECK_S)

    async def _still_queued(self, pending: Pending) -> bool | None:
        """Whether the stream still holds the request (waiting, or taken but not yet acked);
        None when it cannot tell now. A request it never acknowledged it does not hold."""
        if not pending.queued:
            return False
        try:
            ack = json.loads(pending.ack)
            await asyncio.wait_for(self._conn.js.get_msg(ack["stream"], seq=int(ack["seq"])), _RECHECK_S)
        except NotFoundError:
            return False
        except Exception as exc:  # no leader yet, or no right to read the stream: ask again later
            log.debug("cannot tell yet whether a request is still queued: %s", exc)
            return None
        return True
