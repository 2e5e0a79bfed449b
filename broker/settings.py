"""Settings of every servemesh process: a typed object, read from ``SERVEMESH_*`` only at entry points."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseModel):
    nats_url: str = "nats://127.0.0.1:4222"
    # Messages one model/version/priority subject may hold before publishes get 429 (a message is a
    # request, or a client's bundle of concurrent requests: servemesh/outbox.py).
    max_queue: int = Field(default=10_000, ge=1)
    # A client's requests for the same subject published in one turn of its event loop go out as
    # one stream message (servemesh/outbox.py). A bundle counts as one message against max_queue.
    coalesce: bool = True
    # "file" survives a nats-server restart; "memory" is for throwaway meshes.
    storage: str = Field(default="file", pattern="^(file|memory)$")
    replicas: int = Field(default=1, ge=1, le=5)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    # How long a client (and every CLI command) tries to reach NATS the first time before it gives up
    # with "cannot reach NATS"; workers and routers keep trying until the server answers.
    connect_wait_s: float = Field(default=5.0, gt=0)
    # Compute threads per model runtime (0: the runtime's default, usually one per core).
    runtime_threads: int = Field(default=0, ge=0)
    # Event loop of servemesh processes: uvloop when installed ("auto"), or force one.
    loop: str = Field(default="auto", pattern="^(auto|asyncio|uvloop)$")
    # A worker whose model has requests waiting (held, or queued in the stream) and has answered none
    # of them for this long reports itself not ready, saying why (``models show``, /health/ready).
    stall_after_s: float = Field(default=60.0, gt=0)
    # A worker told to stop finishes what it holds for at most this long; what it has not answered by
    # then is redelivered to another replica after its ack wait.
    drain_timeout_s: float = Field(default=30.0, gt=0)
    # Port of a worker's or router's HTTP endpoint (/metrics, /health/live, /health/ready); 0: off.
    http_port: int = Field(default=0, ge=0, le=65535)
    # Address it binds: loopback unless widened (0.0.0.0 in a container, for the scraper and probes).
    http_host: str = "127.0.0.1"
    # Log lines as JSON objects (with trace and request ids) instead of text.
    log_json: bool = False
    # Credentials and TLS (docs/security.md); all optional. Secrets are SecretStr so that no
    # repr or log line shows them.
    user: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None
    nkey_seed: SecretStr | None = None  # an NKey seed ("SU..."), or the path of a file holding one
    creds_file: str | None = None  # a .creds file (JWT + seed), for servers in operator mode
    tls_ca: str | None = None  # CA bundle that signed the server's certificate (else the system's)
    tls_cert: str | None = None  # client certificate, for servers that verify clients
    tls_key: str | None = None
    # S3 for job inputs and outputs given as s3:// URIs (credentials: the standard AWS variables).
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    # Claim check: a request or reply above claim_threshold bytes (0: half the server's max_payload)
    # travels through the object store bucket mesh-claims, the message carrying a reference. Off:
    # requests above max_payload are refused. Objects expire after claim_ttl_s (set when the
    # bucket is created); a claim above claim_max_bytes is refused.
    claims: bool = True
    claim_threshold: int = Field(default=0, ge=0)
    claim_max_bytes: int = Field(default=256 * 2**20, ge=1)
    claim_ttl_s: float = Field(default=900.0, gt=0)
    # Where this process stores its claim-checked payloads: mesh-claims, or a bucket of its own
    # (mesh-claims-<tenant>) where users must not read each other's (deploy/nats/accounts.conf).
    claim_bucket: str = Field(default="mesh-claims", pattern=r"^mesh-claims(-[A-Za-z0-9_-]{1,52})?$")
    # Reply inboxes are subjects under this prefix; a restricted user may subscribe only to its own.
    inbox_prefix: str = Field(default="_INBOX", pattern=r"^[^\s*>.]+(\.[^\s*>.]+)*$")

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> Settings:
        return cls(nats_url=url, **overrides)

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Read ``SERVEMESH_*`` variables; explicit overrides (e.g. CLI flags) win."""
        values = _EnvSettings().model_dump()
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


class _EnvSettings(BaseSettings, Settings):
    model_config = SettingsConfigDict(env_prefix="SERVEMESH_", extra="ignore")
