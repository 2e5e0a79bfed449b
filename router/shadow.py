"""What shadow traffic shows so far: per model, primary and candidate version, how many mirrored
requests agreed, disagreed or failed, and both sides' latency. Fed by clients' reports."""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, get_args

from broker.connection import Connection
from schemas.errors import MeshError
from schemas.shadow import Outcome, ShadowEvent, decode_event
from schemas.subjects import SHADOW_PREFIX
from telemetry.histogram import SECONDS_BUCKETS, Histogram

__all__ = ["OUTCOMES", "ShadowTally", "Tally", "shadow_events"]

log = logging.getLogger(__name__)

OUTCOMES: tuple[str, ...] = get_args(Outcome)
_RECENT = 2048  # latencies kept per side for the percentiles shown in status


@dataclass(slots=True)
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    shadow_errors: Counter[int] = field(default_factory=Counter)  # by status
    max_abs_diff: float = 0.0
    latency: dict[str, Histogram] = field(
        default_factory=lambda: {"primary": Histogram(SECONDS_BUCKETS), "shadow": Histogram(SECONDS_BUCKETS)}
    )
    recent: dict[str, deque[float]] = field(
        default_factory=lambda: {"primary": deque(maxlen=_RECENT), "shadow": deque(maxlen=_RECENT)}
    )

    def add(self, event: ShadowEvent) -> None:
        self.outcomes[event.outcome] += 1
        if event.shadow_status is not None:
            self.shadow_errors[event.shadow_status] += 1
        if event.max_abs_diff is not None:
            self.max_abs_diff = max(self.max_abs_diff, event.max_abs_diff)
        # Latency is compared only where both answered: a timeout's latency is the timeout.
        if event.outcome in ("agree", "disagree"):
            for side, ms in (("primary", event.primary_ms), ("shadow", event.shadow_ms)):
                if ms is not None:
                    self.latency[side].observe(ms / 1000.0)
                    self.recent[side].append(ms)

    def summary(self) -> dict[str, Any]:
        compared = self.outcomes["agree"] + self.outcomes["disagree"]
        return {
            "mirrored": sum(self.outcomes.values()),
            "compared": compared,
            "agreement": round(self.outcomes["agree"] / compared, 4) if compared else None,
            "outcomes": {o: self.outcomes[o] for o in OUTCOMES if self.outcomes[o]},
            "shadow_errors": {str(status): n for status, n in sorted(self.shadow_errors.items())},
            "max_abs_diff": self.max_abs_diff,
            "latency_ms": {side: _percentiles(values) for side, values in self.recent.items()},
        }


class ShadowTally:
    """Tallies keyed by (model, primary version, shadow version)."""

    def __init__(self) -> None:
        self.tallies: dict[tuple[str, str, str], Tally] = {}

    def add(self, event: ShadowEvent) -> None:
        key = (event.model, event.version, event.shadow_version)
        tally = self.tallies.get(key)
        if tally is None:
            tally = self.tallies[key] = Tally()
        tally.add(event)

    def by_model(self) -> dict[str, dict[str, Any]]:
        """For each model's status: ``{"<primary>-><shadow>": summary}``."""
        out: dict[str, dict[str, Any]] = {}
        for (model, version, shadow_version), tally in sorted(self.tallies.items()):
            out.setdefault(model, {})[f"{version}->{shadow_version}"] = tally.summary()
        return out


def _percentiles(values: deque[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    return {f"p{round(q * 100)}": round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3) for q in (0.5, 0.99)}


async def shadow_events(conn: Connection) -> AsyncIterator[ShadowEvent]:
    """Every shadow verdict any client reports, as it arrives; malformed reports are skipped."""
    sub = await conn.nc.subscribe(f"{SHADOW_PREFIX}.*", pending_msgs_limit=-1, pending_bytes_limit=-1)
    try:
        async for msg in sub.messages:
            try:
                yield decode_event(msg.data)
            except MeshError as err:
                log.warning("skipping a shadow report on %s: %s", msg.subject, err.message)
    finally:
        await sub.unsubscribe()
