"""Batch jobs: many inputs for one model, streamed into the queue at low priority, results stored
durably in the MESH_JOBS stream so that anyone can read them later by job id.

The submitter keeps a bounded number of publishes in flight and backs off when the queue is
full, so client memory stays flat however many items there are. Items carry the job id and
their index; workers store each result once (message id ``<job>:<index>``), so a crash and
redelivery never duplicate a result, and readers de-duplicate by index besides.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from nats.js.api import DeliverPolicy, PubAck

from broker.connection import Connection, translate_error
from broker.registry import Json, Registry
from broker.settings import Settings
from schemas.envelope import Reply, decode_reply, encode_request, encode_request_bundle
from schemas.errors import BadInput, MeshError, Overloaded, UnknownModel
from schemas.spec import ModelSpec
from schemas.subjects import (
    HDR_BUNDLE,
    HDR_JOB,
    HDR_JOB_ITEM,
    HDR_MSG_ID,
    JOBS_PREFIX,
    MAX_BUNDLE,
    STREAM_JOBS,
    job_subject,
)
from servemesh.objects import download, is_s3

__all__ = ["Job", "JobResult", "JobStatus", "checked_items", "start_job"]

log = logging.getLogger(__name__)

Inputs = Mapping[str, Any]
_IN_FLIGHT = 256  # publishes awaiting the stream's ack at once
_PROGRESS_EVERY_S = 1.0


@dataclass(frozen=True, slots=True)
class JobStatus:
    id: str
    model: str
    state: str  # submitting | running | done | cancelled | failed
    total: int | None  # known once every item is submitted
    submitted: int
    done: int
    failed: int
    rate: float  # items finished per second since the job started
    eta_s: float | None
    error: str | None = None  # why its submission failed (state "failed")


@dataclass(frozen=True, slots=True)
class JobResult:
    index: int
    reply: Reply | None = None
    error: MeshError | None = None


async def checked_items(inputs: Any, spec: ModelSpec, settings: Settings) -> AsyncIterator[Inputs]:
    """The items of ``inputs`` — dicts (sync or async iterable), or a .npy/.npz file, local or s3://,
    whose first axis is the items — the file opened and the first item checked against the model
    before anything is created: BadInput, with nothing left behind, for inputs that cannot be a job."""
    if is_s3(inputs):
        path = await download(settings, str(inputs))
        try:
            arrays = _arrays(path, spec)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return _from_arrays(arrays, spec, cleanup=path)
    if isinstance(inputs, (str, Path)):
        return _from_arrays(_arrays(Path(inputs), spec), spec)
    if isinstance(inputs, AsyncIterable):
        items = aiter(inputs)
    elif isinstance(inputs, Iterable) and not isinstance(inputs, (bytes, Mapping)):
        items = _aiter_sync(inputs)
    else:
        raise BadInput("job inputs must be an iterable of input dicts or a .npy/.npz file")
    try:
        first = await anext(items)
    except StopAsyncIteration:
        raise BadInput("the job has no items") from None
    if not isinstance(first, Mapping):
        raise BadInput(f"each job item must be a mapping of input name to array, not {type(first).__name__}")
    _check_names(spec, set(first))
    return _chained(first, items)


async def _chained(first: Inputs, rest: AsyncIterator[Inputs]) -> AsyncIterator[Inputs]:
    yield first
    async for item in rest:
        yield item


async def _aiter_sync(items: Iterable[Inputs]) -> AsyncIterator[Inputs]:
    for item in items:
        yield item


def _check_names(spec: ModelSpec, names: set[str]) -> None:
    declared = {t.name for t in spec.inputs}
    if declared and names != declared:
        raise BadInput(f"{spec.name} takes input(s) {', '.join(sorted(declared))}; the job gives "
                       f"{', '.join(sorted(names)) or 'none'}", model=spec.name)  # fmt: skip


def _arrays(path: Path, spec: ModelSpec) -> dict[str, np.ndarray[Any, Any]]:
    """The arrays of a job's input file, checked against the model's declared inputs."""
    if path.suffix not in (".npy", ".npz"):
        raise BadInput(f"{path}: job inputs come as .npy or .npz")
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    try:
        if path.suffix == ".npz":
            arrays = dict(np.load(path, mmap_mode="r", allow_pickle=False))
        else:
            if len(spec.inputs) != 1:
                raise BadInput(f"{spec.name} takes {len(spec.inputs)} inputs; give an .npz with one array per input")
            arrays = {spec.inputs[0].name: np.load(path, mmap_mode="r", allow_pickle=False)}
    except (ValueError, OSError) as exc:
        raise BadInput(f"{path}: not readable as NumPy arrays ({exc})") from None
    _check_names(spec, set(arrays))
    by_name = {t.name: t for t in spec.inputs}
    for name, array in arrays.items():
        if array.ndim == 0 or len(array) == 0:
            raise BadInput(f"{path}: {name!r} holds no items (its first axis is the items)")
        declared = by_name.get(name)
        if declared is None:
            continue
        wire = "str" if array.dtype.kind == "U" else "bytes" if array.dtype.kind == "S" else array.dtype.name
        if wire != declared.dtype:
            raise BadInput(f"{path}: {name!r} is {wire}; {spec.name} takes {declared.dtype}", model=spec.name)
        item = array.shape[1:]
        fits = len(item) == len(declared.shape) and all(d in (-1, n) for d, n in zip(declared.shape, item, strict=True))
        if not fits:
            raise BadInput(f"{path}: {name!r} items have shape {list(item)}; {spec.name} takes "
                           f"{list(declared.shape)} (-1: any)", model=spec.name)  # fmt: skip
    return arrays


async def _from_arrays(
    arrays: dict[str, np.ndarray[Any, Any]], spec: ModelSpec, cleanup: Path | None = None
) -> AsyncIterator[Inputs]:
    try:
        count = min(len(a) for a in arrays.values())
        for i in range(count):
            # Batched models take a leading batch axis: each item is one row of it.
            yield {k: np.ascontiguousarray(a[i : i + 1] if spec.max_batch_size else a[i]) for k, a in arrays.items()}
    finally:
        if cleanup is not None:
            cleanup.unlink(missing_ok=True)


@dataclass(frozen=True)
class _Message:
    headers: dict[str, str]
    payload: bytes
    what: str  # for errors: which items


async def start_job(
    conn: Connection, registry: Registry, spec: ModelSpec, subject: str, items: AsyncIterator[Inputs], job_id: str
) -> Job:
    record: Json = {"id": job_id, "model": spec.name, "subject": subject, "state": "submitting",
                    "total": None, "submitted": 0, "created": time.time()}  # fmt: skip
    await registry.put_job(job_id, record)
    job = Job(conn, registry, job_id)
    # Items leave as bundles of up to a batch: one stream message for each (servemesh/outbox.py).
    bundle = max(1, min(MAX_BUNDLE, spec.max_batch_size))
    # Items go to the queue's job subject, which only the mesh's own processes may publish to: a
    # worker stores results under a job only for messages from there (docs/security.md).
    job._submitter = asyncio.create_task(job._submit(job_subject(subject), items, record, bundle), name=f"job-{job_id}")
    return job


class Job:
    def __init__(self, conn: Connection, registry: Registry, job_id: str) -> None:
        self._conn = conn
        self._registry = registry
        self.id = job_id
        self._submitter: asyncio.Task[int] | None = None

    async def submitted(self) -> int:
        """Wait until every item is in the queue (for a job started here); returns the count."""
        if self._submitter is not None:
            return await self._submitter
        record = await self._record()
        return int(record.get("total") or record.get("submitted") or 0)

    async def _submit(self, subject: str, items: AsyncIterator[Inputs], record: Json, bundle: int = 1) -> int:
        """Queue every item; a submission that fails leaves the job ``failed``, with the reason."""
        try:
            return await self._queue_items(subject, items, record, bundle)
        except Exception as exc:
            err = translate_error(exc, f"job {self.id}")
            log.warning("job %s failed while submitting its items: %s", self.id, err.message)
            with contextlib.suppress(Exception):
                current = await self._record()
                await self._registry.put_job(self.id, {**current, "state": "failed", "error": err.message})
            raise err from exc

    async def _queue_items(self, subject: str, items: AsyncIterator[Inputs], record: Json, bundle: int) -> int:
        """Queue every item, ``bundle`` items to a stream message (see servemesh/outbox.py), a bounded
        number of messages awaiting the stream's acknowledgement."""
        window: collections.deque[tuple[asyncio.Future[PubAck], _Message]] = collections.deque()
        most = max(4, _IN_FLIGHT // bundle)
        count, last_progress = 0, time.monotonic()
        chunk: list[tuple[int, bytes]] = []
        limit = self._conn.nc.max_payload // 2

        async def send() -> None:
            message = self._message(list(chunk))
            window.append((await self._publish(subject, message), message))
            chunk.clear()
            while len(window) >= most:
                await self._confirm(subject, *window.popleft())

        try:
            async for item in items:
                if count % 1000 == 0 and (await self._record()).get("state") == "cancelled":
                    break
                payload = encode_request(dict(item))
                if chunk and sum(len(p) for _, p in chunk) + len(payload) > limit:
                    await send()  # a bundle stays well under the server's max payload
                chunk.append((count, payload))
                if len(chunk) >= bundle:
                    await send()
                count += 1
                if time.monotonic() - last_progress > _PROGRESS_EVERY_S:
                    last_progress = time.monotonic()
                    await self._registry.put_job(self.id, {**record, "submitted": count})
            if chunk:
                await send()
            while window:
                await self._confirm(subject, *window.popleft())
        finally:
            for ack, _ in window:  # the submission failed: nats-py would wait for these forever
                ack.cancel()
        state = (await self._record()).get("state")
        final = {
            **record,
            "submitted": count,
            "total": count,
            "state": "cancelled" if state == "cancelled" else "running",
        }
        await self._registry.put_job(self.id, final)
        return count

    def _message(self, chunk: list[tuple[int, bytes]]) -> _Message:
        """One item, or several as a bundle; its message id makes a publish that went again store once."""
        members = [({HDR_MSG_ID: f"{self.id}:{i}", HDR_JOB: self.id, HDR_JOB_ITEM: str(i)}, p) for i, p in chunk]
        if len(members) == 1:
            (headers, payload), what = members[0], f"job {self.id} item {chunk[0][0]}"
            return _Message(headers, payload, what)
        first, last = chunk[0][0], chunk[-1][0]
        headers = {HDR_MSG_ID: f"{self.id}:{first}-{last}", HDR_BUNDLE: str(len(members))}
        return _Message(headers, encode_request_bundle(members), f"job {self.id} items {first}–{last}")

    async def _publish(self, subject: str, message: _Message) -> asyncio.Future[PubAck]:
        try:
            return await self._conn.js.publish_async(subject, message.payload, wait_stall=10.0, headers=message.headers)
        except Exception as exc:
            raise translate_error(exc, message.what) from exc

    async def _confirm(self, subject: str, ack: asyncio.Future[PubAck], message: _Message) -> None:
        """Wait for a message's acknowledgement; while the queue is full, the message goes again."""
        backoff = 0.05
        while True:
            try:
                await asyncio.wait_for(ack, 10.0)
                return
            except Exception as exc:
                err = translate_error(exc, message.what)
                if not isinstance(err, Overloaded):
                    raise err from exc
            # The queue is full: it drains as workers compute; the same items go again.
            await asyncio.sleep(backoff)
            backoff = min(1.0, backoff * 2)
            ack = await self._publish(subject, message)

    async def _record(self) -> Json:
        record = await self._registry.get_job(self.id)
        if record is None:
            raise UnknownModel(f"no job {self.id!r}", job=self.id)
        return record

    async def status(self) -> JobStatus:
        record = await self._record()
        info = await self._conn.js.stream_info(STREAM_JOBS, subjects_filter=f"{JOBS_PREFIX}.{self.id}.>")
        counts = info.state.subjects or {}
        done = int(counts.get(f"{JOBS_PREFIX}.{self.id}.ok", 0))
        failed = int(counts.get(f"{JOBS_PREFIX}.{self.id}.err", 0))
        total = record.get("total")
        state = record["state"]
        if state == "running" and total is not None and done + failed >= total:
            state = "done"
        elapsed = max(1e-9, time.time() - float(record["created"]))
        rate = (done + failed) / elapsed
        eta = (total - done - failed) / rate if total is not None and rate > 0 and state == "running" else None
        return JobStatus(self.id, record["model"], state, total, int(record.get("submitted", 0)), done, failed,
                         rate, eta, record.get("error"))  # fmt: skip

    async def results(self, follow: bool = True) -> AsyncIterator[JobResult]:
        """Each item's result once, in the order they were stored; ``follow`` waits for the rest."""
        seen: set[int] = set()
        total: int | None = None
        record = await self._record()
        if record.get("state") == "failed":
            raise MeshError(f"job {self.id} failed: {record.get('error', 'its submission did not complete')}",
                            job=self.id)  # fmt: skip
        sub = await self._conn.js.subscribe(
            f"{JOBS_PREFIX}.{self.id}.>", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
        )
        try:
            while total is None or len(seen) < total:
                try:
                    msg = await sub.next_msg(timeout=1.0)
                except TimeoutError:
                    record = await self._record()
                    total = record.get("total")
                    if record.get("state") == "failed":
                        raise MeshError(f"job {self.id} failed: {record.get('error')}", job=self.id) from None
                    if not follow or record.get("state") == "cancelled":
                        return
                    continue
                index = int((msg.headers or {}).get(HDR_JOB_ITEM, "-1"))
                if index in seen:
                    continue
                seen.add(index)
                if total is None and len(seen) % 500 == 0:
                    total = (await self._record()).get("total")
                try:
                    yield JobResult(index, reply=decode_reply(msg.data))
                except MeshError as err:
                    yield JobResult(index, error=err)
        finally:
            await sub.unsubscribe()

    async def cancel(self) -> None:
        """Stop submitting; workers drop the items still queued."""
        await self._registry.put_job(self.id, {**(await self._record()), "state": "cancelled"})

    async def wait(self, poll_s: float = 0.5) -> JobStatus:
        while True:
            status = await self.status()
            if status.state in ("done", "cancelled", "failed"):
                return status
            await asyncio.sleep(poll_s)
