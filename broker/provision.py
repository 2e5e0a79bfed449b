"""Provisioning: the inference and jobs streams, the KV buckets and the claims buckets, made or
changed only by the admin step (``servemesh provision``, ``servemesh up``); every other process
checks that they exist and reports what differs. Per-subject consumers are made by workers, from
the registered spec."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

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
from nats.js.errors import NotFoundError

from broker.connection import Connection
from broker.registry import Registry
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
    claims_bucket_of,
    consumer_name,
    infer_subject,
    job_subject,
    requeue_subject,
)

__all__ = [
    "ATTEMPTS_TTL_S",
    "HEARTBEAT_TTL_S",
    "LEASE_TTL_S",
    "REQUIRED_STREAMS",
    "check_provisioned",
    "ensure_claims_bucket",
    "ensure_consumer",
    "max_deliveries",
    "provision",
    "wait_provisioned",
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


def _infer_config(settings: Settings) -> StreamConfig:
    return StreamConfig(
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


def _jobs_config(settings: Settings) -> StreamConfig:
    return StreamConfig(
        name=STREAM_JOBS,
        subjects=[f"{JOBS_PREFIX}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=_storage(settings),
        num_replicas=settings.replicas,
        max_age=7 * 24 * 3600.0,
        # A redelivered item's result carries the same message id: stored once.
        duplicate_window=600.0,
    )


def _bucket_configs(settings: Settings) -> list[KeyValueConfig]:
    storage, replicas = _storage(settings), settings.replicas
    return [
        KeyValueConfig(bucket=BUCKET_MODELS, history=5, storage=storage, replicas=replicas),
        KeyValueConfig(bucket=BUCKET_WORKERS, history=1, ttl=HEARTBEAT_TTL_S, storage=storage, replicas=replicas),
        KeyValueConfig(bucket=BUCKET_ASSIGNMENTS, history=1, storage=storage, replicas=replicas),
        KeyValueConfig(bucket=BUCKET_LEADER, history=1, ttl=LEASE_TTL_S, storage=storage, replicas=replicas),
        KeyValueConfig(bucket=BUCKET_STATUS, history=1, storage=storage, replicas=replicas),
        KeyValueConfig(bucket=BUCKET_PIPELINES, history=5, storage=storage, replicas=replicas),
        KeyValueConfig(bucket=BUCKET_ROUTES, history=10, storage=storage, replicas=replicas),
        KeyValueConfig(bucket=BUCKET_JOBS, history=1, storage=storage, replicas=replicas),
        KeyValueConfig(bucket=BUCKET_ATTEMPTS, history=1, ttl=ATTEMPTS_TTL_S, storage=storage, replicas=replicas),
    ]


# What every mesh process needs to find: the streams, the registry's buckets, the shared claims bucket.
REQUIRED_STREAMS = (
    STREAM_INFER, STREAM_JOBS, *(f"KV_{c.bucket}" for c in _bucket_configs(Settings())), f"OBJ_{BUCKET_CLAIMS}",
)  # fmt: skip


async def provision(conn: Connection, tenants: Iterable[str] = ()) -> list[str]:
    """The admin step: create what the mesh needs and bring the inference stream's limits in line
    with ``conn.settings``. Returns what it did, a line each (nothing when all was in place).

    Only ``servemesh provision`` (and ``servemesh up``/``nats``, which run their own server) call
    this; every other process checks with :func:`check_provisioned` and changes nothing. Each
    tenant (those named, and every owner of a registered model) gets its own claims bucket, made
    here because a tenant may not create streams (it would choose their subjects)."""
    js, settings = conn.js, conn.settings
    done: list[str] = []
    infer = _infer_config(settings)
    try:
        info = await js.stream_info(STREAM_INFER)
    except NotFoundError:
        await js.add_stream(infer)
        done.append(f"created stream {STREAM_INFER} (max_queue {settings.max_queue}, {settings.replicas} replica(s))")
    else:
        changed = _differences(info.config, settings)
        if changed:
            await js.update_stream(infer)
            done.append(f"updated stream {STREAM_INFER}: {', '.join(changed)}")
    try:
        await js.stream_info(STREAM_JOBS)
    except NotFoundError:
        await js.add_stream(_jobs_config(settings))
        done.append(f"created stream {STREAM_JOBS}")
    for config in _bucket_configs(settings):
        try:
            await js.stream_info(f"KV_{config.bucket}")
        except NotFoundError:
            await js.create_key_value(config)
            done.append(f"created bucket {config.bucket}")
    owners = set(tenants) | await _owners(conn)
    for bucket in [BUCKET_CLAIMS, *sorted(claims_bucket_of(t) for t in owners)]:
        if await ensure_claims_bucket(js, settings, bucket):
            done.append(f"created bucket {bucket}")
    for line in done:
        log.debug("%s", line)
    return done


async def check_provisioned(conn: Connection) -> tuple[list[str], list[str]]:
    """(missing, different): what a process that does not provision finds. ``missing`` names the
    streams and buckets that do not exist; ``different``, the inference stream's settings that
    differ from this process's own (reported, never applied: only the admin step changes them)."""
    js = conn.js
    missing, different = [], []
    for stream in REQUIRED_STREAMS:
        try:
            info = await js.stream_info(stream)
        except NotFoundError:
            missing.append(stream)
            continue
        if stream == STREAM_INFER:
            different = _differences(info.config, conn.settings)
    return missing, different


