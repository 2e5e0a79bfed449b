"""ONNX models on onnxruntime, on the worker's device: the CPU provider on "cpu"; on "cuda:N" the CUDA provider
with that device id (TensorRT's first where the spec asks), I/O binding over pinned host buffers and, optionally,
CUDA graphs (``onnx:`` in servemesh.yaml)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from schemas.errors import ModelFailure
from schemas.spec import ModelSpec, OnnxSettings, TensorSpec
from workers.runtimes.base import Tensors
from workers.runtimes.onnx_binding import BoundRunner, GraphRunner, Staging

__all__ = ["OnnxRuntime"]

log = logging.getLogger(__name__)

_ORT_TYPES = {
    "tensor(bool)": "bool", "tensor(int8)": "int8", "tensor(int16)": "int16", "tensor(int32)": "int32",
    "tensor(int64)": "int64", "tensor(uint8)": "uint8", "tensor(uint16)": "uint16", "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64", "tensor(float16)": "float16", "tensor(float)": "float32",
    "tensor(double)": "float64", "tensor(string)": "str",
}  # fmt: skip


def _tensor_spec(arg: ort.NodeArg) -> TensorSpec:
    dtype = _ORT_TYPES.get(arg.type)
    if dtype is None:
        raise ModelFailure(f"input/output {arg.name!r} has unsupported type {arg.type}")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or []))
    return TensorSpec(name=arg.name, dtype=dtype, shape=shape)


_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def cuda_device_id(device: str) -> int | None:
    """N of "cuda:N"; None for the CPU."""
    if device == "cpu":
        return None
    kind, _, index = device.partition(":")
    if kind != "cuda" or not index.isdigit():
        raise ModelFailure(f"onnxruntime runs on cpu or cuda:N, not {device!r}")
    return int(index)


def providers_for(device_id: int | None, settings: OnnxSettings, cache_dir: Path, model: str) -> list[Any]:
    """The execution providers, in order, for a device (None: the CPU), checked against what is installed."""
    if device_id is None:
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise ModelFailure(f"{model}: this worker runs on cuda:{device_id} but onnxruntime has no CUDA provider "
                           "(install onnxruntime-gpu: the gpu extra)", model=model)  # fmt: skip
    cuda: dict[str, Any] = {
        "device_id": device_id,
        # Arenas grow by what is asked, not to the next power of two: measured footprints stay close to use.
        "arena_extend_strategy": "kSameAsRequested",
        "enable_cuda_graph": "1" if settings.cuda_graphs else "0",
    }
    providers: list[Any] = [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
    if settings.tensorrt:
        if "TensorrtExecutionProvider" not in available:
            raise ModelFailure(f"{model}: onnx.tensorrt is set but onnxruntime has no TensorRT provider", model=model)
        trt = {"device_id": device_id, "trt_engine_cache_enable": "1", "trt_engine_cache_path": str(cache_dir),
               "trt_cuda_graph_enable": "1" if settings.cuda_graphs else "0"}  # fmt: skip
        providers.insert(0, ("TensorrtExecutionProvider", trt))
    return providers


def _pinned(device_id: int) -> Staging:
    """Page-locked staging buffers through the CUDA driver; ordinary ones (still bound) where it cannot."""
    from workers.cuda import CudaUnavailable, driver

    try:
        cuda = driver()
    except CudaUnavailable as exc:
        log.warning("no pinned host buffers (%s): I/O binding over pageable memory", exc)
        return Staging()
    return Staging(lambda nbytes: cuda.pinned(device_id, (nbytes,), np.dtype(np.uint8)))


class OnnxRuntime:
    def __init__(self, artifact: Path, spec: ModelSpec, threads: int = 0, device: str = "cpu") -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle pool threads must not spin: they share the cores with the event loop and nats-server.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        device_id = cuda_device_id(device)
        providers = providers_for(device_id, spec.onnx, artifact.parent / "tensorrt", spec.name)
        try:
            self._session = ort.InferenceSession(str(artifact), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise ModelFailure(f"onnxruntime cannot load {artifact.name}: {exc}", model=spec.name) from exc
        running = self._session.get_providers()[0]
        if device_id is not None and running not in _GPU_PROVIDERS:
            # onnxruntime falls back to the CPU when the CUDA libraries do not load; a GPU worker must not.
            raise ModelFailure(f"{spec.name}: onnxruntime could not use cuda:{device_id} (it offered {running}; "
                               "are CUDA and cuDNN installed as onnxruntime-gpu needs?)", model=spec.name)  # fmt: skip
        log.info("loaded %s on %s (%s)", artifact, device, running)
        self.inputs = [_tensor_spec(a) for a in self._session.get_inputs()]
        self.outputs = [_tensor_spec(a) for a in self._session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]
        self._runner: BoundRunner | GraphRunner | None = None
        if device_id is not None and spec.onnx.cuda_graphs:
            self._runner = GraphRunner(self._session, "cuda", device_id, spec.max_batch_size, _pinned(device_id))
        elif device_id is not None and spec.onnx.io_binding:
            self._runner = BoundRunner(self._session, "cuda", device_id, _pinned(device_id))

    def predict(self, inputs: Tensors) -> Tensors:
        if self._runner is not None:
            return self._runner.run(inputs)
        results = self._session.run(self._output_names, inputs)
        return {name: np.asarray(value) for name, value in zip(self._output_names, results, strict=True)}

    def close(self) -> None:
        del self._session
