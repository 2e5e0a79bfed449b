"""Open Inference Protocol (KServe v2) tensors as numpy arrays: REST JSON, Triton's binary extension, gRPC contents.

Pure conversions, no I/O. Every malformed tensor raises :class:`schemas.errors.BadInput` naming it.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from schemas.errors import BadInput
from schemas.tensors import MAX_RANK

__all__ = [
    "DATATYPES",
    "contents_field",
    "from_binary",
    "from_contents",
    "from_json",
    "numpy_dtype",
    "oip_datatype",
    "to_binary",
    "to_contents",
    "to_json",
]

Array = np.ndarray[Any, Any]

_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}  # fmt: skip
DATATYPES: tuple[str, ...] = (*_NUMPY, "BF16")
# Keyed by (kind, itemsize) so byte order does not matter; BF16 (kind "V") is matched apart.
_OIP: dict[tuple[str, int], str] = {(d.kind, d.itemsize): name for name, d in _NUMPY.items() if name != "BYTES"}
# JSON has no half-precision type, so Triton's binary extension is the only way these travel over REST.
_BINARY_ONLY = frozenset({"FP16", "BF16"})
_CONTENTS: dict[str, str] = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}  # fmt: skip
_LENGTH = struct.Struct("<I")  # a BYTES element's length prefix


def _bad(role: str, name: str, message: str, **data: Any) -> BadInput:
    return BadInput(f"{role} {name!r}: {message}", **{role: name}, **data)


def _bfloat16() -> np.dtype[Any] | None:
    try:
        import ml_dtypes
    except ImportError:
        return None
    bfloat16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
    return bfloat16


def oip_datatype(dtype: np.dtype[Any]) -> str:
    """The OIP datatype of a numpy dtype; str, bytes and object arrays are ``BYTES``."""
    if dtype.kind in "SUO":
        return "BYTES"
    name = _OIP.get((dtype.kind, dtype.itemsize))
    if name is None and dtype.kind == "V" and dtype == _bfloat16():
        name = "BF16"
    if name is None:
        raise BadInput(f"numpy dtype {dtype} has no Open Inference Protocol datatype", dtype=str(dtype))
    return name


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """The numpy dtype of an OIP datatype (``BYTES`` is object); BF16 needs ``ml_dtypes``."""
    return _dtype(datatype, None)


def _dtype(datatype: Any, who: tuple[str, str] | None) -> np.dtype[Any]:
    dtype = _NUMPY.get(datatype) if isinstance(datatype, str) else None
    if dtype is None and datatype == "BF16":
        dtype = _bfloat16()
        if dtype is None:
            message = "BF16 needs the ml_dtypes package installed beside the gateway"
            raise BadInput(message, datatype="BF16") if who is None else _bad(*who, message, datatype="BF16")
    if dtype is None:
        message = f"unknown datatype {datatype!r}; accepted: {', '.join(DATATYPES)}"
        raise BadInput(message, datatype=str(datatype)) if who is None else _bad(*who, message, datatype=datatype)
    return dtype


def _count(shape: Any, who: tuple[str, str]) -> int:
    # bool is an int to Python but never a dimension; the rank limit also keeps math.prod cheap.
    if (
        not isinstance(shape, (list, tuple))
        or len(shape) > MAX_RANK
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise _bad(*who, f"shape must be a list of at most {MAX_RANK} non-negative integers, not {shape!r}")
    return math.prod(shape)


def _checked_count(got: int, count: int, shape: Sequence[int], who: tuple[str, str]) -> None:
    if got != count:
        raise _bad(*who, f"shape {list(shape)} needs {count} elements, got {got}", expected=count, got=got)


def _reshape(flat: Array, shape: Sequence[int], who: tuple[str, str]) -> Array:
    try:
        return flat.reshape(tuple(shape))
    except ValueError as exc:  # a zero-size shape with an axis beyond numpy's index range
        raise _bad(*who, f"shape {list(shape)} is not a valid array shape: {exc}") from exc


def from_json(name: str, datatype: str, shape: list[int], data: Any) -> Array:
    """A REST input's ``data`` (flat row-major or nested lists) as an array of ``shape``."""
    who = ("input", name)
    dtype, count = _dtype(datatype, who), _count(shape, who)
    if datatype in _BINARY_ONLY:
        raise _bad(*who, f"{datatype} travels as binary data only (Triton's binary tensor extension)")
    if not isinstance(data, list):
        raise _bad(*who, f'"data" must be a JSON array, not {type(data).__name__}')
    flat = _strings(data, who) if datatype == "BYTES" else _numbers(data, dtype, datatype, who)
    _checked_count(flat.size, count, shape, who)
    return _reshape(flat, shape, who)


