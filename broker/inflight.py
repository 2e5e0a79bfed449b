"""Requests a client has in flight: each waits for its reply by id, is published again while the
stream has not acknowledged it (a lost publish, a stream between leaders, a reconnect), and
fails at its deadline with what went wrong."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import Coroutine
from typing import Any

from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from broker.connection import Connection, pub_ack_error
from schemas.errors import DeadlineExceeded, MeshError, MeshUnavailable
from schemas.subjects import HDR_MSG_ID

__all__ = ["InFlight", "Pending"]

log = logging.getLogger(__name__)

# A request the stream has not acknowledged is published again after these delays (then every
# last one) until its deadline: a publish can be lost with a node, or meet a stream between
# leaders. The request id makes the stream drop any copy it already stored.
_REPUBLISH_S = (0.25, 0.5, 1.0, 2.0)
# After a reconnect, how often to ask again whether the stream still holds a request.
_RECHECK_S = 1.0


class Pending:
    __slots__ = ("ack", "bundle", "expiry", "future", "headers", "payload", "publishes", "queued", "refused", "retry",
                 "subject", "timeout")  # fmt: skip

    def __init__(
        self, future: asyncio.Future[bytes], subject: str, timeout: float, payload: bytes, headers: dict[str, str]
    ) -> None:
        self.future = future
        self.subject = subject
        self.timeout = timeout
        self.payload = payload  # kept until the stream acknowledges it, to publish again after a reconnect
        self.headers = headers
        self.queued = False
        self.ack = b""  # the stream's acknowledgement: where the request is stored
        self.publishes = 1
        self.refused: MeshError | None = None  # the stream's latest refusal, if it was unavailable
        self.retry: asyncio.TimerHandle | None = None
        self.expiry: asyncio.TimerHandle | None = None
        self.bundle: str | None = None  # the key of the bundle it was published in, if any


class InFlight:
    """Pending requests by id. Acks come to ``<inbox>.a.<id>``; replies are handed to :meth:`resolve`."""

    def __init__(self, conn: Connection, inbox: str) -> None:
        self._conn, self._inbox = conn, inbox
        self._pending: dict[str, Pending] = {}
        # Bundles published (one stream message, one acknowledgement): their requests, and how many are open.
        self._bundles: dict[str, tuple[list[str], list[int]]] = {}
        self._again = itertools.count()
        self._background: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._pending)

    def open(
        self, request_id: str, subject: str, payload: bytes, headers: dict[str, str], timeout: float, remaining: float
    ) -> Pending:
        """Track a request about to be published; it expires ``remaining`` seconds from now."""
        loop = asyncio.get_running_loop()
        pending = Pending(loop.create_future(), subject, timeout, payload, headers)
        self._pending[request_id] = pending
        pending.expiry = loop.call_later(max(0.0, remaining), self._expire, request_id)
        pending.retry = loop.call_later(_REPUBLISH_S[0], self._republish, request_id)
        return pending

    def close(self, request_id: str) -> None:
        pending = self._pending.pop(request_id)
        if pending.bundle is not None:
            _, still_open = self._bundles[pending.bundle]
            still_open[0] -= 1
            if not still_open[0]:
                del self._bundles[pending.bundle]
        for timer in (pending.expiry, pending.retry):
            if timer is not None:
                timer.cancel()

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
        if bundle is not None:  # a bundle's acknowledgement holds for each of its requests
            for member in bundle[0]:
                self._ack(member, msg)
            return
        self._ack(request_id, msg)

    def _ack(self, request_id: str, msg: Msg) -> None:
        pending = self._pending.get(request_id)
        if pending is None or pending.future.done():
            return
        error = pub_ack_error(msg, pending.subject)
        if error is None:
            pending.queued = True
            pending.ack = msg.data
        elif isinstance(error, MeshUnavailable):
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
        for pending in self._pending.values():
            pending.future.cancel()

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

    def _republish(self, request_id: str) -> None:
        pending = self._pending.get(request_id)
        if pending is None or pending.future.done() or pending.queued:
            return
        self._spawn(self._publish(request_id, pending))
        delay = _REPUBLISH_S[min(pending.publishes, len(_REPUBLISH_S) - 1)]
        pending.publishes += 1
        pending.retry = asyncio.get_running_loop().call_later(delay, self._republish, request_id)

    async def _publish(self, request_id: str, pending: Pending, headers: dict[str, str] | None = None) -> None:
        try:
            ack_to, headers = f"{self._inbox}.a.{request_id}", headers or pending.headers
            await self._conn.nc.publish(pending.subject, pending.payload, reply=ack_to, headers=headers)
        except Exception as exc:  # disconnected: the next attempt, or the reconnect, publishes it
            log.debug("could not publish %s again: %s", request_id, exc)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

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
