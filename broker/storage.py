"""Whether the mesh's streams still store what they are sent, and their repair when they stopped.

nats-server marks a stream's file store failed for good once a write to it fails with the disk full
("no space left on device"): from then on it answers every publish to that stream with nothing,
even after the disk has room again, until the server restarts. A router probes each stream with a
write it purges at once; a stream that acknowledges none is reported (``mesh.storage``, so clients
fail fast and workers report not ready), and, once a scratch stream shows the disk takes writes
again, rebuilt: its messages read out, the stream made afresh with the same configuration, the
messages stored again in order (claimed payloads excepted: they are transient, their requests are
answered "gone"). Consumers go with the old stream; workers make theirs again when told it is gone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError

from broker.connection import Connection
from schemas.subjects import STORAGE_SUBJECT, probe_subject

__all__ = [
    "NO_ACK", "StorageNews", "StorageReport", "announce", "disk_takes_writes", "latest_report", "probe", "rebuild",
]

log = logging.getLogger(__name__)

# How a probe that got no acknowledgement is worded; only such a stream is rebuilt (one refusing
# writes for a JetStream limit recovers by itself once its messages are consumed).
NO_ACK = "acknowledges no write"
_PROBE_TIMEOUT_S = 2.0
# Messages a rebuild carries over at most (a queue bounded per subject rarely holds this many).
_MAX_CARRIED = 200_000
# A report holds this long (routers send one every 2 s).
_FRESH_S = 6.0


async def probe(js: JetStreamContext, stream: str, timeout: float = _PROBE_TIMEOUT_S) -> str | None:
    """Why ``stream`` does not store writes now, or None when it does (or does not exist: nothing to say)."""
    subject = probe_subject(stream)
    try:
        await js.publish(subject, b"", timeout=timeout)
    except nats.errors.TimeoutError:
        return f"{NO_ACK} (is the server's disk full?)"
    except (nats.errors.NoRespondersError, NoStreamResponseError):
        return None  # no such stream here (or no leader just now): provisioning's concern, not storage's
    except APIError as exc:
        return f"refuses writes: {exc.description}"
    try:
        await js.purge_stream(stream, subject=subject)
    except Exception as exc:  # the probe stays until the next one purges it: an empty value nobody reads
        log.debug("could not purge the probe of %s: %s", stream, exc)
    return None


async def disk_takes_writes(js: JetStreamContext, name: str) -> bool:
    """Whether a new file-backed stream can store a write: the disk has room again."""
    config = StreamConfig(name=name, subjects=[f"mesh.scratch.{name}"], storage=StorageType.FILE, max_msgs=1)
    try:
        await js.add_stream(config)
        await js.publish(f"mesh.scratch.{name}", b"x" * 65536, timeout=_PROBE_TIMEOUT_S)
        return True
    except Exception as exc:
        log.debug("the disk does not take writes yet: %s", exc)
        return False
    finally:
        try:
            await js.delete_stream(name)
        except Exception as exc:
            log.debug("could not delete scratch stream %s: %s", name, exc)


def _config_of(config: StreamConfig) -> StreamConfig:
    """The configuration to make ``config``'s stream again with: what the server added is left out."""
    metadata = {k: v for k, v in (config.metadata or {}).items() if not k.startswith("_nats")}
    made: StreamConfig = StreamConfig.from_response({**config.as_dict(), "metadata": metadata or None})
    return made


async def rebuild(js: JetStreamContext, stream: str) -> int:
    """Make ``stream`` afresh, its messages carried over; returns how many were."""
    info = await js.stream_info(stream)
    carried: list[tuple[str, dict[str, str] | None, bytes]] = []
    if not stream.startswith("OBJ_"):  # an object store holds only transient claimed payloads
        seq, last = info.state.first_seq, info.state.last_seq
        while seq <= last and len(carried) < _MAX_CARRIED:
            try:
                msg = await js.get_msg(stream, seq=seq)
            except NotFoundError:
                seq += 1
                continue
            headers = {k: v for k, v in (msg.headers or {}).items() if not k.startswith("Nats-Expected")}
            carried.append((msg.subject or "", headers or None, msg.data or b""))
            seq += 1
    config = _config_of(info.config)
    await js.delete_stream(stream)
    await js.add_stream(config)
    for start in range(0, len(carried), 256):
        await asyncio.gather(*(js.publish(subject, data, headers=headers, timeout=10)
                               for subject, headers, data in carried[start : start + 256]))  # fmt: skip
    return len(carried)


@dataclass
class StorageReport:
    """What a router found: per stream, why it does not store writes (empty: every stream does)."""

    router: str
    unwritable: dict[str, str] = field(default_factory=dict)
    at: float = field(default_factory=time.time)

    def encode(self) -> bytes:
        return json.dumps({"router": self.router, "at": self.at, "unwritable": self.unwritable}).encode()

    @classmethod
    def decode(cls, data: bytes) -> StorageReport | None:
        try:
            raw: Mapping[str, Any] = json.loads(data)
            unwritable = {str(k): str(v) for k, v in dict(raw["unwritable"]).items()}
            return cls(str(raw["router"]), unwritable, float(raw["at"]))
        except (ValueError, KeyError, TypeError):
            return None


class StorageNews:
    """The routers' latest report, as heard on ``mesh.storage``; ``on_report`` is told each one."""

    def __init__(self, conn: Connection, on_report: Callable[[StorageReport], None] | None = None) -> None:
        self._conn = conn
        self._on_report = on_report
        self._latest: tuple[StorageReport | None, float] = (None, 0.0)

    async def start(self) -> StorageNews:
        await self._conn.nc.subscribe(STORAGE_SUBJECT, cb=self._heard)
        return self

    async def _heard(self, msg: Msg) -> None:
        report = None if msg.reply else StorageReport.decode(msg.data)  # a request is not news
        if report is None:
            return
        self._latest = (report, time.monotonic())
        if self._on_report is not None:
            self._on_report(report)

    def problems(self) -> dict[str, str]:
        """Per stream, why it stores no writes, while the latest report is fresh (else nothing)."""
        report, heard_at = self._latest
        if report is None or time.monotonic() - heard_at > _FRESH_S:
            return {}
        return report.unwritable


async def announce(conn: Connection, current: Callable[[], StorageReport]) -> Callable[[], Awaitable[None]]:
    """Answer requests on ``mesh.storage`` with ``current()``; returns what stops answering."""

    async def answer(msg: Msg) -> None:
        if msg.reply:  # a request for the latest report (the broadcasts carry none)
            await conn.nc.publish(msg.reply, current().encode())

    sub = await conn.nc.subscribe(STORAGE_SUBJECT, cb=answer)
    return sub.unsubscribe


async def latest_report(conn: Connection, timeout: float = 1.0) -> StorageReport | None:
    """A router's latest report, asked for; None when no router answers."""
    try:
        msg = await conn.nc.request(STORAGE_SUBJECT, b"", timeout=timeout)
    except Exception:
        return None
    return StorageReport.decode(msg.data)
