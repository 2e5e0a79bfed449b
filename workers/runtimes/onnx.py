"""ONNX models on onnxruntime: the CUDA provider when this host has one, else the CPU."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from schemas.errors import ModelFailure
from schemas.spec import ModelSpec, TensorSpec
from workers.runtimes.base import Tensors

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


class OnnxRuntime:
    def __init__(self, artifact: Path, spec: ModelSpec, threads: int = 0, device: str = "cpu") -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle pool threads must not spin: they share the cores with the event loop and nats-server.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        providers = [p for p in wanted if p in ort.get_available_providers()]
        try:
            self._session = ort.InferenceSession(str(artifact), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise ModelFailure(f"onnxruntime cannot load {artifact.name}: {exc}", model=spec.name) from exc
        log.info("loaded %s on %s", artifact, self._session.get_providers()[0])
        self.inputs = [_tensor_spec(a) for a in self._session.get_inputs()]
        self.outputs = [_tensor_spec(a) for a in self._session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]

    def predict(self, inputs: Tensors) -> Tensors:
        results = self._session.run(self._output_names, inputs)
        return {name: np.asarray(value) for name, value in zip(self._output_names, results, strict=True)}

    def close(self) -> None:
        del self._session
