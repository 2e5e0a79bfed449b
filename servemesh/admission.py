"""Admission on the client: a request that could not be served before its deadline is refused at
once (Overloaded, 429), not queued to wait out its timeout.

Every reply tells how many requests wait ahead on its subject and how fast its replica serves when
busy (``Timing.ahead``, ``Timing.rate``). From the latest of those, the rates of every replica
heard from lately, and the requests this client queued since, a subject's expected wait is
``ahead / rate``; a request whose timeout it would not leave room in is refused, as is one beyond
the model's ``max_queue`` (requests waiting per priority). Without fresh reports (a client that
just started, a mesh that went quiet) nothing is refused here: the stream's own bound is the
backstop. The idea is Triton's ``max_queue_size`` and queue timeout, decided where the request
starts rather than after it waited.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from schemas.envelope import Timing
from schemas.errors import Overloaded

__all__ = ["HEADROOM", "Admission"]

# A request is admitted when the expected wait leaves it this share of its timeout, at least: the
# rest covers its own batch, the reply, and an estimate that is a few milliseconds old.
HEADROOM = 0.8
# Reports older than this no longer hold (the queue they describe has moved on).
_FRESH_S = 2.0


@dataclass(slots=True)
class _Load:
    ahead: int = 0
    at: float = 0.0  # monotonic time of the latest report
    since: int = 0  # requests this client queued on the subject since that report
    rates: dict[str, tuple[float, float]] = field(default_factory=dict)  # worker → (req/s, reported at)

    def rate(self, now: float) -> float:
        return sum(rate for rate, at in self.rates.values() if now - at < _FRESH_S)


class Admission:
    def __init__(self) -> None:
        self._loads: dict[str, _Load] = {}

    def check(self, subject: str, timeout: float, max_queue: int | None = None) -> Overloaded | None:
        """The refusal a request on ``subject`` gets now, if any (None: admitted)."""
        load = self._loads.get(subject)
        if load is None:
            return None
        now = time.monotonic()
        if now - load.at >= _FRESH_S:
            return None
        ahead = load.ahead + load.since
        if max_queue is not None and ahead >= max_queue:
            return Overloaded(f"{subject}: {ahead} requests wait, the model queues at most {max_queue}",
                              ahead=ahead, max_queue=max_queue)  # fmt: skip
        rate = load.rate(now)
        if rate > 0 and ahead / rate > HEADROOM * timeout:
            wait = ahead / rate
            return Overloaded(
                f"{subject}: about {ahead} requests ahead, ~{wait:.2g}s at {rate:.0f} req/s, more than its "
                f"timeout of {timeout:.3g}s allows",
                ahead=ahead, rate=round(rate, 1), expected_wait_s=round(wait, 3),
            )  # fmt: skip
        return None

    def queued(self, subject: str, count: int = 1) -> None:
        load = self._loads.get(subject)
        if load is not None:
            load.since += count

    def heard(self, subject: str, timing: Timing) -> None:
        """A reply on ``subject`` came with its worker's view of the queue."""
        if not timing.worker:
            return
        load = self._loads.get(subject)
        if load is None:
            if len(self._loads) >= 4096:
                self._loads.clear()
            load = self._loads[subject] = _Load()
        now = time.monotonic()
        load.ahead, load.at, load.since = timing.ahead, now, 0
        if timing.rate > 0:
            load.rates[timing.worker] = (timing.rate, now)
