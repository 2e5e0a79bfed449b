"""SyncMeshClient: MeshClient for code that is not async (scripts, notebooks, WSGI apps).

It runs one event loop in a daemon thread and hands calls to it; safe to share across threads.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

import numpy as np

from broker.settings import Settings
from schemas.envelope import Reply
from servemesh.client import MeshClient

__all__ = ["SyncMeshClient"]

T = TypeVar("T")


class SyncMeshClient:
    def __init__(self, url: str | None = None, settings: Settings | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="servemesh-client", daemon=True)
        self._thread.start()
        try:
            self._client = self._call(MeshClient.connect(url, settings))
        except BaseException:
            self._stop_loop()
            raise

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def infer(self, model: str, inputs: dict[str, Any], **kwargs: Any) -> dict[str, np.ndarray[Any, Any]]:
        """Blocking :meth:`MeshClient.infer` (same arguments, same typed errors)."""
        return self._call(self._client.infer(model, inputs, **kwargs))

    def infer_reply(self, model: str, inputs: dict[str, Any], **kwargs: Any) -> Reply:
        return self._call(self._client.infer_reply(model, inputs, **kwargs))

    def close(self) -> None:
        if self._loop.is_running():
            self._call(self._client.close())
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> SyncMeshClient:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
