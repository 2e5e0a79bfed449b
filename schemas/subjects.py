"""Every NATS name servemesh uses: subjects, headers, stream, consumer and bucket names."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Final, Literal

__all__ = [
    "BUCKET_ASSIGNMENTS",
    "BUCKET_ATTEMPTS",
    "BUCKET_CLAIMS",
    "BUCKET_JOBS",
    "BUCKET_LEADER",
    "BUCKET_MODELS",
    "BUCKET_PIPELINES",
    "BUCKET_ROUTES",
    "BUCKET_STATUS",
    "BUCKET_WORKERS",
    "CANCEL_PREFIX",
    "HDR_BUNDLE",
    "HDR_CLAIM_BUCKET",
    "HDR_DEADLINE",
    "HDR_DELIVERED",
    "HDR_JOB",
    "HDR_JOB_ITEM",
    "HDR_MSG_ID",
    "HDR_REPLY",
    "HDR_REPLY_INBOX",
    "HDR_REQUEST_ID",
    "HDR_ROUTE",
    "HDR_TRACEPARENT",
    "HDR_TRACESTATE",
    "INFER_PREFIX",
    "JOBS_PREFIX",
    "MAX_BUNDLE",
    "PRIORITIES",
    "SHADOW_PREFIX",
    "STORAGE_SUBJECT",
    "STREAM_INFER",
    "STREAM_JOBS",
    "Priority",
    "ReplyKind",
    "SubjectKind",
    "bundle_limit",
    "bundle_subject",
    "check_name",
    "claims_bucket_of",
    "consumer_name",
    "inbox_subject",
    "infer_subject",
    "is_claims_bucket",
    "is_reply_subject",
    "is_route_subject",
    "job_result_subject",
    "job_subject",
    "parse_infer_subject",
    "probe_subject",
    "requeue_subject",
    "shadow_subject",
    "subject_kind",
]  # fmt: skip

Priority = Literal["high", "normal", "low"]
# What a stream message on an inference subject is, by the subject's last token: a request as a
# client sends it; a request a worker queued again out of a redelivered bundle ("again"); or a
# batch job's item ("job"). Only the mesh's own processes may publish the last two (a tenant's
# grant is ``mesh.infer.<model>.*.*``), which is what lets a worker trust the headers that only
# they carry (docs/security.md).
SubjectKind = Literal["request", "again", "job"]
PRIORITIES: Final[tuple[Priority, ...]] = ("high", "normal", "low")

STREAM_INFER: Final = "MESH_INFER"
INFER_PREFIX: Final = "mesh.infer"
BUCKET_MODELS: Final = "mesh-models"
BUCKET_WORKERS: Final = "mesh-workers"
BUCKET_ASSIGNMENTS: Final = "mesh-assignments"
BUCKET_LEADER: Final = "mesh-leader"
BUCKET_STATUS: Final = "mesh-status"
BUCKET_PIPELINES: Final = "mesh-pipelines"
BUCKET_JOBS: Final = "mesh-jobs"
BUCKET_ROUTES: Final = "mesh-routes"
# How often each redelivered request was computed alone: crashes are charged to the request that
# caused them, not to those that were merely held by the same worker.
BUCKET_ATTEMPTS: Final = "mesh-attempts"
# Object store: payloads too large for one message (claim check); a TTL removes what nobody deleted.
BUCKET_CLAIMS: Final = "mesh-claims"
STREAM_JOBS: Final = "MESH_JOBS"
JOBS_PREFIX: Final = "mesh.jobs"
# Clients report how a mirrored request compared with its primary; routers tally the reports.
SHADOW_PREFIX: Final = "mesh.shadow"
# Routers say which of the mesh's streams stopped storing writes (core NATS: it must get through
# when JetStream does not), and answer requests for it.
STORAGE_SUBJECT: Final = "mesh.storage"
# A client cancels requests it gave up on (caller cancelled, HTTP client gone) on
# ``mesh.cancel.<model>``, the model it sent them to; the payload is their ids, one per line.
CANCEL_PREFIX: Final = "mesh.cancel"

HDR_MSG_ID: Final = "Nats-Msg-Id"
HDR_REPLY: Final = "Mesh-Reply"
# Optional: the client's inbox, where a worker may send several replies as one bundle.
HDR_REPLY_INBOX: Final = "Mesh-Reply-Inbox"
HDR_DEADLINE: Final = "Mesh-Deadline"
# Where a large reply goes by claim check: the requester's own claims bucket, when it has one.
HDR_CLAIM_BUCKET: Final = "Mesh-Claim-Bucket"
# The pipeline stages still ahead of a request: their subjects, comma-separated.
HDR_ROUTE: Final = "Mesh-Route"
# On a reply sent alone: the request it answers (fire-and-forget consumers correlate by it).
HDR_REQUEST_ID: Final = "Mesh-Request-Id"
# A batch job's items carry the job and their index; results are stored under the job.
HDR_JOB: Final = "Mesh-Job"
HDR_JOB_ITEM: Final = "Mesh-Job-Item"
# On a stream message carrying several requests (a client's coalesced publishes): how many.
HDR_BUNDLE: Final = "Mesh-Bundle"
# On a request a worker queued again out of a redelivered bundle: the deliveries it already had.
HDR_DELIVERED: Final = "Mesh-Delivered"
HDR_TRACEPARENT: Final = "traceparent"
HDR_TRACESTATE: Final = "tracestate"

_OWNER_RE = re.compile(r"^[A-Za-z0-9_-]{1,52}$")
# Versions carry no underscore, so a consumer name splits back into its parts unambiguously.
_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")


def check_name(model: str, version: str | None = None) -> None:
    """Raise ValueError unless the model (and version) are valid subject tokens."""
    if not _MODEL_RE.fullmatch(model):
        raise ValueError(f"invalid model name {model!r}: use letters, digits, '_' and '-'")
    if version is not None and not _VERSION_RE.fullmatch(version):
        raise ValueError(f"invalid version {version!r}: use letters, digits and '-'")


# A subject one can publish to: non-empty tokens, no wildcards, no whitespace or control characters.
_PUBLISH_RE = re.compile(r"[^\s*>.\x00-\x1f\x7f]+(\.[^\s*>.\x00-\x1f\x7f]+)*")


def claims_bucket_of(tenant: str | None) -> str:
    """The claims bucket of a model's owner: its own, or the shared one for models without a tenant."""
    return f"{BUCKET_CLAIMS}-{tenant}" if tenant else BUCKET_CLAIMS


