"""Leader lease in KV: create-if-absent to take it, revision-checked update to renew it.

The bucket's TTL removes a lease nobody renews, so a standby takes over within the TTL.
"""

from __future__ import annotations

import logging

from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from broker.connection import Connection
from schemas.subjects import BUCKET_LEADER

__all__ = ["Lease"]

log = logging.getLogger(__name__)


class Lease:
    def __init__(self, kv: KeyValue, key: str, holder: str) -> None:
        self._kv = kv
        self.key = key
        self.holder = holder
        self._revision: int | None = None

    @classmethod
    async def open(cls, conn: Connection, key: str, holder: str) -> Lease:
        return cls(await conn.js.key_value(BUCKET_LEADER), key, holder)

    @property
    def held(self) -> bool:
        return self._revision is not None

    async def tick(self) -> bool:
        """Renew the lease if held, else try to take it; True while this holder leads."""
        try:
            if self._revision is None:
                self._revision = await self._kv.create(self.key, self.holder.encode())
                log.info("%s took the lease %s", self.holder, self.key)
            else:
                self._revision = await self._kv.update(self.key, self.holder.encode(), last=self._revision)
        except KeyWrongLastSequenceError:
            if self._revision is not None:
                log.warning("%s lost the lease %s", self.holder, self.key)
            self._revision = None
        except Exception as exc:  # NATS away: we cannot prove we lead, so we do not
            if self._revision is not None:
                log.warning("%s dropped the lease %s: %s", self.holder, self.key, exc)
            self._revision = None
        return self._revision is not None

    async def holder_now(self) -> str | None:
        try:
            entry = await self._kv.get(self.key)
        except Exception:
            return None
        return entry.value.decode() if entry.value else None

    async def release(self) -> None:
        if self._revision is not None:
            try:
                await self._kv.delete(self.key, last=self._revision)
            except Exception as exc:
                log.info("releasing the lease: %s", exc)
            self._revision = None
