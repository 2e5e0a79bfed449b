"""Fuzzing what reaches a worker: headers and bundle members, written byte by byte on the wire.

Each example publishes a few hundred hand-made messages (any header names and values a NATS frame
can carry, bundles of hostile members, status lines where request headers should be, payloads of
any shape) to one model's subjects, then checks the same worker: every message was settled, every
answer it sent is a typed error or a correct output, nothing went through the last-resort guard,
and an ordinary client gets correct answers. 20 examples of 500 messages: 10,000 in all.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from nats.aio.msg import Msg

from broker import Connection, NatsServer, Settings
from examples.build_models import build_identity_onnx
from schemas.envelope import decode_reply, encode_request, encode_request_bundle
from schemas.errors import MeshError
from schemas.subjects import (
    HDR_BUNDLE,
    HDR_CLAIM_BUCKET,
    HDR_DEADLINE,
    HDR_DELIVERED,
    HDR_JOB,
    HDR_JOB_ITEM,
    HDR_MSG_ID,
    HDR_REPLY,
    HDR_REPLY_INBOX,
    HDR_ROUTE,
    HDR_TRACEPARENT,
    HDR_TRACESTATE,
    PRIORITIES,
    STREAM_INFER,
    consumer_name,
    infer_subject,
    job_subject,
    requeue_subject,
)
from servemesh import MeshClient
from tests.conftest import serving, unique, wait_for
from tests.hostile import RawPublisher, header_block
from tests.property.test_worker import Mesh

PER_EXAMPLE = 500
EXAMPLES = 20
BATCH = 8
NAMES = [HDR_BUNDLE, HDR_CLAIM_BUCKET, HDR_DEADLINE, HDR_DELIVERED, HDR_JOB, HDR_JOB_ITEM, HDR_MSG_ID, HDR_REPLY,
         HDR_REPLY_INBOX, HDR_ROUTE, HDR_TRACEPARENT, HDR_TRACESTATE, "Status", "Description", "Nats-Pending-Messages",
         "Mesh-Request-Id"]  # fmt: skip
HOSTILE_VALUES = ["", " ", "*", ">", "a b", "a.b", "..", "$KV.mesh-workers.x", "mesh.infer.x.1.normal", "-1", "0",
                  "99999999999999999999", "1e9", "²", "٣", "\u0000", "\x7f", "é" * 40, "x" * 2000, "00-" + "0" * 32,
                  "00-" + "f" * 32 + "-" + "f" * 16 + "-01", "mesh-claims", "mesh-claims-x", "mesh-models",
                  "mesh.infer.a.1.high,mesh.infer.b.2.low", ",", "_INBOX.x.a.1", "_INBOX.x.r.1"]  # fmt: skip

STATUS_LINES = [b"", b"", b"", b"100", b"408", b"503 No Responders", b"404 No Messages", b"\xff\xfe"]


class Hostile:
    """Hostile messages from a seeded random source: quick to make by the thousand, and each
    example's seed (drawn by Hypothesis) reproduces its whole batch."""

    def __init__(self, seed: int, inbox: str) -> None:
        self.rng = random.Random(seed)
        self.inbox = inbox

    def text(self, most: int = 40) -> str:
        alphabet = self.rng.choice(["abc.*> -_:~", "0123456789", "\u00e9\u0663\u00b2\u2028\ufffd\x00\x7f\t", ",$.a"])
        return "".join(self.rng.choice(alphabet) for _ in range(self.rng.randint(0, most)))

    def name(self) -> str:
        return self.rng.choice(NAMES) if self.rng.random() < 0.7 else self.text(12) or "X"

    def value(self) -> str:
        return self.rng.choice(HOSTILE_VALUES) if self.rng.random() < 0.6 else self.text()

    def raw(self, most: int = 24) -> bytes:
        data = bytes(self.rng.randrange(256) for _ in range(self.rng.randint(0, most)))
        return data.replace(b"\r", b"").replace(b"\n", b"")

    def headers(self) -> dict[str, str]:
        headers = {self.name(): self.value() for _ in range(self.rng.randint(0, 6))}
        if self.rng.random() < 0.7:
            headers[HDR_REPLY] = f"{self.inbox}.r.{self.rng.randrange(10**6)}"
        return headers

    def payload(self) -> bytes:
        kind = self.rng.choice(["good", "good", "wrong-shape", "garbage", "msgpack"])
        if kind == "good":
            return encode_request({"input": np.full((self.rng.randint(1, 3), 4), 1.0, np.float32)})
        if kind == "wrong-shape":
            return encode_request({"input": np.zeros((1, self.rng.randint(0, 6)), np.float32)})
        if kind == "msgpack":
            return msgpack.packb({self.text(6): self.rng.randrange(2**32) for _ in range(3)})  # type: ignore[no-any-return]
        return self.raw(64)

    def message(self) -> tuple[bytes, bytes]:
        """(header block, payload) of one stream message."""
        if self.rng.random() < 0.5:
            if self.rng.random() < 0.5:  # readable pairs, possibly with every mesh header at once
                pairs: Any = self.headers()
            else:  # raw bytes: names and values a client library would refuse to write
                pairs = [(self.raw().replace(b":", b""), self.raw()) for _ in range(self.rng.randint(0, 5))]
                pairs.append((HDR_REPLY.encode(), f"{self.inbox}.r.{self.rng.randrange(10**6)}".encode()))
            return header_block(pairs, self.rng.choice(STATUS_LINES)), self.payload()
        members = [(self.headers(), self.payload()) for _ in range(self.rng.randint(0, BATCH + 4))]
        count = self.rng.choice([str(len(members)), str(len(members) + 3), "0", "x", "999999", "-2"])
        if self.rng.random() < 0.8:
            body = encode_request_bundle(members)
        else:  # bundles whose structure is wrong: not pairs, not maps, not bytes
            body = msgpack.packb({"v": 1, "requests": [self.rng.choice([1, "a", [1], {"a": 1}, [{}, 1]])
                                                       for _ in range(3)]})  # fmt: skip
        return header_block({HDR_BUNDLE: count, HDR_MSG_ID: unique("fz")}), body


