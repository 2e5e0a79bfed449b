"""ServingStats: what one replica did (answers, batches, errors, latencies), for its heartbeat and metrics."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from telemetry.histogram import BATCH_BUCKETS, SECONDS_BUCKETS, Histogram

__all__ = ["ServingStats"]


@dataclass
class ServingStats:
    """Counters a heartbeat carries, so operators and tests can see what a replica did."""

    succeeded: int = 0
    batches: int = 0
    rows: int = 0
    max_batch: int = 0
    peak_computing: int = 0  # most batches computed at once (up to the model's instances)
    errors: Counter[int] = field(default_factory=Counter)
    expired: int = 0
    cancelled: int = 0  # requests acked uncomputed: their callers had cancelled them
    busy_s: float = 0.0  # time spent computing (with several instances: instance-seconds / instances)
    queue_s: Histogram = field(default_factory=lambda: Histogram(SECONDS_BUCKETS))
    compute_s: Histogram = field(default_factory=lambda: Histogram(SECONDS_BUCKETS))
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    # Recent latencies inside the mesh (stored in the stream → reply sent), for p50/p99.
    recent_ms: deque[float] = field(default_factory=lambda: deque(maxlen=1024))

    def as_dict(self) -> dict[str, Any]:
        ordered = sorted(self.recent_ms)
        return {
            "succeeded": self.succeeded, "batches": self.batches, "rows": self.rows, "max_batch": self.max_batch,
            "peak_computing": self.peak_computing,
            "errors": {str(k): v for k, v in self.errors.items()}, "expired": self.expired, "cancelled": self.cancelled,
            "busy_s": round(self.busy_s, 4), "p50_ms": _quantile(ordered, 0.5), "p99_ms": _quantile(ordered, 0.99),
            "queued": self.queue_s.count, "queue_total_s": round(self.queue_s.sum, 6),
        }  # fmt: skip


def _quantile(ordered: list[float], q: float) -> float | None:
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3) if ordered else None
