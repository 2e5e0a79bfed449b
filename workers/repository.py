"""Read a local model repository: ``<repo>/<model>/<version>/model.onnx|model.pt`` plus an
optional ``<repo>/<model>/servemesh.yaml`` (or ``.toml``) holding the rest of the ModelSpec."""

from __future__ import annotations

import hashlib
import logging
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from schemas.spec import ModelSpec, VersionSpec
from workers.runtimes import ARTIFACT_NAMES

__all__ = ["RepositoryError", "read_model", "read_repository"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RepositoryError:
    model: str
    reason: str


def _config(model_dir: Path) -> dict[str, Any]:
    for name, parse in (("servemesh.yaml", yaml.safe_load), ("servemesh.yml", yaml.safe_load)):
        path = model_dir / name
        if path.exists():
            return dict(parse(path.read_text()) or {})
    toml_path = model_dir / "servemesh.toml"
    if toml_path.exists():
        return tomllib.loads(toml_path.read_text())
    return {}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _versions(model_dir: Path, fmt: str | None) -> dict[str, VersionSpec]:
    versions = {}
    for version_dir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
        for candidate, artifact_name in ARTIFACT_NAMES.items():
            artifact = version_dir / artifact_name
            if artifact.exists() and fmt in (None, candidate):
                versions[version_dir.name] = VersionSpec(
                    uri=artifact.resolve().as_uri(),
                    format=candidate,
                    size=artifact.stat().st_size,
                    sha256=_sha256(artifact),
                )
                break
    return versions


def read_model(model_dir: Path) -> ModelSpec:
    """The ModelSpec of one model directory (blocking: hashes artifacts)."""
    config = _config(model_dir)
    fmt = config.pop("format", None)
    versions = _versions(model_dir, fmt)
    if not versions:
        raise ValueError(f"no <version>/model.onnx or <version>/model.pt under {model_dir}")
    return ModelSpec(name=model_dir.name, versions=versions, **config)


def read_repository(repo: Path) -> tuple[list[ModelSpec], list[RepositoryError]]:
    """Every readable model of ``repo``; a broken model is reported, never fatal to the rest."""
    specs: list[ModelSpec] = []
    errors: list[RepositoryError] = []
    if not repo.is_dir():
        raise FileNotFoundError(f"model repository {repo} is not a directory")
    for model_dir in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            specs.append(read_model(model_dir))
        except (ValueError, ValidationError, OSError, yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
            log.error("skipping model %s: %s", model_dir.name, exc)
            errors.append(RepositoryError(model_dir.name, str(exc)))
    return specs, errors
