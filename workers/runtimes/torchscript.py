"""TorchScript models on torch.jit: inputs and outputs come from the model's servemesh.yaml."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from schemas.errors import ModelFailure
from schemas.spec import ModelSpec, TensorSpec
from workers.runtimes.base import Tensors

__all__ = ["TorchScriptRuntime"]

log = logging.getLogger(__name__)


def _full_shapes(tensors: list[TensorSpec], batched: bool) -> list[TensorSpec]:
    if not batched:
        return list(tensors)
    return [t.model_copy(update={"shape": (-1, *t.shape)}) for t in tensors]


class TorchScriptRuntime:
    def __init__(self, artifact: Path, spec: ModelSpec, threads: int = 0, device: str = "cpu") -> None:
        import torch  # an optional extra: only hosts serving TorchScript need it

        if not spec.inputs or not spec.outputs:
            raise ModelFailure(f"{spec.name}: a TorchScript model must declare inputs and outputs in servemesh.yaml")
        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self._module = torch.jit.load(str(artifact), map_location=self._device).eval()  # type: ignore[no-untyped-call]
        except Exception as exc:
            raise ModelFailure(f"torch cannot load {artifact.name}: {exc}", model=spec.name) from exc
        log.info("loaded %s on %s", artifact, self._device)
        batched = spec.max_batch_size > 0
        self.inputs = _full_shapes(spec.inputs, batched)
        self.outputs = _full_shapes(spec.outputs, batched)

    def predict(self, inputs: Tensors) -> Tensors:
        torch = self._torch
        args = [torch.from_numpy(np.array(inputs[t.name], copy=True)).to(self._device) for t in self.inputs]
        with torch.inference_mode():
            result: Any = self._module(*args)
        values = result if isinstance(result, (tuple, list)) else (result,)
        if len(values) != len(self.outputs):
            raise ModelFailure(f"model returned {len(values)} outputs, servemesh.yaml declares {len(self.outputs)}")
        return {t.name: v.detach().cpu().numpy() for t, v in zip(self.outputs, values, strict=True)}

    def close(self) -> None:
        del self._module
