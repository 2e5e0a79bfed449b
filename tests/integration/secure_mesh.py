"""The secured mesh of the integration tests: nats-server from copies of the configs in
deploy/nats (secrets made for the run, random client ports), its users' settings, and helpers that
check a denial as a user meets it."""

from __future__ import annotations

import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker import Connection, Registry, Settings
from broker.server import find_nats_server
from examples.build_models import build_identity_onnx
from schemas.spec import ModelSpec
from schemas.subjects import (
    BUCKET_ASSIGNMENTS,
    BUCKET_ATTEMPTS,
    BUCKET_CLAIMS,
    BUCKET_JOBS,
    BUCKET_LEADER,
    BUCKET_MODELS,
    BUCKET_PIPELINES,
    BUCKET_ROUTES,
    BUCKET_STATUS,
    BUCKET_WORKERS,
    STREAM_INFER,
    infer_subject,
)
from tests.conftest import unique, wait_for
from workers.repository import read_model
from workers.worker import Worker

# Which tenant owns each model that accounts.conf grants (its `tenant` in the registry).
OWNERS = {"echo_a": "tenant_a", "fraud": "tenant_a", "echo_b": "tenant_b", "ranker": "tenant_b"}
TENANTS = ("tenant_a", "tenant_b")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "nats"
USERS = ("admin", "worker", "tenant_a", "tenant_b", "sys")
BUCKETS = (
    BUCKET_MODELS,
    BUCKET_WORKERS,
    BUCKET_ASSIGNMENTS,
    BUCKET_LEADER,
    BUCKET_STATUS,
    BUCKET_PIPELINES,
    BUCKET_JOBS,
    BUCKET_ROUTES,
    BUCKET_CLAIMS,
    BUCKET_ATTEMPTS,
)
_LISTEN_RE = re.compile(r"Listening for client connections on [^\s]+:(\d+)")


# -- servers from the shipped configs -------------------------------------------------------------


def deploy_copy(dest: Path, route_ports: Sequence[int] = (6222, 6223, 6224)) -> dict[str, str]:
    """Copy deploy/nats to ``dest`` with secrets of its own; returns the users' passwords."""
    shutil.copytree(DEPLOY, dest)
    passwords = {user: secrets.token_urlsafe(16) for user in USERS}
    (dest / "secrets.conf").write_text(
        "".join(f'MESH_{user.upper()}_PASSWORD: "{password}"\n' for user, password in passwords.items())
    )
    route_password = secrets.token_urlsafe(16)
    routes = "".join(f'  "nats-route://route:{route_password}@127.0.0.1:{port}"\n' for port in route_ports)
    (dest / "cluster-secrets.conf").write_text(f'MESH_ROUTE_PASSWORD: "{route_password}"\nMESH_ROUTES: [\n{routes}]\n')
    return passwords


class ConfigServer:
    """nats-server started from one config of a deploy copy (its working directory), stopped by PID."""

    def __init__(self, workdir: Path, config: str) -> None:
        self.workdir = workdir
        self.config = config
        self.log_path = workdir / f"{Path(config).stem}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> ConfigServer:
        # The config's host and port give way to loopback and a free port.
        cmd = [find_nats_server(), "-c", self.config, "-a", "127.0.0.1", "-p", "-1"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.workdir, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            match = _LISTEN_RE.search(text)
            if match and "Server is ready" in text:
                self.port = int(match.group(1))
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server -c {self.config} exited:\n{text[-2000:]}")
            time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"nats-server -c {self.config} not ready after {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Mesh:
    """A running server and the passwords of its users."""

    def __init__(self, server: ConfigServer, passwords: dict[str, str]) -> None:
        self.server = server
        self.passwords = passwords

    def settings(self, user: str, **overrides: Any) -> Settings:
        """A user's settings as its processes would read them from SERVEMESH_* variables."""
        values: dict[str, Any] = {
            "nats_url": self.server.url, "user": user, "password": self.passwords[user],
            "inbox_prefix": f"_INBOX.{user}",
        }  # fmt: skip
        if user.startswith("tenant"):
            values["claim_bucket"] = f"{BUCKET_CLAIMS}-{user}"  # tenants never share a claims bucket
        return Settings(**{**values, **overrides})


# -- helpers ------------------------------------------------------------------------------------


@asynccontextmanager
async def connected(settings: Settings) -> AsyncIterator[Connection]:
    conn = await Connection.open(settings, name=f"test-{settings.user}")
    try:
        yield conn
    finally:
        await conn.close()


async def register(
    admin: Connection, repo: Path, model: str, names: tuple[str, str] = ("input", "output")
) -> ModelSpec:
    """Register an identity model, owned by the tenant accounts.conf grants it to, under a version new
    to this test, so its subjects are too (``names``: its input's and output's)."""
    build_identity_onnx(repo, model, version=uuid.uuid4().hex[:10], names=names)
    spec = read_model(repo / model).model_copy(update={"tenant": OWNERS.get(model)})
    await (await Registry.open(admin)).put_spec(spec)
    return spec


def subject_of(spec: ModelSpec, priority: str = "normal") -> str:
    return infer_subject(spec.name, next(iter(spec.versions)), priority)


@asynccontextmanager
async def serving(settings: Settings, specs: list[ModelSpec]) -> AsyncIterator[Worker]:
    """An in-process worker connected as ``settings`` (registering nothing: the admin did)."""
    async with connected(settings) as conn:
        worker = Worker(conn, unique("w"))
        try:
            await worker.start()
            for spec in specs:
                await worker.serve(spec, register=False)
            yield worker
        finally:
            await worker.drain()


async def queued(admin: Connection, subject: str) -> int:
    """Requests the stream holds on ``subject``."""
    info = await admin.js.stream_info(STREAM_INFER, subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


async def violation(caplog: pytest.LogCaptureFixture, what: str, subject: str) -> None:
    """Wait until a connection reported the server's permissions violation for ``what`` ("publish",
    "subscription") on ``subject``: how nats tells a client it was denied."""
    needle = f'permissions violation for {what} to "{subject}"'.lower()

    async def seen() -> bool:
        return any(needle in record.getMessage().lower() for record in caplog.records)

    await wait_for(seen, timeout=5.0, what=needle)


def ones(n: int = 4) -> dict[str, np.ndarray[Any, Any]]:
    return {"input": np.arange(n, dtype=np.float32)[None]}


def free_ports(count: int) -> list[int]:
    """``count`` TCP ports free on loopback just now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
