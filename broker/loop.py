"""The event loop of a servemesh process: which loop runs it (uvloop roughly halves the
per-message cost), and the sets of background tasks its objects keep."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

__all__ = ["TaskSet", "run"]

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], loop: str = "auto") -> T:
    """``asyncio.run`` on the chosen loop: "uvloop", "asyncio", or "auto" (uvloop if installed)."""
    if loop in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if loop == "uvloop":
                raise
        else:
            return uvloop.run(main)
    return asyncio.run(main)


class TaskSet:
    """Tasks started in the background and held until they finish (the loop itself keeps only weak
    references to tasks, so one nobody holds may vanish mid-way). Each task handles its own errors."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Future[Any]] = set()

    def spawn(self, work: Awaitable[Any], name: str | None = None) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(work)
        if name is not None and isinstance(task, asyncio.Task):
            task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    async def first_done(self) -> None:
        """Until one of them finishes (at once when there are none)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), return_when=asyncio.FIRST_COMPLETED)

    async def join(self, timeout: float | None = None) -> None:
        """Until every task, those started meanwhile too, has finished, or ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while self._tasks:
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                return
            await asyncio.wait(set(self._tasks), timeout=left)
