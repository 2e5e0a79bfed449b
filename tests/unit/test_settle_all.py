"""Settling a batch's requests, against a stand-in connection that records what is published on ack
subjects: a bundle is settled once, when all its requests are, nak'ed if any of them is; a lone request
is settled on its own; nothing is settled twice."""

from __future__ import annotations

import numpy as np
from nats.aio.msg import Msg

from schemas.envelope import encode_request, encode_request_bundle
from schemas.subjects import HDR_BUNDLE, HDR_MSG_ID
from workers.delivery import Delivery, settle_all

SUBJECT = "mesh.infer.m.1.normal"


class _Nc:
    is_closed = False

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    async def publish(self, subject: str, payload: bytes = b"", **_: object) -> None:
        self.published.append((subject, payload))


def _bundle(nc: _Nc, ack_to: str, size: int) -> list[Delivery]:
    requests = [({HDR_MSG_ID: f"{ack_to}-{i}"}, encode_request({"x": np.zeros(1)})) for i in range(size)]
    msg = Msg(
        None, subject=SUBJECT, reply=ack_to, data=encode_request_bundle(requests), headers={HDR_BUNDLE: str(size)}
    )  # type: ignore[arg-type]
    return Delivery(nc, msg, "normal").unbundle()  # type: ignore[arg-type]


async def test_a_batch_settles_each_bundle_once_and_lone_requests_alone() -> None:
    nc = _Nc()
    whole = _bundle(nc, "ack.whole", 3)
    split = _bundle(nc, "ack.split", 4)  # two of its requests in this batch, two in a later one
    failed = _bundle(nc, "ack.failed", 2)
    lone = Delivery(nc, Msg(None, subject=SUBJECT, reply="ack.lone", data=encode_request({"x": np.zeros(1)})), "normal")  # type: ignore[arg-type]
    await settle_all([*whole, split[0], lone, *failed, split[1]], nak=[failed[1]])
    assert sorted(nc.published) == [("ack.failed", b"-NAK"), ("ack.lone", b"+ACK"), ("ack.whole", b"+ACK")]
    await settle_all([*whole, lone, *split[:2]])  # settled already: not counted again
    assert [s for s, _ in nc.published].count("ack.whole") == 1
    assert "ack.split" not in [s for s, _ in nc.published]  # two of its four requests are still open
    await settle_all(split[2:])
    assert nc.published[-1] == ("ack.split", b"+ACK")
