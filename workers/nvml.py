"""NVIDIA's management library (nvidia-ml-py, in the ``gpu`` extra) behind a small typed wrapper: device count,
names, UUIDs, memory, and what one process holds. Not installed or no driver: :func:`open_nvml` says why."""

from __future__ import annotations

from typing import Any

__all__ = ["Nvml", "NvmlUnavailable", "open_nvml"]


class NvmlUnavailable(Exception):
    """NVML cannot be used here; the message says why (not installed, no driver, ...)."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Nvml:
    """An initialised NVML (``module`` is ``pynvml``, or a stand-in in tests). Handles are NVML's own."""

    def __init__(self, module: Any) -> None:
        self._m = module

    def count(self) -> int:
        return int(self._m.nvmlDeviceGetCount())

    def handle(self, ident: str) -> Any:
        """The device NVML lists at index ``ident``, or whose UUID starts with it (as CUDA_VISIBLE_DEVICES allows)."""
        try:
            if ident.isdigit():
                return self._m.nvmlDeviceGetHandleByIndex(int(ident))
            for i in range(self.count()):
                handle = self._m.nvmlDeviceGetHandleByIndex(i)
                if self.uuid(handle).startswith(ident):
                    return handle
            return self._m.nvmlDeviceGetHandleByUUID(ident)  # a MIG instance, say
        except Exception as exc:  # pynvml.NVMLError and its many subclasses
            raise NvmlUnavailable(f"no device {ident!r}: {exc}") from exc

    def name(self, handle: Any) -> str:
        return _text(self._m.nvmlDeviceGetName(handle))

    def uuid(self, handle: Any) -> str:
        return _text(self._m.nvmlDeviceGetUUID(handle))

    def memory(self, handle: Any) -> tuple[int, int]:
        """(total, free) bytes of the device."""
        info = self._m.nvmlDeviceGetMemoryInfo(handle)
        return int(info.total), int(info.free)

    def utilisation(self, handle: Any) -> int | None:
        """Percent of the last sample period in which a kernel ran on the device."""
        try:
            return int(self._m.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:
            return None

    def used_by(self, handle: Any, pid: int) -> int | None:
        """Bytes process ``pid`` holds on the device; None when NVML does not list it (no context yet, or a
        container whose process ids NVML does not see) or cannot tell."""
        try:
            processes = self._m.nvmlDeviceGetComputeRunningProcesses(handle)
        except Exception:
            return None
        for process in processes:
            if int(process.pid) == pid and process.usedGpuMemory is not None:
                return int(process.usedGpuMemory)
        return None


def open_nvml(module: Any | None = None) -> Nvml:
    """NVML, initialised (it may be initialised more than once); NvmlUnavailable when it cannot be."""
    if module is None:
        try:
            import pynvml  # nvidia-ml-py
        except ImportError:
            raise NvmlUnavailable("nvidia-ml-py is not installed (pip install 'servemesh[gpu]')") from None
        module = pynvml
    try:
        module.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
        raise NvmlUnavailable(f"NVML cannot start ({exc or type(exc).__name__}): no NVIDIA driver?") from exc
    return Nvml(module)
