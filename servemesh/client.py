"""MeshClient: publish an inference request on JetStream and await its reply.

Every in-flight request shares one reply subscription (``<inbox>.<request id>``); the
publish is acked by the stream, so a caller learns at once whether the request is queued
or rejected (full queue → Overloaded). Replies are matched by id; duplicates are ignored.
Names are resolved by ``servemesh/resolver.py``, requests tracked by ``servemesh/inflight.py``, and
shadow copies handled by ``servemesh/shadowing.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import numpy as np
from nats.aio.msg import Msg
from nats.nuid import NUID

from broker.claims import Claims
from broker.connection import Connection, pub_ack_error, translate_error
from broker.loop import TaskSet
from broker.settings import Settings
from broker.storage import StorageNews, StorageReport
from schemas.envelope import Reply, claim_of, decode_bundle, decode_reply, encode_request
from schemas.errors import BadInput, DeadlineExceeded, Forbidden, MeshError, MeshUnavailable
from schemas.spec import ModelSpec
from schemas.subjects import (
    BUCKET_CLAIMS,
    CANCEL_PREFIX,
    HDR_CLAIM_BUCKET,
    HDR_DEADLINE,
    HDR_MSG_ID,
    HDR_REPLY,
    HDR_REPLY_INBOX,
    HDR_ROUTE,
    PRIORITIES,
    STREAM_INFER,
    ReplyKind,
    check_name,
    inbox_subject,
    parse_infer_subject,
)
from servemesh.admission import Admission
from servemesh.inflight import InFlight
from servemesh.jobs import Job, checked_items, start_job
from servemesh.outbox import Outbox
from servemesh.resolver import Resolver
from servemesh.results import Results
from servemesh.shadowing import Shadowing
from telemetry import tracing

__all__ = ["MeshClient"]

log = logging.getLogger(__name__)

# Room kept for a request's headers (ids, reply subjects, deadline, route, trace context).
_HEADER_ROOM = 4096



class MeshClient:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._claims = Claims(conn)
        self._inbox = conn.nc.new_inbox()
        # Request ids: a client-unique prefix and a counter (unique across clients for de-duplication).
        self._id_prefix = NUID().next().decode()
        self._counter = itertools.count()
        self._cancelled: dict[str, list[str]] = {}  # by model: requests cancelled in this turn
        self._background = TaskSet()
        self._pending = InFlight(conn, self._inbox)
        self._shadowing = Shadowing(conn, self._inbox, self._claims)
        self._resolver = Resolver(conn, self._shadowing.configs)
        self._outbox = Outbox(conn, self._inbox, self._pending, self._resolver.max_batch, conn.settings.coalesce)
        self._deaf: Forbidden | None = None  # set once the server refuses our reply inbox
        self._admission = Admission()  # refuses at once what could not be served in time
        self._storage = StorageNews(conn, self._on_storage)  # the routers' word on which streams store writes

    @classmethod
    async def connect(cls, url: str | None = None, settings: Settings | None = None) -> MeshClient:
        settings = settings or Settings.from_url(url or Settings().nats_url)
        conn = await Connection.open(settings, name="servemesh-client")
        client = cls(conn)
        conn.on_denied.append(client._on_denied)
        await conn.nc.subscribe(
            f"{client._inbox}.*.*", cb=client._on_reply, pending_msgs_limit=-1, pending_bytes_limit=-1
        )
        conn.on_reconnect.append(client._pending.after_reconnect)
        await client._storage.start()
        await conn.nc.flush()  # a refused reply subscription is usually reported by now
        if client._deaf is None:
            await client._claims.ensure_own()
        if client._deaf is not None:
            await conn.close()
            raise client._deaf
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
        if self._deaf is not None:
            raise self._deaf
        request_id = self._new_id()
        reply_to = inbox_subject(self._inbox, ReplyKind.REPLY, request_id)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            prepared = await self._prepare(model, inputs, version, priority, timeout, request_id, reply_to)
        except (TimeoutError, MeshError) as exc:
            if self._deaf is not None:  # no answer could reach us: say why
                raise self._deaf from None
            if isinstance(exc, MeshError):
                raise
            raise DeadlineExceeded(f"{model}: the registry did not answer within {timeout:.3g}s") from None
        subject, payload, headers = prepared
        staged = HDR_ROUTE in headers  # a pipeline: its reply tells of the last stage's queue, not this one's
        headers[HDR_REPLY_INBOX] = self._inbox
        pending = self._pending.open(request_id, subject, payload, headers, timeout, timeout - (loop.time() - started))
        span = tracing.start_send(subject, request_id, headers)
        mirror_id = None
        if version is None and isinstance(model, str):  # a pinned version or a pipeline is never mirrored
            mirror_id = self._shadowing.pick(model, subject, self._new_id)
        error: BaseException | None = None
        try:
            # Published at the end of this turn of the loop, with any others for the same subject. The
            # stream's PubAck comes to our own inbox too: no round trip is awaited on its own, yet a
            # rejection (full queue, no stream) still fails the call at once.
            await self._outbox.put(subject, request_id, payload, headers)
            self._admission.queued(subject)
            if mirror_id is not None:
                await self._shadowing.send(mirror_id, subject, payload, headers[HDR_DEADLINE], timeout)
            data = await pending.future
            if claim_of(data) is not None:  # a large reply, handed over through the object store
                data = await self._claims.resolve(data, take=True)
            reply = decode_reply(data)
            if not staged:
                self._admission.heard(subject, reply.timing)
            if mirror_id is not None:
                self._shadowing.book.primary_done(mirror_id, reply)
            return reply
        except asyncio.CancelledError:
            self._cancel(subject, request_id)
            raise
        except MeshError as exc:
            error = exc
            raise
        except Exception as exc:
            error = translate_error(exc, f"queue request on {subject}")
            raise error from exc
        finally:
            self._pending.close(request_id)
            tracing.end(span, error)
            if mirror_id is not None and isinstance(error, MeshError):
                self._shadowing.book.primary_done(mirror_id, error)
            # Answered or given up on: our stored request can go (a mirrored one goes once its
            # mirror is settled, for the shadow copy may not have read it yet).
            if mirror_id is None and claim_of(payload) is not None:
                await self._claims.release(payload)

    def _cancel(self, subject: str, request_id: str) -> None:
        """The caller cancelled: tell the workers (at the end of this turn, with the turn's other
        cancellations), so that the request is not computed if it has not been yet."""
        model = parse_infer_subject(subject)[0]
        self._cancelled.setdefault(model, []).append(request_id)
        if len(self._cancelled) == 1 and len(self._cancelled[model]) == 1:
            asyncio.get_running_loop().call_soon(self._send_cancels)

    def _send_cancels(self) -> None:
        cancelled, self._cancelled = self._cancelled, {}
        for model, ids in cancelled.items():
            self._background.spawn(self._conn.nc.publish(f"{CANCEL_PREFIX}.{model}", "\n".join(ids).encode()))

    def _on_denied(self, action: str, subject: str) -> None:
        """The server refused us on permissions: fail at once what waits on it, not at its timeout."""
        user = self._conn.settings.user or "this user"
        # nats-server words the refusal in lower case, the subject included.
        if action == "subscription" and subject.lower().startswith(self._inbox.lower()):
            self._deaf = Forbidden(
                f"{user} may not receive replies under {self._conn.settings.inbox_prefix}: set "
                "SERVEMESH_INBOX_PREFIX to the inbox prefix its permissions allow (e.g. _INBOX.<user>)",
                subject=subject,
            )  # fmt: skip
            self._pending.fail(self._deaf)
        elif action == "publish":
            self._pending.fail(Forbidden(f"{user} may not publish to {subject}", subject=subject), subject)

    def _new_id(self) -> str:
        return f"{self._id_prefix}{next(self._counter)}"

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
        try:
            subject, payload, headers = await self._prepare(
                model, inputs, version, priority, timeout, request_id, reply_to
            )
        except TimeoutError:
            raise DeadlineExceeded(f"{model}: the registry did not answer within {timeout:.3g}s") from None
        self._admission.queued(subject)
        try:
            await self._conn.publish_acked(subject, payload, headers, timeout=min(timeout, 10.0))
        except Exception as exc:
            raise translate_error(exc, f"queue request on {subject}") from exc
        return request_id

    async def subscribe_results(self, subject: str) -> Results:
        """Replies arriving on ``subject`` (e.g. for :meth:`publish`), as (request id, reply or error),
        each request's once; subscribed when this returns. ``async with`` (or ``aclose()``) ends it."""
        return await Results.open(self._conn, subject)

    async def submit_job(
        self, model: str, inputs: Any, priority: str = "low", version: str | None = None, job_id: str | None = None
    ) -> Job:
        """Start a batch job and return at once; its items stream into the queue in the background.

        ``inputs``: an iterable or async iterable of input dicts, or a .npy/.npz file, local or
        ``s3://bucket/key`` (first axis = items).
        """
        _check_priority(priority)
        (subject,) = await self._resolver.route(model, version, priority)  # checks the names first: a 400, not a lookup
        spec = await self._resolver.spec(model)
        job_id = job_id or f"job-{NUID().next().decode()}"
        try:
            check_name(job_id)
        except ValueError as exc:
            raise BadInput(f"job id: {exc}", job=job_id) from None
        items = await checked_items(inputs, spec, self._conn.settings)  # a BadInput here creates nothing
        return await start_job(self._conn, await self._resolver.registry(), spec, subject, items, job_id)

    async def job(self, job_id: str) -> Job:
        """A handle on an existing job (started by anyone), to follow or read its results."""
        job = Job(self._conn, await self._resolver.registry(), job_id)
        await job.status()  # raises UnknownModel (404) for a job that does not exist
        return job

    async def jobs(self) -> dict[str, dict[str, Any]]:
        return await (await self._resolver.registry()).jobs()

    async def _prepare(
        self, model: str | Sequence[str], inputs: dict[str, Any], version: str | None, priority: str,
        timeout: float, request_id: str, reply_to: str,
    ) -> tuple[str, bytes, dict[str, str]]:  # fmt: skip
        """(first subject, payload, headers) of a request, checked before anything is sent. Waits
        (each wait bounded by ``timeout``: TimeoutError) only for a registry read when the route is
        not cached, and for a claim check when the payload is too large for the message itself."""
        _check_priority(priority)
        route = self._resolver.cached_route(model, version, priority)
        if route is None:
            async with asyncio.timeout(timeout):
                route = await self._resolver.route(model, version, priority)
        self._admit(route[0], timeout)
        payload = encode_request(inputs)
        if len(payload) > self._claims.threshold:
            async with asyncio.timeout(timeout):
                payload = await self._claims.wrap(payload)  # claim check: through the object store, if on
        return self._parts(route, payload, timeout, request_id, reply_to)

    def _admit(self, subject: str, timeout: float) -> None:
        """Raise now for a request that cannot be served: Overloaded (429) when the queue could not serve
        it in time (servemesh/admission.py), MeshUnavailable (503) when the stream stores no requests."""
        unstored = self._unstored()
        if unstored is not None:
            raise unstored
        refused = self._admission.check(subject, timeout, self._resolver.max_queue(parse_infer_subject(subject)[0]))
        if refused is not None:
            raise refused

    def _unstored(self) -> MeshUnavailable | None:
        """The routers' latest word that the inference stream stores no writes, while it is fresh."""
        problem = self._storage.problems().get(STREAM_INFER)
        if problem is None:
            return None
        return MeshUnavailable(f"{STREAM_INFER} {problem}: no request can be queued; the mesh repairs the "
                               "stream by itself once its server can write again", stream=STREAM_INFER)  # fmt: skip

    def _on_storage(self, report: StorageReport) -> None:
        unstored = self._unstored()
        if unstored is not None:  # what waits for the stream's acknowledgement will not get one
            self._pending.fail(unstored)

    def _parts(
        self, route: tuple[str, ...], payload: bytes, timeout: float, request_id: str, reply_to: str
    ) -> tuple[str, bytes, dict[str, str]]:
        """(first subject, payload, headers) of a request whose route and payload are known."""
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
        if self._conn.settings.claim_bucket != BUCKET_CLAIMS:
            headers[HDR_CLAIM_BUCKET] = self._conn.settings.claim_bucket  # a large reply comes back there
        return route[0], payload, headers

    async def _on_reply(self, msg: Msg) -> None:
        kind, _, request_id = msg.subject[len(self._inbox) + 1 :].partition(".")
        if kind == ReplyKind.BUNDLE:
            try:
                bundle = decode_bundle(msg.data)
            except MeshError as err:  # its callers time out; nothing else is affected
                log.warning("dropping a reply bundle: %s", err.message)
                return
            for bundled_id, data in bundle:
                self._pending.resolve(bundled_id, data)
            return
        if kind == ReplyKind.REPLY:
            self._pending.resolve(request_id, msg.data)
            return
        if kind == ReplyKind.SHADOW_REPLY:
            self._shadowing.reply(request_id, msg.data)
            return
        if kind == ReplyKind.SHADOW_ACK:
            error = pub_ack_error(msg)
            if error is not None:
                self._shadowing.book.shadow_failed(request_id, error)
            return
        if kind == ReplyKind.ACK:
            self._pending.on_ack(request_id, msg)

    async def models(self) -> list[ModelSpec]:
        return await (await self._resolver.registry()).list_specs()

    async def close(self) -> None:
        self._pending.cancel_all()
        await self._shadowing.close()
        await self._conn.close()

    async def __aenter__(self) -> MeshClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def _check_priority(priority: str) -> None:
    if priority not in PRIORITIES:
        raise BadInput(f"priority must be one of {', '.join(PRIORITIES)}, not {priority!r}")
