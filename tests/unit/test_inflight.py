"""A client's requests in flight, against a stand-in connection that records publishes: each fails at its own
deadline with what went wrong, one the stream has not acknowledged is published again, and nothing piles up
once requests are answered."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from nats.aio.msg import Msg

from schemas.errors import DeadlineExceeded
from schemas.subjects import HDR_MSG_ID
from servemesh.inflight import InFlight

SUBJECT = "mesh.infer.m.1.normal"


class _Nc:
    def __init__(self) -> None:
        self.published: list[str] = []  # request ids, in publish order

    async def publish(
        self, subject: str, payload: bytes, reply: str = "", headers: dict[str, str] | None = None
    ) -> None:
        assert headers is not None and subject == SUBJECT
        self.published.append(headers[HDR_MSG_ID])


class _Conn:
    def __init__(self) -> None:
        self.nc = _Nc()


def _stored(request_id: str, seq: int) -> Msg:
    return Msg(None, subject=f"_INBOX.t.a.{request_id}", data=b'{"stream":"MESH_INFER","seq":%d}' % seq)  # type: ignore[arg-type]


async def test_each_request_fails_at_its_deadline_and_unacknowledged_ones_are_published_again() -> None:
    conn = _Conn()
    inflight = InFlight(conn, "_INBOX.t")  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    start = loop.time()
    timeouts = {"a": 1.2, "b": 0.4, "c": 0.8}
    pending = {rid: inflight.open(rid, SUBJECT, b"x", {HDR_MSG_ID: rid}, t, t) for rid, t in timeouts.items()}
    inflight.on_ack("c", _stored("c", 3))  # c reached the stream: it only waits for its reply
    failed_at: dict[str, float] = {}

    async def outcome(request_id: str) -> DeadlineExceeded:
        with pytest.raises(DeadlineExceeded) as err:
            await pending[request_id].future
        failed_at[request_id] = loop.time() - start
        inflight.close(request_id)
        return err.value

    errors = dict(zip(timeouts, await asyncio.gather(*(outcome(rid) for rid in timeouts)), strict=True))
    assert sorted(failed_at, key=failed_at.__getitem__) == ["b", "c", "a"]
    for request_id, timeout in timeouts.items():
        assert timeout <= failed_at[request_id] < timeout + 0.5, (request_id, failed_at)
        assert errors[request_id].status == 504
    assert "did not acknowledge" in errors["a"].message and "did not acknowledge" in errors["b"].message
    assert "no reply within 0.8s" in errors["c"].message
    # a was published again at least once (after 0.25 s; again 0.5 s later); c, acknowledged, never.
    assert "c" not in conn.nc.published and conn.nc.published.count("a") >= 1, conn.nc.published
    inflight.cancel_all()


async def test_answered_requests_leave_nothing_behind() -> None:
    inflight = InFlight(_Conn(), "_INBOX.t")  # type: ignore[arg-type]
    futures: list[Any] = []
    for i in range(20_000):
        rid = f"r{i}"
        futures.append(inflight.open(rid, SUBJECT, b"x", {HDR_MSG_ID: rid}, 30.0, 30.0).future)
        inflight.on_ack(rid, _stored(rid, i))
        inflight.resolve(rid, b"reply")
        inflight.close(rid)
    assert all(f.result() == b"reply" for f in futures)
    assert len(inflight) == 0
    # Deadlines of answered requests are dropped in bulk: the heap stays bounded, and so do the others.
    assert len(inflight._deadlines) <= 1024 + 1 and not inflight._unacked
    inflight.cancel_all()
    assert inflight._expiry is None and inflight._sweep is None
