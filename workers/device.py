"""The device a worker runs its models on ("cpu" or "cuda:N"): chosen once at start, described in every
heartbeat (kind, name, total and free memory) and in labels (``gpu=true``, ``gpu.model=...``) that placement
rules can name. CUDA devices are seen through NVML; nothing here imports torch."""

from __future__ import annotations

import logging
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from workers.nvml import Nvml, NvmlUnavailable, open_nvml

__all__ = [
    "CPU_DEVICE", "Device", "DeviceError", "gpu_budget_mb", "gpu_uuids", "parse_device", "resolve_device",
    "visible_gpus",
]

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# Of the device memory free at start, what a worker budgets for models by default: the rest is headroom for
# the CUDA context, the runtime's workspace and fragmentation.
GPU_BUDGET_SHARE = 0.9
_DEVICE = re.compile(r"^(auto|cpu|cuda(?::(\d+))?)$")


class DeviceError(Exception):
    """The device asked for cannot be used on this host; the message names it and why."""


@dataclass(frozen=True, slots=True)
class Device:
    kind: str  # "cpu" | "cuda"
    index: int = 0  # N of cuda:N, in this process's CUDA numbering
    name: str = ""  # e.g. "NVIDIA H100 80GB HBM3"
    uuid: str = ""
    nvml: Nvml | None = field(default=None, compare=False, repr=False)
    handle: Any = field(default=None, compare=False, repr=False)

    @property
    def id(self) -> str:
        """What runtimes are told: "cpu" or "cuda:N"."""
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"

    @property
    def labels(self) -> dict[str, str]:
        """Placement labels the worker carries for its device (its own --labels win)."""
        if self.kind == "cpu":
            return {}
        # As NVIDIA's GPU feature discovery spells products: spaces become dashes.
        return {"gpu": "true", "gpu.model": re.sub(r"\s+", "-", self.name.strip()) or "unknown"}

    def memory(self) -> tuple[int, int] | None:
        """(total, free) bytes, or None (a CPU, or NVML cannot tell)."""
        if self.nvml is None or self.handle is None:
            return None
        try:
            return self.nvml.memory(self.handle)
        except Exception as exc:  # a lost device: the heartbeat says nulls rather than failing
            log.warning("cannot read the memory of %s: %s", self.id, exc)
            return None

    def used_by(self, pid: int) -> int | None:
        """Bytes of device memory process ``pid`` holds, where NVML tells."""
        if self.nvml is None or self.handle is None:
            return None
        return self.nvml.used_by(self.handle, pid)

    def status(self) -> dict[str, Any]:
        """The heartbeat's ``device``: nulls for what a CPU (or a silent NVML) cannot tell."""
        mem = self.memory()
        return {
            "kind": self.kind, "id": self.id, "name": self.name or platform.machine(),
            "memory_total_mb": mem[0] // MIB if mem else None, "memory_free_mb": mem[1] // MIB if mem else None,
        }  # fmt: skip


CPU_DEVICE = Device("cpu")


def parse_device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` (= ``cuda:0``) or ``cuda:N``, normalised; ValueError otherwise."""
    match = _DEVICE.match(text.strip().lower())
    if match is None:
        raise ValueError(f"expected auto, cpu or cuda:N, got {text!r}")
    if match.group(1).startswith("cuda"):
        return f"cuda:{int(match.group(2) or 0)}"
    return match.group(1)


def visible_gpus(nvml: Nvml, cuda_visible_devices: str | None) -> list[str]:
    """NVML's identifiers (indexes or UUIDs) of the devices this process sees, in CUDA's numbering: all of them,
    or those ``CUDA_VISIBLE_DEVICES`` lists, up to its first entry that names none (as CUDA reads it)."""
    count = nvml.count()
    if cuda_visible_devices is None:
        return [str(i) for i in range(count)]
    seen: list[str] = []
    for entry in (e.strip() for e in cuda_visible_devices.split(",")):
        if not entry or entry.startswith("-") or (entry.isdigit() and int(entry) >= count) or entry in seen:
            break
        seen.append(entry)
    return seen


def _onnxruntime_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def resolve_device(
    text: str,
    cuda_visible_devices: str | None,
    nvml_module: Any | None = None,
    runtime_has_cuda: Callable[[], bool] = _onnxruntime_has_cuda,
) -> Device:
    """The device ``--device`` names (see :func:`parse_device`). ``auto``: the first visible GPU when onnxruntime
    can run on it, else the CPU. A CUDA device this host cannot show raises DeviceError."""
    asked = parse_device(text)
    if asked == "cpu":
        return CPU_DEVICE
    try:
        nvml = open_nvml(nvml_module)
        ids = visible_gpus(nvml, cuda_visible_devices)
    except NvmlUnavailable as exc:
        if asked == "auto":
            log.info("no GPU seen (%s): running on the CPU", exc)
            return CPU_DEVICE
        raise DeviceError(f"--device {asked}: no CUDA device can be seen: {exc}") from exc
    if asked == "auto":
        if not ids:
            return CPU_DEVICE
        if not runtime_has_cuda():
            log.warning("a GPU is visible but onnxruntime has no CUDA provider (install onnxruntime-gpu, the gpu "
                        "extra): running on the CPU; --device cuda:0 uses it anyway")  # fmt: skip
            return CPU_DEVICE
        asked = "cuda:0"
    index = int(asked.partition(":")[2])
    if index >= len(ids):
        shown = f" (CUDA_VISIBLE_DEVICES={cuda_visible_devices!r})" if cuda_visible_devices is not None else ""
        raise DeviceError(f"--device {asked}: no CUDA device {index}: {len(ids)} visible{shown}")
    try:
        handle = nvml.handle(ids[index])
        return Device("cuda", index, nvml.name(handle), nvml.uuid(handle), nvml, handle)
    except NvmlUnavailable as exc:
        raise DeviceError(f"--device {asked}: {exc}") from exc


def gpu_budget_mb(device: Device, asked_mb: int | None) -> int:
    """GPU memory the worker budgets for models: what was asked, else 90% of what is free on the device now
    (so a second worker on the same GPU budgets what the first left); 0 on a CPU."""
    if device.kind == "cpu":
        return 0
    if asked_mb is not None:
        return asked_mb
    mem = device.memory()
    if mem is None:
        raise DeviceError(f"{device.id}: its free memory cannot be read; give --gpu-memory-mb")
    return int(mem[1] * GPU_BUDGET_SHARE) // MIB


def gpu_uuids(cuda_visible_devices: str | None, nvml_module: Any | None = None) -> list[str]:
    """The UUID of every GPU this process sees, in CUDA's numbering (``servemesh up --workers gpu`` pins one
    worker to each by UUID, which no device ordering can confuse); DeviceError where there is none."""
    try:
        nvml = open_nvml(nvml_module)
        uuids = [nvml.uuid(nvml.handle(ident)) for ident in visible_gpus(nvml, cuda_visible_devices)]
    except NvmlUnavailable as exc:
        raise DeviceError(f"no CUDA device can be seen: {exc}") from exc
    if not uuids:
        shown = f" (CUDA_VISIBLE_DEVICES={cuda_visible_devices!r})" if cuda_visible_devices is not None else ""
        raise DeviceError(f"no CUDA device is visible{shown}")
    return uuids
