"""ModelServer: serves one loaded model version — pulls its subjects, batches, computes, replies.

Each request is checked alone on arrival (deadline, attempts, payload, signature) and answered
with a typed error if it fails; only valid requests join a batch. Replies are published
before acks; a batch that fails in the model is retried member by member, so one bad
request never fails its batch-mates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Container, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from broker.claims import Claims
from broker.connection import Connection
from broker.loop import TaskSet
from broker.provision import max_deliveries
from schemas.envelope import Timing, claim_of, decode_request, encode_error
from schemas.errors import DeadlineExceeded, Forbidden, MeshError, MeshUnavailable, ModelFailure
from schemas.spec import ModelSpec
from schemas.subjects import PRIORITIES, claims_bucket_of, is_claims_bucket
from telemetry import tracing
from workers.attempts import Attempts
from workers.batcher import BatchQueue
from workers.delivery import Delivery, settle_all, settle_failed
from workers.feed import Feed, FeedSource, JetStreamFeeds, feed_handlers
from workers.jobs import JobBook
from workers.replies import ReplySender
from workers.runtimes.base import Runtime, Tensors
from workers.settle import Computed, Settler
from workers.settle import Request as _Request
from workers.signature import Signature
from workers.stats import ServingStats
from workers.tenancy import Tenancy

__all__ = ["ModelServer"]

log = logging.getLogger(__name__)

# A batch expected to compute faster than this runs on the event loop: handing it to a thread
# and back would cost more than the computation (tiny models, pre/post-processing stages).
INLINE_BUDGET_S = 0.0002

_RANK: dict[str, int] = {p: i for i, p in enumerate(PRIORITIES)}
# The longest a request may wait on the server (a claimed payload, a job's state, a stage's owner)
# before it joins a batch: past it, it is answered 503 rather than held.
_ADMIT_TIMEOUT_S = 10.0
# The service rate told to clients is measured over answers spanning at least this long.
_RATE_WINDOW_S = 0.25


class ModelServer:
    def __init__(
        self,
        conn: Connection,
        spec: ModelSpec,
        version: str,
        runtime: Runtime,
        worker_id: str,
        priorities: Iterable[str] | None = None,
        jobs: JobBook | None = None,
        tenancy: Tenancy | None = None,
        feeds: FeedSource | None = None,
        cancels: Container[str] = frozenset(),
    ) -> None:
        """``feeds``: where requests come from (default: the inference stream's consumers);
        ``cancels``: ids of requests their callers gave up on (workers/cancels.py)."""
        self._cancels = cancels
        self._conn = conn
        self._source = feeds or JetStreamFeeds(conn)
        self._claims = Claims(conn)
        self._jobs = jobs
        self.priorities = [p for p in PRIORITIES if p in set(priorities or spec.priorities)]
        self.spec = spec
        self.version = version
        self.runtime = runtime
        self.signature = Signature.of(spec, runtime)
        self.worker_id = worker_id
        self.stats = ServingStats()
        max_rows = spec.max_batch_size if self.signature.batched else 1
        self._queue: BatchQueue[_Request] = BatchQueue(max_rows, spec.max_delay_ms / 1000.0, levels=len(PRIORITIES))
        self._feeds: dict[str, Feed] = {}
        self._retired: dict[str, Feed] = {}  # stopped feeds whose requests may still be in flight
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=spec.instances, thread_name_prefix=f"model-{spec.name}")
        self._batches = TaskSet()  # batches computing, beside the serving loop's own
        self._loop_task: asyncio.Task[None] | None = None
        self._draining = False
        # Seconds per row, smoothed: tells whether a batch is cheap enough to run on the loop.
        self._row_cost_s: float | None = None
        # Per priority: requests still waiting in the stream when our latest delivery left it.
        self._upstream: dict[str, int] = {}
        self.last_used = 0.0  # wall-clock time of the latest request
        self.load_ms = 0.0  # artifact to serving: load, warm up, subscribe
        self._computing = 0  # requests
        self._computing_batches = 0
        self._attempts = Attempts(None)  # opened in start()
        self._claims_bucket = claims_bucket_of(spec.tenant)
        self._tenancy = tenancy or Tenancy(None)
        self._admitting = TaskSet()  # requests waiting on the server before they queue
        self._progress_at = time.monotonic()  # last seen with nothing waiting (see stalled)
        self._remade_at: dict[str, float] = {}  # per priority, when its consumer was last made again
        self._upkeep = TaskSet()
        # Requests per second this replica answers while it has a backlog (0: not measured yet), and
        # what it is measured from: requests and seconds between answers while work was waiting.
        self.rate = 0.0
        self._rate_window = [0, 0.0]
        self._last_settle: float | None = None
        self._was_backlogged = False
        self._settler = Settler(conn, self._claims, self.key, worker_id, self.stats, self._fail, self._claims_bucket,
                                self.load, self._on_settled)  # fmt: skip

    @property
    def key(self) -> str:
        return f"{self.spec.name}:{self.version}"

    async def start(self) -> None:
        self._attempts = await Attempts.open(self._conn)
        await asyncio.get_running_loop().run_in_executor(self._executor, self._warm_up)
        self._loop_task = asyncio.create_task(self._serve(), name=f"serve-{self.key}")
        for priority in self.priorities:
            await self._open_feed(priority)
        log.info("serving %s (batch ≤ %d, priorities %s)", self.key, self._queue.max_rows, ",".join(self._feeds))

    async def _open_feed(self, priority: str) -> None:
        handlers = feed_handlers(self.spec, self._on_delivery, self._fail, self._consumer_gone)
        self._feeds[priority] = await self._source.open(self.spec, self.version, priority, handlers)
        self._retired.pop(priority, None)

    def _consumer_gone(self, feed: Feed) -> None:
        """The server says the feed's consumer is missing (deleted, or its stream rebuilt): make it again,
        at most once a second; the feed goes on pulling meanwhile and finds it once it exists."""
        now = time.monotonic()
        if self._draining or now - self._remade_at.get(feed.priority, 0.0) < 1.0:
            return
        self._remade_at[feed.priority] = now
        self._upkeep.spawn(self._remake_consumer(feed.priority), name=f"consumer-{self.key}")

    async def _remake_consumer(self, priority: str) -> None:
        try:
            await self._source.remake(self.spec, self.version, priority)
            log.info("%s: made the consumer of priority %s again", self.key, priority)
        except Exception as exc:  # the stream may be missing too: asked again on the next refusal
            log.warning("%s: cannot make the consumer of priority %s yet: %s", self.key, priority, exc)

    async def set_priorities(self, priorities: Iterable[str]) -> None:
        """Serve another set of this version's priorities: open new feeds, stop dropped ones."""
        wanted = [p for p in PRIORITIES if p in set(priorities)]
        for priority in [p for p in self._feeds if p not in wanted]:
            feed = self._feeds.pop(priority)
            self._retired[priority] = feed
            await feed.stop()
        for priority in [p for p in wanted if p not in self._feeds]:
            await self._open_feed(priority)
        self.priorities = wanted
        log.info("%s now serves priorities %s", self.key, ",".join(wanted))

    def _feed(self, priority: str) -> Feed:
        return self._feeds.get(priority) or self._retired[priority]

    @property
    def computing_batches(self) -> int:
        """Batches in the model right now (at most the model's instances)."""
        return self._computing_batches

    @property
    def in_flight(self) -> int:
        """Requests this replica holds: queued here, computing, or being answered."""
        return len(self._queue) + len(self._admitting) + self._computing + self._settler.settling

    def _warm_up(self) -> None:
        """One tiny prediction before subscribing, so the first real request does not pay for lazy init."""
        sample = {}
        for t in self.signature.inputs:
            shape = ((1,) if self.signature.batched else ()) + tuple(max(d, 1) for d in t.shape)
            if t.dtype in ("str", "bytes"):
                sample[t.name] = np.full(shape, "" if t.dtype == "str" else b"", dtype=object)
            else:
                sample[t.name] = np.zeros(shape, dtype=t.dtype)
        start = time.perf_counter()
        try:
            self.runtime.predict(sample)
            self._learn_cost(time.perf_counter() - start, 1)
        except Exception as exc:  # zeros may be invalid for some models; serving can still work
            log.warning("%s: warm-up prediction failed: %s", self.key, exc)

    async def _on_delivery(self, delivery: Delivery) -> None:
        """A request arrives (in its feed's callback: nothing here may wait on the server). It is
        answered at once if it cannot be served; one that needs the server first (a claimed payload,
        a pipeline's owner, a job's state) is admitted in a task of its own; the rest join the batch."""
        if tracing.enabled():
            delivery.span = tracing.remote(delivery.headers)  # linked from its batch's process span
        self._upstream[delivery.priority] = delivery.num_pending
        self.last_used = time.time()
        if delivery.request_id in self._cancels:
            await self._drop_cancelled([delivery])
            return
        refusal = self._refusal(delivery)
        if refusal is not None:
            await self._fail(delivery, refusal)
            return
        if delivery.deadline_ms is not None and delivery.deadline_ms <= self.last_used * 1000:
            await self._expire(delivery)
            return
        if delivery.route or delivery.job or claim_of(delivery.data) is not None:
            self._admitting.spawn(self._admit(delivery), name=f"admit-{self.key}")
            return
        await self._enqueue(delivery, delivery.data)

    def _refusal(self, delivery: Delivery) -> MeshError | None:
        """Why ``delivery`` is answered without being computed, if it is: a header that cannot be
        used, too many deliveries, or a claims bucket that is not its model's owner's."""
        if delivery.invalid is not None:
            return delivery.invalid
        if delivery.num_delivered > max_deliveries(self.spec.max_attempts):
            return self._gave_up()
        if delivery.claim_bucket is not None and delivery.claim_bucket != self._claims_bucket:
            return Forbidden(f"{self.key} moves large payloads through {self._claims_bucket} only")
        return None

    async def _admit(self, delivery: Delivery) -> None:
        """Admit a request that needs the server first, each wait bounded by its deadline (and by
        ``_ADMIT_TIMEOUT_S``): a server that stops answering fails it, never holds it."""
        try:
            remaining = _ADMIT_TIMEOUT_S
            if delivery.deadline_ms is not None:
                remaining = min(remaining, max(0.0, delivery.deadline_ms / 1000 - time.time()))
            data = await asyncio.wait_for(self._prepare(delivery), remaining)
        except TimeoutError:
            if delivery.deadline_ms is not None and delivery.deadline_ms <= time.time() * 1000:
                await self._expire(delivery)
            else:
                await self._fail(delivery, MeshUnavailable(f"{self.key}: NATS did not answer in time"))
            return
        except MeshError as err:
            await self._fail(delivery, err)
            return
        except Exception as exc:
            log.exception("%s: admitting a request failed unexpectedly", self.key)
            await settle_failed(delivery, exc, self._fail)
            return
        if data is not None:
            await self._enqueue(delivery, data)

    async def _prepare(self, delivery: Delivery) -> bytes | None:
        """The request's payload, once what it names is checked; None if it was settled meanwhile."""
        if delivery.job and self._jobs is not None and await self._jobs.cancelled(delivery.job):
            await delivery.ack()  # a cancelled job's item: dropped, not computed
            return None
        if delivery.route:
            await self._tenancy.check_route(self.spec.tenant, delivery.route)
        data = delivery.data
        claim = claim_of(data)
        if claim is not None:  # a claim check: the payload is fetched first, from the owner's bucket only
            if is_claims_bucket(claim.bucket) and claim.bucket != self._claims_bucket:
                raise Forbidden(f"{self.key} reads claimed payloads from {self._claims_bucket} only")
            data = await self._claims.resolve(data)
        return data

    async def _enqueue(self, delivery: Delivery, data: bytes) -> None:
        """Decode and check the request against the model, then queue it for a batch; a request
        that does not fit is answered alone."""
        try:
            inputs = decode_request(data)
            rows = self.signature.validate(inputs)
        except MeshError as err:
            await self._fail(delivery, err)
            return
        deadline = None
        if delivery.deadline_ms is not None:
            remaining = (delivery.deadline_ms - time.time() * 1000) / 1000.0
            # What waits here before it would be computed: served too late, its answer helps nobody
            # and the compute is taken from requests that can still make it.
            if self.rate and remaining < (len(self._queue) + self._computing + rows) / self.rate:
                await self._expire(delivery, "would not be served before its deadline; not computed")
                return
            deadline = time.monotonic() + remaining
        # A redelivered request may be the one that crashed a worker: it is computed alone.
        suspect = delivery.num_delivered > 1
        self._queue.put(_Request(delivery, inputs, rows), rows, _RANK[delivery.priority], time.monotonic(), deadline,
                        alone=suspect)  # fmt: skip
        self._wake.set()

    def _gave_up(self) -> ModelFailure:
        attempts = self.spec.max_attempts
        return ModelFailure(f"{self.key}: gave up after {attempts} attempts", attempts=attempts)

    async def _may_attempt(self, batch: list[_Request]) -> bool:
        """A redelivered request, alone in its batch, is charged an attempt before it is computed;
        once it has had max_attempts it is answered "gave up" instead (False)."""
        delivery = batch[0].delivery
        if len(batch) > 1 or delivery.num_delivered == 1:
            return True
        if await self._attempts.charge(delivery.stream_seq, delivery.num_delivered) <= self.spec.max_attempts:
            return True
        await self._fail(delivery, self._gave_up())
        return False

    async def _serve(self) -> None:
        """Form batches and compute them: one at a time, in this loop; with several instances, each in a task
        of its own, a new batch formed only once an instance is free (so it grows meanwhile)."""
        instances = self.spec.instances
        while True:
            if len(self._batches) >= instances:
                await self._batches.first_done()
                continue
            due = self._queue.due_at(more_coming=any(self._upstream.values()))
            if due is None:
                if self._draining:
                    await self._batches.join()
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            wait = due - time.monotonic()
            if wait > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
                continue
            batch, expired = self._queue.take(time.monotonic())
            for request in expired:
                await self._expire(request.delivery)
            gone = [r.delivery for r in batch if r.delivery.request_id in self._cancels]
            if gone:  # cancelled while the batch formed: they leave it
                batch = [r for r in batch if r.delivery.request_id not in self._cancels]
                await self._drop_cancelled(gone)
            if not batch:
                continue
            if instances == 1 or (len(batch) == 1 and batch[0].delivery.num_delivered > 1):
                # A redelivered request may be the one that crashed a worker: nothing computes beside it,
                # so that if it crashes this one too, no other request's attempt is spent on it.
                await self._batches.join()
                await self._attempt(batch)
            else:
                self._batches.spawn(self._attempt(batch), name=f"batch-{self.key}")

    async def _attempt(self, batch: list[_Request]) -> None:
        try:
            if await self._may_attempt(batch):
                await self._run(batch)
        except Exception:  # never let one batch end the serving loop
            log.exception("%s: batch of %d failed unexpectedly", self.key, len(batch))
            for request in batch:
                await self._fail(request.delivery, ModelFailure(f"{self.key}: internal error"))

    async def _run(self, batch: list[_Request]) -> None:
        """Compute one batch, then hand its answers to the settler and return: the next batch can
        start while this one's replies and acks go out."""
        started_ns = time.time_ns()
        t0 = time.monotonic()
        rows = sum(r.rows for r in batch)
        self._computing += len(batch)
        self._computing_batches += 1
        self.stats.peak_computing = max(self.stats.peak_computing, self._computing_batches)
        batch_span = inference_span = None
        if tracing.enabled():
            requests = [(r.delivery.span or tracing.NO_CONTEXT, r.delivery.request_id,
                         max(0.0, (started_ns - r.delivery.stored_ns) / 1e6) if r.delivery.stored_ns else 0.0)
                        for r in batch]  # fmt: skip
            batch_span = tracing.start_process(self.spec.name, self.version, self.worker_id, requests)
            inference_span = tracing.start_infer(batch_span, self.spec.name, rows)
        try:
            if self._row_cost_s is not None and self._row_cost_s * rows < INLINE_BUDGET_S:
                results = self._compute(batch)
            else:
                keepalive = asyncio.create_task(self._keep_alive(batch))
                try:
                    loop = asyncio.get_running_loop()
                    results = await loop.run_in_executor(self._executor, self._compute, batch)
                finally:
                    keepalive.cancel()
        finally:
            self._computing -= len(batch)
            self._computing_batches -= 1
        compute_ms = (time.monotonic() - t0) * 1000
        tracing.end(inference_span)
        self.stats.busy_s += compute_ms / 1000 / self.spec.instances
        self.stats.compute_s.observe(compute_ms / 1000)
        self.stats.batch_size.observe(len(batch))
        self.stats.batches += 1
        self.stats.rows += rows
        self.stats.max_batch = max(self.stats.max_batch, len(batch))
        self._settler.submit(Computed(batch, results, started_ns, compute_ms, batch_span))

    def _compute(self, batch: list[_Request]) -> list[Tensors | MeshError]:
        """The whole batch at once, else each member alone (usually in the executor thread)."""
        start = time.perf_counter()
        results: list[Tensors | MeshError] | None = None
        if self.signature.batched and len(batch) > 1:
            try:
                results = self._predict_batched(batch)
            except Exception as exc:
                log.warning("%s: batch of %d failed (%s); retrying members singly", self.key, len(batch), exc)
        if results is None:
            results = [self._predict_one(r) for r in batch]
        self._learn_cost(time.perf_counter() - start, sum(r.rows for r in batch))
        return results

    def _learn_cost(self, seconds: float, rows: int) -> None:
        per_row = seconds / max(rows, 1)
        previous = self._row_cost_s
        self._row_cost_s = per_row if previous is None else 0.8 * previous + 0.2 * per_row

    def _predict_batched(self, batch: list[_Request]) -> list[Tensors | MeshError]:
        names = [t.name for t in self.signature.inputs]
        merged = {name: np.concatenate([r.inputs[name] for r in batch]) for name in names}
        outputs = self.runtime.predict(merged)
        total = sum(r.rows for r in batch)
        for name, value in outputs.items():
            if value.ndim == 0 or value.shape[0] != total:
                raise ModelFailure(f"output {name!r} has shape {list(value.shape)} for {total} input rows")
        results: list[Tensors | MeshError] = []
        offset = 0
        for r in batch:
            results.append({name: value[offset : offset + r.rows] for name, value in outputs.items()})
            offset += r.rows
        return results

    def _predict_one(self, request: _Request) -> Tensors | MeshError:
        try:
            return self.runtime.predict(request.inputs)
        except MeshError as err:
            return err
        except Exception as exc:
            return ModelFailure(f"{self.key}: {type(exc).__name__}: {exc}", model=self.spec.name)

    async def _keep_alive(self, batch: list[_Request]) -> None:
        """Long batches tell the server they are still being worked on, so nothing is redelivered."""
        interval = self.spec.ack_wait_s / 3
        while True:
            await asyncio.sleep(interval)
            for request in batch:
                await request.delivery.in_progress()

    async def _drop_cancelled(self, deliveries: list[Delivery]) -> None:
        """Requests whose callers cancelled them: acked, not computed, not answered (no one waits)."""
        self.stats.cancelled += len(deliveries)
        await settle_all(deliveries)

    async def _expire(self, delivery: Delivery, why: str = "deadline passed while queued; not computed") -> None:
        self.stats.expired += 1
        err = DeadlineExceeded(f"{self.key}: {why}")
        tracing.request_failed(None, delivery.request_id, err, delivery.span, delivery.subject, self.worker_id)
        await self._answer_error(delivery, err, Timing(worker=self.worker_id))

    async def _fail(self, delivery: Delivery, err: MeshError) -> None:
        self.stats.errors[err.status] += 1
        err.data.setdefault("stage", self.key)
        log.debug("%s: request failed with %d: %s", self.key, err.status, err.message,
                  extra={"request_id": delivery.request_id, "status": err.status})  # fmt: skip
        tracing.request_failed(None, delivery.request_id, err, delivery.span, delivery.subject, self.worker_id)
        await self._answer_error(delivery, err, Timing(worker=self.worker_id, attempt=delivery.num_delivered))

    async def _answer_error(self, delivery: Delivery, err: MeshError, timing: Timing) -> None:
        """Reply (or, for a job item, store) the error, then settle the request."""
        sender = ReplySender(self._conn)
        sender.add(delivery, encode_error(err, timing), ok=False)
        await sender.send()
        await (delivery.nak() if sender.unsaved else delivery.ack())  # gives its pull credit back

    async def drain(self) -> None:
        """Stop pulling, finish what was already taken, then free the runtime."""
        self._draining = True
        await asyncio.gather(*(feed.stop() for feed in self._feeds.values()))
        self._retired.update(self._feeds)
        self._feeds.clear()
        await self._admitting.join()  # each bounded by _ADMIT_TIMEOUT_S
        self._wake.set()
        if self._loop_task is not None:
            await self._loop_task
        await self._settler.wait()
        self._executor.shutdown(wait=True)
        self.runtime.close()
        log.info("drained %s", self.key)

    def load(self, priority: str) -> tuple[int, float]:
        """(requests waiting ahead of a new request at ``priority``, requests/s served when busy): what
        replies tell clients, so that they refuse at once a request that could not be served in time.
        Ahead: what this replica holds, and what waits in the stream at this priority and above."""
        rank = _RANK[priority]
        ahead = float(self.in_flight)
        for p, feed in self._feeds.items():
            if _RANK[p] <= rank:
                ahead += feed.upstream * feed.per_message
        return int(ahead), round(self.rate, 1)

    def _backlogged(self) -> bool:
        return bool(len(self._queue) or self._admitting or self._computing) or any(
            feed.upstream for feed in self._feeds.values()
        )

    def _on_settled(self, count: int) -> None:
        """Measure the rate at which answers go out while work waits (idle gaps say nothing of it)."""
        now = time.monotonic()
        if self._last_settle is not None and self._was_backlogged:
            window = self._rate_window
            window[0] += count
            window[1] += now - self._last_settle
            if window[1] >= _RATE_WINDOW_S:
                sample = window[0] / window[1]
                self.rate = sample if not self.rate else 0.7 * self.rate + 0.3 * sample
                self._rate_window = [0, 0.0]
        self._last_settle = now
        self._was_backlogged = self._backlogged()

    def stalled(self, after_s: float) -> str | None:
        """Why this replica is not serving, if requests wait (held here, or queued in the stream as its
        feeds last heard) and none was answered for ``after_s``; None while it makes progress."""
        now = time.monotonic()
        feeds = list(self._feeds.values())
        queued = sum(feed.upstream for feed in feeds)
        if not (self.in_flight or queued):
            self._progress_at = now
            return None
        since = now - max([self._progress_at, *(feed.released_at for feed in feeds)])
        if since <= after_s:
            return None
        return (f"no request answered for {since:.0f}s while {self.in_flight} are held here "
                f"and {queued} wait in the stream")  # fmt: skip

    def status(self) -> dict[str, Any]:
        # Requests per stream message lately, per priority (clients and jobs send bundles).
        per_message = {p: round(feed.per_message, 2) for p, feed in self._feeds.items()}
        return {"model": self.spec.name, "version": self.version, "priorities": self.priorities,
                "in_flight": self.in_flight, "last_used": self.last_used, "load_ms": round(self.load_ms, 1),
                "per_message": per_message, "stats": self.stats.as_dict()}  # fmt: skip
