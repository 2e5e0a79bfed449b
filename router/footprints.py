"""What workers measured each model version to take once loaded (host RSS and GPU memory deltas), by device
kind: the router keeps the latest figure any worker reported, so placement budgets with measurements rather
than declarations, even for versions loaded nowhere right now."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from router.snapshot import CPU, Footprint

__all__ = ["FootprintBook"]

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (model, version)


class FootprintBook:
    """(model, version, device kind) → the latest measured footprint, fed from worker heartbeats.

    Workers report every version they measured since they started (``measured`` in the heartbeat), so a new
    leader rebuilds the book from the live workers' heartbeats; what it remembers of dead ones is a bonus."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str, str], tuple[float, Footprint]] = {}

    def record(self, beats: Iterable[Mapping[str, Any]]) -> None:
        for beat in beats:
            kind = str((beat.get("device") or {}).get("kind", CPU))
            for label, m in (beat.get("measured") or {}).items():
                model, _, version = str(label).rpartition(":")
                try:
                    at, fp = float(m.get("at", 0.0)), Footprint(int(m["host_mb"]), int(m.get("gpu_mb") or 0))
                except (AttributeError, KeyError, TypeError, ValueError):
                    log.debug("ignoring a malformed measurement of %s from %s", label, beat.get("id"))
                    continue
                key = (model, version, kind)
                if model and (key not in self._seen or self._seen[key][0] <= at):
                    self._seen[key] = (at, fp)

    def by_version(self) -> dict[Key, dict[str, Footprint]]:
        out: dict[Key, dict[str, Footprint]] = {}
        for (model, version, kind), (_, fp) in self._seen.items():
            out.setdefault((model, version), {})[kind] = fp
        return out

    def forget(self, keep: Iterable[Key]) -> None:
        """Drop what no longer names a registered version (a deleted model, a re-registered one goes on)."""
        kept = set(keep)
        for key in [k for k in self._seen if (k[0], k[1]) not in kept]:
            del self._seen[key]
