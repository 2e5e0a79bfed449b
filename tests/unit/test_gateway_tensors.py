"""Open Inference Protocol tensors: exact round trips per datatype, typed refusals, tritonclient's wire bytes."""

from __future__ import annotations

import json
import struct
import sys
from typing import Any

import numpy as np
import pytest

from schemas.errors import BadInput
from servemesh.gateway.tensors import (
    contents_field,
    from_binary,
    from_contents,
    from_json,
    numpy_dtype,
    oip_datatype,
    to_binary,
    to_contents,
    to_json,
)

try:
    import ml_dtypes
except ImportError:
    ml_dtypes = None

try:
    import tritonclient.utils as triton
except ImportError:
    triton = None

NUMERIC = ["UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP32", "FP64"]
needs_bf16 = pytest.mark.skipif(ml_dtypes is None, reason="ml_dtypes not installed")
needs_triton = pytest.mark.skipif(triton is None, reason="tritonclient not installed")


def sample(datatype: str, shape: tuple[int, ...] = (2, 3)) -> np.ndarray[Any, Any]:
    """Values that exercise each datatype's extremes, so a lossy conversion shows."""
    count = int(np.prod(shape))
    if datatype == "BOOL":
        return (np.arange(count) % 3 == 0).reshape(shape)
    if datatype == "BYTES":
        items = [b"", "héllo".encode(), b"a b", b"servemesh", b"\xe2\x82\xac", b"x" * 300] * count
        out = np.empty(count, dtype=object)
        out[:] = items[:count]
        return out.reshape(shape)
    dtype = numpy_dtype(datatype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = [info.min, info.max, 0, 1, info.max - 1, info.min + 1] * count
        return np.array(values[:count], dtype=dtype).reshape(shape)
    values = [np.finfo(dtype).max, -np.finfo(dtype).tiny, 0.1, -2.5, 1e-3, 3.0] * count
    return np.array(values[:count], dtype=dtype).reshape(shape)


def assert_same(got: np.ndarray[Any, Any], want: np.ndarray[Any, Any]) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("datatype", ["BOOL", *NUMERIC, "BYTES"])
@pytest.mark.parametrize("shape", [(), (0,), (2, 3)])
def test_json_round_trip(datatype: str, shape: tuple[int, ...]) -> None:
    x = sample(datatype, shape)
    out_type, out_shape, data = to_json(x)
    wire = json.loads(json.dumps({"datatype": out_type, "shape": out_shape, "data": data}))
    assert wire["datatype"] == datatype and wire["shape"] == list(shape)
    assert_same(from_json("x", wire["datatype"], wire["shape"], wire["data"]), x)


@pytest.mark.parametrize("datatype", ["BOOL", *NUMERIC, "FP16", "BYTES"])
@pytest.mark.parametrize("shape", [(), (0,), (2, 3)])
def test_binary_round_trip(datatype: str, shape: tuple[int, ...]) -> None:
    x = sample(datatype, shape)
    out_type, out_shape, raw = to_binary(x)
    assert out_type == datatype and out_shape == list(shape)
    assert_same(from_binary("x", out_type, out_shape, raw), x)


@needs_bf16
def test_bf16_binary_round_trip_and_refused_as_json() -> None:
    x = np.array([[1.5, -2.0], [0.0, 3.0e38]], dtype=ml_dtypes.bfloat16)
    datatype, shape, raw = to_binary(x)
    assert (datatype, shape, len(raw)) == ("BF16", [2, 2], 8)
    y = from_binary("x", datatype, shape, raw)
    assert y.dtype == x.dtype
    np.testing.assert_array_equal(y.astype(np.float32), x.astype(np.float32))
    with pytest.raises(BadInput, match="BF16 travels as binary data only"):
        from_json("x", "BF16", [1], [1.0])
    with pytest.raises(BadInput, match="binary_data_output"):
        to_json(x)


def test_bf16_without_ml_dtypes_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # makes `import ml_dtypes` fail
    with pytest.raises(BadInput, match="BF16 needs the ml_dtypes package"):
        numpy_dtype("BF16")
    with pytest.raises(BadInput, match=r"input 'x'.*ml_dtypes"):
        from_binary("x", "BF16", [1], b"\x00\x00")


def test_binary_is_little_endian_row_major_and_decodes_zero_copy() -> None:
    raw = struct.pack("<3i", 1, -2, 3) + struct.pack("<3i", 4, 5, 6)
    y = from_binary("x", "INT32", [2, 3], memoryview(raw))
    assert y.tolist() == [[1, -2, 3], [4, 5, 6]]
    assert np.shares_memory(y, np.frombuffer(raw, dtype=np.uint8))
    big_endian = np.arange(6, dtype=">i4").reshape(2, 3)[:, ::2]  # not contiguous either
    datatype, shape, raw = to_binary(big_endian)
    assert (datatype, shape) == ("INT32", [2, 2]) and raw == struct.pack("<4i", 0, 2, 3, 5)


def test_binary_bool_is_one_byte_per_element_and_nonzero_is_true() -> None:
    assert to_binary(np.array([True, False, True])) == ("BOOL", [3], b"\x01\x00\x01")
    assert from_binary("flags", "BOOL", [3], b"\x00\x02\x01").tolist() == [False, True, True]


def test_nested_and_flat_json_give_the_same_array() -> None:
    nested = from_json("x", "FP32", [2, 2, 2], [[[1, 2], [3, 4]], [[5, 6], [7, 8.5]]])
    flat = from_json("x", "FP32", [2, 2, 2], [1, 2, 3, 4, 5, 6, 7, 8.5])
    assert_same(nested, flat)
    assert nested.dtype == np.float32 and nested[1, 1, 1] == 8.5
    words = from_json("w", "BYTES", [2, 1], [["é"], ["b"]])
    assert_same(words, from_json("w", "BYTES", [2, 1], ["é", "b"]))
    assert words.dtype == object and words.tolist() == [["é".encode()], [b"b"]]


def test_json_uint64_keeps_values_above_int64_exact() -> None:
    # numpy alone would read this mix as float64 and round the first value.
    y = from_json("ids", "UINT64", [2], [2**64 - 1, 1])
    assert y.dtype == np.uint64 and y.tolist() == [2**64 - 1, 1]


def test_element_count_mismatch_names_the_input_and_both_counts() -> None:
    with pytest.raises(BadInput, match=r"input 'pixels': shape \[2, 3\] needs 6 elements, got 5") as err:
        from_json("pixels", "FP32", [2, 3], [1, 2, 3, 4, 5])
    assert err.value.data == {"input": "pixels", "expected": 6, "got": 5}
    with pytest.raises(BadInput, match="needs 2 elements, got 3"):
        from_contents("pixels", "INT32", [2], [1, 2, 3])


@pytest.mark.parametrize("shape", [[-1], [2, -3], [1.5], [True], "3", None, [1] * 33])
def test_bad_shapes_are_refused(shape: Any) -> None:
    with pytest.raises(BadInput, match="input 'x': shape must be a list of at most 32 non-negative integers"):
        from_json("x", "INT32", shape, [1])
    with pytest.raises(BadInput, match="shape must be"):
        from_binary("x", "INT32", shape, b"\x00" * 4)


def test_fp16_as_json_is_refused_both_ways() -> None:
    with pytest.raises(BadInput, match="input 'half': FP16 travels as binary data only"):
        from_json("half", "FP16", [1], [1.0])
    with pytest.raises(BadInput, match=r"output 'y': FP16 travels as binary data only.*binary_data_output"):
        to_json(np.zeros(2, np.float16), name="y")


@pytest.mark.parametrize(
    ("datatype", "data", "problem"),
    [
        ("INT8", [127, 128], r"INT8 data must be integers in \[-128, 127\], got 128"),
        ("INT8", [-129], "got -129"),
        ("UINT8", [-1], "got -1"),
        ("UINT64", [2**64], "integers too large for 64 bits"),
        ("UINT64", [2**63, -1], "negative or non-integer"),
        ("INT64", [2**63], r"got 9223372036854775808"),
        ("INT32", [1.5], "got non-integer numbers"),
        ("INT32", ["1"], "got strings"),
        ("INT32", [1, None], "got nulls"),
        ("BOOL", [1, 0], "BOOL data must be true/false, got integers"),
        ("FP32", [1e39], "FP32 values must lie within"),
        ("FP64", ["1.5"], "FP64 data must be numbers, got strings"),
        ("FP64", [[1, 2], [3]], "rectangular nested lists"),
        ("BYTES", ["a", 1], "BYTES data must be JSON strings; element 1: got int"),
        ("BYTES", [["a"], ["b", "c"]], "nested lists must be rectangular"),
    ],
)
def test_json_out_of_range_and_wrong_types_are_refused(datatype: str, data: list[Any], problem: str) -> None:
    with pytest.raises(BadInput, match=f"input 'x': .*{problem}"):
        from_json("x", datatype, [len(data)], data)


def test_json_data_must_be_an_array() -> None:
    with pytest.raises(BadInput, match='"data" must be a JSON array'):
        from_json("x", "INT32", [], 5)


def test_unknown_datatype_names_it_and_the_accepted_ones() -> None:
    with pytest.raises(BadInput, match=r"unknown datatype 'FLOAT32'; accepted: BOOL, UINT8.*BYTES, BF16") as err:
        numpy_dtype("FLOAT32")
    assert err.value.data == {"datatype": "FLOAT32"}
    with pytest.raises(BadInput, match="input 'x': unknown datatype 'fp32'"):
        from_json("x", "fp32", [1], [1.0])


def test_truncated_and_trailing_binary_bytes_are_refused() -> None:
    good = struct.pack("<I", 3) + b"abc" + struct.pack("<I", 0)
    assert from_binary("s", "BYTES", [2], good).tolist() == [b"abc", b""]
    with pytest.raises(BadInput, match="input 's': BYTES element 0 declares 3 bytes but only 2 remain"):
        from_binary("s", "BYTES", [1], struct.pack("<I", 3) + b"ab")
    with pytest.raises(BadInput, match="ends inside the length of element 1"):
        from_binary("s", "BYTES", [2], struct.pack("<I", 2) + b"ab" + b"\x00\x00")
    with pytest.raises(BadInput, match="2 bytes follow the last of 2 BYTES elements"):
        from_binary("s", "BYTES", [2], good + b"!!")
    with pytest.raises(BadInput, match="10000000000 BYTES elements need at least"):
        from_binary("s", "BYTES", [10**10], good)  # refused before allocating anything


def test_binary_size_mismatch_is_refused() -> None:
    with pytest.raises(BadInput, match=r"input 'x': shape \[2, 2\] of FP32 needs 16 bytes, got 12") as err:
        from_binary("x", "FP32", [2, 2], b"\x00" * 12)
    assert err.value.data == {"input": "x", "expected": 16, "got": 12}


def test_bytes_outputs_from_str_and_fixed_width_arrays() -> None:
    assert to_json(np.array(["é", "b"])) == ("BYTES", [2], ["é", "b"])
    assert to_binary(np.array([b"ab", b"c"]))[2] == b"\x02\x00\x00\x00ab\x01\x00\x00\x00c"
    assert to_binary(np.array(["é"], dtype=object))[2] == b"\x02\x00\x00\x00\xc3\xa9"


def test_undecodable_bytes_as_json_suggest_binary_output() -> None:
    with pytest.raises(BadInput, match="output 'img': element 1 is not UTF-8 text: ask for it with binary_data_output"):
        to_json(np.array([b"ok", b"\xff\xfe"], dtype=object), name="img")


def test_unsupported_outputs_are_refused_by_name() -> None:
    with pytest.raises(BadInput, match="output 'z': numpy dtype complex64 has no Open Inference Protocol datatype"):
        to_binary(np.zeros(1, np.complex64), name="z")
    with pytest.raises(BadInput, match="output 'o': a BYTES tensor holds bytes or str items; element 0 is int"):
        to_binary(np.array([1], dtype=object), name="o")


@pytest.mark.parametrize(
    ("datatype", "field"),
    [
        ("BOOL", "bool_contents"), ("INT8", "int_contents"), ("INT16", "int_contents"), ("INT32", "int_contents"),
        ("INT64", "int64_contents"), ("UINT8", "uint_contents"), ("UINT16", "uint_contents"),
        ("UINT32", "uint_contents"), ("UINT64", "uint64_contents"), ("FP32", "fp32_contents"),
        ("FP64", "fp64_contents"), ("BYTES", "bytes_contents"),
    ],
)  # fmt: skip
def test_contents_field_names_follow_the_spec(datatype: str, field: str) -> None:
    assert contents_field(datatype) == field


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_half_precision_has_no_contents_field(datatype: str) -> None:
    with pytest.raises(BadInput, match=f"{datatype} has no InferTensorContents field.*raw_input_contents only"):
        contents_field(datatype)


@pytest.mark.parametrize("datatype", ["BOOL", *NUMERIC, "BYTES"])
def test_contents_round_trip(datatype: str) -> None:
    x = sample(datatype)
    out_type, shape, field, values = to_contents(x)
    assert (out_type, shape, field) == (datatype, [2, 3], contents_field(datatype))
    assert_same(from_contents("x", out_type, shape, tuple(values)), x)


def test_contents_check_narrow_ints_and_item_types() -> None:
    with pytest.raises(BadInput, match=r"input 'x': INT16 data must be integers in \[-32768, 32767\], got 40000"):
        from_contents("x", "INT16", [1], [40000])
    with pytest.raises(BadInput, match="bytes_contents must hold bytes; element 0 is str"):
        from_contents("x", "BYTES", [1], ["text"])
    with pytest.raises(BadInput, match="input 'x': FP16 has no InferTensorContents field"):
        from_contents("x", "FP16", [1], [1.0])
    with pytest.raises(BadInput, match="output 'h': FP16 has no InferTensorContents field"):
        to_contents(np.zeros(1, np.float16), name="h")


def test_datatype_names_both_ways() -> None:
    for datatype in ["BOOL", *NUMERIC, "FP16", "BYTES"]:
        assert oip_datatype(numpy_dtype(datatype)) == datatype
    assert oip_datatype(np.dtype(">f8")) == "FP64"
    assert oip_datatype(np.dtype("U3")) == oip_datatype(np.dtype("S3")) == "BYTES"


@needs_triton
def test_bytes_wire_matches_tritonclient() -> None:
    x = np.array([b"a", b"bcd"], dtype=object)
    assert to_binary(x)[2] == triton.serialize_byte_tensor(x).item()
    encoded = triton.serialize_byte_tensor(sample("BYTES")).item()
    ours = from_binary("x", "BYTES", [2, 3], encoded)
    assert ours.ravel().tolist() == triton.deserialize_bytes_tensor(encoded).tolist()


@needs_triton
@pytest.mark.parametrize("datatype", ["BOOL", *NUMERIC, "FP16"])
def test_datatypes_match_tritonclient(datatype: str) -> None:
    dtype = numpy_dtype(datatype)
    assert oip_datatype(dtype) == triton.np_to_triton_dtype(dtype) == datatype
    assert np.dtype(triton.triton_to_np_dtype(datatype)) == dtype
    x = sample(datatype)
    assert to_binary(x)[2] == x.tobytes()  # what tritonclient sends for a numeric input: the array's bytes


@needs_triton
@pytest.mark.parametrize("dtype", [np.dtype(object), np.dtype("S3")])
def test_bytes_datatype_matches_tritonclient(dtype: np.dtype[Any]) -> None:
    assert oip_datatype(dtype) == triton.np_to_triton_dtype(dtype) == "BYTES"
