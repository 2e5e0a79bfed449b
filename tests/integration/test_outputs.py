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


async def test_digits_torchscript_matches_direct_call(
    nats_server: NatsServer, model_repo: Path, client: MeshClient
) -> None:
    import torch
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float32)[:20]
    async with serving(nats_server.url, model_repo, ["digits"]):
        outputs = await client.infer("digits", {"pixels": x})
    module = torch.jit.load(str(model_repo / "digits" / "1" / "model.pt"))
    with torch.inference_mode():
        logits, label = module(torch.from_numpy(x))
    np.testing.assert_allclose(outputs["logits"], logits.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(outputs["label"], label.numpy())


async def test_torchscript_with_two_instances_matches_direct_call(
    nats_server: NatsServer, model_repo: Path, tmp_path: Path, client: MeshClient
) -> None:
    """Two batches at once through one TorchScript module: every image still gets its own answer."""
    import shutil

    import torch
    from sklearn.datasets import load_digits

    from tests.conftest import set_config, unique

    name = unique("digits")
    shutil.copytree(model_repo / "digits", tmp_path / name)
    set_config(tmp_path / name, instances=2, max_batch_size=8, max_delay_ms=1)
    x = load_digits().data.astype(np.float32)[:200]
    threads = torch.get_num_threads()
    try:
        async with serving(nats_server.url, tmp_path, [name]) as worker:
            outputs = await asyncio.gather(*(client.infer(name, {"pixels": x[i : i + 1]}) for i in range(len(x))))
            stats = worker.servers[(name, "1")].stats
    finally:
        torch.set_num_threads(threads)  # the runtime divided the process's torch threads between instances
    module = torch.jit.load(str(model_repo / "digits" / "1" / "model.pt"))
    with torch.inference_mode():
        logits, label = module(torch.from_numpy(x))
    np.testing.assert_allclose(np.concatenate([o["logits"] for o in outputs]), logits.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.concatenate([o["label"] for o in outputs]), label.numpy())
    assert stats.batches < len(x) and stats.peak_computing == 2


async def test_torchscript_float64(nats_server: NatsServer, model_repo: Path, client: MeshClient) -> None:
    x = np.linspace(-3, 3, 14, dtype=np.float64).reshape(2, 7)
    async with serving(nats_server.url, model_repo, ["double_ts"]):
        outputs = await client.infer("double_ts", {"x": x})
    assert outputs["y"].dtype == np.float64
    np.testing.assert_array_equal(outputs["y"], x * 2)


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
