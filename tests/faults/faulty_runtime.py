"""A runtime plugin for fault scenarios: identity on float32 [4] that takes ``delay_s`` per batch
(read from its artifact, a JSON file), and kills its worker process, as a crash in native code
does, on a request holding the poison value."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np

from schemas.spec import ModelSpec, TensorSpec
from workers.runtimes.base import Tensors

POISON = -666.0
FORMAT = "faults_faulty"


class FaultyRuntime:
    def __init__(self, artifact: Path, spec: ModelSpec, threads: int = 0, device: str = "cpu") -> None:
        self.delay_s = float(json.loads(artifact.read_text()).get("delay_s", 0.0))
        self.inputs = [TensorSpec(name="input", dtype="float32", shape=(-1, 4))]
        self.outputs = [TensorSpec(name="output", dtype="float32", shape=(-1, 4))]

    def predict(self, inputs: Tensors) -> Tensors:
        x = inputs["input"]
        if bool(np.any(x == POISON)):
            os.kill(os.getpid(), signal.SIGSEGV)
        time.sleep(self.delay_s)
        return {"output": np.array(x, copy=True)}

    def close(self) -> None:
        pass


def install(where: Path) -> Path:
    """Make the plugin discoverable (entry point group ``servemesh.runtimes``) by processes whose
    PYTHONPATH holds the returned directory."""
    dist = where / "servemesh_faults_faulty-0.0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: servemesh-faults-faulty\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text(
        f"[servemesh.runtimes]\n{FORMAT} = tests.faults.faulty_runtime:FaultyRuntime\n"
    )
    return where
