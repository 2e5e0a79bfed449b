"""Idempotent provisioning of the inference stream, its per-subject consumers and KV buckets."""

from __future__ import annotations

import logging

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError

from broker.connection import Connection
from broker.settings import Settings
from schemas.subjects import (
    BUCKET_ASSIGNMENTS,
    BUCKET_ATTEMPTS,
    BUCKET_CLAIMS,
    BUCKET_JOBS,
    BUCKET_LEADER,
    BUCKET_MODELS,
    BUCKET_PIPELINES,
    BUCKET_ROUTES,
    BUCKET_STATUS,
    BUCKET_WORKERS,
    INFER_PREFIX,
    JOBS_PREFIX,
    STREAM_INFER,
    STREAM_JOBS,
    consumer_name,
    infer_subject,
    job_subject,
    requeue_subject,
)

__all__ = [
    "ATTEMPTS_TTL_S",
    "HEARTBEAT_TTL_S",
    "LEASE_TTL_S",
    "ensure_buckets",
    "ensure_claims_bucket",
    "ensure_consumer",
    "ensure_stream",
    "max_deliveries",
    "provision",
]

log = logging.getLogger(__name__)

HEARTBEAT_TTL_S = 10.0
# A router that stops renewing loses the lead after this long; a standby takes over then.
LEASE_TTL_S = 3.0
# Attempt counts outlive any redelivery of their request (ack waits are seconds to minutes).
ATTEMPTS_TTL_S = 3600.0


def max_deliveries(max_attempts: int) -> int:
    """Deliveries a request may have before a worker gives up on it whatever its attempts."""
    return 4 * max_attempts


def _storage(settings: Settings) -> StorageType:
    return StorageType.FILE if settings.storage == "file" else StorageType.MEMORY


async def ensure_stream(js: JetStreamContext, settings: Settings) -> None:
    """The work-queue stream of every inference subject, bounded per subject (full → 429)."""
    config = StreamConfig(
        name=STREAM_INFER,
        subjects=[f"{INFER_PREFIX}.>"],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=_storage(settings),
        num_replicas=settings.replicas,
        max_msgs_per_subject=settings.max_queue,
        discard=DiscardPolicy.NEW,
        discard_new_per_subject=True,
        duplicate_window=120.0,
    )
    try:
        info = await js.stream_info(STREAM_INFER)
    except NotFoundError:
        await js.add_stream(config)
        log.info("created stream %s", STREAM_INFER)
        return
    if info.config.max_msgs_per_subject != settings.max_queue:
        await js.update_stream(config)
        log.info("updated stream %s (max_queue=%d)", STREAM_INFER, settings.max_queue)


async def ensure_jobs_stream(js: JetStreamContext, settings: Settings) -> None:
    """Where batch-job results live, so anyone can read them later by job id (kept a week)."""
    config = StreamConfig(
        name=STREAM_JOBS,
        subjects=[f"{JOBS_PREFIX}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=_storage(settings),
        num_replicas=settings.replicas,
        max_age=7 * 24 * 3600.0,
        # A redelivered item's result carries the same message id: stored once.
        duplicate_window=600.0,
    )
    try:
        await js.stream_info(STREAM_JOBS)
    except NotFoundError:
        await js.add_stream(config)


async def ensure_consumer(
    js: JetStreamContext, model: str, version: str, priority: str, *, ack_wait_s: float, max_attempts: int
) -> str:
    """The durable pull consumer shared by all replicas of one subject; returns its name."""
    name = consumer_name(model, version, priority)
    subject = infer_subject(model, version, priority)
    config = ConsumerConfig(
        durable_name=name,
        # Its requests, those a worker queued again out of a redelivered bundle, and batch jobs' items.
        filter_subjects=[subject, requeue_subject(subject), job_subject(subject)],
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait_s,
        # A request held (not computed) by a worker that crashed is delivered again without being
        # charged an attempt (broker/attempts.py), so deliveries may exceed attempts; the last one
        # lets a worker answer "gave up" instead of the message sitting undeliverable forever.
        max_deliver=max_deliveries(max_attempts) + 1,
        max_waiting=1024,
        max_ack_pending=-1,
    )
    # Creating an existing durable with changed settings updates it in place.
    await js.add_consumer(STREAM_INFER, config)
    return name


async def ensure_buckets(js: JetStreamContext, settings: Settings) -> None:
    """The registry buckets; creating an existing bucket with the same config is a no-op."""
    storage, replicas = _storage(settings), settings.replicas
    for config in (
        KeyValueConfig(bucket=BUCKET_MODELS, history=5, storage=storage, replicas=replicas),
        KeyValueConfig(bucket=BUCKET_WORKERS, history=1, ttl=HEARTBEAT_TTL_S, storage=storage, replicas=replicas),
        KeyValueConfig(bucket=BUCKET_ASSIGNMENTS, history=1, storage=storage, replicas=replicas),
        KeyValueConfig(bucket=BUCKET_LEADER, history=1, ttl=LEASE_TTL_S, storage=storage, replicas=replicas),
        KeyValueConfig(bucket=BUCKET_STATUS, history=1, storage=storage, replicas=replicas),
        KeyValueConfig(bucket=BUCKET_PIPELINES, history=5, storage=storage, replicas=replicas),
        KeyValueConfig(bucket=BUCKET_ROUTES, history=10, storage=storage, replicas=replicas),
        KeyValueConfig(bucket=BUCKET_JOBS, history=1, storage=storage, replicas=replicas),
        KeyValueConfig(bucket=BUCKET_ATTEMPTS, history=1, ttl=ATTEMPTS_TTL_S, storage=storage, replicas=replicas),
    ):
        await js.create_key_value(config)
    await ensure_claims_bucket(js, settings)


async def ensure_claims_bucket(js: JetStreamContext, settings: Settings) -> None:
    """The object store of claim-checked payloads; its TTL removes what nobody deleted."""
    config = ObjectStoreConfig(ttl=settings.claim_ttl_s, storage=_storage(settings), replicas=settings.replicas)
    try:
        await js.create_object_store(BUCKET_CLAIMS, config)
    except BadRequestError as exc:
        # Created by a process with another TTL: keep the bucket as it is, not fail to start.
        log.info("bucket %s exists with another configuration (%s); keeping it", BUCKET_CLAIMS, exc.description)
    except Exception as exc:
        # Ordinary requests do not need it: serve them, and answer claims with a typed error.
        log.warning("no %s bucket (%s): large payloads cannot travel by claim check", BUCKET_CLAIMS, exc)


async def provision(conn: Connection) -> None:
    """Create (or adopt) the stream and buckets a mesh needs; safe to run from every process."""
    await ensure_stream(conn.js, conn.settings)
    await ensure_jobs_stream(conn.js, conn.settings)
    await ensure_buckets(conn.js, conn.settings)
