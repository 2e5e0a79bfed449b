"""torch.export models (``model.pt2``): an ExportedProgram saved by ``torch.export.save``, run as its
module, or an AOTInductor package from ``torch._inductor.aoti_compile_and_package``, run compiled.
Inputs and outputs come from servemesh.yaml and are checked against the program's own signature."""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from schemas.errors import ModelFailure
from schemas.spec import ModelSpec
from workers.runtimes.base import Tensors
from workers.runtimes.torch_io import TorchIO, check_declared, full_shapes, torch_device

if TYPE_CHECKING:
    import torch

__all__ = ["TorchExportRuntime", "pt2_kind"]

log = logging.getLogger(__name__)

Pt2Kind = Literal["program", "aoti"]


def pt2_kind(artifact: Path) -> Pt2Kind:
    """Which kind of .pt2 archive ``artifact`` is, from its entries (a zip with one root folder)."""
    try:
        with zipfile.ZipFile(artifact) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelFailure(f"{artifact.name} is not a .pt2 archive (torch.export.save writes one): {exc}") from exc
    entries = {name.split("/", 1)[1] for name in names if "/" in name}
    if any(e.startswith("data/aotinductor/") for e in entries):
        return "aoti"
    # models/<name>.json since torch 2.7; serialized_exported_program.json before.
    if any(e.startswith("models/") and e.endswith(".json") for e in entries) or any(
        n.endswith("serialized_exported_program.json") for n in names
    ):
        return "program"
    raise ModelFailure(f"{artifact.name} is a zip archive, but holds neither an exported program nor an "
                       "AOTInductor model")  # fmt: skip


class TorchExportRuntime:
    def __init__(self, artifact: Path, spec: ModelSpec, threads: int = 0, device: str = "cpu") -> None:
        import torch  # an optional extra: only hosts serving torch models need it

        check_declared(spec, "torch_export")
        self._torch = torch
        self._io = TorchIO(spec, torch_device(device, spec.name))
        if threads:
            torch.set_num_threads(threads)
        try:
            kind = pt2_kind(artifact)
        except ModelFailure as exc:
            raise ModelFailure(f"{spec.name}: {exc.message}", model=spec.name) from exc
        load = _load_aoti if kind == "aoti" else _load_program
        try:
            self._call = load(artifact, spec, self._io)
        except ModelFailure:
            raise
        except Exception as exc:  # torch raises RuntimeError, AssertionError, pickle and serde errors
            raise ModelFailure(f"torch cannot load {artifact.name} ({kind}): {exc}", model=spec.name) from exc
        log.info("loaded %s (%s) on %s (%s)", artifact, kind, self._io.device, spec.precision)
        self.kind = kind
        batched = spec.max_batch_size > 0
        self.inputs = full_shapes(spec.inputs, batched)
        self.outputs = full_shapes(spec.outputs, batched)

    def predict(self, inputs: Tensors) -> Tensors:
        with self._torch.inference_mode():
            return self._io.to_host(self._call(*self._io.to_device(inputs)))

    def close(self) -> None:
        del self._call


def _load_program(artifact: Path, spec: ModelSpec, io: TorchIO) -> Callable[..., Any]:
    import torch

    program = torch.export.load(str(artifact))
    _check_signature(program, spec, io)
    if io.device.type != "cpu":
        # Moves the weights and the devices written into the graph (a plain module.to() would not).
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, io.device)
    module = program.module()
    if io.compute is not None:
        module = module.to(io.compute)
    return module


def _load_aoti(artifact: Path, spec: ModelSpec, io: TorchIO) -> Callable[..., Any]:
    import torch._inductor

    if io.compute is not None:
        raise ModelFailure(f"{spec.name}: an AOTInductor package is compiled for its dtypes; precision "
                           f"{spec.precision} needs the model compiled in it (or an ExportedProgram)",
                           model=spec.name)  # fmt: skip
    index = io.device.index if io.device.type == "cuda" else -1
    compiled = torch._inductor.aoti_load_package(str(artifact), device_index=-1 if index is None else index)
    built_for = compiled.get_metadata().get("AOTI_DEVICE_KEY", "cpu")
    if built_for != io.device.type:
        raise ModelFailure(f"{spec.name}: {artifact.name} is compiled for {built_for}, this worker's device is "
                           f"{io.device}; compile it for {io.device.type}", model=spec.name)  # fmt: skip
    return compiled


def _check_signature(program: torch.export.ExportedProgram, spec: ModelSpec, io: TorchIO) -> None:
    """The declared inputs against the exported ones: count, dtype, and a batch axis that is dynamic
    over 1..max_batch_size — caught here once rather than as a failure of every request."""
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    exported = [nodes[name].meta.get("val") for name in program.graph_signature.user_inputs]
    if len(exported) != len(spec.inputs):
        raise ModelFailure(f"{spec.name}: the program takes {len(exported)} inputs, servemesh.yaml has "
                           f"{len(spec.inputs)}", model=spec.name)  # fmt: skip
    ranges = {str(sym): vr for sym, vr in program.range_constraints.items()}
    for declared, value in zip(spec.inputs, exported, strict=True):
        where = f"{spec.name}: input {declared.name!r}"
        if value is None or not hasattr(value, "dtype"):
            raise ModelFailure(f"{where} is not a tensor in the exported program", model=spec.name)
        dtype = str(value.dtype).removeprefix("torch.")
        allowed = {declared.dtype} | ({str(io.compute).removeprefix("torch.")} if io.compute is not None else set())
        if dtype not in allowed:
            raise ModelFailure(f"{where} is {declared.dtype} in servemesh.yaml, {dtype} in the exported program",
                               model=spec.name)  # fmt: skip
        shape = list(value.shape)
        if spec.max_batch_size > 0:
            if not shape:
                raise ModelFailure(f"{where}: the exported program takes a scalar, the model batches", model=spec.name)
            _check_batch_axis(where, shape.pop(0), ranges, spec.max_batch_size)
        for axis, (want, got) in enumerate(zip(declared.shape, shape, strict=False)):
            if isinstance(got, int) and want != got:
                raise ModelFailure(f"{where}: dimension {axis} is {want} in servemesh.yaml, fixed to {got} in the "
                                   "exported program", model=spec.name)  # fmt: skip
        if len(declared.shape) != len(shape):
            raise ModelFailure(f"{where}: {len(declared.shape)} dimensions (batch axis aside) in servemesh.yaml, "
                               f"{len(shape)} in the exported program", model=spec.name)  # fmt: skip


def _check_batch_axis(where: str, dim: Any, ranges: dict[str, Any], max_batch_size: int) -> None:
    hint = "export it with dynamic_shapes marking axis 0 as torch.export.Dim('batch')"
    if isinstance(dim, int):
        if dim == max_batch_size == 1:
            return
        raise ModelFailure(f"{where}: the batch axis is fixed to {dim} in the exported program; {hint}")
    bounds = ranges.get(str(dim))
    if bounds is None:  # an expression of symbols rather than one: torch checks it per call
        return
    if bounds.lower > 1 or bounds.upper < max_batch_size:
        raise ModelFailure(f"{where}: the exported batch axis takes {bounds.lower}..{bounds.upper} rows, "
                           f"servemesh.yaml's max_batch_size is {max_batch_size}; {hint}")  # fmt: skip