class Guarded(logging.Handler):
    """Counts log records of deliveries that reached the last-resort guard (an untyped failure)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "unexpectedly" in record.getMessage():
            self.records.append(record)


class Fuzz(Mesh):
    """The property tests' mesh harness (an event loop in a thread), serving one identity model."""

    async def _start(self) -> None:
        self.worker = await self._stack.enter_async_context(serving(self.url, self.repo, [self.ident]))
        self.client = await self._stack.enter_async_context(await MeshClient.connect(self.url))
        self.raw = await Connection.open(Settings.from_url(self.url))
        self._stack.push_async_callback(self.raw.close)
        self.inbox = self.raw.nc.new_inbox()
        self.answers: Counter[str] = Counter()
        await self.raw.nc.subscribe(f"{self.inbox}.>", cb=self._on_answer)
        host, port = self.url.rsplit("//", 1)[1].split(":")
        self.publisher = RawPublisher(host, int(port))
        self._stack.push_async_callback(self.publisher.close)

    async def _on_answer(self, msg: Msg) -> None:
        try:
            reply = decode_reply(msg.data)
        except MeshError as err:
            self.answers[str(err.status)] += 1
            return
        assert set(reply.outputs) == {"output"}
        self.answers["outputs"] += 1

    async def publish_all(self, batch: list[tuple[bytes, bytes]], subjects: list[str]) -> None:
        for i, (headers, payload) in enumerate(batch):
            await self.publisher.publish(subjects[i % len(subjects)], headers, payload)
        await self.publisher.flush()

    async def drained(self) -> bool:
        for priority in PRIORITIES:
            info = await self.raw.js.consumer_info(STREAM_INFER, consumer_name(self.ident, "1", priority))
            if info.num_pending or info.num_ack_pending:
                return False
        return all(feed.held == 0 for server in self.worker.servers.values() for feed in server._feeds.values())

    async def serves(self) -> None:
        rows = [np.full((1, 4), i, np.float32) for i in range(2 * BATCH)]
        outs = await asyncio.gather(*(self.client.infer(self.ident, {"input": r}, timeout=20) for r in rows))
        for row, out in zip(rows, outs, strict=True):
            np.testing.assert_array_equal(out["output"], row)


@pytest.fixture(scope="module")
def fuzz(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzz]:
    repo = tmp_path_factory.mktemp("fuzz")
    mesh = Fuzz(nats_server.url, repo)
    mesh.ident = unique("fuzz")
    build_identity_onnx(repo, mesh.ident, "float32", shape=(4,), max_batch_size=BATCH, max_delay_ms=1)
    guard = Guarded()
    logging.getLogger().addHandler(guard)
    mesh._thread.start()
    mesh.run(mesh._start())
    mesh.guard = guard  # type: ignore[attr-defined]
    try:
        yield mesh
        print(f"\nhostile messages: {EXAMPLES * PER_EXAMPLE} sent; answers by status: {dict(mesh.answers)}; "
              f"frames the server refused: {mesh.publisher.refused}")  # fmt: skip
    finally:
        logging.getLogger().removeHandler(guard)
        mesh.close()


FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                phases=[Phase.generate])  # each example is a seed: its batch is printed, not shrunk


@FUZZ
@given(seed=st.integers(0, 2**32))
def test_thousands_of_hostile_messages_never_stop_the_worker(fuzz: Fuzz, seed: int) -> None:
    hostile = Hostile(seed, fuzz.inbox)
    batch = [hostile.message() for _ in range(PER_EXAMPLE)]
    base = [infer_subject(fuzz.ident, "1", p) for p in PRIORITIES]
    subjects = base + [requeue_subject(s) for s in base] + [job_subject(s) for s in base]
    fuzz.run(fuzz.publish_all(batch, subjects))
    fuzz.run(wait_for(fuzz.drained, 60, what="every hostile message settled"))
    assert not fuzz.guard.records, [r.getMessage() for r in fuzz.guard.records]  # type: ignore[attr-defined]
    fuzz.run(fuzz.serves())
