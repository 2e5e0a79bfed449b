"""Per-request validation against a model's signature."""

from __future__ import annotations

import numpy as np
import pytest

from schemas.errors import BadInput, ModelFailure
from schemas.spec import ModelSpec, TensorSpec, VersionSpec
from workers.signature import Signature


class _Meta:
    """A runtime as far as Signature cares: just its reported inputs and outputs."""

    def __init__(self, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
        self.inputs, self.outputs = inputs, outputs

    def predict(self, inputs: dict) -> dict:  # pragma: no cover - never called
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover
        pass


def _spec(**kw: object) -> ModelSpec:
    return ModelSpec(name="m", versions={"1": VersionSpec(uri="file:///m.onnx")}, **kw)  # type: ignore[arg-type]


BATCHED = Signature(
    (TensorSpec(name="a", dtype="float32", shape=(3, -1)), TensorSpec(name="b", dtype="int64", shape=())),
    (TensorSpec(name="y", dtype="float32", shape=(3,)),),
    max_batch_size=8,
)


def test_valid_batched_request_returns_rows() -> None:
    assert BATCHED.validate({"a": np.zeros((5, 3, 7), np.float32), "b": np.zeros(5, np.int64)}) == 5


@pytest.mark.parametrize(
    ("inputs", "fragment"),
    [
        ({"a": np.zeros((1, 3, 2), np.float32)}, "missing input 'b'"),
        ({"a": np.zeros((1, 3, 2), np.float32), "b": np.zeros(1, np.int64), "c": np.zeros(1)}, "unknown input"),
        ({"a": np.zeros((1, 3, 2), np.float64), "b": np.zeros(1, np.int64)}, "must be float32"),
        ({"a": np.zeros((1, 4, 2), np.float32), "b": np.zeros(1, np.int64)}, "expected [batch] + [3, ?]"),
        ({"a": np.zeros((3, 2), np.float32), "b": np.zeros(3, np.int64)}, "expected [batch] + [3, ?]"),
        ({"a": np.zeros((2, 3, 2), np.float32), "b": np.zeros(3, np.int64)}, "disagree on the batch size"),
        ({"a": np.zeros((9, 3, 2), np.float32), "b": np.zeros(9, np.int64)}, "max_batch_size is 8"),
        ({"a": np.zeros((0, 3, 2), np.float32), "b": np.zeros(0, np.int64)}, "at least 1 row"),
    ],
)
def test_invalid_requests_name_the_problem(inputs: dict, fragment: str) -> None:
    with pytest.raises(BadInput) as err:
        BATCHED.validate(inputs)
    assert fragment in err.value.message


def test_unbatched_signature_checks_exact_shapes() -> None:
    sig = Signature((TensorSpec(name="x", dtype="float32", shape=(2, 3)),), (), max_batch_size=0)
    assert sig.validate({"x": np.zeros((2, 3), np.float32)}) == 1
    with pytest.raises(BadInput):
        sig.validate({"x": np.zeros((1, 2, 3), np.float32)})


def test_signature_from_runtime_drops_the_dynamic_batch_axis() -> None:
    meta = _Meta(
        [TensorSpec(name="x", dtype="float32", shape=(-1, 4))], [TensorSpec(name="y", dtype="int64", shape=(-1,))]
    )
    sig = Signature.of(_spec(max_batch_size=16), meta)
    assert sig.inputs[0].shape == (4,) and sig.outputs[0].shape == ()
    with pytest.raises(ModelFailure):
        Signature.of(_spec(max_batch_size=16), _Meta([TensorSpec(name="x", dtype="float32", shape=(2, 4))], []))


def test_string_inputs_accept_object_arrays_only() -> None:
    sig = Signature((TensorSpec(name="s", dtype="str", shape=()),), (), max_batch_size=4)
    assert sig.validate({"s": np.array(["a", "b"], dtype=object)}) == 2
    with pytest.raises(BadInput):
        sig.validate({"s": np.zeros(2, np.float32)})
