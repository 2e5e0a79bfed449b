"""Settler: answers a computed batch — replies, pipeline forwards, job results — then acks, in a
background task per batch, so the serving loop starts the next batch while this one's answers go out.

Order within a request is kept: its reply, forward or stored result first, its ack after (a job
result that could not be stored is nak'ed, to be computed again). Settling gives its pull credit
back, so a replica never holds more than its window.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from broker.claims import Claims
from broker.connection import Connection
from broker.loop import TaskSet
from schemas.envelope import Timing, encode_error, encode_outputs, encode_request
from schemas.errors import MeshError, ModelFailure
from telemetry import tracing
from workers.delivery import Delivery, settle_all
from workers.replies import ReplySender
from workers.runtimes.base import Tensors
from workers.stats import ServingStats

__all__ = ["Computed", "Request", "Settler"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Request:
    delivery: Delivery
    inputs: Tensors
    rows: int


@dataclass(slots=True)
class Computed:
    """A batch back from the model: one result (outputs or a MeshError) per request."""

    batch: list[Request]
    results: list[Tensors | MeshError]
    started_ns: int  # wall clock when compute began (queue wait ends there)
    compute_ms: float
    span: Any = None  # the batch's trace span, ended once its answers are out
    settled: bool = False  # answered, acked and its credit released


class Settler:
    def __init__(
        self,
        conn: Connection,
        claims: Claims,
        key: str,
        worker_id: str,
        stats: ServingStats,
        fail: Callable[[Delivery, MeshError], Awaitable[None]],
        claims_bucket: str,
        load: Callable[[str], tuple[int, float]] = lambda priority: (0, 0.0),
        settled: Callable[[int], None] = lambda count: None,
    ) -> None:
        self._conn = conn
        self._claims = claims
        self._claims_bucket = claims_bucket  # where a large reply goes: the model's owner's bucket
        self._version = key.rpartition(":")[2]
        self._key = key
        self._worker_id = worker_id
        self._stats = stats
        self._fail = fail
        self._load = load  # priority → (requests waiting ahead, requests/s served when busy): told in replies
        self._settled = settled  # told how many requests each batch answered
        self._tasks = TaskSet()
        self.settling = 0  # requests whose answers are still on their way

    def submit(self, done: Computed) -> None:
        self.settling += len(done.batch)
        self._tasks.spawn(self._guarded(done), name=f"settle-{self._key}")

    async def wait(self) -> None:
        """Until every batch submitted so far is answered and acked (drain)."""
        await self._tasks.join()

    async def _guarded(self, done: Computed) -> None:
        try:
            await self.settle(done)
        except Exception:  # answer every member rather than leave callers waiting
            log.exception("%s: answering a batch of %d failed", self._key, len(done.batch))
            for request in [] if done.settled else done.batch:
                await self._fail(request.delivery, ModelFailure(f"{self._key}: internal error"))
        finally:
            self.settling -= len(done.batch)

    async def settle(self, done: Computed) -> None:
        batch, stats = done.batch, self._stats
        sender = ReplySender(self._conn)
        loads: dict[str, tuple[int, float]] = {}
        for request, result in zip(batch, done.results, strict=True):
            delivery = request.delivery
            queue_ms = max(0.0, (done.started_ns - delivery.stored_ns) / 1e6) if delivery.stored_ns else 0.0
            load = loads.get(delivery.priority)
            if load is None:
                load = loads[delivery.priority] = self._load(delivery.priority)
            timing = Timing(queue_ms, done.compute_ms, len(batch), self._worker_id, delivery.num_delivered, *load,
                            version=self._version)  # fmt: skip
            stats.queue_s.observe(queue_ms / 1000)
            if isinstance(result, MeshError):
                stats.errors[result.status] += 1
                result.data.setdefault("stage", self._key)
                sender.add(delivery, encode_error(result, timing), ok=False)
            elif delivery.route:
                stats.succeeded += 1
                sender.forward(delivery, encode_request(result), done.span)  # a pipeline: on to the next stage
            else:
                stats.succeeded += 1
                payload = encode_outputs(result, timing)
                # Too large for a message: by claim check (not a job's result, kept longer than claims are).
                if len(payload) > self._claims.threshold and not delivery.job:
                    payload = await self._claims.wrap_reply(payload, timing, self._claims_bucket)
                sender.add(delivery, payload)
        for delivery, err in await sender.send():
            err.data["stage"] = delivery.route[0] if delivery.route else self._key
            await delivery.reply(encode_error(err, Timing(worker=self._worker_id)))
        sent_ns = time.time_ns()
        stats.recent_ms.extend((sent_ns - r.delivery.stored_ns) / 1e6 for r in batch if r.delivery.stored_ns)
        # A job item whose result was not stored is nak'ed: computed again.
        await settle_all((request.delivery for request in batch), nak=sender.unsaved)  # gives the credit back
        done.settled = True
        self._settled(len(batch))
        for request, result in zip(batch, done.results, strict=True):
            if isinstance(result, MeshError):  # an event on the batch's span, which ends once all are out
                tracing.request_failed(done.span, request.delivery.request_id, result)
        tracing.end(done.span)
