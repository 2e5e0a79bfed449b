"""onnxruntime's I/O binding for models on a GPU: inputs staged in page-locked host buffers, outputs bound to
page-locked buffers where their shapes follow the batch; and CUDA graphs, one per padded batch size, on
device buffers at fixed addresses. On a CPU session the same code runs with ordinary buffers (as tests do)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import onnxruntime as ort

from schemas.errors import ModelFailure
from workers.runtimes.base import Tensors

__all__ = ["Allocator", "BoundRunner", "GraphRunner", "Staging", "batch_buckets", "follows_batch"]

Array = np.ndarray[Any, Any]
Allocator = Callable[[int], Array]  # bytes → a uint8 array of at least that many (pinned, on a GPU)


def _plain(nbytes: int) -> Array:
    return np.empty(nbytes, np.uint8)


class Staging:
    """Reusable host buffers, one per name and thread (instances of a model run batches in parallel), grown by
    doubling; a buffer is valid until the same thread stages that name again."""

    def __init__(self, allocate: Allocator = _plain) -> None:
        self._allocate = allocate
        self._local = threading.local()

    def empty(self, name: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Array:
        buffers: dict[str, Array] = self._local.__dict__.setdefault("buffers", {})
        nbytes = int(np.prod(shape)) * dtype.itemsize
        buf = buffers.get(name)
        if buf is None or buf.nbytes < nbytes:
            buf = buffers[name] = self._allocate(max(nbytes, 2 * (buf.nbytes if buf is not None else 0), 64))
        return buf[:nbytes].view(dtype).reshape(shape)

    def put(self, name: str, array: Array) -> Array:
        staged = self.empty(name, array.shape, array.dtype)
        np.copyto(staged, array)
        return staged


def follows_batch(session: ort.InferenceSession) -> dict[str, bool]:
    """Output name → whether its shape is the batch (the first input's first, symbolic, dimension) followed by
    fixed sizes, so that a buffer can be bound for it before the run."""
    first = session.get_inputs()[0].shape
    batch = first[0] if first and isinstance(first[0], str) else None
    return {
        out.name: batch is not None and bool(out.shape) and out.shape[0] == batch
        and all(isinstance(d, int) and d >= 0 for d in out.shape[1:])
        for out in session.get_outputs()
    }


def _numeric(session: ort.InferenceSession) -> bool:
    args = [*session.get_inputs(), *session.get_outputs()]
    return all(a.type != "tensor(string)" for a in args)


class BoundRunner:
    """Runs a batch through an IOBinding: inputs from staged host buffers (one copy in, a DMA to the device),
    outputs into staged host buffers where their shapes are known, else left to the device and copied back."""

    def __init__(self, session: ort.InferenceSession, device: str, device_id: int, staging: Staging) -> None:
        if not _numeric(session):
            raise ModelFailure("I/O binding needs numeric tensors (this model has strings): set onnx.io_binding false")
        self._session, self._device, self._device_id, self._staging = session, device, device_id, staging
        self._outputs = [o.name for o in session.get_outputs()]
        self._types = {o.name: o.type for o in session.get_outputs()}
        self._known = follows_batch(session)
        self._shapes = {o.name: tuple(o.shape[1:]) for o in session.get_outputs()}
        self._first = session.get_inputs()[0].name

    def run(self, inputs: Tensors) -> Tensors:
        binding = self._session.io_binding()
        for name, array in inputs.items():
            staged = self._staging.put(f"in:{name}", np.ascontiguousarray(array))
            binding.bind_input(name, "cpu", 0, staged.dtype, staged.shape, staged.ctypes.data)
        rows = inputs[self._first].shape[0] if inputs[self._first].ndim else 1
        for name in self._outputs:
            if self._known[name]:
                dtype = np.dtype(_DTYPES[self._types[name]])
                out = self._staging.empty(f"out:{name}", (rows, *self._shapes[name]), dtype)
                binding.bind_output(name, "cpu", 0, dtype, out.shape, out.ctypes.data)
            else:
                binding.bind_output(name, self._device, self._device_id)
        self._session.run_with_iobinding(binding)
        # Copies: the staged buffers are reused by the next batch while these replies are still being encoded.
        return dict(zip(self._outputs, binding.copy_outputs_to_cpu(), strict=True))


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes a graph is captured for: powers of two up to the model's largest batch, and that batch."""
    sizes, n = [], 1
    while n < max_batch:
        sizes.append(n)
        n *= 2
    return [*sizes, max(1, max_batch)]


class GraphRunner:
    """CUDA graphs: per batch bucket, device buffers bound once at fixed addresses (a graph replays the same
    addresses), a batch padded with zeros to its bucket, copied in, replayed, copied out and cut back."""

    def __init__(self, session: ort.InferenceSession, device: str, device_id: int, max_batch: int,
                 staging: Staging) -> None:  # fmt: skip
        known = follows_batch(session)
        inputs = session.get_inputs()
        if not _numeric(session) or not all(known.values()) or not all(
                all(isinstance(d, int) for d in i.shape[1:]) for i in inputs):  # fmt: skip
            raise ModelFailure("onnx.cuda_graphs needs a batched model whose inputs and outputs have fixed sizes "
                               "after the batch axis (and no strings)")  # fmt: skip
        self._session, self._device, self._device_id, self._staging = session, device, device_id, staging
        self._in = {i.name: (tuple(i.shape[1:]), np.dtype(_DTYPES[i.type])) for i in inputs}
        self._out = {o.name: (tuple(o.shape[1:]), np.dtype(_DTYPES[o.type])) for o in session.get_outputs()}
        self._buckets = batch_buckets(max_batch)
        self._graphs: dict[int, tuple[Any, dict[str, ort.OrtValue], dict[str, ort.OrtValue], ort.RunOptions]] = {}
        self._lock = threading.Lock()  # one graph's buffers serve one batch at a time

    def _graph(self, bucket: int) -> tuple[Any, dict[str, ort.OrtValue], dict[str, ort.OrtValue], ort.RunOptions]:
        graph = self._graphs.get(bucket)
        if graph is None:
            binding = self._session.io_binding()
            ins, outs = {}, {}
            for name, (shape, dtype) in self._in.items():
                ins[name] = ort.OrtValue.ortvalue_from_shape_and_type((bucket, *shape), dtype, self._device,
                                                                      self._device_id)  # fmt: skip
                binding.bind_ortvalue_input(name, ins[name])
            for name, (shape, dtype) in self._out.items():
                outs[name] = ort.OrtValue.ortvalue_from_shape_and_type((bucket, *shape), dtype, self._device,
                                                                       self._device_id)  # fmt: skip
                binding.bind_ortvalue_output(name, outs[name])
            options = ort.RunOptions()
            if self._device == "cuda":
                options.add_run_config_entry("gpu_graph_id", str(self._buckets.index(bucket) + 1))
            graph = self._graphs[bucket] = (binding, ins, outs, options)
        return graph

    def run(self, inputs: Tensors) -> Tensors:
        rows = next(iter(inputs.values())).shape[0]
        bucket = next((b for b in self._buckets if b >= rows), None)
        if bucket is None:
            raise ModelFailure(f"a batch of {rows} exceeds the largest captured batch {self._buckets[-1]}")
        with self._lock:
            binding, ins, outs, options = self._graph(bucket)
            for name, array in inputs.items():
                shape, dtype = self._in[name]
                padded = self._staging.empty(f"in:{name}", (bucket, *shape), dtype)
                padded[:rows] = array
                padded[rows:] = 0
                ins[name].update_inplace(padded)
            self._session.run_with_iobinding(binding, options)
            return {name: value.numpy()[:rows].copy() for name, value in outs.items()}


_DTYPES = {
    "tensor(bool)": "bool", "tensor(int8)": "int8", "tensor(int16)": "int16", "tensor(int32)": "int32",
    "tensor(int64)": "int64", "tensor(uint8)": "uint8", "tensor(uint16)": "uint16", "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64", "tensor(float16)": "float16", "tensor(float)": "float32",
    "tensor(double)": "float64",
}  # fmt: skip
