"""MeshClient: publish an inference request on JetStream and await its reply.

Every in-flight request shares one reply subscription (``<inbox>.<request id>``); the
publish is acked by the stream, so a caller learns at once whether the request is queued
or rejected (full queue → Overloaded). Replies are matched by id; duplicates are ignored.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from types import TracebackType
from typing import Any

import numpy as np
from nats.aio.msg import Msg
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.nuid import NUID

from broker import tracing
from broker.claims import Claims
from broker.connection import Connection, pub_ack_error, translate_error
from broker.jobs import Job, items_of, start_job
from broker.registry import Registry
from broker.results import Result, results_on
from broker.routes import choose, default_weights, effective_weights, ready_counts
from broker.settings import Settings
from broker.shadow import Shadowing, shadow_config
from schemas.envelope import Reply, claim_of, decode_bundle, decode_reply, encode_request
from schemas.errors import BadInput, DeadlineExceeded, MeshError, MeshUnavailable, NoCapacity, UnknownModel
from schemas.spec import ModelSpec
from schemas.subjects import (
    HDR_DEADLINE,
    HDR_MSG_ID,
    HDR_REPLY,
    HDR_REPLY_INBOX,
    HDR_ROUTE,
    PRIORITIES,
    check_name,
    infer_subject,
)

__all__ = ["MeshClient"]

log = logging.getLogger(__name__)

_SPEC_TTL_S = 2.0
# Room kept for a request's headers (ids, reply subjects, deadline, route, trace context).
_HEADER_ROOM = 4096
# A request the stream has not acknowledged is published again after these delays (then every
# last one) until its deadline: a publish can be lost with a node, or meet a stream between
# leaders. The request id makes the stream drop any copy it already stored.
_REPUBLISH_S = (0.25, 0.5, 1.0, 2.0)
# With a cached plan to fall back on, a registry read may take this long before the cache is used.
_STALE_AFTER_S = 1.0
# After a reconnect, how often to ask again whether the stream still holds a request.
_RECHECK_S = 1.0


_Plan = tuple[tuple[str, dict[str, float]], ...]  # per stage: model, weight of each version


class _Pending:
    __slots__ = ("ack", "future", "headers", "payload", "publishes", "queued", "refused", "retry", "subject", "timeout")

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


class MeshClient:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._registry: Registry | None = None
        self._claims = Claims(conn)
        self._inbox = conn.nc.new_inbox()
        # Request ids: a client-unique prefix and a counter (unique across clients for de-duplication).
        self._id_prefix = NUID().next().decode()
        self._counter = itertools.count()
        self._pending: dict[str, _Pending] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._specs: dict[str, tuple[float, ModelSpec]] = {}
        self._plans: dict[
            tuple[tuple[str, ...], str | None], tuple[float, tuple[tuple[str, dict[str, float]], ...]]
        ] = {}
        self._shadowing = Shadowing(conn, self._inbox, self._claims)

    @classmethod
    async def connect(cls, url: str | None = None, settings: Settings | None = None) -> MeshClient:
        settings = settings or Settings.from_url(url or Settings().nats_url)
        conn = await Connection.open(settings, name="servemesh-client")
        client = cls(conn)
        await conn.nc.subscribe(
            f"{client._inbox}.*.*", cb=client._on_reply, pending_msgs_limit=-1, pending_bytes_limit=-1
        )
        conn.on_reconnect.append(client._after_reconnect)
        return client

    @property
    def settings(self) -> Settings:
        return self._conn.settings

    async def infer(
        self,
        model: str | Sequence[str],
        inputs: dict[str, Any],
        version: str | None = None,
        priority: str = "normal",
        timeout: float = 5.0,
    ) -> dict[str, np.ndarray[Any, Any]]:
        """Run one request; outputs by name, or a typed MeshError."""
        reply = await self.infer_reply(model, inputs, version=version, priority=priority, timeout=timeout)
        return reply.outputs

    async def infer_reply(
        self,
        model: str | Sequence[str],
        inputs: dict[str, Any],
        version: str | None = None,
        priority: str = "normal",
        timeout: float = 5.0,
    ) -> Reply:
        """Like :meth:`infer`, with the worker's timing (queue wait, compute, batch size).

        ``model`` may name a registered pipeline, or list stages (``"name"`` or ``"name:version"``):
        each stage's outputs become the next one's inputs and the last stage answers.
        """
        request_id = self._new_id()
        reply_to = f"{self._inbox}.r.{request_id}"
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            subject, payload, headers = await asyncio.wait_for(
                self._prepare(model, inputs, version, priority, timeout, request_id, reply_to), timeout
            )
        except TimeoutError:
            raise DeadlineExceeded(f"{model}: the registry did not answer within {timeout:.3g}s") from None
        headers[HDR_REPLY_INBOX] = self._inbox
        pending = _Pending(loop.create_future(), subject, timeout, payload, headers)
        self._pending[request_id] = pending
        timer = loop.call_later(max(0.0, timeout - (loop.time() - started)), self._expire, request_id)
        pending.retry = loop.call_later(_REPUBLISH_S[0], self._republish, request_id)
        span = tracing.start_producer(subject, request_id, headers)
        mirror_id = None
        if version is None and isinstance(model, str):  # a pinned version or a pipeline is never mirrored
            mirror_id = self._shadowing.pick(model, subject, self._new_id)
        error: BaseException | None = None
        try:
            # The stream's PubAck comes to our own inbox too: no round trip is awaited on its own,
            # yet a rejection (full queue, no stream) still fails the call at once.
            await self._conn.nc.publish(subject, payload, reply=f"{self._inbox}.a.{request_id}", headers=headers)
            if mirror_id is not None:
                await self._shadowing.send(mirror_id, subject, payload, headers[HDR_DEADLINE], timeout)
            data = await pending.future
            if claim_of(data) is not None:  # a large reply, handed over through the object store
                data = await self._claims.resolve(data, take=True)
            reply = decode_reply(data)
            if mirror_id is not None:
                self._shadowing.book.primary_done(mirror_id, reply)
            return reply
        except MeshError as exc:
            error = exc
            raise
        except Exception as exc:
            error = translate_error(exc, f"queue request on {subject}")
            raise error from exc
        finally:
            timer.cancel()
            if pending.retry is not None:
                pending.retry.cancel()
            del self._pending[request_id]
            tracing.end(span, error)
            if mirror_id is not None and isinstance(error, MeshError):
                self._shadowing.book.primary_done(mirror_id, error)
            # Answered or given up on: our stored request can go (a mirrored one goes once its
            # mirror is settled, for the shadow copy may not have read it yet).
            if mirror_id is None and claim_of(payload) is not None:
                await self._claims.release(payload)

    def _new_id(self) -> str:
        return f"{self._id_prefix}{next(self._counter)}"

    def _republish(self, request_id: str) -> None:
        pending = self._pending.get(request_id)
        if pending is None or pending.future.done() or pending.queued:
            return
        self._spawn(self._publish(request_id, pending))
        delay = _REPUBLISH_S[min(pending.publishes, len(_REPUBLISH_S) - 1)]
        pending.publishes += 1
        pending.retry = asyncio.get_running_loop().call_later(delay, self._republish, request_id)

    async def _publish(self, request_id: str, pending: _Pending, headers: dict[str, str] | None = None) -> None:
        try:
            ack_to, headers = f"{self._inbox}.a.{request_id}", headers or pending.headers
            await self._conn.nc.publish(pending.subject, pending.payload, reply=ack_to, headers=headers)
        except Exception as exc:  # disconnected: the next attempt, or the reconnect, publishes it
            log.debug("could not publish %s again: %s", request_id, exc)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _after_reconnect(self) -> None:
        self._spawn(self._recover_pending())

    async def _recover_pending(self) -> None:
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
                        headers = {**headers, HDR_MSG_ID: f"{request_id}~again{next(self._counter)}"}
                    await self._publish(request_id, pending, headers)
            if unsure:
                await asyncio.sleep(_RECHECK_S)

    async def _still_queued(self, pending: _Pending) -> bool | None:
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

    async def publish(
        self,
        model: str | Sequence[str],
        inputs: dict[str, Any],
        reply_to: str,
        version: str | None = None,
        priority: str = "normal",
        timeout: float = 60.0,
    ) -> str:
        """Fire and forget: queue a request whose reply goes to ``reply_to``; returns its request id
        once the stream has it. Read the replies with :meth:`subscribe_results`."""
        request_id = f"{self._id_prefix}{next(self._counter)}"
        subject, payload, headers = await self._prepare(model, inputs, version, priority, timeout, request_id, reply_to)
        try:
            await self._conn.js.publish(subject, payload, timeout=min(timeout, 10.0), headers=headers)
        except Exception as exc:
            raise translate_error(exc, f"queue request on {subject}") from exc
        return request_id

    def subscribe_results(self, subject: str) -> AsyncIterator[Result]:
        """Replies arriving on ``subject`` (e.g. for :meth:`publish`), as (request id, reply or error)."""
        return results_on(self._conn, subject)

    async def submit_job(
        self, model: str, inputs: Any, priority: str = "low", version: str | None = None, job_id: str | None = None
    ) -> Job:
        """Start a batch job and return at once; its items stream into the queue in the background.

        ``inputs``: an iterable or async iterable of input dicts, or a .npy/.npz file, local or
        ``s3://bucket/key`` (first axis = items).
        """
        if priority not in PRIORITIES:
            raise BadInput(f"priority must be one of {', '.join(PRIORITIES)}, not {priority!r}")
        (subject,) = await self._route(model, version, priority)  # checks the names first: a 400, not a lookup
        spec = await self._spec(model)
        job_id = job_id or f"job-{NUID().next().decode()}"
        try:
            check_name(job_id)
        except ValueError as exc:
            raise BadInput(f"job id: {exc}", job=job_id) from None
        items = items_of(inputs, spec, self._conn.settings)
        return await start_job(self._conn, await self._open_registry(), spec, subject, items, job_id)

    async def job(self, job_id: str) -> Job:
        """A handle on an existing job (started by anyone), to follow or read its results."""
        job = Job(self._conn, await self._open_registry(), job_id)
        await job.status()  # raises UnknownModel (404) for a job that does not exist
        return job

    async def jobs(self) -> dict[str, dict[str, Any]]:
        return await (await self._open_registry()).jobs()

    async def _prepare(
        self, model: str | Sequence[str], inputs: dict[str, Any], version: str | None, priority: str,
        timeout: float, request_id: str, reply_to: str,
    ) -> tuple[str, bytes, dict[str, str]]:  # fmt: skip
        """(first subject, payload, headers) of a request, checked before anything is sent."""
        if priority not in PRIORITIES:
            raise BadInput(f"priority must be one of {', '.join(PRIORITIES)}, not {priority!r}")
        route = await self._route(model, version, priority)
        payload = encode_request(inputs)
        if len(payload) > self._claims.threshold:
            payload = await self._claims.wrap(payload)  # claim check: through the object store, if on
        # Headers count against max_payload too; beyond it the server drops the whole connection.
        if len(payload) > self._conn.nc.max_payload - _HEADER_ROOM:
            raise BadInput(
                f"request is {len(payload)} bytes; the server accepts at most {self._conn.nc.max_payload} "
                f"with headers (up to {_HEADER_ROOM}); turn the claim check on to send it through the "
                "object store: SERVEMESH_CLAIMS=true",
                size=len(payload),
            )
        headers = {
            HDR_MSG_ID: request_id,
            HDR_REPLY: reply_to,
            HDR_DEADLINE: str(int(time.time() * 1000 + timeout * 1000)),
        }
        if len(route) > 1:
            headers[HDR_ROUTE] = ",".join(route[1:])
        return route[0], payload, headers

    async def _route(self, model: str | Sequence[str], version: str | None, priority: str) -> tuple[str, ...]:
        """The subjects a request passes through: one model, a named pipeline, or listed stages.
        A stage named without a version follows its weighted route, drawn per request."""
        plan = await self._plan(model, version)
        return tuple(
            infer_subject(name, next(iter(weights)) if len(weights) == 1 else choose(weights), priority)
            for name, weights in plan
        )

    async def _plan(self, model: str | Sequence[str], version: str | None) -> _Plan:
        """Per stage: the model and the weights of its versions (registry and routes read, cached briefly)."""
        names = (model,) if isinstance(model, str) else tuple(model)
        key = (names, version)
        cached = self._plans.get(key)
        now = time.monotonic()
        if cached is not None and now - cached[0] < _SPEC_TTL_S:
            return cached[1]
        if not names:
            raise BadInput("a pipeline needs at least one stage")
        for stage in names:  # each becomes a subject token: refused here, never sent
            name, _, pinned = stage.partition(":")
            try:
                check_name(name, pinned or version)
            except ValueError as exc:
                raise BadInput(str(exc), model=name) from None
        try:
            plan = await asyncio.wait_for(self._read_plan(names, version), _STALE_AFTER_S if cached else None)
        except MeshError as exc:
            if cached is None or not isinstance(exc, MeshUnavailable):
                raise
            plan = cached[1]  # the registry is unreachable for now: the last plan still routes
        except Exception as exc:
            if cached is None:
                raise translate_error(exc, f"look up {', '.join(names)}") from exc
            plan = cached[1]
        self._plans[key] = (now, plan)
        return plan

    async def _read_plan(self, names: tuple[str, ...], version: str | None) -> _Plan:
        if len(names) == 1 and ":" not in names[0]:
            stages = await self._pipeline(names[0])
            if stages is not None:
                names, version = tuple(stages), None
        plan = []
        for stage in names:
            name, _, pinned = stage.partition(":")
            plan.append((name, await self._weights(name, pinned or version)))
        return tuple(plan)

    async def _weights(self, model: str, version: str | None) -> dict[str, float]:
        spec = await self._spec(model)
        route = None if version is not None else await (await self._open_registry()).get_route(model)
        if version is None:
            self._shadowing.configs[model] = shadow_config(route)
        if version is not None:
            if version not in spec.versions:
                raise UnknownModel(f"model {model!r} has no version {version!r}", model=model, version=version)
            await self._check_loadable(model, version)
            return {version: 1.0}
        ready = ready_counts(await (await self._open_registry()).get_status(model))
        if route is None or not route.get("weights"):  # no route, or one that only shadows
            target = spec.resolve_version(None)
            weights = default_weights(target, spec.versions, ready)
            if weights == {target: 1.0}:
                await self._check_loadable(model, target)
            return weights
        weights = effective_weights(route.get("weights", {}), route.get("previous") or {}, ready)
        weights = {v: w for v, w in weights.items() if v in spec.versions}
        if not weights:
            raise UnknownModel(f"model {model!r}: its route names no registered version", model=model)
        return weights

    async def _check_loadable(self, model: str, version: str) -> None:
        """Fail fast, rather than wait out the timeout, for a version that failed to load everywhere it went."""
        status = await (await self._open_registry()).get_status(model)
        version_status = (status or {}).get("versions", {}).get(version, {})
        failed = version_status.get("failed") or {}
        if failed and not version_status.get("ready"):
            worker, reason = next(iter(failed.items()))
            raise NoCapacity(
                f"{model}:{version} is not loaded anywhere: it failed to load ({reason} on {worker})",
                model=model, version=version, failures=failed,
            )  # fmt: skip

    async def _pipeline(self, name: str) -> list[str] | None:
        """The stages of a registered pipeline ``name``, unless a model of that name exists."""
        registry = await self._open_registry()
        if await registry.get_spec(name) is not None:
            return None
        return await registry.get_pipeline(name)

    async def _open_registry(self) -> Registry:
        try:
            if self._registry is None:
                self._registry = await Registry.open(self._conn)
        except BucketNotFoundError:
            raise UnknownModel("no model registry on this NATS yet (is a worker running?)") from None
        return self._registry

    async def _spec(self, model: str) -> ModelSpec:
        cached = self._specs.get(model)
        now = time.monotonic()
        if cached is not None and now - cached[0] < _SPEC_TTL_S:
            return cached[1]
        registry = await self._open_registry()
        try:
            spec = await registry.get_spec(model)
        except Exception as exc:
            raise translate_error(exc, f"look up model {model!r}") from exc
        if spec is None:
            raise UnknownModel(f"model {model!r} is not registered", model=model)
        self._specs[model] = (now, spec)
        return spec

    async def _on_reply(self, msg: Msg) -> None:
        kind, _, request_id = msg.subject[len(self._inbox) + 1 :].partition(".")
        if kind == "m":
            try:
                bundle = decode_bundle(msg.data)
            except MeshError as err:  # its callers time out; nothing else is affected
                log.warning("dropping a reply bundle: %s", err.message)
                return
            for bundled_id, data in bundle:
                self._resolve(bundled_id, data)
            return
        if kind == "r":
            self._resolve(request_id, msg.data)
            return
        if kind == "s":
            self._shadowing.reply(request_id, msg.data)
            return
        if kind == "t":
            error = pub_ack_error(msg)
            if error is not None:
                self._shadowing.book.shadow_failed(request_id, error)
            return
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

    def _resolve(self, request_id: str, data: bytes) -> None:
        pending = self._pending.get(request_id)
        if pending is not None and not pending.future.done():  # else late or duplicate (at-least-once)
            pending.future.set_result(data)

    async def models(self) -> list[ModelSpec]:
        return await (await self._open_registry()).list_specs()

    async def close(self) -> None:
        for pending in self._pending.values():
            pending.future.cancel()
        await self._shadowing.close()
        await self._conn.close()

    async def __aenter__(self) -> MeshClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
