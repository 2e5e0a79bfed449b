"""Processes of a fault scenario — workers and routers — spawned, signalled and stopped by PID."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from servemesh.local import spawn_router, spawn_worker
from tests.integration.cluster import ROUTER_ENV


class Fleet:
    def __init__(self, url: str, logs: Path) -> None:
        self.url = url
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._args: dict[str, tuple[Path | None, dict[str, str] | None, str | None]] = {}

    def worker(
        self, name: str, models: Path | None = None, env: dict[str, str] | None = None, url: str | None = None
    ) -> None:
        """A worker serving ``models`` as they are, or (None) following the router; connected to
        ``url`` when given (a node of a cluster), else to the fleet's server."""
        self._args[name] = (models, env, url)
        self.procs[name] = spawn_worker(url or self.url, models, name, self.logs / f"{name}.log", env)

    def restart(self, name: str) -> None:
        """Start a dead worker again under the same id (what a supervisor such as Kubernetes does)."""
        assert not self.alive(name)
        self.worker(name, *self._args[name])

    def router(self, name: str, env: dict[str, str] | None = None) -> None:
        self.procs[name] = spawn_router(self.url, name, self.logs / f"{name}.log", {**ROUTER_ENV, **(env or {})}, 0.25)

    def signal(self, name: str, sig: int) -> None:
        self.procs[name].send_signal(sig)

    def wait(self, name: str, timeout: float = 30.0) -> int:
        return self.procs[name].wait(timeout)

    def alive(self, name: str) -> bool:
        return self.procs[name].poll() is None

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # a stalled process must run to hear SIGTERM
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