def _strings(data: list[Any], who: tuple[str, str]) -> Array:
    items = np.array(data, dtype=object).reshape(-1)  # ragged nesting leaves lists among the items
    for i, item in enumerate(items):
        if not isinstance(item, str):
            problem = "nested lists must be rectangular" if isinstance(item, list) else f"got {type(item).__name__}"
            raise _bad(*who, f"BYTES data must be JSON strings; element {i}: {problem}")
        items[i] = item.encode()
    return items


def _numbers(values: Any, dtype: np.dtype[Any], datatype: str, who: tuple[str, str]) -> Array:
    """Values as a flat array of ``dtype``, vectorised: numpy infers the JSON types, then we check and cast."""
    try:
        inferred = np.asarray(values)
    except (ValueError, TypeError, OverflowError) as exc:
        raise _bad(*who, f"{datatype} data must be a flat list or rectangular nested lists of numbers") from exc
    inferred = inferred.reshape(-1)
    if inferred.size == 0:
        return np.empty(0, dtype)
    if dtype.kind == "b":
        if inferred.dtype.kind != "b":
            raise _bad(*who, f"BOOL data must be true/false, got {_kind_name(inferred)}")
        return inferred
    if dtype.kind in "iu":
        return _integers(values, inferred, dtype, datatype, who)
    if inferred.dtype.kind not in "iuf":
        raise _bad(*who, f"{datatype} data must be numbers, got {_kind_name(inferred)}")
    with np.errstate(over="ignore"):
        out = inferred.astype(dtype, copy=False)
    if inferred.dtype.kind == "f" and (np.isinf(out) & np.isfinite(inferred)).any():
        info = np.finfo(dtype)
        raise _bad(*who, f"{datatype} values must lie within ±{float(info.max):g}", datatype=datatype)
    return out


def _integers(values: Any, inferred: Array, dtype: np.dtype[Any], datatype: str, who: tuple[str, str]) -> Array:
    info = np.iinfo(dtype)
    expected = f"{datatype} data must be integers in [{info.min}, {info.max}]"
    if inferred.dtype.kind == "f" and dtype.kind == "u" and dtype.itemsize == 8:
        # numpy reads a mix of integers above and below 2**63 as float64; read them again as uint64.
        try:
            exact = np.asarray(values, dtype=dtype).reshape(-1)
        except (ValueError, TypeError, OverflowError) as exc:
            raise _bad(*who, f"{expected}, got a negative or non-integer value", datatype=datatype) from exc
        if exact.shape == inferred.shape and bool((exact.astype(np.float64) == inferred).all()):
            return exact
    if inferred.dtype.kind not in "iu":
        raise _bad(*who, f"{expected}, got {_kind_name(inferred)}", datatype=datatype)
    low, high = int(inferred.min()), int(inferred.max())
    if low < info.min or high > info.max:
        raise _bad(*who, f"{expected}, got {low if low < info.min else high}", datatype=datatype)
    return inferred.astype(dtype, copy=False)


def _kind_name(array: Array) -> str:
    return {"b": "booleans", "i": "integers", "u": "integers", "f": "non-integer numbers", "U": "strings"}.get(
        array.dtype.kind, "nulls, objects or integers too large for 64 bits"
    )


def to_json(array: Array, name: str = "output") -> tuple[str, list[int], list[Any]]:
    """``(datatype, shape, data)`` for a REST output: data flat row-major, BYTES as UTF-8 strings."""
    who = ("output", name)
    datatype, shape = _out_datatype(array, who), list(array.shape)
    if datatype in _BINARY_ONLY:
        raise _bad(*who, f"{datatype} travels as binary data only: ask for it with binary_data_output")
    data: list[Any] = array.ravel().tolist()
    if datatype == "BYTES":
        for i, item in enumerate(data):
            if isinstance(item, str):
                continue
            try:
                data[i] = _item_bytes(item, i, who).decode()
            except UnicodeDecodeError as exc:
                raise _bad(*who, f"element {i} is not UTF-8 text: ask for it with binary_data_output") from exc
    return datatype, shape, data


def _out_datatype(array: Array, who: tuple[str, str]) -> str:
    try:
        return oip_datatype(array.dtype)
    except BadInput as exc:
        raise _bad(*who, exc.message, dtype=str(array.dtype)) from exc


def _item_bytes(item: Any, index: int, who: tuple[str, str]) -> bytes:
    if isinstance(item, bytes):
        return bytes(item)
    if isinstance(item, str):
        return item.encode()
    raise _bad(*who, f"a BYTES tensor holds bytes or str items; element {index} is {type(item).__name__}")


