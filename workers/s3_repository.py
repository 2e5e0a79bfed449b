"""Read a model repository kept on S3, laid out like a local one:
``s3://bucket/prefix/<model>/<version>/model.onnx|model.pt2|model.pt`` and ``.../<model>/servemesh.yaml``."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import yaml
from pydantic import ValidationError

from schemas.spec import ModelSpec, VersionSpec
from workers.repository import RepositoryError
from workers.runtimes import ARTIFACT_NAMES
from workers.store import ArtifactStore, s3_call, split_s3_uri

__all__ = ["read_s3_model", "read_s3_repository"]

_FORMATS = {name: fmt for fmt, name in ARTIFACT_NAMES.items()}


async def _listing(s3: Any, bucket: str, prefix: str, uri: str) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    token: str | None = None
    while True:
        extra = {"ContinuationToken": token} if token else {}
        page = await s3_call(s3.list_objects_v2(Bucket=bucket, Prefix=prefix, **extra), uri)
        objects += page.get("Contents", [])
        if not page.get("IsTruncated"):
            return objects
        token = page["NextContinuationToken"]


def _spec(
    name: str, bucket: str, model_prefix: str, objects: list[dict[str, Any]], config: dict[str, Any]
) -> ModelSpec:
    fmt = config.pop("format", None)
    versions = {}
    for obj in objects:
        parts = obj["Key"][len(model_prefix) :].split("/")
        if len(parts) == 2 and parts[1] in _FORMATS and fmt in (None, _FORMATS[parts[1]]):
            versions[parts[0]] = VersionSpec(uri=f"s3://{bucket}/{obj['Key']}", format=_FORMATS[parts[1]],
                                             size=int(obj["Size"]))  # fmt: skip
    if not versions:
        names = " or ".join(f"<version>/{artifact}" for artifact in ARTIFACT_NAMES.values())
        raise ValueError(f"no {names} under s3://{bucket}/{model_prefix}")
    return ModelSpec(name=name, versions=versions, **config)


async def _config(s3: Any, bucket: str, model_prefix: str, objects: list[dict[str, Any]]) -> dict[str, Any]:
    keys = {obj["Key"] for obj in objects}
    key = f"{model_prefix}servemesh.yaml"
    if key not in keys:
        return {}
    body = await s3_call(s3.get_object(Bucket=bucket, Key=key), f"s3://{bucket}/{key}")
    return dict(yaml.safe_load(await body["Body"].read()) or {})


async def read_s3_model(store: ArtifactStore, uri: str) -> ModelSpec:
    """The ModelSpec of the model at ``s3://bucket/.../<model>`` (its name is the last path part)."""
    bucket, prefix = split_s3_uri(uri.rstrip("/"))
    model_prefix = prefix + "/"
    async with store.client() as s3:
        objects = await _listing(s3, bucket, model_prefix, uri)
        config = await _config(s3, bucket, model_prefix, objects)
    return _spec(prefix.rsplit("/", 1)[-1], bucket, model_prefix, objects, config)


async def read_s3_repository(store: ArtifactStore, uri: str) -> tuple[list[ModelSpec], list[RepositoryError]]:
    """Every readable model under ``s3://bucket/prefix``; a broken one is reported, not fatal."""
    bucket, prefix = split_s3_uri(uri.rstrip("/") + "/")
    specs: list[ModelSpec] = []
    errors: list[RepositoryError] = []
    async with store.client() as s3:
        objects = await _listing(s3, bucket, prefix, uri)
        by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for obj in objects:
            rest = obj["Key"][len(prefix) :]
            if "/" in rest:
                by_model[rest.split("/", 1)[0]].append(obj)
        for name, model_objects in sorted(by_model.items()):
            model_prefix = f"{prefix}{name}/"
            try:
                config = await _config(s3, bucket, model_prefix, model_objects)
                specs.append(_spec(name, bucket, model_prefix, model_objects, config))
            except (ValueError, ValidationError, yaml.YAMLError) as exc:
                errors.append(RepositoryError(name, str(exc)))
    return specs, errors
