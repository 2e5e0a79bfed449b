"""A request's headers as a worker receives them, read and checked in one place.

Whatever a client (or anyone allowed to publish) put in the headers arrives here first. A value
that cannot be used is refused with a typed error naming the header, never half-used: a worker
answers such a request with that error and settles it, and nothing else is affected. Where the
answer goes (the reply subject) is read apart and never raises, so that even a request whose
other headers are refused is told why.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from schemas.errors import BadInput, Forbidden
from schemas.subjects import (
    HDR_CLAIM_BUCKET,
    HDR_DEADLINE,
    HDR_DELIVERED,
    HDR_JOB,
    HDR_JOB_ITEM,
    HDR_MSG_ID,
    HDR_REPLY,
    HDR_REPLY_INBOX,
    HDR_ROUTE,
    SubjectKind,
    is_claims_bucket,
    is_reply_subject,
    is_route_subject,
)

__all__ = ["MAX_STAGES", "RequestHeaders", "read_headers", "reply_of"]

# Pipeline stages a request may still have ahead of it.
MAX_STAGES = 16

# Request ids: a client's NUID and counter, a job's "<job>:<index>", a pipeline stage's
# "<request id>~<stage subject>"; never a character that could end a header or a subject token.
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9_:~+.\-]{1,256}")
_JOB_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
# Subjects a reply may never go to: the mesh's own (requests, job results, shadow reports) and the
# server's ($JS, $KV, $O, $SYS), where a reply would act with the worker's rights, not the caller's.
_RESERVED_RE = re.compile(r"(?:\$|mesh\.)")
# A client's inbox takes acknowledgements of its publishes on "<inbox>.a.<id>" and "<inbox>.t.<id>":
# a reply there would forge one (a request "queued" that was not).
_ACK_RE = re.compile(r"(?:^|.*\.)[at]\.[^.]+")


@dataclass(slots=True, frozen=True)
class RequestHeaders:
    request_id: str | None = None
    reply_to: str | None = None
    reply_inbox: str | None = None
    deadline_ms: int | None = None  # absolute, ms since the epoch
    route: tuple[str, ...] = ()  # the pipeline stages still ahead, as subjects
    job: str | None = None
    job_item: str | None = None
    claim_bucket: str | None = None  # where a large reply goes (the requester's bucket)
    delivered_before: int = 0  # deliveries it had inside a bundle, for a request queued again


_INBOXES: dict[str, bool] = {}  # reply inboxes seen, and whether replies may go under them


def _replyable(subject: str) -> bool:
    return is_reply_subject(subject) and _RESERVED_RE.match(subject) is None and _ACK_RE.fullmatch(subject) is None


def _inbox(raw: str | None) -> str | None:
    """A client's reply inbox, checked once per inbox (its requests all carry the same)."""
    if not raw:
        return None
    ok = _INBOXES.get(raw)
    if ok is None:
        if len(_INBOXES) >= 4096:
            _INBOXES.clear()
        ok = _INBOXES[raw] = _replyable(raw)
    return raw if ok else None


def reply_of(headers: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(reply subject, reply inbox): where answers to this request may go; None where nowhere.

    A subject nobody could publish to, one reserved to the mesh or the server, or one of a
    client's acknowledgement subjects is as good as none. Under the client's (checked) inbox only
    the rest of the subject is checked."""
    inbox = _inbox(headers.get(HDR_REPLY_INBOX))
    raw = headers.get(HDR_REPLY)
    if not raw:
        return None, inbox
    if inbox is not None and len(raw) > len(inbox) + 1 and raw[len(inbox)] == "." and raw.startswith(inbox):
        rest = raw[len(inbox) + 1 :]
        ok = len(raw) <= 1024 and is_reply_subject(rest) and _ACK_RE.fullmatch(rest) is None
        return (raw if ok else None), inbox
    return (raw if _replyable(raw) else None), inbox


def read_headers(headers: Mapping[str, str], kind: SubjectKind) -> RequestHeaders:
    """Every header the mesh reads, checked; BadInput (or Forbidden, for a header only the mesh's own
    processes may send on this ``kind`` of subject) naming the first that cannot be used."""
    reply_to, reply_inbox = reply_of(headers)
    request_id = headers.get(HDR_MSG_ID)
    if request_id is not None:
        if not _REQUEST_ID_RE.fullmatch(request_id):
            raise BadInput(f"header {HDR_MSG_ID}: not a request id (letters, digits and _:~+.-, at most 256)")
        request_id = request_id.partition("~")[0]  # a pipeline stage's id starts with its request's
    deadline_ms = None
    raw = headers.get(HDR_DEADLINE)
    if raw is not None:
        # ASCII digits only ("²".isdigit(), yet int() refuses it), and few enough to be a time.
        if not (0 < len(raw) <= 15 and raw.isascii() and raw.isdigit()):
            raise BadInput(f"header {HDR_DEADLINE}: milliseconds since the epoch, as digits")
        deadline_ms = int(raw)
    route: tuple[str, ...] = ()
    raw = headers.get(HDR_ROUTE)
    if raw is not None:
        route = tuple(raw.split(","))
        if len(route) > MAX_STAGES or not all(map(is_route_subject, route)):
            raise BadInput(
                f"header {HDR_ROUTE}: at most {MAX_STAGES} stages, each mesh.infer.<model>.<version>.<priority>"
            )
    job = headers.get(HDR_JOB)
    job_item = headers.get(HDR_JOB_ITEM)
    if job is not None or job_item is not None:
        if kind == "request":
            raise Forbidden(f"header {HDR_JOB}: job items come on a model's job subject, not its request subject")
        if job is None or not _JOB_RE.fullmatch(job):
            raise BadInput(f"header {HDR_JOB}: a job id (letters, digits, '_' and '-')")
        if job_item is None or not (0 < len(job_item) <= 12 and job_item.isascii() and job_item.isdigit()):
            raise BadInput(f"header {HDR_JOB_ITEM}: the item's index, as digits")
    claim_bucket = headers.get(HDR_CLAIM_BUCKET)
    if claim_bucket is not None and not is_claims_bucket(claim_bucket):
        raise BadInput(f"header {HDR_CLAIM_BUCKET}: mesh-claims or mesh-claims-<owner>")
    delivered_before = 0
    raw = headers.get(HDR_DELIVERED)
    if raw is not None:
        if kind != "again":
            raise Forbidden(f"header {HDR_DELIVERED}: only a request a worker queued again carries it")
        if not (0 < len(raw) <= 6 and raw.isascii() and raw.isdigit()):
            raise BadInput(f"header {HDR_DELIVERED}: a count, as digits")
        delivered_before = int(raw)
    return RequestHeaders(
        request_id, reply_to, reply_inbox, deadline_ms, route, job, job_item, claim_bucket, delivered_before
    )
