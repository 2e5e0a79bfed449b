"""Queue lag of every inference subject: one stream-info call for the counts, and one message
lookup per non-empty subject for the age of its oldest request."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from schemas.subjects import INFER_PREFIX, STREAM_INFER, parse_infer_subject

__all__ = ["SubjectLag", "read_lag"]


@dataclass(frozen=True, slots=True)
class SubjectLag:
    messages: int
    age_s: float


async def read_lag(js: JetStreamContext, now: float) -> dict[tuple[str, str, str], SubjectLag]:
    """(model, version, priority) → lag, for subjects holding requests (``now``: wall-clock seconds)."""
    info = await js.stream_info(STREAM_INFER, subjects_filter=f"{INFER_PREFIX}.>")
    counts = {s: n for s, n in (info.state.subjects or {}).items() if n > 0}
    ages = await asyncio.gather(*(_oldest_age(js, subject, now) for subject in counts))
    lag: dict[tuple[str, str, str], SubjectLag] = {}
    for (subject, count), age in zip(counts.items(), ages, strict=True):
        try:
            key = parse_infer_subject(subject)
        except ValueError:
            continue
        if key in lag:  # a queue's requests and those queued again (schemas.subjects.requeue_subject)
            count, age = count + lag[key].messages, max(age, lag[key].age_s)
        lag[key] = SubjectLag(count, age)
    return lag


async def _oldest_age(js: JetStreamContext, subject: str, now: float) -> float:
    try:
        msg = await js.get_msg(STREAM_INFER, seq=1, subject=subject, next=True)
    except NotFoundError:  # taken meanwhile
        return 0.0
    if msg.time is None:
        return 0.0
    return max(0.0, now - msg.time.timestamp())
