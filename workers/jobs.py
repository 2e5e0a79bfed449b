"""What a worker needs to know of batch jobs: which were cancelled (their items are dropped)."""

from __future__ import annotations

import asyncio
import logging
import time

from broker.registry import Registry

__all__ = ["JobBook"]

log = logging.getLogger(__name__)

# A cancelled job stops being computed within this long (one KV read per job per interval).
_RECHECK_S = 1.0
# A job's record read for longer than this is taken as not cancelled: its items keep being served.
_READ_TIMEOUT_S = 1.0


class JobBook:
    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._known: dict[str, tuple[float, bool]] = {}  # job → (checked at, cancelled)

    async def cancelled(self, job: str) -> bool:
        now = time.monotonic()
        checked = self._known.get(job)
        if checked is not None and now - checked[0] < _RECHECK_S:
            return checked[1]
        try:
            record = await asyncio.wait_for(self._registry.get_job(job), _READ_TIMEOUT_S)
        except Exception as exc:  # the registry is away: serve the item, ask again later
            log.info("cannot tell whether job %s was cancelled (%s); serving its item", job, type(exc).__name__)
            return checked[1] if checked is not None else False
        cancelled = bool(record and record.get("state") == "cancelled")
        if len(self._known) > 10_000:  # old jobs fall out; they are read again if they come back
            self._known.clear()
        self._known[job] = (now, cancelled)
        return cancelled