def from_binary(name: str, datatype: str, shape: list[int], raw: bytes | memoryview) -> Array:
    """An input sent as binary data: little-endian row-major values, or length-prefixed BYTES elements."""
    who = ("input", name)
    dtype, count = _dtype(datatype, who), _count(shape, who)
    octets = memoryview(raw).cast("B")
    if datatype == "BYTES":
        return _reshape(_unpack(octets, count, who), shape, who)
    if len(octets) != count * dtype.itemsize:
        expected = count * dtype.itemsize
        raise _bad(*who, f"shape {list(shape)} of {datatype} needs {expected} bytes, got {len(octets)}",
                   expected=expected, got=len(octets))  # fmt: skip
    if datatype == "BOOL":
        flat = np.frombuffer(octets, dtype=np.uint8)
        # Any nonzero byte is true, as in C; only then is a copy needed.
        flat = flat != 0 if flat.size and flat.max() > 1 else flat.view(np.bool_)
    else:
        flat = np.frombuffer(octets, dtype=dtype.newbyteorder("<"))
    return _reshape(flat, shape, who)


def _unpack(octets: memoryview, count: int, who: tuple[str, str]) -> Array:
    size = len(octets)
    if size < _LENGTH.size * count:  # checked first, so a huge shape allocates nothing
        raise _bad(*who, f"{count} BYTES elements need at least {_LENGTH.size * count} bytes, got {size}")
    items = np.empty(count, dtype=object)
    offset = 0
    for i in range(count):
        if offset + _LENGTH.size > size:
            raise _bad(*who, f"BYTES data ends inside the length of element {i} of {count}")
        (length,) = _LENGTH.unpack_from(octets, offset)
        offset += _LENGTH.size
        if offset + length > size:
            raise _bad(*who, f"BYTES element {i} declares {length} bytes but only {size - offset} remain")
        items[i] = bytes(octets[offset : offset + length])
        offset += length
    if offset != size:
        raise _bad(*who, f"{size - offset} bytes follow the last of {count} BYTES elements")
    return items


def to_binary(array: Array, name: str = "output") -> tuple[str, list[int], bytes]:
    """``(datatype, shape, raw)`` for a binary output: little-endian row-major, or length-prefixed BYTES."""
    who = ("output", name)
    datatype, shape = _out_datatype(array, who), list(array.shape)
    if datatype != "BYTES":
        return datatype, shape, array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    parts: list[bytes] = []
    for i, item in enumerate(array.ravel().tolist()):
        octets = _item_bytes(item, i, who)
        parts += (_LENGTH.pack(len(octets)), octets)
    return datatype, shape, b"".join(parts)


def contents_field(datatype: str) -> str:
    """The ``InferTensorContents`` field that carries a datatype; FP16 and BF16 have none."""
    return _field(datatype, None)


def _field(datatype: str, who: tuple[str, str] | None) -> str:
    _dtype(datatype, who)
    field = _CONTENTS.get(datatype)
    if field is None:
        message = f"{datatype} has no InferTensorContents field: send it in raw_input_contents only"
        raise BadInput(message, datatype=datatype) if who is None else _bad(*who, message, datatype=datatype)
    return field


def from_contents(name: str, datatype: str, shape: list[int], values: Sequence[Any]) -> Array:
    """A gRPC input's typed contents (the repeated field, as a sequence) as an array of ``shape``."""
    who = ("input", name)
    _field(datatype, who)
    dtype, count = _dtype(datatype, who), _count(shape, who)
    _checked_count(len(values), count, shape, who)
    items = list(values)  # a protobuf repeated field converts fastest this way
    if datatype == "BYTES":
        flat = np.empty(count, dtype=object)
        for i, item in enumerate(items):
            if not isinstance(item, bytes):
                raise _bad(*who, f"bytes_contents must hold bytes; element {i} is {type(item).__name__}")
            flat[i] = bytes(item)
    else:
        flat = _numbers(items, dtype, datatype, who)
    return _reshape(flat, shape, who)


def to_contents(array: Array, name: str = "output") -> tuple[str, list[int], str, list[Any]]:
    """``(datatype, shape, field, values)`` for a gRPC output's ``InferTensorContents``."""
    who = ("output", name)
    datatype = _out_datatype(array, who)
    field = _field(datatype, who)
    values: list[Any] = array.ravel().tolist()
    if datatype == "BYTES":
        values = [_item_bytes(item, i, who) for i, item in enumerate(values)]
    return datatype, list(array.shape), field, values
