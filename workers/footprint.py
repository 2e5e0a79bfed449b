"""What a loaded model version takes: the worker's host resident set and GPU memory, sampled before it loads
and after it warmed up; the deltas are reported in the heartbeat and the router plans with them."""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import dataclass

from workers.device import Device

__all__ = ["Measured", "MemoryMeter", "Sample", "rss_bytes"]

MIB = 1024 * 1024
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """This process's resident set now (Linux: /proc/self/statm); elsewhere its peak, the best the OS offers."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


@dataclass(frozen=True, slots=True)
class Sample:
    host: int  # bytes resident
    gpu_process: int | None = None  # bytes this process holds on the device, where NVML lists it
    gpu_device: int | None = None  # bytes in use on the whole device


@dataclass(frozen=True, slots=True)
class Measured:
    """One version's footprint on this worker, in MiB, and when it was measured (wall clock)."""

    host_mb: int
    gpu_mb: int
    at: float

    def as_json(self) -> dict[str, float]:
        return {"host_mb": self.host_mb, "gpu_mb": self.gpu_mb, "at": round(self.at, 3)}


def _mb(delta: int) -> int:
    return max(0, -(-delta // MIB))  # rounded up; a load that freed memory (a collection ran) counts as none


class MemoryMeter:
    """Samples host RSS and the device's memory. Loads are measured one at a time, but models already loaded
    keep serving meanwhile, so a figure may include what their batches held at that moment: it is a planning
    figure, measured again at every load."""

    def __init__(self, device: Device, pid: int | None = None) -> None:
        self.device = device
        self.pid = os.getpid() if pid is None else pid

    def sample(self) -> Sample:
        if self.device.kind == "cpu":
            return Sample(rss_bytes())
        mem = self.device.memory()
        return Sample(rss_bytes(), self.device.used_by(self.pid), mem[0] - mem[1] if mem else None)

    def measure(self, before: Sample, after: Sample) -> Measured:
        """The footprint between two samples. GPU: this process's own use where NVML lists it (other processes
        on the device do not count), else the change in the device's use."""
        gpu = 0
        if after.gpu_process is not None:
            gpu = after.gpu_process - (before.gpu_process or 0)
        elif after.gpu_device is not None and before.gpu_device is not None:
            gpu = after.gpu_device - before.gpu_device
        return Measured(_mb(after.host - before.host), _mb(gpu), time.time())
