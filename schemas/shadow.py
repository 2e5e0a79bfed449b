"""Shadow traffic: which candidate version a model's requests are mirrored to, and the verdict
a client reports for each mirrored request (its wire form on ``mesh.shadow.<model>``)."""

from __future__ import annotations

from typing import Any, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.errors import BadInput

__all__ = ["Outcome", "ShadowConfig", "ShadowEvent", "decode_event", "encode_event"]

# agree/disagree: both answered and the outputs were compared. shadow_error: the candidate failed
# (its status is in the event). shadow_timeout: no answer in time. primary_error: nothing to
# compare against, the primary itself failed.
Outcome = Literal["agree", "disagree", "shadow_error", "shadow_timeout", "primary_error"]


class ShadowConfig(BaseModel):
    """Stored in a model's route: mirror ``percent`` of the requests served by other versions."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    version: str
    percent: float = Field(gt=0, le=100)
    # Outputs agree when every element is within atol + rtol * |primary| (numpy's isclose).
    rtol: float = Field(default=1e-4, ge=0)
    atol: float = Field(default=1e-6, ge=0)


class ShadowEvent(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    v: int = 1
    model: str
    version: str  # the primary version, whose reply went to the caller
    shadow_version: str
    outcome: Outcome
    primary_ms: float | None = None  # client-side latency, publish to reply
    shadow_ms: float | None = None
    max_abs_diff: float | None = None  # largest difference over numeric outputs, when compared
    shadow_status: int | None = None  # the candidate's error status, on shadow_error


def encode_event(event: ShadowEvent) -> bytes:
    packed: bytes = msgpack.packb(event.model_dump(exclude_none=True))
    return packed


def decode_event(payload: bytes) -> ShadowEvent:
    try:
        body: Any = msgpack.unpackb(payload)
        return ShadowEvent.model_validate(body)
    except (ValueError, TypeError, ValidationError, msgpack.exceptions.UnpackException) as exc:
        raise BadInput(f"malformed shadow event: {exc}") from exc
