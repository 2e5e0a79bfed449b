"""servemesh: a model-serving mesh on NATS JetStream. The public API::

    from servemesh import MeshClient

    async with await MeshClient.connect("nats://127.0.0.1:4222") as client:
        outputs = await client.infer("iris", {"input": rows})

Every error is a :class:`MeshError`; its subclasses say what went wrong and carry an HTTP-like
``status`` (400 BadInput, 403 Forbidden, 404 UnknownModel, 429 Overloaded, 500 ModelFailure,
503 NoCapacity / MeshUnavailable, 504 DeadlineExceeded).

This package is the product's face: the client, the command line and the local launcher. It is
the only one that imports both workers/ and router/.
"""

from broker.settings import Settings
from schemas.envelope import Reply, Timing
from schemas.errors import (
    BadInput,
    DeadlineExceeded,
    Forbidden,
    MeshError,
    MeshUnavailable,
    ModelFailure,
    NoCapacity,
    Overloaded,
    UnknownModel,
)
from servemesh.client import MeshClient
from servemesh.jobs import Job, JobResult, JobStatus
from servemesh.results import Result, Results
from servemesh.sync_client import SyncMeshClient

__all__ = [
    "BadInput", "DeadlineExceeded", "Forbidden", "Job", "JobResult", "JobStatus", "MeshClient", "MeshError",
    "MeshUnavailable", "ModelFailure", "NoCapacity", "Overloaded", "Reply", "Result", "Results", "Settings",
    "SyncMeshClient", "Timing", "UnknownModel",
]  # fmt: skip
