"""Properties of the wire codec and the per-request check, without a server.

Whatever bytes or msgpack structure arrives, decoding either yields arrays or raises the typed
BadInput (never another exception); every array a client can send comes back bit for bit.
"""

from __future__ import annotations

import contextlib
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from schemas.envelope import Timing, decode_reply, decode_request, encode_error, encode_outputs, encode_request
from schemas.errors import (
    BadInput,
    DeadlineExceeded,
    MeshError,
    MeshUnavailable,
    ModelFailure,
    NoCapacity,
    Overloaded,
    UnknownModel,
)
from schemas.spec import TensorSpec
from schemas.tensors import decode_tensor, encode_tensor
from tests.property.strategies import any_msgpack, arrays, numeric_arrays, object_arrays, request_bodies, tensor_maps
from workers.signature import Signature

FAST = settings(max_examples=150, deadline=None)


def _wire(obj: Any) -> Any:
    """What the other side sees: packed, then unpacked."""
    return msgpack.unpackb(msgpack.packb(obj), raw=False)


def _same(x: np.ndarray[Any, Any], y: np.ndarray[Any, Any]) -> None:
    """Equal shape and bit-identical values (NaN payloads and -0.0 included)."""
    assert y.shape == x.shape
    if x.dtype.kind in "USO":
        assert y.dtype == object
        assert [str(v) if x.dtype.kind == "U" else v for v in x.reshape(-1).tolist()] == y.reshape(-1).tolist()
        return
    assert y.dtype == x.dtype.newbyteorder("<") and y.dtype.byteorder in "<=|"
    little = x.astype(x.dtype.newbyteorder("<"))
    assert np.ascontiguousarray(y).tobytes() == np.ascontiguousarray(little).tobytes()


def _decodes_or_bad_input(payload: bytes) -> dict[str, np.ndarray[Any, Any]] | None:
    try:
        inputs = decode_request(payload)
    except BadInput as err:
        assert err.status == 400 and err.message
        return None
    assert all(isinstance(name, str) and isinstance(a, np.ndarray) for name, a in inputs.items())
    return inputs


# -- round trips ----------------------------------------------------------------------------------


@FAST
@given(numeric_arrays())
@example(np.zeros((0, 3), np.float16))
@example(np.array(True))
@example(np.arange(12, dtype=">f8").reshape(3, 4).T[::2])
def test_every_numeric_array_round_trips_bit_for_bit(x: np.ndarray[Any, Any]) -> None:
    _same(x, decode_tensor(_wire(encode_tensor(x))))


@FAST
@given(object_arrays())
@example(np.empty((2, 0), dtype=object))
@example(np.array([["é", ""]]))
def test_str_and_bytes_arrays_round_trip(x: np.ndarray[Any, Any]) -> None:
    _same(x, decode_tensor(_wire(encode_tensor(x))))


@FAST
@given(st.dictionaries(st.text(min_size=1, max_size=8), arrays, min_size=1, max_size=4))
def test_requests_and_replies_round_trip(inputs: dict[str, np.ndarray[Any, Any]]) -> None:
    decoded = decode_request(encode_request(inputs))
    assert decoded.keys() == inputs.keys()
    for name, x in inputs.items():
        _same(x, decoded[name])
    timing = Timing(queue_ms=1.5, compute_ms=0.25, batch_size=3, worker="w", attempt=2)
    reply = decode_reply(encode_outputs(inputs, timing))
    assert reply.timing == timing
    for name, x in inputs.items():
        _same(x, reply.outputs[name])


# -- whatever arrives, a typed error or arrays ---------------------------------------------------


@FAST
@given(st.binary(max_size=256))
@example(b"")
@example(b"\xc1")
@example(b"\x81\xa6inputs\x81\xa1x\x83\xa2dt\xa7float32\xa2sh\x91\xcf" + b"\xff" * 8 + b"\xa1b\xc4\x00")
def test_arbitrary_bytes_decode_or_raise_bad_input(payload: bytes) -> None:
    _decodes_or_bad_input(payload)


@FAST
@given(any_msgpack)
def test_arbitrary_msgpack_decodes_or_raises_bad_input(body: Any) -> None:
    _decodes_or_bad_input(msgpack.packb(body))


@settings(max_examples=400, deadline=None)
@given(request_bodies())
# Found by these properties: each once escaped as TypeError/ValueError instead of BadInput.
@example({"inputs": {"x": {"dt": ["float32"], "sh": [1], "b": b"\0" * 4}}})  # unhashable dtype
@example({"inputs": {"x": {"dt": "float32", "sh": [0, 2**63], "b": b""}}})  # zero-size, huge axis
@example({"inputs": {"x": {"dt": "str", "sh": [0, 2**64 - 1], "items": []}}})
@example({"inputs": {"x": {"dt": "float32", "sh": [1] * 70, "b": b"\0" * 4}}})  # rank above numpy's limit
@example({"inputs": {"x": {"dt": "float32", "sh": [True], "b": b"\0" * 4}}})  # a bool is not a dimension
def test_malformed_envelopes_decode_or_raise_bad_input(body: Any) -> None:
    inputs = _decodes_or_bad_input(msgpack.packb(body))
    if inputs is None:
        return
    for name, array in inputs.items():  # what decodes is exactly what was declared
        declared = body["inputs"][name]
        assert list(array.shape) == list(declared["sh"])
        if declared["dt"] not in ("str", "bytes"):
            assert array.nbytes == len(declared["b"])


