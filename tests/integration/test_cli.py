"""The command line as a user runs it: `servemesh up`, `servemesh infer`, and the blocking client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from broker import NatsServer
from examples.build_models import build_identity_onnx
from schemas.errors import BadInput
from servemesh import SyncMeshClient
from tests.conftest import serving, unique, wait_for


async def _servemesh(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "servemesh", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_infer_command_prints_outputs_and_typed_errors(nats_server: NatsServer, tmp_path: Path) -> None:
    name = unique("ident")
    build_identity_onnx(tmp_path / "repo", name, "int32", shape=(3,))
    x = np.arange(6, dtype=np.int32).reshape(2, 3)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "bad.npy", x.astype(np.float32))
    async with serving(nats_server.url, tmp_path / "repo", [name]):
        code, out, _ = await _servemesh(
            "infer", name, "--input", f"input={tmp_path / 'x.npy'}", "--json", "--nats", nats_server.url
        )
        assert code == 0
        body = json.loads(out)
        assert body["outputs"]["output"] == x.tolist()
        assert body["timing"]["batch_size"] == 1
        code, out, _ = await _servemesh(
            "infer", name, "--input", f"input={tmp_path / 'bad.npy'}", "--json", "--nats", nats_server.url
        )
        assert code == 1
        assert json.loads(out)["status"] == 400


def test_sync_client_for_non_async_code(nats_server: NatsServer, tmp_path: Path) -> None:
    name = unique("ident")
    build_identity_onnx(tmp_path, name, "float64", shape=(2,))

    loop = asyncio.new_event_loop()
    done = asyncio.Event()
    ready = threading.Event()

    def run() -> None:
        async def main() -> None:
            async with serving(nats_server.url, tmp_path, [name]):
                ready.set()
                await done.wait()

        loop.run_until_complete(main())

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert ready.wait(60)
        with SyncMeshClient(nats_server.url) as client:
            x = np.array([[1.5, -2.0]])
            np.testing.assert_array_equal(client.infer(name, {"input": x})["output"], x)
            with pytest.raises(BadInput):
                client.infer(name, {"input": x.astype(np.float32)})
    finally:
        loop.call_soon_threadsafe(done.set)
        thread.join(30)


async def test_up_runs_a_mesh_and_stops_everything_it_started(tmp_path: Path) -> None:
    name = unique("ident")
    build_identity_onnx(tmp_path / "repo", name, "float32", shape=(2,))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "servemesh", "up", "--models", str(tmp_path / "repo"), "--workers", "2", "--port", "-1",
        "--state-dir", str(tmp_path / "state"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        progress = []  # startup progress, as it happens, then the summary line
        while not (line := (await asyncio.wait_for(proc.stdout.readline(), 90)).decode()).startswith("servemesh up:"):
            assert line, progress
            progress.append(line)
        assert progress[0].startswith("nats-server ready at") and any(f"{name}:1 ready on" in p for p in progress)
        assert "1 of 1 model version(s) ready" in line, line
        url = line.split()[4].rstrip(";")
        from broker import Registry
        from servemesh import MeshClient

        async with await MeshClient.connect(url) as client:
            x = np.array([[3.0, 4.0]], np.float32)
            np.testing.assert_array_equal((await client.infer(name, {"input": x}))["output"], x)
            registry = await Registry.open(client._conn)

            async def both_beat() -> bool:  # the worker that answered may be the only one up yet
                return len(await registry.heartbeats()) == 2

            await wait_for(both_beat, timeout=60, what="a heartbeat from each of the 2 workers")
            pids = [beat["pid"] for beat in (await registry.heartbeats()).values()]
        assert len(pids) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 60)
    assert code == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    host, port = url.removeprefix("nats://").split(":")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=2).close()
