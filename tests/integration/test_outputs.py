"""Outputs through the mesh equal a direct onnxruntime / torch call on the same inputs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from broker import NatsServer
from servemesh import MeshClient
from tests.conftest import serving


def direct_onnx(path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


async def test_iris_onnx_matches_direct_call(nats_server: NatsServer, model_repo: Path, client: MeshClient) -> None:
    from sklearn.datasets import load_iris

    x = load_iris().data.astype(np.float32)[::10]
    async with serving(nats_server.url, model_repo, ["iris"]):
        outputs = await client.infer("iris", {"input": x})
    expected = direct_onnx(model_repo / "iris" / "1" / "model.onnx", {"input": x})
    np.testing.assert_array_equal(outputs["probabilities"], expected["probabilities"])
    np.testing.assert_array_equal(outputs["label"], expected["label"])
    assert outputs["label"].dtype == np.int64


# The digits MLP (same weights) in each torch format: torch_export, and TorchScript (deprecated by torch).
DIGITS = {"digits": "model.pt2", "digits_ts": "model.pt"}
DOUBLES = {"double_ex": "model.pt2", "double_ts": "model.pt"}


def direct_torch(path: Path, *inputs: np.ndarray) -> tuple[np.ndarray, ...]:
    """The model at ``path`` called directly: an exported program's module, a compiled AOTInductor
    package, or a TorchScript module."""
    import torch

    from workers.runtimes.torch_export import pt2_kind

    if path.suffix != ".pt2":
        module = torch.jit.load(str(path))
    elif pt2_kind(path) == "aoti":
        module = torch._inductor.aoti_load_package(str(path))
    else:
        module = torch.export.load(str(path)).module()
    with torch.inference_mode():
        result = module(*(torch.from_numpy(x) for x in inputs))
    return tuple(r.numpy() for r in (result if isinstance(result, (tuple, list)) else (result,)))


@pytest.mark.parametrize("name", list(DIGITS))
async def test_digits_on_torch_matches_direct_call(
    nats_server: NatsServer, model_repo: Path, client: MeshClient, name: str
) -> None:
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float32)[:20]
    async with serving(nats_server.url, model_repo, [name]):
        outputs = await client.infer(name, {"pixels": x})
    logits, label = direct_torch(model_repo / name / "1" / DIGITS[name], x)
    np.testing.assert_allclose(outputs["logits"], logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(outputs["label"], label)
    assert outputs["logits"].dtype == np.float32 and outputs["label"].dtype == np.int64


async def test_torch_export_batches_of_one_and_many_match_direct_call(
    nats_server: NatsServer, model_repo: Path, client: MeshClient
) -> None:
    """The exported batch axis is dynamic: a batch of 1, of 64 (max_batch_size) and whatever the
    worker forms from single requests all run, and every row gets its own answer."""
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float32)[:128]
    async with serving(nats_server.url, model_repo, ["digits"]) as worker:
        one = await client.infer("digits", {"pixels": x[:1]})
        full = await client.infer("digits", {"pixels": x[:64]})
        singles = await asyncio.gather(*(client.infer("digits", {"pixels": x[i : i + 1]}) for i in range(len(x))))
        stats = worker.servers[("digits", "1")].stats
    logits, label = direct_torch(model_repo / "digits" / "1" / "model.pt2", x)
    np.testing.assert_allclose(one["logits"], logits[:1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(full["logits"], logits[:64], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.concatenate([o["logits"] for o in singles]), logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.concatenate([o["label"] for o in singles]), label)
    assert stats.batches < 2 + len(x)  # the single requests were batched together


@pytest.mark.parametrize("name", list(DIGITS))
async def test_torch_with_two_instances_matches_direct_call(
    nats_server: NatsServer, model_repo: Path, tmp_path: Path, client: MeshClient, name: str
) -> None:
    """Two batches at once through one torch module: every image still gets its own answer."""
    import shutil

    import torch
    from sklearn.datasets import load_digits

    from tests.conftest import set_config, unique

    copy = unique(name)
    shutil.copytree(model_repo / name, tmp_path / copy)
    set_config(tmp_path / copy, instances=2, max_batch_size=8, max_delay_ms=1)
    x = load_digits().data.astype(np.float32)[:200]
    threads = torch.get_num_threads()
    try:
        async with serving(nats_server.url, tmp_path, [copy]) as worker:
            outputs = await asyncio.gather(*(client.infer(copy, {"pixels": x[i : i + 1]}) for i in range(len(x))))
            stats = worker.servers[(copy, "1")].stats
    finally:
        torch.set_num_threads(threads)  # the runtime divided the process's torch threads between instances
    logits, label = direct_torch(model_repo / name / "1" / DIGITS[name], x)
    np.testing.assert_allclose(np.concatenate([o["logits"] for o in outputs]), logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.concatenate([o["label"] for o in outputs]), label)
    assert stats.batches < len(x) and stats.peak_computing == 2


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
async def test_torch_export_precision_is_close_to_fp32_direct_call(
    nats_server: NatsServer, model_repo: Path, tmp_path: Path, client: MeshClient, precision: str
) -> None:
    """``precision`` in servemesh.yaml: computed in half precision (both work on CPU in torch 2.13),
    answered in the declared float32. TorchScript's precision: tests/unit/test_torch_runtimes.py."""
    import shutil

    from sklearn.datasets import load_digits

    from tests.conftest import set_config, unique

    name = "digits"
    copy = unique(name)
    shutil.copytree(model_repo / name, tmp_path / copy)
    set_config(tmp_path / copy, precision=precision)
    x = load_digits().data.astype(np.float32)[:64]
    async with serving(nats_server.url, tmp_path, [copy]):
        outputs = await client.infer(copy, {"pixels": x})
    logits, label = direct_torch(model_repo / name / "1" / DIGITS[name], x)
    assert outputs["logits"].dtype == np.float32
    assert not np.array_equal(outputs["logits"], logits)  # it did compute in another precision
    # bf16 keeps 8 bits of mantissa, fp16 11: on logits up to ~30, bf16 is off by ~0.1, fp16 by ~0.02.
    np.testing.assert_allclose(outputs["logits"], logits, rtol=0, atol=0.25 if precision == "bf16" else 0.05)
    assert np.mean(outputs["label"] == label) >= 0.95


