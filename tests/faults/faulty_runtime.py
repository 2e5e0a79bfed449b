"""A runtime plugin for the poison scenario: identity on float32 [4], except that a request
holding the poison value kills the worker process the way a crash in native code does."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np

from schemas.spec import ModelSpec, TensorSpec
from workers.runtimes.base import Tensors

POISON = -666.0
FORMAT = "faults_crash"


class CrashingRuntime:
    def __init__(self, artifact: Path, spec: ModelSpec, threads: int = 0) -> None:
        self.inputs = [TensorSpec(name="input", dtype="float32", shape=(-1, 4))]
        self.outputs = [TensorSpec(name="output", dtype="float32", shape=(-1, 4))]

    def predict(self, inputs: Tensors) -> Tensors:
        x = inputs["input"]
        if bool(np.any(x == POISON)):
            os.kill(os.getpid(), signal.SIGSEGV)
        return {"output": np.array(x, copy=True)}

    def close(self) -> None:
        pass


def install(where: Path) -> Path:
    """Make the plugin discoverable (entry point group ``servemesh.runtimes``) by processes whose
    PYTHONPATH holds the returned directory."""
    dist = where / "servemesh_faults_crash-0.0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: servemesh-faults-crash\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text(
        f"[servemesh.runtimes]\n{FORMAT} = tests.faults.crash_runtime:CrashingRuntime\n"
    )
    return where
