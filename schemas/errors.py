"""The one error tree of servemesh: every failure a caller can see, with its status.

    MeshError (status 500)
    ├── BadInput (400)          the request is malformed or does not fit the model
    ├── Forbidden (403)         this user may not do that (the server's permissions refused it)
    ├── UnknownModel (404)      no such model or version is registered
    ├── Overloaded (429)        the model's queue is full; retry later
    ├── ModelFailure (500)      the runtime failed on this request (or it hit max attempts)
    ├── NoCapacity (503)        the mesh cannot serve the model right now
    ├── DeadlineExceeded (504)  the request's deadline passed before an answer
    └── MeshUnavailable (503)   the client cannot reach NATS / JetStream

Errors cross the wire as ``{"status", "code", "message", "data"}`` and are rebuilt with
:func:`error_from_wire`, so a caller catches the same class the worker raised.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "BadInput",
    "DeadlineExceeded",
    "Forbidden",
    "MeshError",
    "MeshUnavailable",
    "ModelFailure",
    "NoCapacity",
    "Overloaded",
    "UnknownModel",
    "error_from_wire",
]


class MeshError(Exception):
    """Base of every servemesh error; ``status`` follows HTTP semantics."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"

    def __init__(self, message: str, **data: Any) -> None:
        super().__init__(message)
        self.message = message
        self.data = data

    def to_wire(self) -> dict[str, Any]:
        return {"status": self.status, "code": self.code, "message": self.message, "data": self.data}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class BadInput(MeshError):
    status = 400
    code = "bad_input"


class Forbidden(MeshError):
    status = 403
    code = "forbidden"


class UnknownModel(MeshError):
    status = 404
    code = "unknown_model"


class Overloaded(MeshError):
    status = 429
    code = "overloaded"


class ModelFailure(MeshError):
    status = 500
    code = "model_failure"


class NoCapacity(MeshError):
    status = 503
    code = "no_capacity"


class MeshUnavailable(MeshError):
    status = 503
    code = "unavailable"


class DeadlineExceeded(MeshError):
    status = 504
    code = "deadline_exceeded"


_BY_CODE: dict[str, type[MeshError]] = {
    cls.code: cls
    for cls in (
        BadInput, Forbidden, UnknownModel, Overloaded, ModelFailure, NoCapacity, MeshUnavailable, DeadlineExceeded
    )
}  # fmt: skip
_BY_STATUS: dict[int, type[MeshError]] = {
    400: BadInput, 403: Forbidden, 404: UnknownModel, 429: Overloaded, 504: DeadlineExceeded
}  # fmt: skip


def error_from_wire(payload: dict[str, Any]) -> MeshError:
    """Rebuild the typed error a worker sent; unknown codes fall back to the status."""
    code = str(payload.get("code", ""))
    status = int(payload.get("status", 500))
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status, MeshError)
    data = payload.get("data") or {}
    return cls(str(payload.get("message", "")), **(data if isinstance(data, dict) else {}))
