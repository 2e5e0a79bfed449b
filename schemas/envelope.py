"""Request and reply envelopes: small msgpack maps around tensors, checked cheaply by hand.

Pydantic stays off this path on purpose: the envelope is decoded once per request on the
worker and once per reply on the client, and its cost is part of every request's latency.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from schemas.errors import BadInput, MeshError, ModelFailure, error_from_wire
from schemas.tensors import decode_tensor, encode_tensor

__all__ = [
    "Claim", "Reply", "Timing", "claim_of", "decode_bundle", "decode_reply", "decode_request", "decode_request_bundle",
    "encode_bundle", "encode_claim", "encode_error", "encode_outputs", "encode_request", "encode_request_bundle",
]  # fmt: skip

WIRE_VERSION = 1

Tensors = dict[str, np.ndarray[Any, Any]]


@dataclass(slots=True)
class Timing:
    """Where a request's time went, as the worker saw it (milliseconds)."""

    queue_ms: float = 0.0
    compute_ms: float = 0.0
    batch_size: int = 0
    worker: str = ""
    attempt: int = 1
    # The worker's view of its queue as it answered, for clients to shed load at once (429) rather
    # than queue a request that could not be served in time: requests waiting ahead on this
    # subject, and the requests per second this replica serves when it has work (0: not known yet).
    ahead: int = 0
    rate: float = 0.0
    version: str = ""  # the model version that answered (a canary's or the main one)


@dataclass(slots=True)
class Reply:
    outputs: Tensors
    timing: Timing


@dataclass(slots=True, frozen=True)
class Claim:
    """A claim check: the real payload (request or reply) is the object ``name`` of ``bucket``."""

    bucket: str
    name: str
    size: int


def _timing_map(t: Timing) -> dict[str, Any]:
    # By hand: dataclasses.asdict deep-copies and costs more than the rest of the reply.
    return {"queue_ms": t.queue_ms, "compute_ms": t.compute_ms, "batch_size": t.batch_size,
            "worker": t.worker, "attempt": t.attempt, "ahead": t.ahead, "rate": t.rate,
            "version": t.version}  # fmt: skip


_TIMING_FIELDS = frozenset(Timing.__dataclass_fields__)


def _timing_of(raw: Any) -> Timing:
    """A reply's timing; fields this version does not know (a newer worker's) are left out."""
    if not isinstance(raw, dict):
        return Timing()
    return Timing(**{k: v for k, v in raw.items() if k in _TIMING_FIELDS})


def _pack(body: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(body)
    return packed


def encode_request(inputs: dict[str, Any]) -> bytes:
    if not isinstance(inputs, dict) or not inputs:
        raise BadInput("inputs must be a non-empty mapping of name to array")
    tensors = {str(name): encode_tensor(value) for name, value in inputs.items()}
    return _pack({"v": WIRE_VERSION, "inputs": tensors})


def decode_request(payload: bytes) -> Tensors:
    """Decode a request body into named arrays, or raise BadInput naming what is wrong."""
    try:
        body = msgpack.unpackb(payload, raw=False)
    except Exception as exc:  # msgpack raises many unrelated types for garbage
        raise BadInput(f"malformed request payload: {exc}") from exc
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), dict):
        raise BadInput("malformed request payload: expected a map with 'inputs'")
    if body.get("v", WIRE_VERSION) != WIRE_VERSION:
        raise BadInput(f"unsupported envelope version {body.get('v')!r}")
    return {str(name): decode_tensor(obj, str(name)) for name, obj in body["inputs"].items()}


def encode_outputs(outputs: dict[str, Any], timing: Timing) -> bytes:
    tensors = {name: encode_tensor(value) for name, value in outputs.items()}
    return _pack({"v": WIRE_VERSION, "outputs": tensors, "timing": _timing_map(timing)})


def encode_error(error: MeshError, timing: Timing | None = None) -> bytes:
    body: dict[str, Any] = {"v": WIRE_VERSION, "error": error.to_wire()}
    if timing is not None:
        body["timing"] = _timing_map(timing)
    return _pack(body)


def encode_bundle(replies: list[tuple[str, bytes]]) -> bytes:
    """Several encoded replies for one client, as (request id, reply) pairs."""
    return _pack({"v": WIRE_VERSION, "replies": replies})


def decode_bundle(payload: bytes) -> list[tuple[str, bytes]]:
    try:
        body = msgpack.unpackb(payload, raw=False)
        return [(str(request_id), bytes(reply)) for request_id, reply in body["replies"]]
    except Exception as exc:
        raise ModelFailure(f"unreadable reply bundle from worker: {exc}") from exc


def encode_request_bundle(requests: list[tuple[dict[str, str], bytes]]) -> bytes:
    """Several encoded requests for one subject, as (headers, request) pairs: one stream message."""
    return _pack({"v": WIRE_VERSION, "requests": requests})


def decode_request_bundle(payload: bytes) -> list[tuple[dict[str, str], bytes]]:
    """The (headers, request) pairs of a request bundle; BadInput if it cannot be read."""
    try:
        body = msgpack.unpackb(payload, raw=False)
        requests = [(headers, request) for headers, request in body["requests"]]
    except Exception as exc:
        raise BadInput(f"unreadable request bundle: {exc}") from exc
    for headers, request in requests:
        if not isinstance(headers, dict) or not isinstance(request, bytes):
            raise BadInput("unreadable request bundle: each request is a map of headers and bytes")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
            raise BadInput("unreadable request bundle: header names and values are strings")
    return requests


def decode_reply(payload: bytes) -> Reply:
    """Decode a reply; an error reply is raised as its typed MeshError.

    A reply that cannot be read is the worker's fault, not the caller's: ModelFailure.
    """
    try:
        body = msgpack.unpackb(payload, raw=False)
        timing = _timing_of(body.get("timing"))
        if "claim" in body:  # its receiver resolves a claim before decoding; an empty reply would mislead
            raise ValueError("a claim check, not resolved")
        error = body.get("error")
        if error is not None:
            error = error_from_wire(error)
        else:
            outputs = {str(name): decode_tensor(obj, str(name)) for name, obj in body.get("outputs", {}).items()}
    except Exception as exc:
        raise ModelFailure(f"unreadable reply from worker: {exc}") from exc
    if error is not None:
        raise error
    return Reply(outputs, timing)


# Every claim envelope starts with these bytes (map of 2: "v", 1, "claim", ...), so telling one
# from an ordinary payload costs a prefix comparison, not a decode.
_CLAIM_PREFIX = b"\x82\xa1v" + msgpack.packb(WIRE_VERSION) + b"\xa5claim"


def encode_claim(claim: Claim) -> bytes:
    return _pack({"v": WIRE_VERSION, "claim": {"bucket": claim.bucket, "name": claim.name, "size": claim.size}})


def claim_of(payload: bytes) -> Claim | None:
    """The claim a payload carries instead of tensors, or None for an ordinary payload."""
    if not payload.startswith(_CLAIM_PREFIX):
        return None
    try:
        ref = msgpack.unpackb(payload, raw=False)["claim"]
        bucket, name, size = ref["bucket"], ref["name"], ref["size"]
    except Exception as exc:
        raise BadInput(f"malformed claim reference: {exc}") from exc
    if not (isinstance(bucket, str) and isinstance(name, str) and name and type(size) is int and size >= 0):
        raise BadInput("malformed claim reference: expected bucket, name and size")
    return Claim(bucket, name, size)
