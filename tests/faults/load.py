"""The fault suite's load driver: N callers sending back to back for as long as a fault lasts,
tallying every request as answered (with the expected output), failed with a typed MeshError
(by status), or lost (neither a reply nor a typed error by its timeout plus a grace period)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from schemas.errors import MeshError
from servemesh import MeshClient

_NONCES = itertools.count(1)


@dataclass
class Tally:
    sent: int = 0
    answered: int = 0
    failed: Counter[int] = field(default_factory=Counter)
    lost: int = 0
    wrong: int = 0  # answered with an output other than the expected one
    redelivered: int = 0  # answered on a later delivery (the first holder died or stalled)
    by_worker: Counter[str] = field(default_factory=Counter)  # answers per worker id
    errors: dict[str, str] = field(default_factory=dict)  # one message per error kind, to say why
    untyped: list[str] = field(default_factory=list)  # exceptions outside the MeshError tree (counted as lost)

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())

    def line(self, name: str) -> str:
        failed = ", ".join(f"{n}×{s}" for s, n in sorted(self.failed.items()))
        text = f"{name}: sent {self.sent} / answered {self.answered} / failed {self.failed_total}"
        text += f" ({failed})" if failed else ""
        text += f" / lost {self.lost}"
        if self.wrong:
            text += f" / WRONG {self.wrong}"
        return text


class Load:
    """Closed-loop load on an identity model (output = input) with ``input`` of shape [width].

    Each request carries values unique to it (caller, sequence, run), so an answer that
    belongs to another request counts as wrong, not answered.
    """

    def __init__(
        self,
        client: MeshClient,
        model: str,
        callers: int = 8,
        timeout: float = 10.0,
        grace: float = 2.0,
        width: int = 4,
        pause_after_error: float = 0.05,
    ) -> None:
        self.client = client
        self.model = model
        self.callers = callers
        self.timeout = timeout
        self.grace = grace
        self.width = width
        self.pause_after_error = pause_after_error
        self.tally = Tally()
        self._run = next(_NONCES)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._answered_changed = asyncio.Event()

    async def __aenter__(self) -> Load:
        self._tasks = [asyncio.create_task(self._caller(i), name=f"load-{i}") for i in range(self.callers)]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    async def stop(self) -> Tally:
        """Stop sending and wait for every request in flight to end (bounded by timeout + grace)."""
        self._stop.set()
        await asyncio.gather(*self._tasks)
        return self.tally

    async def answers(self, more: int, timeout: float, what: str = "answers") -> float:
        """Wait until ``more`` further requests have been answered; returns the seconds it took."""
        start = time.monotonic()
        target = self.tally.answered + more
        while self.tally.answered < target:
            left = timeout - (time.monotonic() - start)
            if left <= 0:
                raise AssertionError(f"only {self.tally.answered - target + more} of {more} {what} in {timeout}s")
            self._answered_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._answered_changed.wait(), left)
        return time.monotonic() - start

    def _input(self, caller: int, seq: int) -> np.ndarray:
        x = np.zeros((1, self.width), np.float32)
        x[0, :3] = (caller, seq, self._run)
        return x

    async def _caller(self, caller: int) -> None:
        tally = self.tally
        for seq in itertools.count():
            if self._stop.is_set():
                return
            x = self._input(caller, seq)
            tally.sent += 1
            try:
                reply = await asyncio.wait_for(
                    self.client.infer_reply(self.model, {"input": x}, timeout=self.timeout), self.timeout + self.grace
                )
            except TimeoutError:
                tally.lost += 1
                continue
            except MeshError as err:
                tally.failed[err.status] += 1
                tally.errors.setdefault(f"{err.status} {type(err).__name__}", err.message[:160])
                await asyncio.sleep(self.pause_after_error)  # an outage is no reason to spin
                continue
            except Exception as exc:
                tally.lost += 1
                tally.untyped.append(repr(exc)[:200])
                continue
            if np.array_equal(reply.outputs.get("output"), x):
                tally.answered += 1
                tally.redelivered += reply.timing.attempt > 1
                tally.by_worker[reply.timing.worker] += 1
                self._answered_changed.set()
            else:
                tally.wrong += 1
