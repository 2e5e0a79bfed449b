"""Claim check: a payload too large for one NATS message travels through the JetStream object
store (bucket ``mesh-claims``) and the message carries only a reference to it.

Who stores an object owns it: a client deletes its request's object once answered; a reply's
object is handed to the client with the reply, which deletes it once read. A worker only reads
request objects — a redelivery may need them again. The bucket's TTL removes whatever a crash,
a timeout or a fire-and-forget request left behind.
"""

from __future__ import annotations

import asyncio
import io
import logging

from nats.js.api import ObjectMeta, ObjectMetaOptions
from nats.js.errors import BucketNotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore
from nats.nuid import NUID

from broker.connection import Connection, translate_error
from schemas.envelope import Claim, Timing, claim_of, encode_claim, encode_error
from schemas.errors import BadInput, MeshError, ModelFailure
from schemas.subjects import BUCKET_CLAIMS, is_claims_bucket

__all__ = ["Claims"]

log = logging.getLogger(__name__)

# Room a reply needs beside its payload when it goes out in a bundle (request id, framing).
_BUNDLE_ROOM = 1024
# Opening a bucket, storing or reading an object: each waits on the server at most this long (an
# object of claim_max_bytes moves in well under it on any link the mesh runs on).
_TIMEOUT_S = 30.0


class Claims:
    """Stores large payloads and resolves the references to them, on one connection."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._stores: dict[str, ObjectStore] = {}
        self._nuid = NUID()
        self._threshold = (-1, 0)  # (the server's max_payload, the threshold it gives)

    @property
    def threshold(self) -> int:
        """Payloads above this many bytes travel by claim check (a setting above what a message
        can carry with its headers is lowered to that)."""
        max_payload = self._conn.nc.max_payload
        if max_payload != self._threshold[0]:  # read on every request; the server's limit rarely changes
            limit = min(self._conn.settings.claim_threshold or max_payload // 2, max_payload - 8 * _BUNDLE_ROOM)
            self._threshold = (max_payload, limit)
        return self._threshold[1]

    async def _bucket(self, name: str) -> ObjectStore:
        store = self._stores.get(name)
        if store is None:
            try:
                store = await asyncio.wait_for(self._conn.js.object_store(name), _TIMEOUT_S)
            except BucketNotFoundError:
                raise BadInput(
                    f"payload too large for one message and no {name} bucket to carry it: the admin makes "
                    f"it with `servemesh provision`" + (f" --tenant {name[len(BUCKET_CLAIMS) + 1 :]}"
                                                       if name != BUCKET_CLAIMS else "")
                ) from None
            except Exception as exc:
                raise translate_error(exc, f"open the {name} bucket") from exc
            self._stores[name] = store
        return store

    async def ensure_own(self) -> None:
        """Check that this process's own claims bucket exists (a worker may have a large reply for it
        before we ever store a request there); only logs when it does not."""
        name = self._conn.settings.claim_bucket
        if name != BUCKET_CLAIMS and self._conn.settings.claims:
            try:
                await self._bucket(name)
            except MeshError as err:
                log.warning("claims bucket %s unavailable: %s", name, err.message)

    async def wrap(self, payload: bytes, bucket: str | None = None) -> bytes:
        """``payload`` itself when small enough (or claims are off); else stored (in ``bucket``, by
        default our own), and a claim for it."""
        if len(payload) <= self.threshold or not self._conn.settings.claims:
            return payload
        if len(payload) > self._conn.settings.claim_max_bytes:
            raise BadInput(
                f"payload is {len(payload)} bytes; claims carry at most {self._conn.settings.claim_max_bytes}",
                size=len(payload),
            )
        bucket = bucket or self._conn.settings.claim_bucket
        store = await self._bucket(bucket)
        name = self._nuid.next().decode()
        # Chunks as large as a message may be: fewer acknowledged publishes per object.
        chunk = max(64 * 1024, self._conn.nc.max_payload - 4096)
        meta = ObjectMeta(name=name, options=ObjectMetaOptions(max_chunk_size=chunk))
        try:
            await asyncio.wait_for(store.put(name, payload, meta=meta), _TIMEOUT_S)
        except Exception as exc:
            raise translate_error(exc, f"store a {len(payload)}-byte payload in {bucket}") from exc
        return encode_claim(Claim(bucket, name, len(payload)))

    async def wrap_reply(self, payload: bytes, timing: Timing, bucket: str | None = None) -> bytes:
        """Like :meth:`wrap`, for a worker's reply (into the requester's ``bucket``, if it named a
        valid one): never raises, a reply that cannot go is an error reply."""
        try:
            wrapped = await self.wrap(payload, bucket if bucket and is_claims_bucket(bucket) else BUCKET_CLAIMS)
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
        if not is_claims_bucket(claim.bucket):
            raise BadInput(f"claims are resolved from {BUCKET_CLAIMS} buckets only, not {claim.bucket!r}")
        limit = self._conn.settings.claim_max_bytes
        if claim.size > limit:
            raise BadInput(f"claimed payload is {claim.size} bytes; at most {limit} are accepted", size=claim.size)
        store = await self._bucket(claim.bucket)
        try:
            info = await asyncio.wait_for(store.get_info(claim.name), _TIMEOUT_S)
            if info.size != claim.size:
                raise BadInput(f"claimed payload {claim.name!r} is {info.size} bytes, not {claim.size}")
            sink = io.BytesIO()
            await asyncio.wait_for(store.get(claim.name, writeinto=sink), _TIMEOUT_S)
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
        if claim is None or not is_claims_bucket(claim.bucket):
            return
        try:
            await asyncio.wait_for((await self._bucket(claim.bucket)).delete(claim.name), _TIMEOUT_S)
        except Exception as exc:
            log.info("could not delete claimed payload %s (it expires anyway): %s", claim.name, exc)