# Requests per stream message at most: a client's bundle is never larger than a batch of its
# model (or this, for a model that does not batch), and a bundle is redelivered whole.
MAX_BUNDLE: Final = 64


def bundle_limit(max_batch_size: int) -> int:
    """The most requests one stream message may carry for a model with this ``max_batch_size``."""
    return max(1, min(MAX_BUNDLE, max_batch_size or MAX_BUNDLE))


def is_claims_bucket(name: str) -> bool:
    """``mesh-claims`` or a bucket of one's own, ``mesh-claims-<owner>`` (e.g. per tenant)."""
    owner = name.removeprefix(BUCKET_CLAIMS + "-")
    return name == BUCKET_CLAIMS or (owner != name and _OWNER_RE.fullmatch(owner) is not None)


def is_reply_subject(subject: str) -> bool:
    """Whether a subject taken from a request's headers can be published to (NATS refuses others)."""
    return len(subject) <= 1024 and _PUBLISH_RE.fullmatch(subject) is not None  # match's $ allows a final \n


class ReplyKind(StrEnum):
    """What arrives on a client's inbox, by the token after the inbox: ``<inbox>.<kind>.<id>``."""

    ACK = "a"  # the stream's acknowledgement of a request (or of a bundle: id ``<first id>+``)
    REPLY = "r"  # a worker's reply to one request
    BUNDLE = "m"  # a worker's replies to several of this client's requests, in one message
    SHADOW_REPLY = "s"  # the candidate version's reply to a mirrored request
    SHADOW_ACK = "t"  # the stream's acknowledgement of a mirrored request


