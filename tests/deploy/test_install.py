"""The image's install steps, run as CI runs them: deploy/docker/install.sh into a fresh virtual
environment (pip's cache reused; the CPU variant without extras, as the cpu image builds it), then
deploy/docker/smoke.py with that environment's interpreter, outside the source tree. And the
Dockerfile runs exactly these scripts, as a user that is not root."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

from tests.deploy.tools import DEPLOY, ROOT

DOCKER = DEPLOY / "docker"


def test_install_script_in_a_fresh_venv_then_one_request_on_the_embedded_mesh(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    install = subprocess.run(["sh", str(DOCKER / "install.sh"), str(venv), "cpu"], capture_output=True, text=True,
                             timeout=300, env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home()),
                                               "PYTHON": sys.executable})  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:] + install.stdout[-2000:]
    assert f"servemesh {version('servemesh')}" in install.stdout
    assert "CPUExecutionProvider" in install.stdout
    smoke = subprocess.run([str(venv / "bin" / "python"), str(DOCKER / "smoke.py")], cwd=tmp_path,
                           capture_output=True, text=True, timeout=180)  # fmt: skip
    assert smoke.returncode == 0, smoke.stdout[-3000:] + smoke.stderr[-3000:]
    assert f"servemesh from {venv}" in smoke.stdout, "the smoke run used another servemesh than the one installed"
    assert "smoke: CLI: answered by smoke:1" in smoke.stdout and "smoke: REST: output FP32[1, 4]" in smoke.stdout
    assert smoke.stdout.rstrip().endswith("smoke: ok")


def _stages(dockerfile: str) -> dict[str, list[str]]:
    """Instructions per stage (continuation lines joined), by stage name."""
    text = re.sub(r"\\\n\s*", " ", dockerfile)
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = stages.setdefault(match.group(1), [])
        current.append(line)
    return stages


def test_the_dockerfile_runs_the_scripts_ci_runs_and_drops_root() -> None:
    stages = _stages((DOCKER / "Dockerfile").read_text())
    assert {"cpu", "gpu", "cpu-build", "gpu-build"} <= set(stages)
    cpu_runs = [i for i in stages["cpu-build"] if i.startswith("RUN")]
    assert any("deploy/docker/install.sh /opt/servemesh cpu" in i for i in cpu_runs)
    assert any("deploy/docker/smoke.py" in i and "cd /tmp" in i for i in cpu_runs)
    assert any("deploy/docker/install.sh /opt/servemesh gpu" in i for i in stages["gpu-build"] if i.startswith("RUN"))
    for final in ("cpu", "gpu"):
        users = [i.split()[1] for i in stages[final] if i.startswith("USER")]
        assert users and users[-1].split(":")[0] not in ("0", "root"), f"{final} runs as root"
        assert 'ENTRYPOINT ["servemesh"]' in stages[final]
        assert any(i.startswith("COPY --from=" + final + "-build /opt/servemesh") for i in stages[final])
    base = {i.split()[1] for i in stages["source"] if i.startswith("FROM")}
    assert base == {"${PYTHON_IMAGE}"}


def test_the_image_copies_every_package_the_project_installs() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    source = _stages((DOCKER / "Dockerfile").read_text())["source"]
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    for package in packages:
        assert f"COPY {package}/ {package}/" in source, f"the image leaves out {package}/"
        assert f"!{package}/" in ignore, f"Dockerfile.dockerignore keeps {package}/ out of the build context"
