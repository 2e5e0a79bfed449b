"""OnnxRuntime on the worker's device: providers and device ids per device, a clear failure where CUDA is asked
for and absent, and the I/O-binding and CUDA-graph runners (checked on CPU sessions, where they run with ordinary
buffers); the same model on a real GPU where there is one."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from examples.build_models import build_mlp_onnx
from schemas.errors import ModelFailure
from schemas.spec import ModelSpec, OnnxSettings, VersionSpec
from workers.runtimes import load_runtime
from workers.runtimes.onnx import OnnxRuntime, providers_for
from workers.runtimes.onnx_binding import BoundRunner, GraphRunner, Staging, batch_buckets, follows_batch

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelSpec]:
    repo = tmp_path_factory.mktemp("repo")
    build_mlp_onnx(repo, "mlp", d_in=8, hidden=32, d_out=4, max_batch_size=16)
    artifact = repo / "mlp" / "1" / "model.onnx"
    return artifact, ModelSpec(name="mlp", versions={"1": VersionSpec(uri=str(artifact))}, max_batch_size=16)


def _session(artifact: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(artifact), providers=["CPUExecutionProvider"])


def test_a_cpu_worker_runs_onnx_on_the_cpu_provider_only(mlp: tuple[Path, ModelSpec]) -> None:
    runtime = OnnxRuntime(*mlp, device="cpu")
    assert runtime._session.get_providers() == ["CPUExecutionProvider"]
    x = np.ones((3, 8), np.float32)
    assert runtime.predict({"input": x})["output"].shape == (3, 4)


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has a CUDA provider")
def test_cuda_asked_of_an_onnxruntime_without_it_fails_the_load_with_the_fix(mlp: tuple[Path, ModelSpec]) -> None:
    with pytest.raises(ModelFailure, match=r"runs on cuda:0 but onnxruntime has no CUDA provider \(install "
                                           r"onnxruntime-gpu"):  # fmt: skip
        load_runtime("onnx", *mlp, 0, "cuda:0")


def test_a_device_onnxruntime_does_not_know_is_refused(mlp: tuple[Path, ModelSpec]) -> None:
    with pytest.raises(ModelFailure, match="onnxruntime runs on cpu or cuda:N, not 'tpu:0'"):
        load_runtime("onnx", *mlp, 0, "tpu:0")


def test_cuda_providers_carry_the_device_id_and_the_specs_settings(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:  # fmt: skip
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    assert providers_for(None, OnnxSettings(tensorrt=True), tmp_path, "m") == ["CPUExecutionProvider"]
    [(cuda, options), cpu] = providers_for(2, OnnxSettings(), tmp_path, "m")
    assert (cuda, cpu, options["device_id"], options["enable_cuda_graph"]) == ("CUDAExecutionProvider",
                                                                               "CPUExecutionProvider", 2, "0")
    [(trt, trt_options), (_, cuda_options), _] = providers_for(1, OnnxSettings(tensorrt=True, cuda_graphs=True),
                                                               tmp_path, "m")  # fmt: skip
    assert trt == "TensorrtExecutionProvider" and trt_options["device_id"] == 1
    assert trt_options["trt_engine_cache_path"] == str(tmp_path) and cuda_options["enable_cuda_graph"] == "1"
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(ModelFailure, match=r"onnx\.tensorrt is set but onnxruntime has no TensorRT provider"):
        providers_for(0, OnnxSettings(tensorrt=True), tmp_path, "m")


def test_onnx_settings_are_validated_and_default_to_io_binding_only() -> None:
    assert OnnxSettings() == OnnxSettings(io_binding=True, cuda_graphs=False, tensorrt=False)
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        OnnxSettings.model_validate({"cuda_graph": True})


# The runners, on a CPU session ------------------------------------------------------------------------------------


def test_outputs_that_follow_the_batch_are_known_before_the_run(mlp: tuple[Path, ModelSpec]) -> None:
    assert follows_batch(_session(mlp[0])) == {"output": True}


def test_the_bound_runner_matches_a_plain_run_at_every_batch_size_and_thread(mlp: tuple[Path, ModelSpec]) -> None:
    session = _session(mlp[0])
    runner = BoundRunner(session, "cpu", 0, Staging())
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((n, 8)).astype(np.float32) for n in (1, 7, 16, 2, 16, 5)]
    for x in batches:
        np.testing.assert_allclose(runner.run({"input": x})["output"], session.run(None, {"input": x})[0], rtol=1e-6)
    with ThreadPoolExecutor(4) as pool:  # instances share one runner; buffers are per thread
        results = list(pool.map(lambda x: runner.run({"input": x})["output"], batches * 8))
    for x, out in zip(batches * 8, results, strict=True):
        np.testing.assert_allclose(out, session.run(None, {"input": x})[0], rtol=1e-6)


def test_replies_do_not_share_the_staged_buffers(mlp: tuple[Path, ModelSpec]) -> None:
    runner = BoundRunner(_session(mlp[0]), "cpu", 0, Staging())
    first = runner.run({"input": np.ones((4, 8), np.float32)})["output"]
    kept = first.copy()
    runner.run({"input": np.zeros((4, 8), np.float32)})
    np.testing.assert_array_equal(first, kept)


def test_graph_buckets_are_powers_of_two_up_to_the_largest_batch() -> None:
    assert batch_buckets(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert batch_buckets(16) == [1, 2, 4, 8, 16] and batch_buckets(1) == [1] and batch_buckets(0) == [1]


def test_the_graph_runner_pads_to_its_bucket_and_cuts_the_outputs_back(mlp: tuple[Path, ModelSpec]) -> None:
    session = _session(mlp[0])
    runner = GraphRunner(session, "cpu", 0, 16, Staging())
    rng = np.random.default_rng(2)
    for n in (3, 1, 16, 9, 3):
        x = rng.standard_normal((n, 8)).astype(np.float32)
        out = runner.run({"input": x})["output"]
        assert out.shape == (n, 4)
        np.testing.assert_allclose(out, session.run(None, {"input": x})[0], rtol=1e-6)
    assert sorted(runner._graphs) == [1, 4, 16]  # one set of fixed buffers per bucket used
    with pytest.raises(ModelFailure, match="exceeds the largest captured batch 16"):
        runner.run({"input": np.ones((17, 8), np.float32)})


# On a GPU ---------------------------------------------------------------------------------------------------------


def _cuda_device_count() -> int:
    try:
        from workers.nvml import open_nvml

        return open_nvml().count()
    except Exception:
        return 0


@pytest.mark.skipif(not HAS_CUDA or _cuda_device_count() == 0, reason="no CUDA device")
@pytest.mark.parametrize("settings", [OnnxSettings(), OnnxSettings(io_binding=False), OnnxSettings(cuda_graphs=True)])
def test_the_mlp_on_cuda_matches_the_cpu(mlp: tuple[Path, ModelSpec], settings: OnnxSettings) -> None:
    artifact, spec = mlp
    gpu = OnnxRuntime(artifact, spec.model_copy(update={"onnx": settings}), device="cuda:0")
    assert gpu._session.get_providers()[0] == "CUDAExecutionProvider"
    cpu = OnnxRuntime(artifact, spec, device="cpu")
    for n in (1, 5, 16):
        x = np.random.default_rng(n).standard_normal((n, 8)).astype(np.float32)
        np.testing.assert_allclose(gpu.predict({"input": x})["output"], cpu.predict({"input": x})["output"],
                                   rtol=1e-3, atol=1e-4)  # fmt: skip


# Batching on a GPU ------------------------------------------------------------------------------------------------


def test_a_gpu_replica_serves_with_the_specs_gpu_batching_and_a_cpu_replica_with_its_own() -> None:
    spec = ModelSpec(name="m", versions={"1": VersionSpec(uri="file:///m")}, max_batch_size=32, instances=1,
                     gpu={"max_batch_size": 256, "instances": 2})  # fmt: skip
    on_gpu = spec.on_device("cuda")
    assert (on_gpu.max_batch_size, on_gpu.instances, on_gpu.max_delay_ms) == (256, 2, spec.max_delay_ms)
    assert spec.on_device("cpu") is spec


@pytest.mark.parametrize(("batch", "gpu_batch"), [(32, 16), (0, 64)])
def test_a_gpu_batch_below_the_models_own_or_on_an_unbatched_model_is_refused(batch: int, gpu_batch: int) -> None:
    with pytest.raises(ValueError, match=f"gpu.max_batch_size {gpu_batch} is below max_batch_size {batch}"):
        ModelSpec(name="m", versions={"1": VersionSpec(uri="file:///m")}, max_batch_size=batch,
                  gpu={"max_batch_size": gpu_batch})  # fmt: skip
