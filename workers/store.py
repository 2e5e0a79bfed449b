"""ArtifactStore: model artifacts from local disk or S3, through a verified, size-limited LRU cache.

Downloads go to a temp file and are renamed into place only once complete and verified (size,
and sha256 when the spec has one), so a half-written file is never loaded. Concurrent loads of
one artifact share one download. Failures come back as ModelFailure naming the cause.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.errors import ModelFailure
from schemas.spec import VersionSpec

__all__ = ["ArtifactStore", "StoreSettings", "s3_call", "split_s3_uri"]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


class StoreSettings(BaseModel):
    s3_endpoint_url: str | None = None  # e.g. http://127.0.0.1:8333 for a local S3 server
    s3_region: str = "us-east-1"
    # Unset: the standard AWS variables and files decide (the usual way to give credentials).
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    cache_dir: Path = Path(os.path.expanduser("~/.cache/servemesh/artifacts"))
    cache_max_mb: int = Field(default=10_240, ge=1)

    @classmethod
    def from_env(cls) -> StoreSettings:
        """``SERVEMESH_S3_ENDPOINT_URL``, ``SERVEMESH_CACHE_DIR``...; credentials: the standard AWS variables."""
        return cls(**_EnvStoreSettings().model_dump())


class _EnvStoreSettings(BaseSettings, StoreSettings):
    model_config = SettingsConfigDict(env_prefix="SERVEMESH_", extra="ignore")


def split_s3_uri(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3://bucket/key URI: {uri!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ArtifactStore:
    def __init__(self, settings: StoreSettings | None = None) -> None:
        self.settings = settings or StoreSettings()
        self.settings.cache_dir.mkdir(parents=True, exist_ok=True)
        self._inflight: dict[Path, asyncio.Future[Path]] = {}
        self.hits = self.misses = 0

    async def fetch(self, vspec: VersionSpec) -> Path:
        """A local path holding the verified artifact of ``vspec`` (downloading it if need be)."""
        scheme = urlparse(vspec.uri).scheme
        if scheme in ("", "file"):
            path = Path(unquote(urlparse(vspec.uri).path))
            if not path.exists():
                raise ModelFailure(f"artifact {vspec.uri} does not exist", uri=vspec.uri)
            await self._verify(path, vspec)
            return path
        if scheme == "s3":
            return await self._fetch_s3(vspec)
        raise ModelFailure(f"artifact {vspec.uri}: scheme {scheme!r} is not supported", uri=vspec.uri)

    async def _verify(self, path: Path, vspec: VersionSpec) -> None:
        size = path.stat().st_size
        if vspec.size is not None and size != vspec.size:
            raise ModelFailure(f"artifact {vspec.uri} is {size} bytes, expected {vspec.size} (truncated?)")
        if vspec.sha256:
            digest = await asyncio.get_running_loop().run_in_executor(None, _sha256, path)
            if digest != vspec.sha256:
                raise ModelFailure(f"artifact {vspec.uri} fails its sha256 check (corrupt?)", uri=vspec.uri)

    async def _fetch_s3(self, vspec: VersionSpec) -> Path:
        bucket, key = split_s3_uri(vspec.uri)
        async with self.client() as s3:
            head = await s3_call(s3.head_object(Bucket=bucket, Key=key), vspec.uri)
            etag = str(head["ETag"]).strip('"')
            size = int(head["ContentLength"])
            name = hashlib.sha256(vspec.uri.encode()).hexdigest()[:32]
            path = self.settings.cache_dir / f"{name}-{etag.replace('-', '_')}{Path(key).suffix}"
            if path.exists() and path.stat().st_size == size:
                self.hits += 1
                os.utime(path)  # most recently used
                return path
            self.misses += 1
            shared = self._inflight.get(path)
            if shared is not None:  # another load of the same artifact is downloading it
                return await shared
            future: asyncio.Future[Path] = asyncio.get_running_loop().create_future()
            self._inflight[path] = future
            try:
                await self._download(s3, bucket, key, size, path, vspec)
                future.set_result(path)
            except BaseException as exc:
                future.set_exception(exc)
                raise
            finally:
                del self._inflight[path]
                if future.done() and not future.cancelled():
                    future.exception()  # retrieved: a failure nobody else awaited is not reported twice
        await asyncio.get_running_loop().run_in_executor(None, self._evict, path)
        return path

    async def _download(self, s3: Any, bucket: str, key: str, size: int, path: Path, vspec: VersionSpec) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        started, done, next_report = time.monotonic(), 0, 0.1
        try:
            response = await s3_call(s3.get_object(Bucket=bucket, Key=key), vspec.uri)
            with tmp.open("wb") as out:
                async for chunk in response["Body"].iter_chunks(_CHUNK):
                    out.write(chunk)
                    done += len(chunk)
                    if size > 8 * _CHUNK and done / size >= next_report:
                        log.info("downloading %s: %d%% of %.1f MiB", vspec.uri, 100 * done // size, size / _CHUNK)
                        next_report += 0.1
            if done != size:
                raise ModelFailure(f"download of {vspec.uri} ended at {done} of {size} bytes", uri=vspec.uri)
            await self._verify(tmp, vspec.model_copy(update={"size": size if vspec.size is None else vspec.size}))
            os.replace(tmp, path)  # atomic: the cache never shows a partial file
            rate = size / _CHUNK / max(1e-6, time.monotonic() - started)
            log.info("fetched %s (%.1f MiB at %.0f MiB/s)", vspec.uri, size / _CHUNK, rate)
        finally:
            tmp.unlink(missing_ok=True)

    def _evict(self, keep: Path) -> None:
        """Least recently used files go first until the cache fits its budget."""
        files = sorted((p for p in self.settings.cache_dir.iterdir() if p.is_file() and not p.name.startswith(".")),
                       key=lambda p: p.stat().st_mtime)  # fmt: skip
        total = sum(p.stat().st_size for p in files)
        budget = self.settings.cache_max_mb * _CHUNK
        for victim in files:
            if total <= budget:
                break
            if victim == keep:
                continue
            total -= victim.stat().st_size
            victim.unlink(missing_ok=True)
            log.info("cache full: evicted %s", victim.name)

    def client(self) -> Any:
        """An aioboto3 S3 client (async context manager) for this store's endpoint and region."""
        import aioboto3  # only workers with S3 repositories need it

        session = aioboto3.Session(
            region_name=self.settings.s3_region,
            aws_access_key_id=self.settings.s3_access_key_id,
            aws_secret_access_key=self.settings.s3_secret_access_key,
        )
        from aiobotocore.config import AioConfig

        # Few retries: a worker that cannot reach S3 should say so in seconds, then retry on its own backoff.
        config = AioConfig(connect_timeout=5, read_timeout=60, retries={"max_attempts": 2, "mode": "standard"})
        return session.client("s3", endpoint_url=self.settings.s3_endpoint_url, config=config)


async def s3_call(call: Any, uri: str) -> Any:
    """Await an S3 call, translating botocore's errors into ModelFailure with the cause spelled out."""
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

    try:
        return await call
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        reason = {"404": "no such key", "NoSuchKey": "no such key", "NoSuchBucket": "no such bucket",
                  "403": "access denied", "AccessDenied": "access denied", "InvalidAccessKeyId": "access denied",
                  "SignatureDoesNotMatch": "access denied"}.get(code, f"S3 error {code}")  # fmt: skip
        raise ModelFailure(f"artifact {uri}: {reason}", uri=uri, s3_code=code) from exc
    except EndpointConnectionError as exc:
        raise ModelFailure(f"artifact {uri}: S3 unreachable ({exc})", uri=uri) from exc
    except BotoCoreError as exc:
        raise ModelFailure(f"artifact {uri}: {exc}", uri=uri) from exc
