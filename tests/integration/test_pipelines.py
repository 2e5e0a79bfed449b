"""Async pipelines and fire-and-forget: stages chained through their own queues, errors naming
the stage, priority and deadline carried through, replies read from a subject of one's own."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from broker import NatsServer
from examples.build_models import build_iris_onnx
from schemas.errors import BadInput, DeadlineExceeded
from schemas.subjects import STREAM_INFER, consumer_name
from servemesh import MeshClient
from tests.conftest import serving, unique


def build_scale(repo: Path, name: str, factor: float, out_dtype: int = TensorProto.FLOAT) -> Path:
    """A preprocessing stage: ``input`` = raw × factor (so its output feeds a model taking ``input``)."""
    nodes = [
        helper.make_node("Mul", ["raw", "factor"], ["scaled"]),
        helper.make_node("Cast", ["scaled"], ["input"], to=out_dtype),
    ]
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("raw", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("input", out_dtype, ["batch", 4])],
        [helper.make_tensor("factor", TensorProto.FLOAT, [], [factor])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    (repo / name / "1").mkdir(parents=True)
    onnx.save(model, str(repo / name / "1" / "model.onnx"))
    (repo / name / "servemesh.yaml").write_text("max_batch_size: 32\nmax_delay_ms: 2\n")
    return repo / name


def build_passthrough(repo: Path, name: str, input_name: str) -> Path:
    """An unbatched stage returning its float32 [4] input as ``out``."""
    graph = helper.make_graph(
        [helper.make_node("Identity", [input_name], ["out"])], name,
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    (repo / name / "1").mkdir(parents=True)
    onnx.save(model, str(repo / name / "1" / "model.onnx"))
    return repo / name


@pytest.fixture
def stages(tmp_path: Path) -> tuple[Path, str, str]:
    prep, clf = unique("prep"), unique("clf")
    build_scale(tmp_path, prep, 0.5)
    build_iris_onnx(tmp_path, name=clf)
    return tmp_path, prep, clf


def _iris_direct(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip(["probabilities", "label"], session.run(["probabilities", "label"], {"input": x}), strict=True))


async def test_declared_pipeline_equals_the_stages_called_by_hand(
    nats_server: NatsServer, stages: tuple[Path, str, str], client: MeshClient
) -> None:
    repo, prep, clf = stages
    raw = np.random.default_rng(3).uniform(0, 16, (5, 4)).astype(np.float32)
    async with serving(nats_server.url, repo, [prep, clf]):
        outputs = await client.infer([prep, clf], {"raw": raw}, priority="high")
        pinned = await client.infer([f"{prep}:1", f"{clf}:1"], {"raw": raw})
    expected = _iris_direct(repo / clf / "1" / "model.onnx", raw * 0.5)
    np.testing.assert_array_equal(outputs["label"], expected["label"])
    np.testing.assert_allclose(outputs["probabilities"], expected["probabilities"], rtol=1e-6)
    np.testing.assert_array_equal(pinned["label"], expected["label"])
    info = await client._conn.js.consumer_info(STREAM_INFER, consumer_name(clf, "1", "high"))
    assert info.delivered.consumer_seq == 1  # the high request stayed high through every stage


async def test_named_pipeline_is_called_like_a_model(
    nats_server: NatsServer, stages: tuple[Path, str, str], client: MeshClient
) -> None:
    repo, prep, clf = stages
    name = unique("pipe")
    async with serving(nats_server.url, repo, [prep, clf]):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "servemesh", "pipelines", "add", name, prep, clf, "--json", "--nats", nats_server.url,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await proc.communicate()
        assert proc.returncode == 0 and json.loads(out)["stages"] == [prep, clf]
        raw = np.full((1, 4), 10.0, np.float32)
        outputs = await client.infer(name, {"raw": raw})
    expected = _iris_direct(repo / clf / "1" / "model.onnx", raw * 0.5)
    np.testing.assert_array_equal(outputs["label"], expected["label"])


async def test_an_error_names_the_failing_stage(nats_server: NatsServer, tmp_path: Path, client: MeshClient) -> None:
    prep, clf = unique("prep64"), unique("clf")
    build_scale(tmp_path, prep, 1.0, out_dtype=TensorProto.DOUBLE)  # hands clf float64: wrong dtype
    build_iris_onnx(tmp_path, name=clf)
    async with serving(nats_server.url, tmp_path, [prep, clf]):
        with pytest.raises(BadInput) as err:
            await client.infer([prep, clf], {"raw": np.ones((1, 4), np.float32)})
        assert err.value.data["stage"] == f"{clf}:1" and "must be float32" in err.value.message
        with pytest.raises(BadInput) as err:
            await client.infer([prep, clf], {"raw": np.ones((1, 5), np.float32)})
        assert err.value.data["stage"] == f"{prep}:1"


async def test_the_deadline_holds_across_stages(nats_server: NatsServer, tmp_path: Path, client: MeshClient) -> None:
    from tests.integration.test_redelivery import _build_spin_model

    spin, after = unique("spin"), unique("after")
    _build_spin_model(tmp_path, spin)  # x [4], n [] → y [4]; takes as long as n asks
    build_passthrough(tmp_path, after, "y")  # takes what spin gives
    async with serving(nats_server.url, tmp_path, [spin, after]) as worker:
        with pytest.raises(DeadlineExceeded):
            await client.infer([spin, after], {"x": np.ones(4, np.float32), "n": np.array(600_000)}, timeout=0.3)
        stats = worker.servers[(after, "1")].stats
        await _until(lambda: stats.expired == 1)
    assert stats.succeeded == 0  # the second stage never computed it: its deadline had passed


async def _until(condition: object, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_fire_and_forget_replies_arrive_on_the_chosen_subject(
    nats_server: NatsServer, stages: tuple[Path, str, str], client: MeshClient
) -> None:
    repo, prep, clf = stages
    subject = f"results.{unique('app')}"
    results = await client.subscribe_results(subject)  # subscribed from here on
    async with serving(nats_server.url, repo, [prep, clf]):
        sent = [
            await client.publish(clf, {"input": np.full((1, 4), i, np.float32)}, reply_to=subject) for i in range(3)
        ]
        bad = await client.publish(clf, {"input": np.ones((1, 3), np.float32)}, reply_to=subject)
        got = {}
        while len(got) < 4:
            result = await asyncio.wait_for(results.__anext__(), 10)
            got[result.request_id] = result
    await results.aclose()
    assert set(got) == {*sent, bad}
    assert all(got[r].reply is not None and got[r].reply.outputs["label"].shape == (1,) for r in sent)
    assert isinstance(got[bad].error, BadInput)
