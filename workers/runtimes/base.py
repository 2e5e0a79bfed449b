"""The runtime interface: a loaded model that maps a batch of named arrays to named arrays."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from schemas.spec import ModelSpec, TensorSpec

__all__ = ["Runtime", "RuntimeFactory", "Tensors"]

Tensors = dict[str, np.ndarray[Any, Any]]


class Runtime(Protocol):
    """A model loaded in memory. ``predict`` is blocking and runs in an executor thread.

    ``inputs``/``outputs`` are the signature the runtime itself knows (full shapes, batch axis
    included, -1 for dynamic); a runtime without metadata returns the spec's declaration.
    """

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def predict(self, inputs: Tensors) -> Tensors: ...

    def close(self) -> None: ...


class RuntimeFactory(Protocol):
    """Loads an artifact; ``threads`` caps the runtime's compute threads (0: its own default), and
    ``device`` is the worker's device ("cpu" or "cuda:N")."""

    def __call__(self, artifact: Path, spec: ModelSpec, threads: int = 0, device: str = "cpu") -> Runtime: ...
