"""ModelSpec rules, subject names, and reading a model repository from disk."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from examples.build_models import build_identity_onnx
from schemas.spec import ModelSpec, VersionSpec
from schemas.subjects import (
    check_name,
    consumer_name,
    infer_subject,
    is_claims_bucket,
    is_reply_subject,
    parse_infer_subject,
)
from workers.repository import read_repository
from workers.runtimes import runtime_threads


def test_version_resolution_prefers_explicit_then_default_then_newest() -> None:
    versions = {v: VersionSpec(uri=f"file:///{v}") for v in ("1", "2", "10")}
    spec = ModelSpec(name="m", versions=versions)
    assert spec.resolve_version(None) == "10"
    assert spec.resolve_version("2") == "2"
    assert ModelSpec(name="m", versions=versions, default_version="2").resolve_version(None) == "2"
    with pytest.raises(ValidationError):
        ModelSpec(name="m", versions=versions, default_version="3")


@pytest.mark.parametrize(("setting", "instances", "cores", "threads"), [
    (0, 1, 8, 0),  # one instance: the runtime's own default
    (0, 2, 8, 4),  # several: the cores shared among them
    (0, 3, 2, 1),  # never fewer than one thread
    (6, 2, 8, 6),  # the worker's setting wins
])  # fmt: skip
def test_instances_share_the_cores(
    monkeypatch: pytest.MonkeyPatch, setting: int, instances: int, cores: int, threads: int
) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    assert runtime_threads(setting, instances) == threads
    versions = {"1": VersionSpec(uri="file:///m")}
    assert ModelSpec(name="m", versions=versions, instances=instances).instances == instances
    with pytest.raises(ValidationError):
        ModelSpec(name="m", versions=versions, instances=0)


@pytest.mark.parametrize("bad", ["", "a.b", "a b", "a*", ">", "-lead", "iris\n"])
def test_invalid_model_names_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        check_name(bad)
    with pytest.raises(ValueError):
        check_name("iris", bad or "\n")  # the same rules for versions (a final line break too)


def test_subjects_and_consumer_names_round_trip() -> None:
    subject = infer_subject("my_model", "3", "high")
    assert subject == "mesh.infer.my_model.3.high"
    assert parse_infer_subject(subject) == ("my_model", "3", "high")
    assert consumer_name("a_b", "1", "low") == "infer_a_b_1_low"
    # consumer_name("a", "b_1", ...) would collide with it, which is why versions refuse "_".
    with pytest.raises(ValueError):
        check_name("a", "b_1")


def test_repository_reads_good_models_and_reports_broken_ones(tmp_path: Path) -> None:
    build_identity_onnx(tmp_path, "good", "int32", shape=(2,))
    (tmp_path / "empty" / "1").mkdir(parents=True)
    build_identity_onnx(tmp_path, "badconfig", "float32")
    (tmp_path / "badconfig" / "servemesh.yaml").write_text("max_batch_size: -3\n")
    specs, errors = read_repository(tmp_path)
    assert [s.name for s in specs] == ["good"]
    good = specs[0]
    assert good.versions["1"].format == "onnx" and good.versions["1"].sha256 and good.max_batch_size == 64
    assert good.inputs[0].dtype == "int32" and good.inputs[0].shape == (2,)
    assert sorted(e.model for e in errors) == ["badconfig", "empty"]


def test_claims_buckets_are_the_shared_one_or_one_of_their_own() -> None:
    assert is_claims_bucket("mesh-claims") and is_claims_bucket("mesh-claims-tenant_a")
    for name in ("mesh-models", "mesh-claimsx", "mesh-claims-", "mesh-claims-a.b", "mesh-claims->", "OBJ_mesh-claims",
                 "mesh-claims-a\n"):  # fmt: skip
        assert not is_claims_bucket(name), name


def test_reply_subjects_are_whole_publishable_subjects() -> None:
    assert is_reply_subject("_INBOX.abc.r.1") and is_reply_subject("a")
    for bad in ("", "a.b\n", "a..b", ".a", "a.", "a b", "a.*", "a.>", "a\tb", "x" * 1025):
        assert not is_reply_subject(bad), bad