@FAST
@given(tensor_maps())
@example({"dt": "float32", "sh": [10**6, 10**6], "b": b"\0" * 4})  # 10^12 elements claimed, 4 bytes sent
@example({"dt": "float64", "sh": [2**32, 2**32], "b": b""})
def test_huge_declared_shapes_are_bad_input_not_memory_errors(obj: Any) -> None:
    try:
        decoded = decode_tensor(_wire(obj))
    except BadInput as err:
        assert err.data.get("input") == "tensor"
        return
    assert decoded.nbytes <= 64 * 8  # nothing decodes to more than the bytes that came with it


@FAST
@given(st.one_of(st.binary(max_size=128), any_msgpack.map(msgpack.packb)))
@example(msgpack.packb({"error": 5}))
@example(msgpack.packb({"error": {"status": "x"}}))
@example(msgpack.packb({"outputs": [1]}))
@example(msgpack.packb({"outputs": {"y": {"dt": "float32", "sh": [2], "b": b""}}}))
def test_any_reply_decodes_or_raises_a_mesh_error(payload: bytes) -> None:
    """The client side: a garbled reply is a typed error too (ModelFailure: the worker's fault)."""
    try:
        decode_reply(payload)
    except MeshError as err:
        assert err.message
        if not isinstance(err, ModelFailure):  # a well-formed error reply, rebuilt as its own class
            assert "error" in msgpack.unpackb(payload, raw=False)
        elif "unreadable reply" not in err.message:
            assert msgpack.unpackb(payload, raw=False)["error"]["code"] == ModelFailure.code


@FAST
@given(
    st.sampled_from([BadInput, UnknownModel, Overloaded, ModelFailure, NoCapacity, MeshUnavailable, DeadlineExceeded]),
    st.text(max_size=20),
    st.dictionaries(st.text(max_size=5), st.integers(-(2**63), 2**63 - 1)),
)
def test_error_replies_keep_class_message_and_data(cls: type[MeshError], message: str, data: dict[str, int]) -> None:
    with pytest.raises(MeshError) as got:
        decode_reply(encode_error(cls(message, **data)))
    assert (type(got.value), got.value.status, got.value.message, got.value.data) == (cls, cls.status, message, data)


# -- the per-request check -----------------------------------------------------------------------

SIG = Signature(
    (TensorSpec(name="a", dtype="float32", shape=(3, -1)), TensorSpec(name="b", dtype="int64", shape=())),
    (TensorSpec(name="y", dtype="float32", shape=(3,)),),
    max_batch_size=8,
)
names = st.sampled_from(["a", "b", "c", "A", ""])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(names, st.one_of(numeric_arrays(), object_arrays()), max_size=4))
def test_validate_accepts_only_what_fits_the_signature(inputs: dict[str, np.ndarray[Any, Any]]) -> None:
    try:
        rows = SIG.validate(inputs)
    except BadInput as err:
        assert err.status == 400 and err.message
        return
    assert set(inputs) == {"a", "b"}
    a, b = inputs["a"], inputs["b"]
    assert a.dtype == np.float32 and b.dtype == np.int64
    assert a.ndim == 3 and a.shape[1] == 3 and b.ndim == 1
    assert 1 <= rows == a.shape[0] == b.shape[0] <= SIG.max_batch_size


def _valid(rows: int, width: int) -> dict[str, np.ndarray[Any, Any]]:
    return {"a": np.zeros((rows, 3, width), np.float32), "b": np.zeros(rows, np.int64)}


def _without(inputs: dict[str, np.ndarray[Any, Any]], name: str) -> dict[str, np.ndarray[Any, Any]]:
    return {k: v for k, v in inputs.items() if k != name}


OTHER_DTYPES = ["float64", "float16", "int32", "bool"]
MUTATIONS = {
    "drop": ("missing input", lambda x, d: _without(x, d.draw(st.sampled_from(["a", "b"])))),
    "extra": ("unknown input", lambda x, d: {**x, d.draw(st.text(min_size=1).filter(lambda s: s not in x)): x["b"]}),
    "dtype": ("must be", lambda x, d: {**x, "a": x["a"].astype(d.draw(st.sampled_from(OTHER_DTYPES)))}),
    "rank": ("shape", lambda x, d: {**x, "a": x["a"].reshape(x["a"].shape + (1,) * d.draw(st.integers(1, 3)))}),
    "fixed-dim": ("shape", lambda x, d: {**x, "a": np.zeros((len(x["b"]), d.draw(st.integers(4, 9)), 2), np.float32)}),
    "rows": ("batch size", lambda x, d: {**x, "b": np.zeros(x["b"].shape[0] % 8 + 1, np.int64)}),
    "too-many-rows": ("max_batch_size", lambda x, d: _valid(d.draw(st.integers(9, 64)), 1)),
}  # fmt: skip


@FAST
@given(st.integers(1, 8), st.integers(0, 5), st.sampled_from(sorted(MUTATIONS)), st.data())
def test_each_kind_of_mistake_is_named(rows: int, width: int, kind: str, data: st.DataObject) -> None:
    good = _valid(rows, width)
    assert SIG.validate(good) == rows
    fragment, mutate = MUTATIONS[kind]
    with pytest.raises(BadInput, match=fragment):
        SIG.validate(mutate(good, data))


@FAST
@given(request_bodies())
def test_decode_then_validate_raises_nothing_but_bad_input(body: Any) -> None:
    """The worker's whole per-request path, decode then check, on anything a client could send."""
    inputs = _decodes_or_bad_input(msgpack.packb(body))
    if inputs is not None:
        with contextlib.suppress(BadInput):
            SIG.validate(inputs)
