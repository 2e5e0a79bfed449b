"""Claim check: a payload too large for one NATS message travels through the JetStream object
store (bucket ``mesh-claims``) and the message carries only a reference to it.

Who stores an object owns it: a client deletes its request's object once answered; a reply's
object is handed to the client with the reply, which deletes it once read. A worker only reads
request objects — a redelivery may need them again. The bucket's TTL removes whatever a crash,
a timeout or a fire-and-forget request left behind.
"""

from __future__ import annotations

import io
import logging

from nats.js.api import ObjectMeta, ObjectMetaOptions
from nats.js.errors import BucketNotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore
from nats.nuid import NUID

from broker.connection import Connection, translate_error
from schemas.envelope import Claim, Timing, claim_of, encode_claim, encode_error
from schemas.errors import BadInput, MeshError, ModelFailure
from schemas.subjects import BUCKET_CLAIMS

__all__ = ["Claims"]

log = logging.getLogger(__name__)

# Room a reply needs beside its payload when it goes out in a bundle (request id, framing).
_BUNDLE_ROOM = 1024


class Claims:
    """Stores large payloads and resolves the references to them, on one connection."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._store: ObjectStore | None = None
        self._nuid = NUID()

    @property
    def threshold(self) -> int:
        """Payloads above this many bytes travel by claim check (a setting above what a message
        can carry with its headers is lowered to that)."""
        max_payload = self._conn.nc.max_payload
        return min(self._conn.settings.claim_threshold or max_payload // 2, max_payload - 8 * _BUNDLE_ROOM)

    async def _bucket(self) -> ObjectStore:
        if self._store is None:
            try:
                self._store = await self._conn.js.object_store(BUCKET_CLAIMS)
            except BucketNotFoundError:
                raise BadInput(
                    f"payload too large for one message and no {BUCKET_CLAIMS} bucket to carry it "
                    "(provisioned when a worker starts)"
                ) from None
            except Exception as exc:
                raise translate_error(exc, f"open the {BUCKET_CLAIMS} bucket") from exc
        return self._store

    async def wrap(self, payload: bytes) -> bytes:
        """``payload`` itself when small enough (or claims are off); else stored, and a claim for it."""
        if len(payload) <= self.threshold or not self._conn.settings.claims:
            return payload
        if len(payload) > self._conn.settings.claim_max_bytes:
            raise BadInput(
                f"payload is {len(payload)} bytes; claims carry at most {self._conn.settings.claim_max_bytes}",
                size=len(payload),
            )
        store = await self._bucket()
        name = self._nuid.next().decode()
        # Chunks as large as a message may be: fewer acknowledged publishes per object.
        chunk = max(64 * 1024, self._conn.nc.max_payload - 4096)
        meta = ObjectMeta(name=name, options=ObjectMetaOptions(max_chunk_size=chunk))
        try:
            await store.put(name, payload, meta=meta)
        except Exception as exc:
            raise translate_error(exc, f"store a {len(payload)}-byte payload in {BUCKET_CLAIMS}") from exc
        return encode_claim(Claim(BUCKET_CLAIMS, name, len(payload)))

    async def wrap_reply(self, payload: bytes, timing: Timing) -> bytes:
        """Like :meth:`wrap`, for a worker's reply: never raises, a reply that cannot go is an error reply."""
        try:
            wrapped = await self.wrap(payload)
        except MeshError as err:
            return encode_error(ModelFailure(f"the reply cannot be sent: {err.message}", size=len(payload)), timing)
        if len(wrapped) > self._conn.nc.max_payload - _BUNDLE_ROOM:
            too_large = ModelFailure(
                f"the reply is {len(payload)} bytes; the server accepts at most {self._conn.nc.max_payload} "
                "and the claim check is off",
                size=len(payload),
            )
            return encode_error(too_large, timing)
        return wrapped

    async def resolve(self, payload: bytes, take: bool = False) -> bytes:
        """The payload a claim refers to (an ordinary payload is returned as is). ``take``: the
        object was handed to us (a reply's) and is deleted once read."""
        claim = claim_of(payload)
        if claim is None:
            return payload
        if claim.bucket != BUCKET_CLAIMS:
            raise BadInput(f"claims are resolved from {BUCKET_CLAIMS} only, not {claim.bucket!r}")
        limit = self._conn.settings.claim_max_bytes
        if claim.size > limit:
            raise BadInput(f"claimed payload is {claim.size} bytes; at most {limit} are accepted", size=claim.size)
        store = await self._bucket()
        try:
            info = await store.get_info(claim.name)
            if info.size != claim.size:
                raise BadInput(f"claimed payload {claim.name!r} is {info.size} bytes, not {claim.size}")
            sink = io.BytesIO()
            await store.get(claim.name, writeinto=sink)
        except ObjectNotFoundError:
            raise BadInput(f"claimed payload {claim.name!r} is gone (expired or deleted)", claim=claim.name) from None
        except MeshError:
            raise
        except Exception as exc:
            raise translate_error(exc, f"read claimed payload {claim.name!r}") from exc
        if take:
            await self.release(payload)
        return sink.getvalue()

    async def release(self, payload: bytes) -> None:
        """Delete the object a claim we own refers to; best effort (the TTL is the backstop)."""
        claim = claim_of(payload)
        if claim is None or claim.bucket != BUCKET_CLAIMS:
            return
        try:
            await (await self._bucket()).delete(claim.name)
        except Exception as exc:
            log.info("could not delete claimed payload %s (it expires anyway): %s", claim.name, exc)