async def wait_provisioned(conn: Connection, who: str, poll_s: float = 1.0) -> None:
    """Until the mesh is provisioned, saying once what is missing and how to fix it; then warns of
    the inference stream's settings that differ from this process's (and leaves them as they are)."""
    told = False
    while True:
        try:
            missing, different = await check_provisioned(conn)
        except Exception as exc:  # the server is away or slow: ask again
            missing, different = ["(cannot tell: " + type(exc).__name__ + ")"], []
        if not missing:
            break
        if not told:
            log.error("%s waits for the mesh to be provisioned (missing: %s): run `servemesh provision` as the admin",
                      who, ", ".join(missing))  # fmt: skip
            told = True
        await asyncio.sleep(poll_s)
    if told:
        log.info("%s: the mesh is provisioned", who)
    if different:
        log.warning("%s: %s has other settings than this process (%s); left as they are, only `servemesh "
                    "provision` changes them", who, STREAM_INFER, ", ".join(different))  # fmt: skip


def _differences(config: StreamConfig, settings: Settings) -> list[str]:
    found = []
    if config.max_msgs_per_subject != settings.max_queue:
        found.append(f"max_queue {config.max_msgs_per_subject} → {settings.max_queue}")
    if config.num_replicas != settings.replicas:
        found.append(f"replicas {config.num_replicas} → {settings.replicas}")
    return found


async def _owners(conn: Connection) -> set[str]:
    """The tenants that own registered models."""
    specs = await (await Registry.open(conn)).list_specs()
    return {spec.tenant for spec in specs if spec.tenant}


async def ensure_consumer(
    js: JetStreamContext, model: str, version: str, priority: str, *, ack_wait_s: float, max_attempts: int
) -> str:
    """The durable pull consumer shared by all replicas of one subject; returns its name. Its settings
    come from the registered spec (the same for every worker), so creating it again changes nothing."""
    name = consumer_name(model, version, priority)
    subject = infer_subject(model, version, priority)
    config = ConsumerConfig(
        durable_name=name,
        # Its requests, those a worker queued again out of a redelivered bundle, and batch jobs' items.
        filter_subjects=[subject, requeue_subject(subject), job_subject(subject)],
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait_s,
        # A request held (not computed) by a worker that crashed is delivered again without being
        # charged an attempt (workers/attempts.py), so deliveries may exceed attempts; the last one
        # lets a worker answer "gave up" instead of the message sitting undeliverable forever.
        max_deliver=max_deliveries(max_attempts) + 1,
        max_waiting=1024,
        max_ack_pending=-1,
    )
    # Creating an existing durable with changed settings updates it in place.
    await js.add_consumer(STREAM_INFER, config)
    return name


async def ensure_claims_bucket(js: JetStreamContext, settings: Settings, bucket: str = BUCKET_CLAIMS) -> bool:
    """An object store of claim-checked payloads (its TTL removes what nobody deleted); True if made now."""
    try:
        await js.stream_info(f"OBJ_{bucket}")
        return False
    except NotFoundError:
        pass
    config = ObjectStoreConfig(ttl=settings.claim_ttl_s, storage=_storage(settings), replicas=settings.replicas)
    await js.create_object_store(bucket, config)
    return True