def inbox_subject(inbox: str, kind: ReplyKind, request_id: str) -> str:
    return f"{inbox}.{kind.value}.{request_id}"


def bundle_subject(inbox: str) -> str:
    """Where a worker sends a bundle of replies for one client (see HDR_REPLY_INBOX)."""
    return inbox_subject(inbox, ReplyKind.BUNDLE, "bundle")


def job_result_subject(job: str, ok: bool) -> str:
    """Where a job item's result is stored: successes and failures apart, so both are counted cheaply."""
    return f"{JOBS_PREFIX}.{job}.{'ok' if ok else 'err'}"


_REQUEUE = ".again"
_JOB = ".job"


def infer_subject(model: str, version: str, priority: str) -> str:
    return f"{INFER_PREFIX}.{model}.{version}.{priority}"


def _base(subject: str) -> str:
    return subject.removesuffix(_REQUEUE).removesuffix(_JOB)


def requeue_subject(subject: str) -> str:
    """Where a worker queues again the requests of a redelivered bundle taken from ``subject``: the
    same queue (its consumer reads both), on a subject a worker may publish to without being able
    to send requests anywhere else (docs/security.md)."""
    return _base(subject) + _REQUEUE


def job_subject(subject: str) -> str:
    """Where a batch job's items for the queue ``subject`` are published (read by the same consumer)."""
    return _base(subject) + _JOB


def subject_kind(subject: str) -> SubjectKind:
    if subject.endswith(_REQUEUE):
        return "again"
    return "job" if subject.endswith(_JOB) else "request"


def parse_infer_subject(subject: str) -> tuple[str, str, str]:
    """``mesh.infer.<model>.<version>.<priority>`` (or its requeue or job subject) → (model, version, priority)."""
    parts = _base(subject).split(".")
    if len(parts) != 5 or ".".join(parts[:2]) != INFER_PREFIX:
        raise ValueError(f"not an inference subject: {subject!r}")
    return parts[2], parts[3], parts[4]


_ROUTE_RE = re.compile(
    r"mesh\.infer\.[A-Za-z0-9][A-Za-z0-9_-]{0,127}\.[A-Za-z0-9][A-Za-z0-9-]{0,63}\.(?:high|normal|low)"
)


def is_route_subject(subject: str) -> bool:
    """Whether ``subject`` may be a pipeline stage: a request queue, ``mesh.infer.<model>.<version>.<priority>``."""
    return _ROUTE_RE.fullmatch(subject) is not None


def probe_subject(stream: str) -> str:
    """A subject of ``stream`` that no consumer reads and no reader lists (an empty KV value), where a
    router writes and at once purges a probe: whether the stream still stores what it is sent."""
    if stream.startswith("KV_"):
        return f"$KV.{stream[3:]}._probe"
    if stream.startswith("OBJ_"):
        return f"$O.{stream[4:]}.C._probe"
    if stream in (STREAM_INFER, STREAM_JOBS):
        return f"{INFER_PREFIX if stream == STREAM_INFER else JOBS_PREFIX}._probe"
    raise ValueError(f"not a stream of the mesh: {stream!r}")


def shadow_subject(model: str) -> str:
    """Where clients report shadow comparisons for ``model`` (core NATS, not stored)."""
    return f"{SHADOW_PREFIX}.{model}"


def consumer_name(model: str, version: str, priority: str) -> str:
    """The durable pull consumer shared by every replica serving this subject."""
    return f"infer_{model}_{version}_{priority}"
