"""Read a local model repository: ``<repo>/<model>/<version>/model.onnx|model.pt2|model.pt`` plus an
optional ``<repo>/<model>/servemesh.yaml`` (or ``.toml``) holding the rest of the ModelSpec."""

from __future__ import annotations

import difflib
import hashlib
import logging
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from schemas.spec import ModelSpec, VersionSpec
from schemas.subjects import check_name
from workers.runtimes import ARTIFACT_NAMES

__all__ = ["ModelConfigError", "RepositoryError", "read_model", "read_repository"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RepositoryError:
    model: str
    reason: str


class ModelConfigError(ValueError):
    """A model directory whose settings cannot be used; the message is one line naming the file."""


# Settings a servemesh.yaml may hold: the ModelSpec's, less what the directory itself gives.
_SETTINGS = (set(ModelSpec.model_fields) - {"name", "versions", "spec_version"}) | {"format"}


def _config(model_dir: Path) -> tuple[dict[str, Any], Path | None]:
    for name in ("servemesh.yaml", "servemesh.yml", "servemesh.toml"):
        path = model_dir / name
        if not path.exists():
            continue
        try:
            raw = tomllib.loads(path.read_text()) if name.endswith(".toml") else yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark is not None else ""
            raise ModelConfigError(f"{path}: not valid YAML ({where}{getattr(exc, 'problem', None) or exc})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ModelConfigError(f"{path}: not valid TOML ({exc})") from None
        if raw is None:
            return {}, path
        if not isinstance(raw, dict):
            raise ModelConfigError(f"{path}: expected settings as key: value lines, got {type(raw).__name__}")
        for key in raw:
            if key not in _SETTINGS:
                near = difflib.get_close_matches(str(key), sorted(_SETTINGS), n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else f"; known: {', '.join(sorted(_SETTINGS))}"
                raise ModelConfigError(f"{path}: unknown setting {key!r}{hint}")
        return dict(raw), path
    return {}, None


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
    """The ModelSpec of one model directory (blocking: hashes artifacts); ModelConfigError, with one
    line naming what is wrong, for one that cannot be used."""
    if not model_dir.is_dir():
        raise ModelConfigError(f"{model_dir}: no such model directory")
    try:
        check_name(model_dir.name)
    except ValueError as exc:
        raise ModelConfigError(f"{model_dir}: {exc}") from None
    config, path = _config(model_dir)
    fmt = config.pop("format", None)
    versions = _versions(model_dir, fmt)
    if not versions:
        names = " or ".join(f"<version>/{artifact}" for artifact in ARTIFACT_NAMES.values())
        raise ModelConfigError(f"{model_dir}: no model version in it (expected {names})")
    try:
        return ModelSpec(name=model_dir.name, versions=versions, **config)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first.get("loc", ())) or "settings"
        raise ModelConfigError(f"{path or model_dir}: {field}: {first.get('msg')}") from None


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
