"""LocalMesh: a whole mesh on one machine — embedded nats-server, router(s) and worker processes,
with a local model repository registered. ``servemesh up`` and the demo use it. Every child is
started and stopped by its PID."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from broker.connection import Connection
from broker.provision import provision
from broker.registry import Registry
from broker.server import NatsServer
from broker.settings import Settings
from schemas.spec import ModelSpec
from workers.repository import read_repository

__all__ = [
    "LocalMesh", "spawn_router", "spawn_worker", "wait_models_ready", "wait_models_settled", "wait_workers_ready",
]

log = logging.getLogger(__name__)


def _spawn(args: list[str], log_path: Path | None, extra_env: dict[str, str] | None) -> subprocess.Popen[bytes]:
    """``python -m servemesh ARGS`` as a child in its own process group (signals stay ours to send)."""
    env = {**os.environ, **(extra_env or {})}
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - the child owns it
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "servemesh", *args], stdout=out, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip
    finally:
        if log_path:
            out.close()  # type: ignore[union-attr]


def spawn_worker(
    url: str,
    models: Path | None,
    worker_id: str,
    log_path: Path | None = None,
    extra_env: dict[str, str] | None = None,
    memory_mb: int = 4096,
    labels: str = "",
    device: str = "",
    gpu_memory_mb: int | None = None,
) -> subprocess.Popen[bytes]:
    """A worker process: serving ``models`` as they are, or (None) following the router; on ``device``
    ("cpu", "cuda:N"; "": the worker's default)."""
    args = ["worker", "--id", worker_id, "--nats", url, "--memory-mb", str(memory_mb)]
    args += ["--models", str(models)] if models is not None else []
    args += ["--labels", labels] if labels else []
    args += ["--device", device] if device else []
    args += ["--gpu-memory-mb", str(gpu_memory_mb)] if gpu_memory_mb is not None else []
    return _spawn(args, log_path, extra_env)


def spawn_router(
    url: str, router_id: str, log_path: Path | None = None, extra_env: dict[str, str] | None = None, tick_s: float = 0.5
) -> subprocess.Popen[bytes]:
    return _spawn(["router", "--id", router_id, "--nats", url, "--tick", str(tick_s)], log_path, extra_env)


async def wait_workers_ready(registry: Registry, worker_ids: list[str], timeout: float) -> None:
    """Until every worker has heartbeated ``ready`` (all its models loaded), or TimeoutError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        beats = await registry.heartbeats()
        if all(beats.get(w, {}).get("ready") for w in worker_ids):
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"workers {worker_ids} not ready after {timeout}s")


async def wait_models_ready(registry: Registry, models: list[str], timeout: float, replicas: int = 1) -> None:
    """Until every version of ``models`` is loaded on at least ``replicas`` workers, or TimeoutError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        loaded: dict[str, int] = {}
        for beat in (await registry.heartbeats()).values():
            for key in beat.get("models", {}):
                loaded[key] = loaded.get(key, 0) + 1
        specs = [await registry.get_spec(m) for m in models]
        wanted = [f"{s.name}:{v}" for s in specs if s is not None for v in s.versions]
        if len(wanted) >= len(models) and all(loaded.get(k, 0) >= replicas for k in wanted):
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"models {models} not ready after {timeout}s")


async def wait_models_settled(
    registry: Registry,
    specs: list[ModelSpec],
    timeout: float,
    say: Callable[[str], None] = lambda line: None,
    children: dict[str, subprocess.Popen[bytes]] | None = None,
) -> dict[str, str]:
    """Until every version of ``specs`` is loaded on a worker or has failed to load on one (or
    ``timeout``); returns "model:version" → "ready on w" / "failed: why" / "still loading", telling
    ``say`` each as it happens. A child process that exits meanwhile is said, not waited for."""
    wanted = [f"{s.name}:{v}" for s in specs for v in s.versions]
    outcome: dict[str, str] = {}
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline and len(outcome) < len(wanted):
        beats = await registry.heartbeats()
        for label in wanted:
            if label in outcome:
                continue
            ready = sorted(w for w, beat in beats.items() if label in beat.get("models", {}))
            failed = {w: why for w, beat in beats.items()
                      for lbl, why in {**beat.get("failed", {}), **beat.get("retrying", {})}.items() if lbl == label}
            if ready:
                outcome[label] = f"ready on {', '.join(ready)}"
                say(f"{label} ready on {', '.join(ready)} ({time.monotonic() - started:.1f} s)")
            elif failed:
                outcome[label] = f"failed: {next(iter(failed.values()))}"
                say(f"{label} failed to load — {next(iter(failed.values()))}")
        for name, proc in (children or {}).items():
            if proc.poll() is not None and f"exited:{name}" not in outcome:
                outcome[f"exited:{name}"] = str(proc.returncode)
                say(f"{name} exited with code {proc.returncode}; see its log")
        await asyncio.sleep(0.2)
    for label in wanted:
        if label not in outcome:
            outcome[label] = "still loading"
            say(f"{label} still loading after {timeout:.0f} s; it will be served once it is")
    return {k: v for k, v in outcome.items() if not k.startswith("exited:")}


