"""Hypothesis strategies shared by the property tests: arrays the codec must carry, and the
malformed wire values (msgpack structures, tensor maps, shapes) a client could send instead."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from schemas.tensors import NUMERIC_DTYPES

__all__ = [
    "any_msgpack",
    "arrays",
    "numeric_arrays",
    "object_arrays",
    "request_bodies",
    "shapes",
    "tensor_maps",
    "wire_dims",
]

DTYPES = sorted(NUMERIC_DTYPES)
# Integers msgpack can carry, with the edges a shape or a length check must survive.
wire_ints = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.sampled_from([0, 1, -1, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 10**12]),
)
# A dimension as a client may declare it: usually small, sometimes huge, negative or not an int.
wire_dims = st.one_of(
    st.integers(0, 4), st.integers(0, 4), wire_ints, st.booleans(), st.floats(allow_nan=False), st.text(max_size=2)
)

leaves = st.one_of(st.none(), st.booleans(), wire_ints, st.floats(), st.text(max_size=8), st.binary(max_size=16))
any_msgpack = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=6), children, max_size=4),
    ),
    max_leaves=20,
)

shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4)


@st.composite
def numeric_arrays(draw: st.DrawFn, dtype: str | None = None) -> np.ndarray[Any, Any]:
    """Any numeric array: every wire dtype, both byte orders, zero-size, and non-contiguous views."""
    name = dtype or draw(st.sampled_from(DTYPES))
    base = np.dtype(name)
    if base.itemsize > 1 and draw(st.booleans()):
        base = base.newbyteorder(draw(st.sampled_from(["<", ">"])))
    arr = draw(hnp.arrays(base, shapes))
    view = draw(st.sampled_from(["as-is", "transposed", "strided", "reversed"]))
    if view == "transposed":
        arr = arr.T
    elif view == "strided" and arr.ndim:
        arr = arr[..., ::2]
    elif view == "reversed" and arr.ndim:
        arr = arr[::-1]
    return arr


@st.composite
def object_arrays(draw: st.DrawFn) -> np.ndarray[Any, Any]:
    """BYTES/str tensors: unicode arrays, or object arrays of only bytes or only str."""
    shape = draw(shapes)
    size = int(np.prod(shape))
    kind = draw(st.sampled_from(["unicode", "str-objects", "bytes-objects"]))
    if kind == "bytes-objects":
        items: list[Any] = draw(st.lists(st.binary(max_size=8), min_size=size, max_size=size))
    else:
        items = draw(st.lists(st.text(max_size=8), min_size=size, max_size=size))
    if kind == "unicode":
        # numpy's "U" dtype drops trailing NULs, so those strings travel only as object arrays.
        items = [s.rstrip("\x00") for s in items]
        return np.array(items, dtype=str).reshape(shape) if size else np.empty(shape, dtype=str)
    arr = np.empty(size, dtype=object)
    arr[:] = items
    return arr.reshape(shape)


arrays = st.one_of(numeric_arrays(), object_arrays())


@st.composite
def tensor_maps(draw: st.DrawFn) -> Any:
    """A tensor's wire map, often nearly right: real or junk dtype, any shape, data of any length."""
    dt = draw(st.one_of(st.sampled_from([*DTYPES, "str", "bytes"]), st.text(max_size=8), any_msgpack))
    sh = draw(st.one_of(st.lists(wire_dims, max_size=6), st.lists(st.integers(0, 3), min_size=33, max_size=80),
                        any_msgpack))  # fmt: skip
    obj: dict[str, Any] = {"dt": dt, "sh": sh}
    if draw(st.booleans()):
        obj["b"] = draw(st.one_of(st.binary(max_size=64), any_msgpack))
    if draw(st.booleans()):
        obj["items"] = draw(st.one_of(st.lists(st.one_of(st.text(max_size=3), st.binary(max_size=3)), max_size=8),
                                      any_msgpack))  # fmt: skip
    if draw(st.booleans()):
        obj[draw(st.text(max_size=4))] = draw(any_msgpack)
    return obj


@st.composite
def request_bodies(draw: st.DrawFn) -> Any:
    """A request envelope as a client could pack it: right or wrong version, any inputs."""
    body: dict[str, Any] = {}
    if draw(st.booleans()):
        body["v"] = draw(st.one_of(st.just(1), any_msgpack))
    body["inputs"] = draw(
        st.one_of(
            st.dictionaries(st.text(max_size=6), st.one_of(tensor_maps(), any_msgpack), max_size=3),
            any_msgpack,
        )
    )
    return body
