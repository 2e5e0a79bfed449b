"""Tensor codec: numpy arrays as msgpack maps of dtype, shape and raw little-endian bytes.

Numeric and bool tensors decode zero-copy with ``np.frombuffer``; BYTES/str tensors travel as
a flat list of items. Anything malformed raises :class:`schemas.errors.BadInput`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from schemas.errors import BadInput

__all__ = ["MAX_RANK", "NUMERIC_DTYPES", "decode_tensor", "dtype_name", "encode_tensor"]

NUMERIC_DTYPES: frozenset[str] = frozenset(
    {
        "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
        "float16", "float32", "float64", "complex64", "complex128",
    }
)  # fmt: skip
_ITEM_DTYPES = frozenset({"bytes", "str"})
# Numeric data travels little-endian; the dtypes to view it with, made once.
_WIRE_DTYPES: dict[str, np.dtype[Any]] = {name: np.dtype(name).newbyteorder("<") for name in NUMERIC_DTYPES}
# Ranks numpy 1 and 2 both support; no model takes more.
MAX_RANK = 32


def dtype_name(dtype: np.dtype[Any]) -> str:
    """The wire name of a numpy dtype: ``float32``, ``bool``, ``bytes`` or ``str``."""
    if dtype.kind == "U":
        return "str"
    if dtype.kind in ("S", "O"):
        return "bytes"
    name = _NAMES.get(dtype)
    if name is None:  # a handful of numeric dtypes exist, so the cache stays tiny
        name = _NAMES[dtype] = np.dtype(dtype).newbyteorder("=").name
    return name


_NAMES: dict[np.dtype[Any], str] = {}


def encode_tensor(array: Any) -> dict[str, Any]:
    arr = np.asarray(array)
    if arr.dtype.kind == "U":
        return {"dt": "str", "sh": list(arr.shape), "items": [str(x) for x in arr.reshape(-1)]}
    if arr.dtype.kind in ("S", "O"):
        return _encode_items(arr)
    name = dtype_name(arr.dtype)
    if name not in NUMERIC_DTYPES:
        raise BadInput(f"dtype {arr.dtype} cannot be sent", dtype=str(arr.dtype))
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    shape = list(arr.shape)  # taken first: ascontiguousarray turns a 0-d array into 1-d
    flat = np.ascontiguousarray(arr).reshape(-1)
    # A uint8 view of the contiguous buffer packs as msgpack bin without a copy.
    return {"dt": name, "sh": shape, "b": memoryview(flat.view(np.uint8))}  # type: ignore[arg-type]


def _encode_items(arr: np.ndarray[Any, Any]) -> dict[str, Any]:
    items = list(arr.reshape(-1))
    if all(isinstance(x, (bytes, np.bytes_)) for x in items):
        return {"dt": "bytes", "sh": list(arr.shape), "items": [bytes(x) for x in items]}
    if all(isinstance(x, (str, np.str_)) for x in items):
        return {"dt": "str", "sh": list(arr.shape), "items": [str(x) for x in items]}
    raise BadInput("object tensors must hold only bytes or only str items")


def decode_tensor(obj: Any, name: str = "tensor") -> np.ndarray[Any, Any]:
    """Rebuild an array from its wire form; numeric data is viewed in place, not copied."""
    if not isinstance(obj, dict):
        raise BadInput(f"{name}: a tensor must be a map of dt, sh and data", input=name)
    dt, shape = obj.get("dt"), _shape(obj.get("sh"), name)
    count = math.prod(shape)
    if not isinstance(dt, str):
        raise BadInput(f"{name}: dtype must be a name, not {type(dt).__name__}", input=name)
    if dt in _ITEM_DTYPES:
        items = obj.get("items")
        if not isinstance(items, list) or len(items) != count:
            raise BadInput(f"{name}: expected {count} items for shape {list(shape)}", input=name)
        kind = str if dt == "str" else bytes
        if not all(isinstance(x, kind) for x in items):
            raise BadInput(f"{name}: every item of a {dt} tensor must be {dt}", input=name)
        out = np.empty(count, dtype=object)
        out[:] = items
        return _reshape(out, shape, name)
    dtype = _WIRE_DTYPES.get(dt)
    if dtype is None:
        raise BadInput(f"{name}: unknown dtype {dt!r}", input=name, dtype=dt)
    data = obj.get("b")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BadInput(f"{name}: tensor data must be raw bytes", input=name)
    if len(data) != count * dtype.itemsize:
        raise BadInput(f"{name}: {len(data)} bytes do not fit dtype {dt} and shape {list(shape)}", input=name)
    return _reshape(np.frombuffer(data, dtype=dtype), shape, name)


def _shape(shape: Any, name: str) -> tuple[int, ...]:
    # bool is an int to Python, not to numpy; the rank limit also keeps math.prod cheap.
    if (
        not isinstance(shape, (list, tuple))
        or len(shape) > MAX_RANK
        or not all(type(d) is int and d >= 0 for d in shape)
    ):
        raise BadInput(f"{name}: shape must be a list of at most {MAX_RANK} non-negative integers", input=name)
    return tuple(shape)


def _reshape(flat: np.ndarray[Any, Any], shape: tuple[int, ...], name: str) -> np.ndarray[Any, Any]:
    try:
        return flat.reshape(shape)
    except ValueError as exc:  # a zero-size shape with an axis beyond numpy's index range
        raise BadInput(f"{name}: shape {list(shape)} is not a valid array shape: {exc}", input=name) from exc
