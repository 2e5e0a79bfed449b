"""MeshClient: publish an inference request on JetStream and await its reply.

Every in-flight request shares one reply subscription (``<inbox>.<request id>``); the
publish is acked by the stream, so a caller learns at once whether the request is queued
or rejected (full queue → Overloaded). Replies are matched by id; duplicates are ignored.
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType
from typing import Any

import numpy as np
from nats.aio.msg import Msg
from nats.js.errors import BucketNotFoundError
from nats.nuid import NUID

from broker.connection import Connection, translate_error
from broker.registry import Registry
from broker.settings import Settings
from schemas.envelope import Reply, decode_reply, encode_request
from schemas.errors import BadInput, DeadlineExceeded, UnknownModel
from schemas.spec import ModelSpec
from schemas.subjects import HDR_DEADLINE, HDR_MSG_ID, HDR_REPLY, PRIORITIES, infer_subject

__all__ = ["MeshClient"]

_SPEC_TTL_S = 2.0


class MeshClient:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._registry: Registry | None = None
        self._nuid = NUID()
        self._inbox = conn.nc.new_inbox()
        self._pending: dict[str, asyncio.Future[bytes]] = {}
        self._specs: dict[str, tuple[float, ModelSpec]] = {}

    @classmethod
    async def connect(cls, url: str | None = None, settings: Settings | None = None) -> MeshClient:
        settings = settings or Settings.from_url(url or Settings().nats_url)
        conn = await Connection.open(settings, name="servemesh-client")
        client = cls(conn)
        await conn.nc.subscribe(
            f"{client._inbox}.*", cb=client._on_reply, pending_msgs_limit=-1, pending_bytes_limit=-1
        )
        return client

    async def infer(
        self,
        model: str,
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
        model: str,
        inputs: dict[str, Any],
        version: str | None = None,
        priority: str = "normal",
        timeout: float = 5.0,
    ) -> Reply:
        """Like :meth:`infer`, with the worker's timing (queue wait, compute, batch size)."""
        deadline = time.monotonic() + timeout
        if priority not in PRIORITIES:
            raise BadInput(f"priority must be one of {', '.join(PRIORITIES)}, not {priority!r}")
        spec = await self._spec(model)
        version = spec.resolve_version(version)
        if version not in spec.versions:
            raise UnknownModel(f"model {model!r} has no version {version!r}", model=model, version=version)
        payload = encode_request(inputs)
        if len(payload) > self._conn.nc.max_payload:
            raise BadInput(
                f"request is {len(payload)} bytes; the server accepts at most {self._conn.nc.max_payload}",
                size=len(payload),
            )
        request_id = self._nuid.next().decode()
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        headers = {
            HDR_MSG_ID: request_id,
            HDR_REPLY: f"{self._inbox}.{request_id}",
            HDR_DEADLINE: str(int(time.time() * 1000 + timeout * 1000)),
        }
        try:
            await self._publish(infer_subject(model, version, priority), payload, headers, deadline)
            try:
                async with asyncio.timeout_at(asyncio.get_running_loop().time() + deadline - time.monotonic()):
                    data = await future
            except TimeoutError:
                raise DeadlineExceeded(
                    f"no reply from {model}:{version} within {timeout:.3g}s", model=model, request_id=request_id
                ) from None
        finally:
            self._pending.pop(request_id, None)
        return decode_reply(data)

    async def _publish(self, subject: str, payload: bytes, headers: dict[str, str], deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("deadline passed before the request was queued")
        try:
            await self._conn.js.publish(subject, payload, timeout=remaining, headers=headers)
        except TimeoutError as exc:
            raise DeadlineExceeded(f"{subject}: the stream did not acknowledge in time") from exc
        except Exception as exc:
            raise translate_error(exc, f"queue request on {subject}") from exc

    async def _spec(self, model: str) -> ModelSpec:
        cached = self._specs.get(model)
        now = time.monotonic()
        if cached is not None and now - cached[0] < _SPEC_TTL_S:
            return cached[1]
        try:
            if self._registry is None:
                self._registry = await Registry.open(self._conn)
            spec = await self._registry.get_spec(model)
        except BucketNotFoundError:
            raise UnknownModel(f"model {model!r}: no model registry on this NATS yet (is a worker running?)") from None
        except Exception as exc:
            raise translate_error(exc, f"look up model {model!r}") from exc
        if spec is None:
            raise UnknownModel(f"model {model!r} is not registered", model=model)
        self._specs[model] = (now, spec)
        return spec

    async def _on_reply(self, msg: Msg) -> None:
        request_id = msg.subject.rsplit(".", 1)[-1]
        future = self._pending.pop(request_id, None)
        if future is not None and not future.done():
            future.set_result(msg.data)

    async def models(self) -> list[ModelSpec]:
        if self._registry is None:
            self._registry = await Registry.open(self._conn)
        return await self._registry.list_specs()

    async def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        await self._conn.close()

    async def __aenter__(self) -> MeshClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
