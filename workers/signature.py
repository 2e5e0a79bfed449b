"""A model's serving signature and the per-request check against it (names, dtypes, shapes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from schemas.errors import BadInput, ModelFailure
from schemas.spec import ModelSpec, TensorSpec
from schemas.tensors import NUMERIC_DTYPES
from workers.runtimes.base import Runtime

__all__ = ["Signature"]

_NUMPY = {name: np.dtype(name) for name in NUMERIC_DTYPES}


def _dims(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join("?" if d < 0 else str(d) for d in shape) + "]"


@dataclass(slots=True, frozen=True)
class Signature:
    """Inputs/outputs with per-item shapes (the batch axis left out when ``max_batch_size`` > 0)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int

    @classmethod
    def of(cls, spec: ModelSpec, runtime: Runtime) -> Signature:
        """The spec's declaration where it has one, else what the runtime reports."""
        batched = spec.max_batch_size > 0
        if spec.inputs and spec.outputs:
            return cls(tuple(spec.inputs), tuple(spec.outputs), spec.max_batch_size)
        return cls(
            tuple(spec.inputs) or _per_item(runtime.inputs, batched, spec.name),
            tuple(spec.outputs) or _per_item(runtime.outputs, batched, spec.name),
            spec.max_batch_size,
        )

    @property
    def batched(self) -> bool:
        return self.max_batch_size > 0

    def validate(self, inputs: dict[str, np.ndarray[Any, Any]]) -> int:
        """Check one request; return its row count (1 for an unbatched model) or raise BadInput."""
        if len(inputs) != len(self.inputs) or not all(t.name in inputs for t in self.inputs):
            self._check_names(inputs)
        rows = -1
        for spec in self.inputs:
            array = inputs[spec.name]
            _check_dtype(spec, array)
            rows = self._check_shape(spec, array.shape, rows)
        return max(rows, 1)

    def _check_names(self, inputs: dict[str, np.ndarray[Any, Any]]) -> None:
        expected = {t.name for t in self.inputs}
        unknown = sorted(set(inputs) - expected)
        if unknown:
            raise BadInput(f"unknown input(s) {unknown}; the model takes {sorted(expected)}", inputs=unknown)
        missing = sorted(expected - set(inputs))
        raise BadInput(f"missing input {missing[0]!r}", input=missing[0])

    def _check_shape(self, spec: TensorSpec, shape: tuple[int, ...], rows: int) -> int:
        item_shape = shape
        if self.batched:
            if not shape or shape[0] < 1:
                raise BadInput(f"input {spec.name!r} needs a leading batch axis of at least 1 row", input=spec.name)
            if shape[0] > self.max_batch_size:
                raise BadInput(
                    f"input {spec.name!r} has {shape[0]} rows; max_batch_size is {self.max_batch_size}", input=spec.name
                )
            if rows not in (-1, shape[0]):
                raise BadInput(f"inputs disagree on the batch size ({rows} vs {shape[0]})", input=spec.name)
            rows, item_shape = shape[0], shape[1:]
        fits = len(item_shape) == len(spec.shape) and all(
            w < 0 or w == d for w, d in zip(spec.shape, item_shape, strict=True)
        )
        if not fits:
            axis = "[batch] + " if self.batched else ""
            raise BadInput(
                f"input {spec.name!r} has shape {list(shape)}; expected {axis}{_dims(spec.shape)}",
                input=spec.name,
                shape=list(shape),
            )
        return rows


def _check_dtype(spec: TensorSpec, array: np.ndarray[Any, Any]) -> None:
    if spec.dtype in ("str", "bytes"):
        ok = array.dtype == object
    else:
        # Wire arrays are little-endian, which compares equal to the native dtype on every supported host.
        ok = array.dtype == _NUMPY.get(spec.dtype) or (
            array.dtype.kind not in "OUS" and array.dtype.newbyteorder("=").name == spec.dtype
        )
    if not ok:
        got = "str/bytes" if array.dtype == object else array.dtype.newbyteorder("=").name
        raise BadInput(f"input {spec.name!r} must be {spec.dtype}, not {got}", input=spec.name, dtype=got)


def _per_item(tensors: list[TensorSpec], batched: bool, model: str) -> tuple[TensorSpec, ...]:
    if not batched:
        return tuple(tensors)
    out = []
    for t in tensors:
        if not t.shape or t.shape[0] != -1:
            raise ModelFailure(
                f"{model}: max_batch_size > 0 but {t.name!r} has no dynamic batch axis {_dims(t.shape)}", model=model
            )
        out.append(t.model_copy(update={"shape": t.shape[1:]}))
    return tuple(out)
