"""What the torch runtimes share: the worker's device, the model's precision, and moving a batch
between numpy and that device (on CUDA through pinned host buffers with non-blocking copies)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch  # imported by the torch runtimes only: torch is an optional extra

from schemas.errors import ModelFailure
from schemas.spec import ModelSpec, TensorSpec
from workers.runtimes.base import Tensors

__all__ = ["TorchIO", "check_declared", "compute_dtype", "full_shapes", "torch_device"]

_FLOATS = {"float16", "float32", "float64"}
# Declared dtypes torch has no tensors for.
_NOT_TORCH = {"str", "bytes"}


def full_shapes(tensors: list[TensorSpec], batched: bool) -> list[TensorSpec]:
    """The declared per-item shapes with the batch axis in front (-1) when the model batches."""
    if not batched:
        return list(tensors)
    return [t.model_copy(update={"shape": (-1, *t.shape)}) for t in tensors]


def check_declared(spec: ModelSpec, kind: str) -> None:
    """Torch artifacts carry no names for their inputs and outputs: servemesh.yaml gives them."""
    if not spec.inputs or not spec.outputs:
        raise ModelFailure(f"{spec.name}: a {kind} model must declare inputs and outputs in servemesh.yaml",
                           model=spec.name)  # fmt: skip
    for t in (*spec.inputs, *spec.outputs):
        if t.dtype in _NOT_TORCH:
            raise ModelFailure(f"{spec.name}: {t.name} is {t.dtype}; torch tensors hold numbers", model=spec.name)


def torch_device(device: str, model: str) -> torch.device:
    """The worker's device ("cpu" or "cuda:N") as a torch device this process can use."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ModelFailure(f"{model}: {device!r} is not a torch device ({exc})", model=model) from exc
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ModelFailure(f"{model}: device {device!r}: the torch runtimes run on cpu or cuda:N", model=model)
    if not torch.cuda.is_available():
        raise ModelFailure(f"{model}: device {device} asked for, but torch {torch.__version__} finds no CUDA device",
                           model=model)  # fmt: skip
    index = 0 if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise ModelFailure(f"{model}: device {device}: this host has {torch.cuda.device_count()} CUDA device(s)",
                           model=model)  # fmt: skip
    return torch.device("cuda", index)


def compute_dtype(spec: ModelSpec) -> torch.dtype | None:
    """The float dtype the model computes in for its ``precision``; None: as exported (fp32)."""
    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[spec.precision]


class TorchIO:
    """A batch's way in and out: numpy arrays → tensors on the device (float inputs in the compute
    dtype), and the model's outputs → numpy arrays of the declared dtypes."""

    def __init__(self, spec: ModelSpec, device: torch.device) -> None:
        self.device = device
        self.compute = compute_dtype(spec)
        self._cuda = device.type == "cuda"
        self._inputs = spec.inputs
        self._outputs = spec.outputs
        self._dtypes = {t.name: _torch_dtype(t.dtype) for t in (*spec.inputs, *spec.outputs)}

    def to_device(self, inputs: Tensors) -> list[torch.Tensor]:
        """The model's positional arguments, in declaration order."""
        return [self._tensor(t, inputs[t.name]) for t in self._inputs]

    def to_host(self, result: Any) -> Tensors:
        """The model's return value (a tensor, or a tuple/list of them) as named arrays."""
        values: Sequence[Any] = result if isinstance(result, (tuple, list)) else (result,)
        if len(values) != len(self._outputs):
            raise ModelFailure(f"model returned {len(values)} outputs, servemesh.yaml declares {len(self._outputs)}")
        tensors = [self._declared(t, v) for t, v in zip(self._outputs, values, strict=True)]
        if not self._cuda:
            return {t.name: v.numpy() for t, v in zip(self._outputs, tensors, strict=True)}
        hosts = [torch.empty(v.shape, dtype=v.dtype, pin_memory=True) for v in tensors]
        for host, value in zip(hosts, tensors, strict=True):
            host.copy_(value, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()  # the copies above are asynchronous
        return {t.name: h.numpy() for t, h in zip(self._outputs, hosts, strict=True)}

    def _tensor(self, spec: TensorSpec, array: np.ndarray[Any, Any]) -> torch.Tensor:
        if self._cuda:
            # One copy into page-locked memory, from which the transfer runs without blocking this thread.
            host = torch.empty(array.shape, dtype=self._dtypes[spec.name], pin_memory=True)
            host.numpy()[...] = array
            tensor = host.to(self.device, non_blocking=True)
        else:
            # Request arrays are read-only views of the message (torch wants writable memory).
            tensor = torch.from_numpy(np.require(array, requirements=("C", "W")))
        if self.compute is not None and tensor.is_floating_point():
            tensor = tensor.to(self.compute)
        return tensor

    def _declared(self, spec: TensorSpec, value: Any) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            raise ModelFailure(f"model returned {type(value).__name__} for output {spec.name!r}, not a tensor")
        tensor: torch.Tensor = value.detach()
        if tensor.is_floating_point() and spec.dtype in _FLOATS:
            # Back to the declared dtype after fp16/bf16 compute (numpy has no bfloat16).
            tensor = tensor.to(self._dtypes[spec.name])
        return tensor


def _torch_dtype(dtype: str) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, dtype)).dtype
