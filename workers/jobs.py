"""What a worker needs to know of batch jobs: which were cancelled (their items are dropped)."""

from __future__ import annotations

import time

from broker.registry import Registry

__all__ = ["JobBook"]

# A cancelled job stops being computed within this long (one KV read per job per interval).
_RECHECK_S = 1.0


class JobBook:
    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._known: dict[str, tuple[float, bool]] = {}  # job → (checked at, cancelled)

    async def cancelled(self, job: str) -> bool:
        now = time.monotonic()
        checked = self._known.get(job)
        if checked is not None and now - checked[0] < _RECHECK_S:
            return checked[1]
        record = await self._registry.get_job(job)
        cancelled = bool(record and record.get("state") == "cancelled")
        if len(self._known) > 10_000:  # old jobs fall out; they are read again if they come back
            self._known.clear()
        self._known[job] = (now, cancelled)
        return cancelled
