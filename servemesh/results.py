"""Replies read from a subject of one's choosing: the other half of fire-and-forget requests.

Delivery is at least once (a worker that stalls past its ack wait has the request redelivered and
computed again, and its late reply arrives too), so replies are de-duplicated by request id here,
as ``MeshClient.infer`` does for its own: each request's result is yielded once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from types import TracebackType

from nats.aio.subscription import Subscription

from broker.claims import Claims
from broker.connection import Connection
from schemas.envelope import Reply, claim_of, decode_reply
from schemas.errors import MeshError
from schemas.subjects import HDR_REQUEST_ID

__all__ = ["Result", "Results"]

# Request ids remembered, to drop a late duplicate: far more than a subscriber has in flight.
REMEMBERED = 65_536


@dataclass(frozen=True, slots=True)
class Result:
    request_id: str | None
    reply: Reply | None = None
    error: MeshError | None = None


class Results:
    """Each reply published to a subject, decoded, once per request id; errors come as values, never
    raised. Subscribed from the moment :meth:`open` returns, so nothing published after is missed."""

    def __init__(self, conn: Connection, sub: Subscription) -> None:
        self._sub = sub
        self._messages = sub.messages
        self._claims = Claims(conn)
        self._seen: set[str] = set()
        self._order: deque[str] = deque()
        self.duplicates = 0  # replies dropped because their request's result was already yielded

    @classmethod
    async def open(cls, conn: Connection, subject: str) -> Results:
        sub = await conn.nc.subscribe(subject)
        await conn.nc.flush()  # the server has the subscription before anything is published
        return cls(conn, sub)

    def __aiter__(self) -> Results:
        return self

    async def __anext__(self) -> Result:
        while True:
            msg = await self._messages.__anext__()  # StopAsyncIteration once closed
            request_id = (msg.headers or {}).get(HDR_REQUEST_ID)
            if request_id is not None:
                if request_id in self._seen:
                    self.duplicates += 1
                    continue
                self._remember(request_id)
            try:
                data = msg.data
                if claim_of(data) is not None:  # a large reply, handed over through the object store
                    data = await self._claims.resolve(data, take=True)
                return Result(request_id, reply=decode_reply(data))
            except MeshError as err:
                return Result(request_id, error=err)

    def _remember(self, request_id: str) -> None:
        self._seen.add(request_id)
        self._order.append(request_id)
        if len(self._order) > REMEMBERED:
            self._seen.discard(self._order.popleft())

    async def aclose(self) -> None:
        await self._sub.unsubscribe()

    async def __aenter__(self) -> Results:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
