"""TorchScript models (``model.pt``) on torch.jit, which torch deprecates: new models should be
exported with torch.export (format ``torch_export``). Inputs and outputs come from servemesh.yaml."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from schemas.errors import ModelFailure
from schemas.spec import ModelSpec
from workers.runtimes.base import Tensors
from workers.runtimes.torch_io import TorchIO, check_declared, full_shapes, torch_device

__all__ = ["TorchScriptRuntime"]

log = logging.getLogger(__name__)


class TorchScriptRuntime:
    def __init__(self, artifact: Path, spec: ModelSpec, threads: int = 0, device: str = "cpu") -> None:
        import torch  # an optional extra: only hosts serving torch models need it

        check_declared(spec, "TorchScript")
        self._torch = torch
        self._io = TorchIO(spec, torch_device(device, spec.name))
        if threads:
            torch.set_num_threads(threads)
        try:
            module = torch.jit.load(str(artifact), map_location=self._io.device)  # type: ignore[no-untyped-call]
        except Exception as exc:
            raise ModelFailure(f"torch cannot load {artifact.name}: {exc}", model=spec.name) from exc
        if self._io.compute is not None:
            module = module.to(self._io.compute)
        self._module = module.eval()
        log.info("loaded %s on %s (%s)", artifact, self._io.device, spec.precision)
        batched = spec.max_batch_size > 0
        self.inputs = full_shapes(spec.inputs, batched)
        self.outputs = full_shapes(spec.outputs, batched)

    def predict(self, inputs: Tensors) -> Tensors:
        with self._torch.inference_mode():
            result: Any = self._module(*self._io.to_device(inputs))
            return self._io.to_host(result)

    def close(self) -> None:
        del self._module
