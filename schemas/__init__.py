"""Wire contracts of servemesh: tensor codec, envelopes, ModelSpec, names and errors. No I/O."""

from schemas.envelope import Reply, Timing, decode_reply, decode_request, encode_error, encode_outputs, encode_request
from schemas.errors import (
    BadInput,
    DeadlineExceeded,
    MeshError,
    MeshUnavailable,
    ModelFailure,
    NoCapacity,
    Overloaded,
    UnknownModel,
)
from schemas.spec import ModelSpec, TensorSpec, VersionSpec
from schemas.tensors import decode_tensor, encode_tensor

__all__ = [
    "BadInput", "DeadlineExceeded", "MeshError", "MeshUnavailable", "ModelFailure", "ModelSpec",
    "NoCapacity", "Overloaded", "Reply", "TensorSpec", "Timing", "UnknownModel", "VersionSpec",
    "decode_reply", "decode_request", "decode_tensor", "encode_error", "encode_outputs",
    "encode_request", "encode_tensor",
]  # fmt: skip
