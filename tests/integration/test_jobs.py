"""Batch jobs: results stored once per item and readable by anyone later, surviving a worker
crash, cancellable, failures reported per item, and never ahead of interactive traffic."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import numpy as np
import onnxruntime as ort

from broker import Connection, NatsServer, Registry, Settings, provision
from examples.build_models import build_identity_onnx, build_slow_onnx
from schemas.errors import BadInput
from servemesh import MeshClient
from servemesh.local import spawn_worker, wait_workers_ready
from tests.conftest import serving, set_config, unique


async def _collect(job, follow: bool = True) -> dict[int, object]:  # type: ignore[no-untyped-def]
    results = {}
    async for result in job.results(follow=follow):
        assert result.index not in results, "a result came twice"
        results[result.index] = result
    return results


async def test_job_from_a_generator_gives_every_result_once(
    nats_server: NatsServer, tmp_path: Path, client: MeshClient
) -> None:
    name = unique("ident")
    build_identity_onnx(tmp_path, name, "int32", shape=(3,))
    items = ({"input": np.full((1, 3), i, np.int32)} for i in range(300))
    async with serving(nats_server.url, tmp_path, [name]):
        job = await client.submit_job(name, items)
        assert await job.submitted() == 300
        status = await asyncio.wait_for(job.wait(), 60)
        results = await _collect(job)
    assert status.state == "done" and status.total == 300 and status.done == 300 and status.failed == 0
    assert sorted(results) == list(range(300))
    for i, result in results.items():
        np.testing.assert_array_equal(result.reply.outputs["output"], np.full((1, 3), i, np.int32))


async def test_results_outlive_the_client_that_submitted_them(nats_server: NatsServer, tmp_path: Path) -> None:
    name = unique("slowjob")
    build_slow_onnx(tmp_path, name, max_batch_size=8)
    x = np.random.default_rng(5).standard_normal((120, 256)).astype(np.float32)
    np.save(tmp_path / "items.npy", x)
    async with serving(nats_server.url, tmp_path, [name]):
        first = await MeshClient.connect(nats_server.url)
        job = await first.submit_job(name, tmp_path / "items.npy")
        await job.submitted()
        await first.close()  # the submitting client goes away; the job goes on
        async with await MeshClient.connect(nats_server.url) as later:
            again = await later.job(job.id)
            await asyncio.wait_for(again.wait(), 60)
            results = await _collect(again)
    session = ort.InferenceSession(str(tmp_path / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": x})[0]
    assert sorted(results) == list(range(120))
    for i, result in results.items():
        np.testing.assert_allclose(result.reply.outputs["output"][0], expected[i], rtol=1e-5, atol=1e-6)


async def test_job_survives_a_killed_worker_without_loss_or_duplicates(
    nats_server: NatsServer, tmp_path: Path, client: MeshClient
) -> None:
    name = unique("slowjob")
    set_config(build_slow_onnx(tmp_path, name, max_batch_size=4), ack_wait_s=2.0)
    conn = await Connection.open(Settings.from_url(nats_server.url))
    await provision(conn)
    ids = [unique("victim"), unique("survivor")]
    procs = {w: spawn_worker(nats_server.url, tmp_path, w, tmp_path / f"{w}.log") for w in ids}
    try:
        await wait_workers_ready(await Registry.open(conn), ids, timeout=60)
        job = await client.submit_job(name, ({"input": np.full((1, 256), i / 500, np.float32)} for i in range(500)))
        while (await job.status()).done < 50:
            await asyncio.sleep(0.02)
        procs[ids[0]].send_signal(signal.SIGKILL)
        status = await asyncio.wait_for(job.wait(), 90)
        results = await _collect(job)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        await conn.close()
    assert status.done == 500 and status.failed == 0  # stored once each: no duplicates counted
    assert sorted(results) == list(range(500))


async def test_cancel_stops_the_work_and_failed_items_are_reported(
    nats_server: NatsServer, tmp_path: Path, client: MeshClient
) -> None:
    name = unique("slowjob")
    build_slow_onnx(tmp_path, name, max_batch_size=1, max_delay_ms=0)
    good = {"input": np.ones((1, 256), np.float32)}
    bad = {"input": np.ones((1, 7), np.float32)}
    async with serving(nats_server.url, tmp_path, [name]):
        job = await client.submit_job(name, (bad if i % 100 == 3 else good for i in range(2000)))
        while (await job.status()).done < 20:
            await asyncio.sleep(0.02)
        await job.cancel()
        await asyncio.sleep(1.5)  # in-flight batches finish; nothing new starts
        settled = (await job.status()).done
        await asyncio.sleep(1.0)
        status = await job.status()
        failures = [r for r in (await _collect(job, follow=False)).values() if r.error is not None]
    assert status.state == "cancelled"
    assert status.done == settled < 2000  # stopped, well short of the end
    assert failures and all(isinstance(r.error, BadInput) and r.index % 100 == 3 for r in failures)


async def test_interactive_requests_are_served_ahead_of_a_running_job(
    nats_server: NatsServer, tmp_path: Path, client: MeshClient
) -> None:
    name = unique("slowjob")
    build_slow_onnx(tmp_path, name, max_batch_size=4, max_delay_ms=1)
    x = np.ones((1, 256), np.float32)

    async def interactive_p99() -> float:
        latencies = []
        for _ in range(10):
            started = asyncio.get_running_loop().time()
            await client.infer(name, {"input": x}, timeout=30)
            latencies.append(asyncio.get_running_loop().time() - started)
        return float(np.percentile(latencies, 99))

    async with serving(nats_server.url, tmp_path, [name]):
        alone = await interactive_p99()
        job = await client.submit_job(name, ({"input": x} for _ in range(600)))
        await job.submitted()
        started = asyncio.get_running_loop().time()
        beside_job = await interactive_p99()
        status = await job.status()
        await job.wait()
        backlog_s = asyncio.get_running_loop().time() - started  # how long the job's queue took to drain
    print(f"interactive p99 alone {alone * 1000:.1f} ms, beside a 600-item job {beside_job * 1000:.1f} ms")
    # Ten requests sent one after another behind 600 queued job items were all answered while
    # most of the job still waited, each far sooner than the job's backlog took to drain.
    assert status.done + status.failed < 300
    assert beside_job < backlog_s / 5


async def test_jobs_command_line_submit_follow_and_write_results(nats_server: NatsServer, tmp_path: Path) -> None:
    import json
    import sys

    name = unique("ident")
    build_identity_onnx(tmp_path / "repo", name, "float32", shape=(2,))
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    np.save(tmp_path / "items.npy", x)

    async def servemesh(*args: str) -> dict:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "servemesh", "jobs", *args, "--json", "--nats", nats_server.url,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0
        return json.loads(out)

    async with serving(nats_server.url, tmp_path / "repo", [name]):
        done = await servemesh(
            "submit", name, "--input", str(tmp_path / "items.npy"), "--output", str(tmp_path / "out.npz")
        )
    assert done["state"] == "done" and done["done"] == 20 and done["written"] == 20
    written = np.load(tmp_path / "out.npz")
    np.testing.assert_array_equal(written["output"], x)
    assert written["failed"].size == 0
    status = await servemesh("status", done["id"])
    assert status["state"] == "done" and status["total"] == 20
    assert any(job["id"] == done["id"] for job in await servemesh("list"))


async def test_resubmitting_a_job_id_after_a_client_restart_duplicates_nothing(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    name = unique("ident")
    build_identity_onnx(tmp_path, name, "int64", shape=(1,))
    job_id = unique("nightly")

    def items() -> object:
        return ({"input": np.full((1, 1), i, np.int64)} for i in range(80))

    async with serving(nats_server.url, tmp_path, [name]):
        async with await MeshClient.connect(nats_server.url) as first:
            await asyncio.wait_for((await first.submit_job(name, items(), job_id=job_id)).wait(), 60)
        # The submitting process "restarts" and, not knowing how far it got, submits everything again.
        async with await MeshClient.connect(nats_server.url) as again:
            job = await again.submit_job(name, items(), job_id=job_id)
            status = await asyncio.wait_for(job.wait(), 60)
            results = await _collect(job)
    assert status.done == 80 and status.failed == 0  # each result stored once
    assert sorted(results) == list(range(80))
