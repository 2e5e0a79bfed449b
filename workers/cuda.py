"""The CUDA driver (libcuda, present wherever an NVIDIA driver is) through ctypes, for the two things a worker
needs without torch: the device's primary context made before the first model loads (so its few hundred MiB
are not measured as that model's), and page-locked host buffers for onnxruntime's I/O binding."""

from __future__ import annotations

import ctypes
import logging
import threading
import weakref
from typing import Any

import numpy as np

__all__ = ["CudaDriver", "CudaUnavailable", "driver"]

log = logging.getLogger(__name__)

_PORTABLE = 0x01  # CU_MEMHOSTALLOC_PORTABLE: pinned for every context, not only the current one


class CudaUnavailable(Exception):
    """No usable CUDA driver here."""


class CudaDriver:
    def __init__(self, library: str = "libcuda.so.1") -> None:
        try:
            self._lib = ctypes.CDLL(library)
        except OSError as exc:
            raise CudaUnavailable(f"no CUDA driver ({library}): {exc}") from exc
        self._check(self._lib.cuInit(0), "cuInit")
        self._contexts: dict[int, ctypes.c_void_p] = {}
        self._lock = threading.Lock()

    def _check(self, status: int, call: str) -> None:
        if status != 0:
            raise CudaUnavailable(f"{call} failed with CUDA error {status}")

    def primary_context(self, index: int) -> ctypes.c_void_p:
        """Device ``index``'s primary context (the one onnxruntime and torch use), made current in this thread."""
        with self._lock:
            ctx = self._contexts.get(index)
            if ctx is None:
                device = ctypes.c_int()
                self._check(self._lib.cuDeviceGet(ctypes.byref(device), index), "cuDeviceGet")
                ctx = ctypes.c_void_p()
                self._check(self._lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), device), "cuDevicePrimaryCtxRetain")
                self._contexts[index] = ctx
        self._check(self._lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        return ctx

    def pinned(self, index: int, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
        """A page-locked host array (freed when the array is collected)."""
        self.primary_context(index)
        nbytes = max(1, int(np.prod(shape)) * dtype.itemsize)
        ptr = ctypes.c_void_p()
        self._check(self._lib.cuMemHostAlloc(ctypes.byref(ptr), ctypes.c_size_t(nbytes), _PORTABLE), "cuMemHostAlloc")
        assert ptr.value is not None
        raw = (ctypes.c_byte * nbytes).from_address(ptr.value)
        # Every view of the array keeps ``raw`` alive; when the last goes, the pinned memory is freed.
        weakref.finalize(raw, self._lib.cuMemFreeHost, ctypes.c_void_p(ptr.value))
        array: np.ndarray[Any, Any] = np.frombuffer(memoryview(raw).cast("B"), dtype=np.uint8)
        return array.view(dtype).reshape(shape)


_driver: CudaDriver | None = None
_driver_lock = threading.Lock()


def driver() -> CudaDriver:
    """The process's CUDA driver, loaded once; CudaUnavailable where there is none."""
    global _driver
    with _driver_lock:
        if _driver is None:
            _driver = CudaDriver()
        return _driver