@pytest.mark.parametrize("name", list(DOUBLES))
async def test_torch_float64(nats_server: NatsServer, model_repo: Path, client: MeshClient, name: str) -> None:
    x = np.linspace(-3, 3, 14, dtype=np.float64).reshape(2, 7)
    async with serving(nats_server.url, model_repo, [name]):
        outputs = await client.infer(name, {"x": x})
    assert outputs["y"].dtype == np.float64
    np.testing.assert_array_equal(outputs["y"], x * 2)
    np.testing.assert_array_equal(outputs["y"], direct_torch(model_repo / name / "1" / DOUBLES[name], x)[0])


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@pytest.mark.skipif(not _cuda(), reason="no CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
async def test_torch_export_on_a_cuda_worker_matches_direct_call(
    nats_server: NatsServer, model_repo: Path, tmp_path: Path, client: MeshClient, precision: str
) -> None:
    """A worker on cuda:0: pinned buffers, non-blocking copies, the answers the CPU's direct call gives."""
    import shutil

    from sklearn.datasets import load_digits

    from broker import Connection, Settings
    from tests.conftest import set_config, unique
    from workers.device import Device
    from workers.repository import read_model
    from workers.worker import Worker

    name = unique("digits")
    shutil.copytree(model_repo / "digits", tmp_path / name)
    set_config(tmp_path / name, precision=precision)
    x = load_digits().data.astype(np.float32)[:64]
    conn = await Connection.open(Settings.from_url(nats_server.url))
    worker = Worker(conn, unique("gpu"), device=Device("cuda", 0))
    try:
        await worker.start()
        await worker.serve(read_model(tmp_path / name))
        many = await client.infer(name, {"pixels": x})
        singles = await asyncio.gather(*(client.infer(name, {"pixels": x[i : i + 1]}) for i in range(len(x))))
    finally:
        await worker.drain()
        await conn.close()
    logits, label = direct_torch(model_repo / "digits" / "1" / "model.pt2", x)
    tolerance = 1e-4 if precision == "fp32" else 0.05
    np.testing.assert_allclose(many["logits"], logits, rtol=0, atol=tolerance)
    np.testing.assert_allclose(np.concatenate([o["logits"] for o in singles]), logits, rtol=0, atol=tolerance)
    if precision == "fp32":
        np.testing.assert_array_equal(many["label"], label)


@pytest.fixture(scope="module")
def aoti_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits MLP compiled by AOTInductor (a C++ compiler and half a minute, once per module)."""
    from examples.build_models import build_digits_export

    repo = tmp_path_factory.mktemp("aoti")
    build_digits_export(repo, "digits_aoti", aoti=True)
    return repo


async def test_aoti_package_matches_direct_call(
    nats_server: NatsServer, model_repo: Path, aoti_repo: Path, client: MeshClient
) -> None:
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float32)[:40]
    async with serving(nats_server.url, aoti_repo, ["digits_aoti"]) as worker:
        one = await client.infer("digits_aoti", {"pixels": x[:1]})
        many = await client.infer("digits_aoti", {"pixels": x})
        kind = worker.servers[("digits_aoti", "1")].runtime.kind
    assert kind == "aoti"
    logits, label = direct_torch(aoti_repo / "digits_aoti" / "1" / "model.pt2", x)
    np.testing.assert_allclose(many["logits"], logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(one["logits"], logits[:1], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(many["label"], label)
    # The same weights as the exported program, compiled: equal up to the order of float sums.
    program_logits, _ = direct_torch(model_repo / "digits" / "1" / "model.pt2", x)
    np.testing.assert_allclose(many["logits"], program_logits, rtol=1e-4, atol=1e-4)


async def test_fixed_shape_model_with_two_inputs(nats_server: NatsServer, model_repo: Path, client: MeshClient) -> None:
    rng = np.random.default_rng(1)
    x, y = rng.random((2, 3), dtype=np.float32), rng.random(3, dtype=np.float32)
    async with serving(nats_server.url, model_repo, ["fixed"]):
        outputs = await client.infer("fixed", {"x": x, "y": y})
    expected = direct_onnx(model_repo / "fixed" / "1" / "model.onnx", {"x": x, "y": y})
    np.testing.assert_array_equal(outputs["z"], expected["z"])


def _sample(dtype: str, rng: np.random.Generator) -> np.ndarray:
    if dtype == "string":
        return np.array([["a", "bé", ""], ["servemesh", "x" * 50, "z"]], dtype=object)
    if dtype == "bool":
        return rng.random((2, 3)) > 0.5
    if dtype.startswith(("int", "uint")):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=(2, 3), dtype=dtype, endpoint=True)
    return rng.standard_normal((2, 3)).astype(dtype)


@pytest.mark.parametrize(
    "dtype", ["float32", "float16", "float64", "int8", "int32", "int64", "uint8", "uint64", "bool", "string"]
)
async def test_dtypes_round_trip_through_models(
    nats_server: NatsServer, model_repo: Path, client: MeshClient, dtype: str
) -> None:
    name = f"identity_{dtype}"
    x = _sample(dtype, np.random.default_rng(7))
    async with serving(nats_server.url, model_repo, [name]):
        outputs = await client.infer(name, {"input": x})
    expected = direct_onnx(model_repo / name / "1" / "model.onnx", {"input": x})["output"]
    assert outputs["output"].shape == expected.shape
    np.testing.assert_array_equal(outputs["output"], expected)
    np.testing.assert_array_equal(outputs["output"], x)
