"""README.md as a newcomer follows it: every shell command and Python snippet in it runs, as
written, against the mesh `make up` starts (the example models on an embedded nats-server); the
commands that run until stopped are run by the tests named here instead."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from examples.build_models import build_repository
from servemesh.local import LocalMesh

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DEFAULT_URL = "nats://127.0.0.1:4222"
# Commands that run until stopped (or are the suite itself), and what runs them.
ELSEWHERE = {
    "make demo": "test_the_demo_runs, below (what it runs once installed)",
    "make test": "CI: .ci/run runs it",
    "make up": "the mesh fixture below (the same models, `servemesh up`'s LocalMesh); test_cli.py runs `up` itself",
}


def blocks(lang: str) -> list[str]:
    """The fenced code blocks of README.md tagged ``lang``."""
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def commands() -> list[str]:
    found = []
    for block in blocks("sh"):
        for line in block.splitlines():
            command = re.split(r"\s+#\s", line, maxsplit=1)[0].strip()
            if command and not command.startswith("#"):
                found.append(command)
    return found


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    repo = tmp_path_factory.mktemp("readme") / "models"
    build_repository(repo)
    local = LocalMesh(repo, port=-1, storage="memory", gateway=GATEWAY)
    asyncio.run(local.start())
    try:
        yield local.url
    finally:
        local.stop()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# The README's gateway ports (`servemesh up`'s defaults), and the free ones this run's gateway has.
GATEWAY = (_free_port(), _free_port())


def _ported(text: str) -> str:
    http, grpc = GATEWAY
    return text.replace("127.0.0.1:8000", f"127.0.0.1:{http}").replace("127.0.0.1:8001", f"127.0.0.1:{grpc}")


def _env(url: str) -> dict[str, str]:
    return {**os.environ, "SERVEMESH_NATS_URL": url, "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
            f"{os.environ.get('PATH', '')}"}  # fmt: skip


def test_the_readme_has_commands_and_snippets() -> None:
    assert len(commands()) >= 10 and blocks("python")


@pytest.mark.parametrize("command", commands())
def test_every_shell_command_in_the_readme_runs(mesh: str, tmp_path_factory: pytest.TempPathFactory,
                                                command: str) -> None:  # fmt: skip
    if command in ELSEWHERE:
        target = command.split()[1]
        assert re.search(rf"^{target}:", (ROOT / "Makefile").read_text(), flags=re.M), command
        return
    workdir = tmp_path_factory.getbasetemp() / "readme-session"  # one session: later commands use earlier files
    workdir.mkdir(exist_ok=True)
    done = subprocess.run(["bash", "-c", _ported(command)], cwd=workdir, env=_env(mesh), capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr


def test_every_python_snippet_in_the_readme_runs(mesh: str, tmp_path: Path) -> None:
    for i, snippet in enumerate(blocks("python")):
        script = tmp_path / f"snippet_{i}.py"
        script.write_text(_ported(snippet.replace(DEFAULT_URL, mesh)))
        done = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=_env(mesh), capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, f"{snippet}\n{done.stdout}\n{done.stderr}"


def test_the_demo_runs(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), "--state", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "accuracy" in done.stdout and "ready on worker-1" in done.stdout and "mesh stopped" in done.stdout
    assert "over HTTP (KServe v2)" in done.stdout and "version 1: label" in done.stdout
