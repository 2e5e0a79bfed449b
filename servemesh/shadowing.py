"""Shadow traffic on the client: mirror a share of requests to a candidate version, compare its
reply with the primary's once both are in, and report the verdict on ``mesh.shadow.<model>``.

The caller only ever sees the primary's reply; a mirror never delays, fails or changes it. At
most ``limit`` mirrors are open at once, so a slow candidate cannot grow a client's memory.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from broker.claims import Claims
from broker.connection import Connection, translate_error
from broker.loop import TaskSet
from schemas.envelope import Reply, claim_of, decode_reply
from schemas.errors import MeshError
from schemas.shadow import Outcome, ShadowConfig, ShadowEvent, encode_event
from schemas.subjects import (
    BUCKET_CLAIMS,
    HDR_CLAIM_BUCKET,
    HDR_DEADLINE,
    HDR_MSG_ID,
    HDR_REPLY,
    ReplyKind,
    inbox_subject,
    infer_subject,
    parse_infer_subject,
    shadow_subject,
)

__all__ = ["ShadowBook", "Shadowing", "compare", "shadow_config", "verdict"]

log = logging.getLogger(__name__)

# A mirror's reply may come this long after the request's own timeout before it counts as lost.
_GRACE_S = 1.0

Tensors = Mapping[str, np.ndarray[Any, Any]]


def shadow_config(route: Mapping[str, Any] | None) -> ShadowConfig | None:
    """The shadow settings of a route document, if it has valid ones."""
    raw = (route or {}).get("shadow")
    if not raw:
        return None
    try:
        return ShadowConfig.model_validate(raw)
    except ValidationError as exc:
        log.warning("ignoring a route's shadow settings: %s", exc)
        return None


def compare(primary: Tensors, shadow: Tensors, rtol: float, atol: float) -> tuple[bool, float | None]:
    """(agree, largest absolute difference over numeric outputs). Names, shapes and every element
    must match; numbers within ``atol + rtol * |primary|``, NaN equal to NaN."""
    if primary.keys() != shadow.keys():
        return False, None
    agree, worst = True, None  # type: bool, float | None
    for name, a in primary.items():
        b = shadow[name]
        if a.shape != b.shape:
            return False, None
        if a.dtype.kind in "biuf" and b.dtype.kind in "biuf":
            if "f" in (a.dtype.kind, b.dtype.kind):
                close = np.isclose(b, a, rtol=rtol, atol=atol, equal_nan=True)
            else:
                close = a == b
            agree = agree and bool(np.all(close))
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            diff = diff[~np.isnan(diff)]
            if diff.size:
                worst = max(worst or 0.0, float(diff.max()))
        else:
            agree = agree and a.dtype.kind == b.dtype.kind and bool(np.array_equal(a, b))
    return agree, worst


def verdict(
    primary: Reply | MeshError | None, shadow: Reply | MeshError | None, config: ShadowConfig
) -> tuple[Outcome, float | None, int | None]:
    """(outcome, max_abs_diff, the candidate's error status) of one mirrored request."""
    if not isinstance(primary, Reply):
        return "primary_error", None, None
    if shadow is None:
        return "shadow_timeout", None, None
    if isinstance(shadow, MeshError):
        return "shadow_error", None, shadow.status
    agree, diff = compare(primary.outputs, shadow.outputs, config.rtol, config.atol)
    return ("agree" if agree else "disagree"), diff, None


@dataclass(slots=True)
class _Mirror:
    model: str
    version: str
    config: ShadowConfig
    sent: float
    timer: asyncio.TimerHandle
    primary: Reply | MeshError | None = None
    primary_ms: float | None = None
    shadow: Reply | MeshError | None = None
    shadow_ms: float | None = None


class ShadowBook:
    """The mirrors one client has in flight, keyed by the mirror's request id."""

    def __init__(
        self, emit: Callable[[ShadowEvent], None], limit: int = 1024, rng: random.Random | None = None,
        closed: Callable[[str], None] | None = None,
    ) -> None:  # fmt: skip
        self._emit = emit
        self._closed = closed  # told each mirror id once the book is done with it
        self._limit = limit
        self._rng = rng or random.Random()
        self._open: dict[str, _Mirror] = {}
        self.mirrored = 0
        self.skipped = 0  # draws that would have mirrored but found the book full

    @property
    def in_flight(self) -> int:
        return len(self._open)

    def draw(self, config: ShadowConfig) -> bool:
        """Whether to mirror this request (``percent`` of the time, while there is room)."""
        if self._rng.random() * 100.0 >= config.percent:
            return False
        if len(self._open) >= self._limit:
            self.skipped += 1
            return False
        return True

    def open(self, mirror_id: str, model: str, version: str, config: ShadowConfig, timeout: float) -> None:
        timer = asyncio.get_running_loop().call_later(timeout + _GRACE_S, self._finish, mirror_id)
        self._open[mirror_id] = _Mirror(model, version, config, time.monotonic(), timer)
        self.mirrored += 1

    def primary_done(self, mirror_id: str, result: Reply | MeshError) -> None:
        mirror = self._open.get(mirror_id)
        if mirror is not None:
            mirror.primary, mirror.primary_ms = result, _ms_since(mirror.sent)
            if mirror.shadow is not None:
                self._finish(mirror_id)

    def shadow_reply(self, mirror_id: str, payload: bytes) -> None:
        try:
            result: Reply | MeshError = decode_reply(payload)
        except MeshError as err:
            result = err
        self._shadow_done(mirror_id, result)

    def shadow_failed(self, mirror_id: str, error: MeshError) -> None:
        """The stream refused the mirror (e.g. the candidate's queue is full)."""
        self._shadow_done(mirror_id, error)

    def _shadow_done(self, mirror_id: str, result: Reply | MeshError) -> None:
        mirror = self._open.get(mirror_id)
        if mirror is None or mirror.shadow is not None:
            return  # late, or a duplicate (at-least-once delivery)
        mirror.shadow, mirror.shadow_ms = result, _ms_since(mirror.sent)
        if mirror.primary is not None:
            self._finish(mirror_id)

    def _finish(self, mirror_id: str) -> None:
        mirror = self._open.pop(mirror_id, None)
        if mirror is None:
            return
        mirror.timer.cancel()
        if self._closed is not None:
            self._closed(mirror_id)
        outcome, diff, status = verdict(mirror.primary, mirror.shadow, mirror.config)
        self._emit(ShadowEvent(
            model=mirror.model, version=mirror.version, shadow_version=mirror.config.version, outcome=outcome,
            primary_ms=mirror.primary_ms, shadow_ms=mirror.shadow_ms, max_abs_diff=diff, shadow_status=status,
        ))  # fmt: skip

    def close(self) -> None:
        for mirror_id, mirror in self._open.items():
            mirror.timer.cancel()
            if self._closed is not None:
                self._closed(mirror_id)
        self._open.clear()


class Shadowing:
    """A client's shadow traffic: which models mirror (read with their routes), the mirrors in
    flight, and their reports. Mirrors reply to ``<inbox>.s.<id>``; the stream acks them on ``.t.``."""

    def __init__(self, conn: Connection, inbox: str, claims: Claims) -> None:
        self._conn, self._inbox, self._claims = conn, inbox, claims
        self.configs: dict[str, ShadowConfig | None] = {}
        self.book = ShadowBook(self._report, closed=self._closed)
        # A request that went by claim check is read by both versions: its object goes once the
        # mirror is settled, which is never before the primary's reply (or timeout).
        self._claimed: dict[str, bytes] = {}
        self._tasks = TaskSet()

    def pick(self, model: str, subject: str, new_id: Callable[[], str]) -> str | None:
        """A request id for a mirror of this request, if the model's route shadows it this time."""
        config = self.configs.get(model)
        if config is None or parse_infer_subject(subject)[1] == config.version or not self.book.draw(config):
            return None
        return new_id()

    async def send(self, mirror_id: str, subject: str, payload: bytes, deadline: str, timeout: float) -> None:
        """Queue a copy of a request (already queued on ``subject``) for the shadow version."""
        model, version, priority = parse_infer_subject(subject)
        config = self.configs[model]
        assert config is not None
        self.book.open(mirror_id, model, version, config, timeout)
        if claim_of(payload) is not None:
            self._claimed[mirror_id] = payload
        reply_to = inbox_subject(self._inbox, ReplyKind.SHADOW_REPLY, mirror_id)
        headers = {HDR_MSG_ID: mirror_id, HDR_REPLY: reply_to, HDR_DEADLINE: deadline}
        if self._conn.settings.claim_bucket != BUCKET_CLAIMS:
            headers[HDR_CLAIM_BUCKET] = self._conn.settings.claim_bucket
        try:
            ack_to = inbox_subject(self._inbox, ReplyKind.SHADOW_ACK, mirror_id)
            candidate = infer_subject(model, config.version, priority)
            await self._conn.nc.publish(candidate, payload, reply=ack_to, headers=headers)
        except Exception as exc:  # the caller's own request is queued already; only the mirror fails
            self.book.shadow_failed(mirror_id, translate_error(exc, "queue a shadow request"))

    def reply(self, mirror_id: str, payload: bytes) -> None:
        """A mirror's reply; a large one is read from the claim check first, off the reply path."""
        if claim_of(payload) is None:
            self.book.shadow_reply(mirror_id, payload)
        else:
            self._spawn(self._claimed_reply(mirror_id, payload))

    async def _claimed_reply(self, mirror_id: str, payload: bytes) -> None:
        try:
            self.book.shadow_reply(mirror_id, await self._claims.resolve(payload, take=True))
        except MeshError as err:
            self.book.shadow_failed(mirror_id, err)

    def _closed(self, mirror_id: str) -> None:
        payload = self._claimed.pop(mirror_id, None)
        if payload is not None:
            self._spawn(self._claims.release(payload))

    def _report(self, event: ShadowEvent) -> None:
        self._spawn(self._conn.nc.publish(shadow_subject(event.model), encode_event(event)))

    def _spawn(self, work: Awaitable[None]) -> None:
        self._tasks.spawn(work)

    async def close(self, grace_s: float = 2.0) -> None:
        """Let mirrors still in flight finish and report (up to ``grace_s``), then drop the rest."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.book.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.01)
        self.book.close()
        await self._tasks.join(timeout=1.0)


def _ms_since(start: float) -> float:
    return round((time.monotonic() - start) * 1000.0, 3)
