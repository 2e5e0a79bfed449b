"""The tensor codec and envelopes: exact round trips, zero-copy decode, typed errors."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from schemas.envelope import (
    Timing,
    decode_reply,
    decode_request,
    decode_request_bundle,
    encode_error,
    encode_outputs,
    encode_request,
    encode_request_bundle,
)
from schemas.errors import BadInput, DeadlineExceeded, MeshError, ModelFailure, Overloaded, UnknownModel
from schemas.tensors import NUMERIC_DTYPES, decode_tensor, encode_tensor


@pytest.mark.parametrize("dtype", sorted(NUMERIC_DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3, 4)])
def test_numeric_round_trip(dtype: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 100).astype(dtype)
    wire = msgpack.unpackb(msgpack.packb(encode_tensor(x)))
    y = decode_tensor(wire)
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_array_equal(y, x)


def test_decode_is_zero_copy() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    wire = msgpack.unpackb(msgpack.packb(encode_tensor(x)))
    y = decode_tensor(wire)
    assert not y.flags.owndata
    assert np.shares_memory(y, np.frombuffer(wire["b"], dtype=np.uint8))


def test_non_contiguous_and_big_endian_arrays_encode_by_value() -> None:
    x = np.arange(24, dtype=">i4").reshape(4, 6)[:, ::2]
    y = decode_tensor(msgpack.unpackb(msgpack.packb(encode_tensor(x))))
    np.testing.assert_array_equal(y, x)
    assert y.dtype == np.dtype("int32")


def test_str_and_bytes_tensors() -> None:
    s = np.array([["héllo", ""], ["a", "servemesh"]])
    b = np.array([b"\x00\xff", b"abc"], dtype=object)
    s2 = decode_tensor(msgpack.unpackb(msgpack.packb(encode_tensor(s))))
    b2 = decode_tensor(msgpack.unpackb(msgpack.packb(encode_tensor(b))))
    assert s2.shape == (2, 2) and s2.tolist() == s.tolist()
    assert b2.tolist() == [b"\x00\xff", b"abc"]


@pytest.mark.parametrize(
    "obj",
    [
        [1, 2],
        {"dt": "float32", "sh": [2], "b": b"\0" * 7},
        {"dt": "float32", "sh": [-2], "b": b""},
        {"dt": "float32", "sh": "2", "b": b"\0" * 8},
        {"dt": "nope", "sh": [1], "b": b"\0"},
        {"dt": "float32", "sh": [1], "b": [0.0]},
        {"dt": "str", "sh": [2], "items": ["a"]},
        {"dt": "str", "sh": [1], "items": [b"a"]},
    ],
)
def test_malformed_tensors_raise_bad_input(obj: object) -> None:
    with pytest.raises(BadInput):
        decode_tensor(obj)


def test_request_round_trip_and_garbage() -> None:
    x = np.ones((2, 3), np.float16)
    assert decode_request(encode_request({"a": x}))["a"].tolist() == x.tolist()
    for garbage in (b"", b"\xc1", msgpack.packb({"inputs": 3}), msgpack.packb({"v": 99, "inputs": {}})):
        with pytest.raises(BadInput):
            decode_request(garbage)
    with pytest.raises(BadInput):
        encode_request({})


def test_request_bundle_round_trip() -> None:
    requests = [({"Nats-Msg-Id": f"r{i}", "Mesh-Reply": f"_INBOX.x.r.{i}"}, encode_request({"x": np.arange(i)}))
                for i in range(3)]  # fmt: skip
    assert decode_request_bundle(encode_request_bundle(requests)) == requests


@pytest.mark.parametrize(
    "body",
    [b"\xc1", msgpack.packb({"v": 1}), msgpack.packb({"v": 1, "requests": [[{"a": 1}, b"x"]]}),
     msgpack.packb({"v": 1, "requests": [[{"a": "b"}, "not bytes"]]}), msgpack.packb({"v": 1, "requests": [[1]]})],
)  # fmt: skip
def test_unreadable_request_bundles_raise_bad_input(body: bytes) -> None:
    with pytest.raises(BadInput, match="unreadable request bundle"):
        decode_request_bundle(body)


@pytest.mark.parametrize("cls", [BadInput, UnknownModel, Overloaded, ModelFailure, DeadlineExceeded])
def test_errors_cross_the_wire_as_the_same_class(cls: type[MeshError]) -> None:
    with pytest.raises(cls) as info:
        decode_reply(encode_error(cls("what happened", model="m"), Timing(worker="w")))
    assert info.value.message == "what happened"
    assert info.value.data == {"model": "m"}
    assert info.value.status == cls.status


def test_reply_carries_outputs_and_timing() -> None:
    reply = decode_reply(encode_outputs({"y": np.arange(3)}, Timing(1.5, 2.5, 4, "w1", 2)))
    assert reply.outputs["y"].tolist() == [0, 1, 2]
    assert reply.timing == Timing(1.5, 2.5, 4, "w1", 2)
