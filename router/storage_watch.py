"""StorageWatch: every router probes the mesh's streams, says which stopped storing writes on
``mesh.storage`` (core NATS, which gets through when JetStream does not), answers requests for
the latest report there, and rebuilds a stream the server no longer writes once the disk has room
again (broker/storage.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from broker.connection import Connection
from broker.provision import REQUIRED_STREAMS
from broker.storage import NO_ACK, StorageReport, announce, disk_takes_writes, probe, rebuild
from schemas.subjects import BUCKET_CLAIMS, STORAGE_SUBJECT

__all__ = ["StorageWatch"]

log = logging.getLogger(__name__)

INTERVAL_S = 2.0
# Tenants' claims buckets are looked up this often (they change only with provisioning).
_LIST_EVERY_S = 60.0


class StorageWatch:
    def __init__(self, conn: Connection, router_id: str, interval_s: float = INTERVAL_S) -> None:
        self._conn = conn
        self.report = StorageReport(router_id)
        self._interval = interval_s
        self._streams = list(REQUIRED_STREAMS)
        self._listed_at = 0.0
        self._scratch = f"MESH_SCRATCH_{router_id}".replace(".", "_")[:64]
        self.rebuilt: dict[str, int] = {}  # stream → messages carried over, by this router

    async def run(self, stop: asyncio.Event) -> None:
        stop_answering = await announce(self._conn, lambda: self.report)
        try:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    await self.check()
                    await self._conn.nc.publish(STORAGE_SUBJECT, self.report.encode())
                except Exception as exc:  # NATS away: the next round tries again
                    log.info("storage check failed: %s", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.0, started + self._interval - time.monotonic()))
        finally:
            with contextlib.suppress(Exception):
                await stop_answering()

    async def check(self) -> StorageReport:
        js = self._conn.js
        await self._list_claims_buckets()
        found = await asyncio.gather(*(probe(js, stream) for stream in self._streams))
        unwritable = {stream: why for stream, why in zip(self._streams, found, strict=True) if why}
        wedged = [stream for stream, why in unwritable.items() if why.startswith(NO_ACK)]
        if wedged and await disk_takes_writes(js, self._scratch):
            for stream in wedged:
                if await probe(js, stream) is None:  # another router repaired it meanwhile
                    unwritable.pop(stream)
                    continue
                carried = await rebuild(js, stream)
                self.rebuilt[stream] = carried
                log.warning("rebuilt stream %s, which its server no longer wrote to: %d messages carried over",
                            stream, carried)  # fmt: skip
                if await probe(js, stream) is None:
                    unwritable.pop(stream)
        for stream in unwritable.keys() - self.report.unwritable.keys():
            log.error("stream %s %s", stream, unwritable[stream])
        for stream in self.report.unwritable.keys() - unwritable.keys():
            log.info("stream %s stores writes again", stream)
        self.report = StorageReport(self.report.router, unwritable)
        return self.report

    async def _list_claims_buckets(self) -> None:
        if time.monotonic() - self._listed_at < _LIST_EVERY_S:
            return
        names = await self._conn.js.streams_info()
        own = [i.config.name for i in names if (i.config.name or "").startswith(f"OBJ_{BUCKET_CLAIMS}-")]
        self._streams = [*REQUIRED_STREAMS, *sorted(n for n in own if n)]
        self._listed_at = time.monotonic()
