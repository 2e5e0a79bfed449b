"""Model runtimes by format; more plug in through the ``servemesh.runtimes`` entry point group."""

from __future__ import annotations

import os
from importlib.metadata import entry_points
from pathlib import Path

from schemas.errors import ModelFailure
from schemas.spec import ModelSpec
from workers.runtimes.base import Runtime, RuntimeFactory, Tensors

__all__ = ["ARTIFACT_NAMES", "Runtime", "RuntimeFactory", "Tensors", "load_runtime", "runtime_threads"]

# The file a repository holds for each built-in format.
ARTIFACT_NAMES = {"onnx": "model.onnx", "torch_export": "model.pt2", "torchscript": "model.pt"}


def _builtin(fmt: str) -> RuntimeFactory | None:
    if fmt == "onnx":
        from workers.runtimes.onnx import OnnxRuntime

        return OnnxRuntime
    if fmt == "torchscript":
        from workers.runtimes.torchscript import TorchScriptRuntime

        return TorchScriptRuntime
    if fmt == "torch_export":
        from workers.runtimes.torch_export import TorchExportRuntime

        return TorchExportRuntime
    return None


def runtime_threads(setting: int, instances: int) -> int:
    """Compute threads for a model's runtime: the worker's setting if it has one (0: the runtime's own
    default); for a model with several instances, which share one runtime, the cores divided among them."""
    if setting or instances == 1:
        return setting
    return max(1, len(os.sched_getaffinity(0)) // instances)


def load_runtime(fmt: str, artifact: Path, spec: ModelSpec, threads: int = 0, device: str = "cpu") -> Runtime:
    """Load ``artifact`` in the runtime for ``fmt`` on ``device`` (blocking: call it from an executor)."""
    factory = _builtin(fmt)
    if factory is None:
        plugins = {ep.name: ep for ep in entry_points(group="servemesh.runtimes")}
        if fmt not in plugins:
            raise ModelFailure(f"no runtime for format {fmt!r}", format=fmt)
        factory = plugins[fmt].load()
    try:
        return factory(artifact, spec, threads, device)
    except ModelFailure:
        raise
    except ImportError as exc:
        raise ModelFailure(f"runtime {fmt!r} is not installed on this worker: {exc}", format=fmt) from exc
    except Exception as exc:
        raise ModelFailure(f"{spec.name}: cannot load {artifact}: {exc}", model=spec.name) from exc