class LocalMesh:
    def __init__(
        self,
        models: Path,
        workers: int = 1,
        routers: int = 1,
        port: int = -1,
        state_dir: Path | None = None,
        storage: str = "file",
        gateway: tuple[int, int] | None = None,
        gpus: list[str] | None = None,
    ) -> None:
        """``gateway``: (REST port, gRPC port) of an Open Inference Protocol gateway to start too. ``gpus``:
        one worker per GPU (its UUID), each seeing only its own, instead of ``workers`` on the CPU."""
        self.models = models
        self.gateway = gateway
        self.gpus = gpus
        self.n_workers = len(gpus) if gpus else workers
        self.n_routers = routers
        self.storage = storage
        self.server = NatsServer(port=port, store_dir=state_dir / "nats" if state_dir else None)
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.outcome: dict[str, str] = {}  # model:version → ready on / failed / still loading

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def log_dir(self) -> Path:
        return self.server.store_dir

    async def start(self, timeout: float = 120.0, say: Callable[[str], None] = lambda line: None) -> LocalMesh:
        """Start everything and wait until each model is ready or has failed to load (``timeout``: then
        the ones still loading are named and left to finish). ``say`` is told each step as it happens."""
        if not self.models.is_dir():
            raise FileNotFoundError(2, "no such model repository", str(self.models))
        specs, errors = await asyncio.get_running_loop().run_in_executor(None, read_repository, self.models)
        self.server.start()
        say(f"nats-server ready at {self.url}")
        env = {"SERVEMESH_STORAGE": self.storage}
        conn = await Connection.open(Settings.from_url(self.url, storage=self.storage))
        try:
            made = await provision(conn)
            say(f"provisioned the mesh ({len(made)} streams and buckets made)" if made else "the mesh is provisioned")
            registry = await Registry.open(conn)
            for error in errors:
                say(f"not registered: {error.model} — {error.reason}")
            for spec in specs:
                await registry.put_spec(spec)
            say(f"registered {len(specs)} model(s) from {self.models}: {', '.join(s.name for s in specs) or 'none'}")
            for i in range(self.n_routers):
                name = f"router-{i + 1}"
                self.children[name] = spawn_router(self.url, name, self.log_dir / f"{name}.log", env)
            for i in range(self.n_workers):
                name = f"worker-{i + 1}"
                if self.gpus:  # CUDA_VISIBLE_DEVICES by UUID: the worker sees its GPU alone, as cuda:0
                    gpu_env = {**env, "CUDA_VISIBLE_DEVICES": self.gpus[i]}
                    self.children[name] = spawn_worker(self.url, None, name, self.log_dir / f"{name}.log", gpu_env,
                                                       device="cuda:0")  # fmt: skip
                else:
                    self.children[name] = spawn_worker(self.url, None, name, self.log_dir / f"{name}.log", env)
            if self.gateway is not None:
                http, grpc = self.gateway
                args = ["gateway", "--http-port", str(http), "--grpc-port", str(grpc), "--nats", self.url]
                self.children["gateway"] = _spawn(args, self.log_dir / "gateway.log", env)
            on = f" (one per GPU: {', '.join(self.gpus)})" if self.gpus else ""
            say(f"started {self.n_routers} router(s) and {self.n_workers} worker(s){on}; loading models ...")
            self.outcome = await wait_models_settled(
                registry, [s for s in specs if s.min_replicas > 0], timeout, say, self.children
            )
            if self.gateway is not None:
                await self._gateway_listening(say)
        except BaseException:
            await conn.close()
            self.stop()
            raise
        await conn.close()
        return self

    async def _gateway_listening(self, say: Callable[[str], None], timeout: float = 30.0) -> None:
        assert self.gateway is not None
        http, grpc = self.gateway
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.children["gateway"].poll() is not None:
                say(f"the gateway exited (port {http} or {grpc} in use?); see {self.log_dir / 'gateway.log'}")
                return
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", http)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            writer.close()
            say(f"gateway (Open Inference Protocol): REST http://127.0.0.1:{http}/v2, gRPC 127.0.0.1:{grpc}")
            return
        say(f"the gateway is not listening after {timeout:.0f} s; see {self.log_dir / 'gateway.log'}")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every child (workers drain, routers release the lease), SIGKILL stragglers, stop NATS."""
        for proc in self.children.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in self.children.items():
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %ss; killing it", name, timeout)
                proc.kill()
                proc.wait()
        self.children.clear()
        self.server.close()

    async def __aenter__(self) -> LocalMesh:
        return await self.start()

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
