"""Who owns which model, as a worker needs to know before it acts for a request: a pipeline's later
stages must belong to the owner of the model the request came to (only that owner, or the mesh's
own processes, could have published it there). Specs are read from the registry, briefly cached,
each read bounded in time."""

from __future__ import annotations

import asyncio
import time

from broker.registry import Registry
from schemas.errors import Forbidden, MeshError, MeshUnavailable
from schemas.spec import ModelSpec
from schemas.subjects import parse_infer_subject

__all__ = ["Tenancy"]

_TTL_S = 5.0
_READ_TIMEOUT_S = 2.0


class Tenancy:
    def __init__(self, registry: Registry | None) -> None:
        self._registry = registry
        self._specs: dict[str, tuple[float, ModelSpec | None]] = {}

    async def _spec(self, model: str) -> ModelSpec | None:
        cached = self._specs.get(model)
        now = time.monotonic()
        if cached is not None and now - cached[0] < _TTL_S:
            return cached[1]
        if self._registry is None:
            return None
        try:
            spec = await asyncio.wait_for(self._registry.get_spec(model), _READ_TIMEOUT_S)
        except MeshError:
            raise
        except Exception as exc:
            if cached is not None:
                return cached[1]  # the registry is away for now: what it said a moment ago still holds
            raise MeshUnavailable(f"cannot read the owner of {model!r}: {type(exc).__name__}") from exc
        if len(self._specs) > 4096:
            self._specs.clear()
        self._specs[model] = (now, spec)
        return spec

    async def check_route(self, owner: str | None, route: tuple[str, ...]) -> None:
        """Forbidden unless every stage of ``route`` is a registered model of ``owner``. The refusal
        names the stage, never anything of the other model (its owner, inputs or outputs)."""
        for subject in route:
            model = parse_infer_subject(subject)[0]
            spec = await self._spec(model)
            if spec is None or spec.tenant != owner:
                raise Forbidden(f"pipeline stage {subject} is not reachable from this model", stage=subject)
