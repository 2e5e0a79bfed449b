"""S3 objects a client reads or writes around batch jobs: inputs fetched to a temporary file,
results uploaded from one. (Model artifacts have their own cached store on the workers.)"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from broker.settings import Settings
from schemas.errors import BadInput, MeshUnavailable

__all__ = ["download", "is_s3", "upload"]


def is_s3(location: object) -> bool:
    return isinstance(location, str) and location.startswith("s3://")


def _split(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if not parsed.netloc or not parsed.path.strip("/"):
        raise BadInput(f"not an s3://bucket/key URI: {uri!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def _client(settings: Settings) -> Any:
    import aioboto3

    return aioboto3.Session(region_name=settings.s3_region).client("s3", endpoint_url=settings.s3_endpoint_url)


async def download(settings: Settings, uri: str) -> Path:
    """``uri`` copied to a temporary file (same suffix); the caller removes it."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = _split(uri)
    handle = tempfile.NamedTemporaryFile(prefix="servemesh-", suffix=Path(key).suffix, delete=False)  # noqa: SIM115
    try:
        async with _client(settings) as s3:
            response = await s3.get_object(Bucket=bucket, Key=key)
            async for chunk in response["Body"].iter_chunks(1 << 20):
                handle.write(chunk)
    except (ClientError, BotoCoreError) as exc:
        Path(handle.name).unlink(missing_ok=True)
        raise MeshUnavailable(f"cannot read {uri}: {exc}") from exc
    finally:
        handle.close()
    return Path(handle.name)


async def upload(settings: Settings, path: Path, uri: str) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = _split(uri)
    try:
        async with _client(settings) as s3:
            await s3.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
    except (ClientError, BotoCoreError) as exc:
        raise MeshUnavailable(f"cannot write {uri}: {exc}") from exc
