"""The JetStream store's disk fills, then is freed: requests fail fast with a typed 503 that says so
(not after their timeout), workers report not ready, `models show` names the stream, and the mesh
recovers by itself once the disk has room again, without restarting nats-server."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest

from broker import Connection, NatsServer, Registry, Settings
from schemas.errors import MeshError, MeshUnavailable
from schemas.subjects import STREAM_INFER
from servemesh import MeshClient
from servemesh.local import wait_workers_ready
from tests.conftest import provisioned, wait_for
from tests.faults.conftest import identity_repo
from tests.faults.fleet import Fleet
from tests.faults.load import Load
from tests.faults.report import record
from tests.integration.secure_mesh import free_ports


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs for the JetStream store (mounting needs root, as CI runs; unmounted after)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"this test mounts a small tmpfs and needs root: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def server(small_disk: Path, tmp_path: Path) -> Iterator[NatsServer]:
    with NatsServer(store_dir=small_disk / "nats", log_path=tmp_path / "nats-server.log") as nats_server:
        yield provisioned(nats_server)


@pytest.fixture
async def client(server: NatsServer) -> AsyncIterator[MeshClient]:
    async with await MeshClient.connect(server.url) as mesh_client:
        yield mesh_client


def fill(disk: Path) -> Path:
    """Write zeros until the disk is full; returns the file."""
    filler = disk / "filler"
    with open(filler, "wb") as out:
        try:
            while True:
                out.write(b"\0" * 2**20)
                out.flush()
        except OSError:
            pass
    return filler


def ready_code(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=3) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code


async def _models_show(url: str, model: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "servemesh", "models", "show", model, "--nats", url, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return out.decode()


async def test_a_full_disk_fails_requests_fast_and_the_mesh_recovers_by_itself(
    server: NatsServer, small_disk: Path, client: MeshClient, fleet: Fleet, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    model = identity_repo(repo, ack_wait_s=None)
    (http_port,) = free_ports(1)
    conn = await Connection.open(Settings.from_url(server.url))
    fleet.router("r1")
    fleet.worker("w1", repo, env={"SERVEMESH_HTTP_PORT": str(http_port)})
    await wait_workers_ready(await Registry.open(conn), ["w1"], timeout=60)
    x = {"input": np.ones((1, 4), np.float32)}
    started = time.monotonic()
    try:
        async with Load(client, model, callers=4, timeout=5, pause_after_error=0.2) as load:
            await load.answers(300, 20, "answers before the disk fills")
            filled_at = time.monotonic()
            filler = await asyncio.get_running_loop().run_in_executor(None, fill, small_disk)

            async def refused_fast() -> bool:
                begun = time.monotonic()
                try:
                    await client.infer(model, x, timeout=5)
                except MeshUnavailable as err:
                    return "acknowledges no write" in err.message and time.monotonic() - begun < 1.0
                except MeshError:
                    return False
                return False

            await wait_for(refused_fast, 30, what="requests refused at once with a 503 naming the stream")
            detected_s = time.monotonic() - filled_at
            shown = await _models_show(server.url, model)
            assert f"STORAGE: stream {STREAM_INFER} acknowledges no write" in shown, shown
            await wait_for(lambda: _is(ready_code(http_port) == 503), 10, what="the worker not ready")

            filler.unlink()  # room again
            freed_at = time.monotonic()

            async def serving() -> bool:
                try:
                    out = await client.infer(model, x, timeout=3)
                except MeshError:
                    return False
                return bool(np.array_equal(out["output"], x["input"]))

            await wait_for(serving, 60, what="the mesh serving again by itself")
            recovered_s = time.monotonic() - freed_at
            await load.answers(300, 30, "answers after the disk was freed")
            await wait_for(lambda: _is(ready_code(http_port) == 200), 15, what="the worker ready again")
        tally = load.tally
        record("JetStream disk full, then freed (no restart)", tally, time.monotonic() - started,
               detected_s=round(detected_s, 1), recovered_s=round(recovered_s, 1))  # fmt: skip
        assert tally.lost == 0 and tally.wrong == 0 and not tally.untyped
        assert set(tally.failed) <= {503, 504}, tally.errors
    finally:
        await conn.close()


async def _is(value: bool) -> bool:
    return value
