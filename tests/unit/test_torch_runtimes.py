"""The torch runtimes on their own: loading model.pt2 and model.pt, batch sizes, files that are not
models, signatures that disagree with servemesh.yaml, precision and devices."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from examples import build_models
from schemas.errors import ModelFailure
from schemas.spec import ModelSpec, TensorSpec, VersionSpec
from workers.repository import read_model
from workers.runtimes import load_runtime

torch = pytest.importorskip("torch")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("torch_models")
    build_models.build_digits_export(repo)
    build_models.build_digits_torchscript(repo)
    return repo


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().data.astype(np.float32)


def _load(model_dir: Path, device: str = "cpu", **overrides: object):  # type: ignore[no-untyped-def]
    spec = read_model(model_dir).model_copy(update=overrides)
    version = spec.versions["1"]
    return load_runtime(version.format, Path(version.uri.removeprefix("file://")), spec, 0, device)


def _direct(model_dir: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    module = torch.export.load(str(model_dir / "1" / "model.pt2")).module()
    with torch.inference_mode():
        logits, label = module(torch.from_numpy(x))
    return logits.numpy(), label.numpy()


def _spec(path: Path, **kw: object) -> ModelSpec:
    defaults: dict[str, object] = {
        "max_batch_size": 64,
        "inputs": [TensorSpec(name="pixels", dtype="float32", shape=(64,))],
        "outputs": [TensorSpec(name="logits", dtype="float32", shape=(10,)), TensorSpec(name="label", dtype="int64")],
    }
    version = VersionSpec(uri=path.as_uri(), format="torch_export")
    return ModelSpec(name="m", versions={"1": version}, **{**defaults, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize("rows", [1, 2, 7, 64])
def test_exported_program_answers_every_batch_size(repo: Path, pixels: np.ndarray, rows: int) -> None:
    runtime = _load(repo / "digits")
    assert runtime.kind == "program"
    assert [t.shape for t in runtime.inputs] == [(-1, 64)]
    out = runtime.predict({"pixels": pixels[:rows]})
    logits, label = _direct(repo / "digits", pixels[:rows])
    assert out["logits"].shape == (rows, 10) and out["label"].shape == (rows,)
    np.testing.assert_allclose(out["logits"], logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out["label"], label)


def test_read_only_request_arrays_are_accepted(repo: Path, pixels: np.ndarray) -> None:
    """Requests decode zero-copy into read-only arrays; the runtime must not need to write them."""
    frozen = np.frombuffer(pixels[:3].tobytes(), np.float32).reshape(3, 64)
    out = _load(repo / "digits").predict({"pixels": frozen})
    np.testing.assert_allclose(out["logits"], _direct(repo / "digits", pixels[:3])[0], rtol=1e-6, atol=1e-6)


def test_the_two_formats_hold_the_same_model(repo: Path, pixels: np.ndarray) -> None:
    exported = _load(repo / "digits").predict({"pixels": pixels[:32]})
    scripted = _load(repo / "digits_ts").predict({"pixels": pixels[:32]})
    np.testing.assert_allclose(exported["logits"], scripted["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(exported["label"], scripted["label"])


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "not a .pt2 archive"),
        (b"this is not a model", "not a .pt2 archive"),
        ("onnx", "not a .pt2 archive"),
        ("torchscript", "neither an exported program nor an AOTInductor model"),
        ("truncated", "not a .pt2 archive"),
        ("empty zip", "neither an exported program nor an AOTInductor model"),
    ],
)
def test_a_file_that_is_no_exported_program_is_a_model_failure(
    repo: Path, tmp_path: Path, content: bytes | str, fragment: str
) -> None:
    target = tmp_path / "model.pt2"
    if content == "onnx":
        build_models.build_fixed_shape_onnx(tmp_path, "fixed")
        shutil.copy(tmp_path / "fixed" / "1" / "model.onnx", target)
    elif content == "torchscript":  # a TorchScript file is a zip too, of another layout
        shutil.copy(repo / "digits_ts" / "1" / "model.pt", target)
    elif content == "truncated":
        data = (repo / "digits" / "1" / "model.pt2").read_bytes()
        target.write_bytes(data[: len(data) // 2])
    elif content == "empty zip":
        zipfile.ZipFile(target, "w").close()
    else:
        assert isinstance(content, bytes)
        target.write_bytes(content)
    with pytest.raises(ModelFailure) as err:
        load_runtime("torch_export", target, _spec(target))
    assert fragment in err.value.message and err.value.message.startswith("m: ")


def test_a_damaged_program_is_a_model_failure(repo: Path, tmp_path: Path) -> None:
    """A zip of the right layout whose program does not deserialize."""
    source, target = repo / "digits" / "1" / "model.pt2", tmp_path / "model.pt2"
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as damaged:
        for item in original.infolist():
            data = original.read(item)
            damaged.writestr(item, b"{not json" if item.filename.endswith("models/model.json") else data)
    with pytest.raises(ModelFailure, match=r"torch cannot load model\.pt2 \(program\)"):
        load_runtime("torch_export", target, _spec(target))


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"inputs": [TensorSpec(name="pixels", dtype="float64", shape=(64,))]}, "float64 in servemesh.yaml, float32"),
        ({"inputs": [TensorSpec(name="pixels", dtype="float32", shape=(32,))]}, "dimension 0 is 32"),
        ({"inputs": [TensorSpec(name="pixels", dtype="float32", shape=(8, 8))]}, "dimension 0 is 8"),
        ({"inputs": [TensorSpec(name="pixels", dtype="float32", shape=(-1,))]}, "dimension 0 is -1"),
        ({"inputs": [TensorSpec(name="a", dtype="float32", shape=(64,))] * 2}, "takes 1 inputs, servemesh.yaml has 2"),
        ({"inputs": []}, "must declare inputs and outputs"),
        ({"outputs": [TensorSpec(name="text", dtype="str")]}, "torch tensors hold numbers"),
    ],
)  # fmt: skip
def test_a_signature_that_disagrees_with_the_program_fails_at_load(
    repo: Path, overrides: dict[str, object], fragment: str
) -> None:
    path = repo / "digits" / "1" / "model.pt2"
    with pytest.raises(ModelFailure) as err:
        load_runtime("torch_export", path, _spec(path, **overrides))
    assert fragment in err.value.message


def _export(tmp_path: Path, dynamic_shapes: object) -> Path:
    """The digits module (untrained) exported with the given batch axis."""
    program = torch.export.export(
        build_models._digits_module().eval(), (torch.zeros(8, 64),), dynamic_shapes=dynamic_shapes
    )
    target = tmp_path / "model.pt2"
    torch.export.save(program, str(target))
    return target


def test_a_fixed_batch_axis_fails_at_load_with_the_fix(tmp_path: Path) -> None:
    path = _export(tmp_path, None)
    with pytest.raises(ModelFailure) as err:
        load_runtime("torch_export", path, _spec(path))
    assert "batch axis is fixed to 8" in err.value.message and "torch.export.Dim('batch')" in err.value.message
    # Unbatched (max_batch_size 0), the same program takes its exact shape.
    inputs = [TensorSpec(name="pixels", dtype="float32", shape=(8, 64))]
    outputs = [
        TensorSpec(name="logits", dtype="float32", shape=(8, 10)),
        TensorSpec(name="label", dtype="int64", shape=(8,)),
    ]
    runtime = load_runtime("torch_export", path, _spec(path, max_batch_size=0, inputs=inputs, outputs=outputs))
    assert runtime.predict({"pixels": np.ones((8, 64), np.float32)})["logits"].shape == (8, 10)


def test_a_batch_axis_bounded_below_max_batch_size_fails_at_load(tmp_path: Path) -> None:
    path = _export(tmp_path, ({0: torch.export.Dim("batch", min=1, max=16)},))
    with pytest.raises(ModelFailure, match=r"takes 1\.\.16 rows, servemesh.yaml's max_batch_size is 64"):
        load_runtime("torch_export", path, _spec(path))
    assert load_runtime("torch_export", path, _spec(path, max_batch_size=16)).predict(
        {"pixels": np.ones((16, 64), np.float32)}
    )["label"].shape == (16,)


@pytest.mark.parametrize("name", ["digits", "digits_ts"])
def test_half_precision_is_close_to_fp32(repo: Path, pixels: np.ndarray, name: str) -> None:
    """fp16 and bf16 both compute on CPU in torch 2.13; outputs come back in the declared float32."""
    x = pixels[:256]
    expected, label = _direct(repo / "digits", x)
    for precision, tolerance in (("bf16", 0.25), ("fp16", 0.05)):
        out = _load(repo / name, precision=precision).predict({"pixels": x})
        assert out["logits"].dtype == np.float32 and out["label"].dtype == np.int64
        assert not np.array_equal(out["logits"], expected), precision
        np.testing.assert_allclose(out["logits"], expected, rtol=0, atol=tolerance, err_msg=precision)
        assert np.mean(out["label"] == label) >= 0.95


def test_precision_is_validated_and_refused_for_onnx(tmp_path: Path) -> None:
    path = tmp_path / "model.pt2"
    with pytest.raises(ValidationError, match="precision"):
        _spec(path, precision="fp8")
    assert _spec(path).precision == "fp32"
    with pytest.raises(ValidationError, match="precision bf16 applies to torch models"):
        ModelSpec(name="m", versions={"1": VersionSpec(uri=path.as_uri(), format="onnx")}, precision="bf16")


def test_precision_is_read_from_servemesh_yaml(repo: Path, tmp_path: Path) -> None:
    from tests.conftest import set_config

    shutil.copytree(repo / "digits", tmp_path / "digits")
    set_config(tmp_path / "digits", precision="bf16")
    assert read_model(tmp_path / "digits").precision == "bf16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a CUDA device")
@pytest.mark.parametrize("name", ["digits", "digits_ts"])
def test_a_cuda_device_without_cuda_is_a_model_failure(repo: Path, name: str) -> None:
    with pytest.raises(ModelFailure, match="finds no CUDA device"):
        _load(repo / name, device="cuda:0")


@pytest.mark.parametrize(
    ("device", "fragment"),
    [("tpu:0", "'tpu:0' is not a torch device"), ("cuda:x", "'cuda:x' is not a torch device"),
     ("meta", "the torch runtimes run on cpu or cuda:N")],
)  # fmt: skip
def test_a_device_torch_cannot_serve_on_is_a_model_failure(repo: Path, device: str, fragment: str) -> None:
    with pytest.raises(ModelFailure) as err:
        _load(repo / "digits", device=device)
    assert fragment in err.value.message


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("name", ["digits", "digits_ts"])
def test_cuda_matches_cpu(repo: Path, pixels: np.ndarray, name: str, precision: str) -> None:
    """On the GPU (pinned buffers, non-blocking copies) the answers are the CPU's, within precision."""
    x = pixels[:64]
    expected, label = _direct(repo / "digits", x)
    runtime = _load(repo / name, device="cuda:0", precision=precision)
    for rows in (1, 64):
        out = runtime.predict({"pixels": x[:rows]})
        assert out["logits"].dtype == np.float32 and out["label"].dtype == np.int64
        tolerance = {"fp32": 1e-4, "fp16": 0.05, "bf16": 0.25}[precision]
        np.testing.assert_allclose(out["logits"], expected[:rows], rtol=0, atol=tolerance)
        if precision == "fp32":
            np.testing.assert_array_equal(out["label"], label[:rows])
    runtime.close()
