"""ModelSpec: what a model is and how the mesh should serve it (stored in the registry)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.subjects import PRIORITIES, Priority, check_name
from schemas.tensors import NUMERIC_DTYPES

__all__ = ["GpuBatching", "ModelSpec", "OnnxSettings", "TensorSpec", "VersionSpec"]

_DTYPES = NUMERIC_DTYPES | {"bytes", "str"}


class TensorSpec(BaseModel):
    """One input or output. ``shape`` excludes the batch axis when the model batches; -1 = any."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    dtype: str
    shape: tuple[int, ...] = ()

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in _DTYPES:
            raise ValueError(f"unknown dtype {value!r}; expected one of {sorted(_DTYPES)}")
        return value

    @field_validator("shape")
    @classmethod
    def _dims(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(d < -1 for d in value):
            raise ValueError("dimensions are sizes >= 0, or -1 for any size")
        return value


class VersionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    uri: str
    format: str = "onnx"
    sha256: str | None = None
    size: int | None = None
    memory_mb: int | None = None


class OnnxSettings(BaseModel):
    """How onnxruntime runs the model on a CUDA device (on the CPU none of this applies)."""

    model_config = ConfigDict(extra="forbid")

    # Inputs staged in page-locked host buffers and bound, outputs bound to page-locked buffers where their
    # shapes are known: one DMA each way per batch instead of pageable copies.
    io_binding: bool = True
    # Capture one CUDA graph per batch size (batches padded to a power of two): less launch overhead for
    # small kernels; every node must run on CUDA, and inputs and outputs need fixed per-row shapes.
    cuda_graphs: bool = False
    # TensorRT's provider first (CUDA for the nodes it cannot take); engines are cached beside the artifact.
    tensorrt: bool = False


class GpuBatching(BaseModel):
    """Batching on a GPU worker, in place of the model's own: GPUs want larger batches and several in flight."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int | None = Field(default=None, ge=1, le=65536)
    max_delay_ms: float | None = Field(default=None, ge=0)
    instances: int | None = Field(default=None, ge=1, le=16)  # batches in flight on one device


class ModelSpec(BaseModel):
    """A model with its versions, batching and serving limits (wire contract v1)."""

    model_config = ConfigDict(extra="forbid")

    spec_version: Literal[1] = 1
    name: str
    versions: dict[str, VersionSpec] = Field(min_length=1)
    default_version: str | None = None
    max_batch_size: int = Field(default=0, ge=0, le=65536)
    max_delay_ms: float = Field(default=2.0, ge=0)
    # Batches one replica computes at once (Triton's instance count), sharing one loaded copy of the
    # model and the runtime's threads: each batch gets fewer threads, but none waits on another's.
    instances: int = Field(default=1, ge=1, le=16)
    # The float precision a torch model computes in: its weights and float inputs are cast on load and
    # per batch, its float outputs cast back to the declared dtypes (fp16 and bf16 halve memory and
    # use tensor cores on CUDA; bf16 keeps fp32's range). ONNX models carry their own precision.
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    priorities: list[Priority] = list(PRIORITIES)
    # Requests one priority of a version may have waiting; beyond, new ones are refused at once (429).
    # Unset: bounded only by time (a request that would not be served before its timeout is refused).
    max_queue: int | None = Field(default=None, ge=1)
    max_attempts: int = Field(default=3, ge=1)
    # Redelivery after a worker goes silent (a crash, a stall, a lost cluster leader): short enough that what a
    # dead leader had delivered comes back well within a typical timeout; long batches keep it alive.
    ack_wait_s: float = Field(default=5.0, gt=0)
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    # Memory one loaded replica needs; unset: estimated from the artifact's size.
    memory_mb: int | None = Field(default=None, ge=1)
    # Labels every worker serving this model must carry (e.g. {"gpu": "true"}).
    labels: dict[str, str] = {}
    # priority → labels a worker must carry to serve it, e.g. {"high": {"tier": "fast"}}.
    placement: dict[Priority, dict[str, str]] = {}
    # Names of the classes a classifier's label output indexes, for people reading replies.
    class_names: list[str] = []
    # The tenant that owns the model (docs/security.md). A worker forwards a pipeline request only
    # to models of the same owner, and moves large payloads only through that owner's claims bucket.
    tenant: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,52}$")
    onnx: OnnxSettings = OnnxSettings()
    gpu: GpuBatching = GpuBatching()

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        check_name(self.name)
        for version in self.versions:
            check_name(self.name, version)
        if self.default_version is not None and self.default_version not in self.versions:
            raise ValueError(f"default_version {self.default_version!r} is not among the versions")
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} exceeds max_replicas {self.max_replicas}")
        onnx = sorted(v for v, vspec in self.versions.items() if vspec.format == "onnx")
        if self.precision != "fp32" and onnx:
            raise ValueError(f"precision {self.precision} applies to torch models; ONNX version(s) {', '.join(onnx)} "
                             "carry their own (convert the model to float16 instead)")  # fmt: skip
        gpu_batch = self.gpu.max_batch_size
        if gpu_batch is not None and (self.max_batch_size == 0 or gpu_batch < self.max_batch_size):
            # Clients bundle up to max_batch_size requests; a GPU replica must take whatever they send.
            raise ValueError(f"gpu.max_batch_size {self.gpu.max_batch_size} is below max_batch_size "
                             f"{self.max_batch_size} (or the model is not batched)")  # fmt: skip
        unknown = set(self.placement) - set(self.priorities)
        if unknown:
            raise ValueError(f"placement names priorities the model does not serve: {sorted(unknown)}")
        return self

    def on_device(self, kind: str) -> ModelSpec:
        """The spec a replica on a device of ``kind`` ("cpu", "cuda") serves with: on a GPU, ``gpu``'s batching."""
        if kind == "cpu":
            return self
        update = {k: v for k, v in self.gpu.model_dump().items() if v is not None}
        return self.model_copy(update=update) if update else self

    def memory_of(self, version: str) -> int:
        """Memory (MiB) one replica of ``version`` is planned with."""
        vspec = self.versions[version]
        if vspec.memory_mb is not None:
            return vspec.memory_mb
        if self.memory_mb is not None:
            return self.memory_mb
        # A loaded runtime typically takes about twice its artifact, plus a fixed overhead.
        return 16 + 2 * (vspec.size or 0) // (1024 * 1024)

    def resolve_version(self, version: str | None) -> str:
        """The version a request goes to: the one asked for, else the default, else the newest."""
        if version is not None:
            return version
        if self.default_version is not None:
            return self.default_version
        return max(self.versions, key=_version_key)


def _version_key(version: str) -> tuple[int, int | str]:
    return (1, int(version)) if version.isdigit() else (0, version)
