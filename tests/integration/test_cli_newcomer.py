"""The command line as a newcomer meets it: every mistake gets one line and an exit code (2 for a
usage error, 1 for what cannot be done), never a traceback or a hang; what it starts it stops."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from broker import NatsServer
from examples.build_models import build_identity_onnx
from schemas.errors import BadInput, MeshError
from servemesh import MeshClient
from tests.conftest import serving, set_config, unique, wait_for
from tests.integration.secure_mesh import free_ports


async def servemesh(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "servemesh", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def one_line(err: str, *needles: str) -> str:
    """stderr is one line holding every needle, and no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def closed_port() -> int:
    (port,) = free_ports(1)
    return port


@pytest.fixture
def ident(tmp_path: Path) -> tuple[Path, str]:
    name = unique("cli")
    build_identity_onnx(tmp_path / "repo", name, "float32", shape=(4,))
    return tmp_path / "repo", name


# -- hangs ------------------------------------------------------------------------------------------


async def test_an_unreachable_nats_is_one_line_in_seconds(closed_port: int, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((1, 4), np.float32))
    commands = [["infer", "m", "--input", f"input={tmp_path / 'x.npy'}"], ["models", "list"], ["top", "--once"],
                ["jobs", "list"]]  # fmt: skip
    url = f"nats://127.0.0.1:{closed_port}"
    started = time.monotonic()
    # The wait is settable; the commands run side by side (each on its own would wait as long).
    results = await asyncio.gather(*(servemesh(*command, "--nats", url, timeout=30,
                                               env={"SERVEMESH_CONNECT_WAIT_S": "2"}) for command in commands))
    assert time.monotonic() - started < 15
    for command, (code, _, err) in zip(commands, results, strict=True):
        assert code == 1, command
        one_line(err, f"cannot reach NATS at {url}", "connection refused", "SERVEMESH_NATS_URL")


async def test_a_job_whose_input_cannot_be_read_is_refused_before_it_exists(
    nats_server: NatsServer, ident: tuple[Path, str], tmp_path: Path, client: MeshClient
) -> None:
    repo, name = ident
    np.save(tmp_path / "wrong.npy", np.zeros((5, 3), np.float32))  # items of [3]; the model takes [4]
    async with serving(nats_server.url, repo, [name]):
        before = set(await client.jobs())
        code, _, err = await servemesh("jobs", "submit", name, "--input", str(tmp_path / "missing.npy"),
                                       "--nats", nats_server.url)  # fmt: skip
        assert code == 1
        one_line(err, "missing.npy", "no such file")
        code, _, err = await servemesh("jobs", "submit", name, "--input", str(tmp_path / "wrong.npy"),
                                       "--nats", nats_server.url)  # fmt: skip
        assert code == 1
        one_line(err, "items have shape [3]", "[4]")
        with pytest.raises(BadInput, match="no such file"):
            await client.submit_job(name, tmp_path / "missing.npz")
        assert set(await client.jobs()) == before  # nothing created, no zombie job


async def test_a_job_whose_submission_fails_ends_failed_with_the_reason(
    nats_server: NatsServer, ident: tuple[Path, str], client: MeshClient
) -> None:
    repo, name = ident

    def items() -> Any:
        yield {"input": np.zeros((1, 4), np.float32)}
        raise OSError("the source went away")

    async with serving(nats_server.url, repo, [name]):
        job = await client.submit_job(name, items())
        with pytest.raises(MeshError, match="the source went away"):
            await job.submitted()
        status = await job.status()
        assert status.state == "failed" and "the source went away" in (status.error or "")
        with pytest.raises(MeshError, match="failed"):
            async for _ in job.results():
                pass
        _code, out, _ = await servemesh("jobs", "list", "--json", "--nats", nats_server.url)
        listed = next(j for j in json.loads(out) if j["id"] == job.id)
        assert listed["state"] == "failed"


def _alive_with(marker: str) -> list[int]:
    """PIDs of processes whose command line holds ``marker`` (to check that none is left)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_up_stopped_while_starting_leaves_nothing_behind(ident: tuple[Path, str], sig: int) -> None:
    repo, _ = ident
    (port,) = free_ports(1)
    temps_before = set(Path("/tmp").glob("servemesh-nats-*"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "servemesh", "up", "--models", str(repo), "--port", str(port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    while "started" not in (line := (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()):
        assert line, "up ended before starting its processes"
    proc.send_signal(sig)  # the models are still loading
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0 and "Traceback" not in err.decode(), err.decode()
    assert _alive_with(f"127.0.0.1:{port}") == []  # no nats-server, router or worker
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert set(Path("/tmp").glob("servemesh-nats-*")) <= temps_before


async def test_up_serves_what_loads_and_names_what_does_not(ident: tuple[Path, str]) -> None:
    repo, name = ident
    (repo / "corrupt" / "1").mkdir(parents=True)
    (repo / "corrupt" / "1" / "model.onnx").write_bytes(b"not a model at all")
    (port,) = free_ports(1)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "servemesh", "up", "--models", str(repo), "--port", str(port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    lines = []
    try:
        while not (line := (await asyncio.wait_for(proc.stdout.readline(), 90)).decode()).startswith("servemesh up:"):
            assert line, lines
            lines.append(line)
        assert any(line.startswith(f"{name}:1 ready on") for line in lines), lines
        failed = next(line for line in lines if line.startswith("corrupt:1 failed to load"))
        assert "onnxruntime" in failed.lower() or "protobuf" in failed.lower(), failed
        assert "1 of 2 model version(s) ready" in line
        async with await MeshClient.connect(f"nats://127.0.0.1:{port}") as client:  # and it keeps running
            out = await client.infer(name, {"input": np.ones((1, 4), np.float32)})
            np.testing.assert_array_equal(out["output"], np.ones((1, 4)))
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 60)
    assert proc.returncode == 0


# -- a sentence where a traceback was -----------------------------------------------------------------


async def test_inputs_that_cannot_be_read(nats_server: NatsServer, tmp_path: Path) -> None:
    with open(tmp_path / "pickled.npy", "wb") as out:
        np.save(out, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "both.npz", input=np.zeros((1, 4), np.float32))
    (tmp_path / "text.npy").write_text("hello")
    cases = [
        (["input=" + str(tmp_path / "missing.npy")], 1, "no such file"),
        (["input=" + str(tmp_path / "pickled.npy")], 1, "pickled Python objects are not read"),
        (["input=" + str(tmp_path / "both.npz")], 2, "--input " + str(tmp_path / "both.npz")),
        (["input=" + str(tmp_path / "text.npy")], 1, "not a NumPy"),
        (["input"], 2, "NAME=FILE.npy"),
    ]
    for inputs, expected, needle in cases:
        flags = [part for i in inputs for part in ("--input", i)]
        code, _, err = await servemesh("infer", "m", *flags, "--nats", nats_server.url)
        assert code == expected, (inputs, err)
        one_line(err, needle)


@pytest.mark.parametrize(
    ("config", "args", "code", "needle"),
    [
        ("max_batch_size: [1\n", [], 1, "not valid YAML"),
        ("max_batch_sz: 8\n", [], 1, "did you mean 'max_batch_size'"),
        ("max_batch_size: -3\n", [], 1, "max_batch_size"),
        (None, ["--priorities", "urgent"], 2, "give some of high,normal,low"),
        (None, ["--placement", "high"], 2, "PRIORITY:k=v"),
        (None, ["--min-replicas", "2", "--max-replicas", "1"], 2, "exceeds --max-replicas 1"),
        (None, ["--version", "7"], 2, "holds version(s) 1"),
        (None, ["--labels", "gpu"], 2, "expected key=value"),
    ],
)
async def test_models_add_mistakes(
    nats_server: NatsServer, ident: tuple[Path, str], config: str | None, args: list[str], code: int, needle: str
) -> None:
    repo, name = ident
    if config is not None:
        (repo / name / "servemesh.yaml").write_text(config)
    got, _, err = await servemesh("models", "add", name, "--from", str(repo / name), *args, "--nats", nats_server.url)
    assert got == code, err
    one_line(err, needle)


async def test_models_add_of_nothing_usable(nats_server: NatsServer, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for name, source, code, needle in [
        ("m", tmp_path / "empty", 1, "no model version"),
        ("a.b", tmp_path / "empty", 2, "invalid model name"),
        ("m", tmp_path / "nowhere", 1, "no such model directory"),
    ]:
        got, _, err = await servemesh("models", "add", name, "--from", str(source), "--nats", nats_server.url)
        assert got == code, err
        one_line(err, needle)


async def test_what_does_not_exist_is_said_so(nats_server: NatsServer, ident: tuple[Path, str]) -> None:
    repo, name = ident
    async with serving(nats_server.url, repo, [name]):
        for args, needle in [
            (["jobs", "status", "job-nosuch"], "no job 'job-nosuch'"),
            (["jobs", "results", "job-nosuch"], "no job 'job-nosuch'"),
            (["jobs", "cancel", "job-nosuch"], "no job 'job-nosuch'"),
            (["jobs", "submit", name, "--input", str(repo / "missing.npy")], "no such file"),
            (["models", "show", "nosuch"], "no model 'nosuch'"),
            (["routes", "rm", "nosuch"], "no model 'nosuch'"),
            (["routes", "shadow", "nosuch", "--off"], "no model 'nosuch'"),
            (["routes", "shadow", name, "--off"], "mirrors nothing"),
            (["pipelines", "rm", "nosuch"], "no pipeline 'nosuch'"),
        ]:
            code, _, err = await servemesh(*args, "--nats", nats_server.url)
            assert code == 1, (args, err)
            one_line(err, needle)
        code, out, _ = await servemesh("routes", "show", name, "--json", "--nats", nats_server.url)
        assert "shadow" not in json.loads(out)  # the refused --off created no record


async def test_a_job_for_an_unknown_model(nats_server: NatsServer, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((2, 4), np.float32))
    code, _, err = await servemesh("jobs", "submit", "nosuch", "--input", str(tmp_path / "x.npy"),
                                   "--nats", nats_server.url)  # fmt: skip
    assert code == 1
    one_line(err, "404", "'nosuch' is not registered")


@pytest.mark.parametrize(
    ("weights", "needle"), [(["1=abc"], "must be a number"), (["1=-5"], "0 or more"), (["1=0"], "positive weight"),
                            (["1"], "VERSION=WEIGHT")],
)
async def test_route_weights_are_checked(nats_server: NatsServer, weights: list[str], needle: str) -> None:
    code, _, err = await servemesh("routes", "set", "m", *weights, "--nats", nats_server.url)
    assert code == 2
    one_line(err, needle)


async def test_up_on_a_busy_port_or_a_missing_repository(nats_server: NatsServer, tmp_path: Path) -> None:
    code, _, err = await servemesh("up", "--models", str(tmp_path), "--port", str(nats_server.port))
    assert code == 1
    one_line(err, f"port {nats_server.port} is in use", "--port")
    code, _, err = await servemesh("up", "--models", "/nonexistent")
    assert code == 1
    one_line(err, "/nonexistent", "no such model repository")


async def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    code, _, err = await servemesh("--debug", "up", "--models", str(tmp_path / "nowhere"))
    assert code == 1 and "Traceback" in err
    code, _, err = await servemesh("up", "--models", str(tmp_path / "nowhere"), env={"SERVEMESH_DEBUG": "1"})
    assert code == 1 and "Traceback" in err


async def test_results_into_a_closed_pipe(nats_server: NatsServer, ident: tuple[Path, str], client: MeshClient) -> None:
    repo, name = ident
    async with serving(nats_server.url, repo, [name]):
        job = await client.submit_job(name, [{"input": np.full((1, 4), i, np.float32)} for i in range(300)])
        await job.wait()
        reader = f"{sys.executable} -m servemesh jobs results {job.id} --nats {nats_server.url} | head -n 2"
        proc = await asyncio.create_subprocess_shell(reader, stdout=asyncio.subprocess.PIPE,
                                                     stderr=asyncio.subprocess.PIPE)  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert len(out.decode().splitlines()) == 2 and "Traceback" not in err.decode() and "Error" not in err.decode()


# -- wrong things no longer accepted -----------------------------------------------------------------


async def test_pipelines_and_removals_are_checked(nats_server: NatsServer, tmp_path: Path) -> None:
    first, second = unique("first"), unique("second")
    build_identity_onnx(tmp_path, first, "float32", shape=(4,))  # gives "output"
    build_identity_onnx(tmp_path, second, "float32", shape=(4,))  # takes "input"
    url = nats_server.url
    for name in (first, second):
        assert (await servemesh("models", "add", name, "--from", str(tmp_path / name), "--nats", url))[0] == 0
    code, _, err = await servemesh("pipelines", "add", unique("p"), first, second, "--nats", url)
    assert code == 1
    one_line(err, f"{second} takes input 'input'", f"{first} does not give")
    chained = unique("chained")
    third = unique("third")
    build_identity_onnx(tmp_path, third, "float32", shape=(4,), names=("output", "input"))  # takes "output"
    assert (await servemesh("models", "add", third, "--from", str(tmp_path / third), "--nats", url))[0] == 0
    code, _, err = await servemesh("pipelines", "add", chained, first, third, "--nats", url)
    assert code == 0, err
    code, _, err = await servemesh("models", "rm", third, "--nats", url)
    assert code == 1
    one_line(err, chained, "--force")
    assert (await servemesh("models", "rm", third, "--force", "--nats", url))[0] == 0


async def test_shadowing_the_version_that_takes_all_traffic_warns(nats_server: NatsServer, tmp_path: Path) -> None:
    name = unique("sh")
    build_identity_onnx(tmp_path, name, "float32", shape=(4,))
    assert (await servemesh("models", "add", name, "--from", str(tmp_path / name), "--nats", nats_server.url))[0] == 0
    code, _, err = await servemesh("routes", "shadow", name, "1", "--nats", nats_server.url)
    assert code == 0
    one_line(err, "warning", "already takes all the traffic")


async def test_a_fixed_repository_worker_never_removes_what_others_registered(
    nats_server: NatsServer, tmp_path: Path, ident: tuple[Path, str]
) -> None:
    repo, name = ident
    build_identity_onnx(tmp_path / "v2", name, "float32", shape=(4,), version="2")
    code, _, err = await servemesh("models", "add", name, "--from", str(tmp_path / "v2" / name), "--nats",
                                   nats_server.url)  # fmt: skip
    assert code == 0, err
    async with serving(nats_server.url, repo, [name]), await MeshClient.connect(nats_server.url) as client:
        spec = await client._resolver.spec(name)
    assert set(spec.versions) == {"1", "2"}


# -- state that told the truth -----------------------------------------------------------------------


async def test_infer_says_which_version_answered_and_pipelines_name_their_stage(
    nats_server: NatsServer, ident: tuple[Path, str], tmp_path: Path
) -> None:
    repo, name = ident
    set_config(repo / name, max_batch_size=8)
    np.save(tmp_path / "x.npy", np.ones((1, 4), np.float32))
    np.save(tmp_path / "bad.npy", np.ones((1, 3), np.float32))
    async with serving(nats_server.url, repo, [name]):
        code, out, err = await servemesh("infer", name, "--input", f"input={tmp_path / 'x.npy'}",
                                         "--nats", nats_server.url)  # fmt: skip
        assert code == 0 and f"answered by {name}:1 on" in out, err
        code, out, _ = await servemesh("infer", name, "--input", f"input={tmp_path / 'x.npy'}", "--json",
                                       "--nats", nats_server.url)  # fmt: skip
        assert json.loads(out)["version"] == "1"
        code, _, err = await servemesh("infer", name, "--input", f"input={tmp_path / 'bad.npy'}",
                                       "--nats", nats_server.url)  # fmt: skip
        assert code == 1
        one_line(err, "error 400", f"(stage {name}:1)")


async def test_jobs_list_tells_finished_jobs_apart(
    nats_server: NatsServer, ident: tuple[Path, str], client: MeshClient
) -> None:
    repo, name = ident
    async with serving(nats_server.url, repo, [name]):
        job = await client.submit_job(name, [{"input": np.full((1, 4), i, np.float32)} for i in range(20)])
        await job.wait()
        _, out, _ = await servemesh("jobs", "list", "--json", "--nats", nats_server.url)
        listed = next(j for j in json.loads(out) if j["id"] == job.id)
        assert listed["state"] == "done" and listed["done"] == 20
        _code, out, _ = await servemesh("jobs", "list", "--nats", nats_server.url)
        assert any(job.id in line and " done " in line for line in out.splitlines()), out


async def test_a_cancelled_job_has_no_eta(nats_server: NatsServer, ident: tuple[Path, str], client: MeshClient) -> None:
    repo, name = ident
    async with serving(nats_server.url, repo, [name]):
        job = await client.submit_job(name, [{"input": np.full((1, 4), i, np.float32)} for i in range(2000)])
        await job.cancel()
        await job.submitted()

        async def settled() -> bool:
            status = await job.status()
            return status.state == "cancelled" and status.eta_s is None

        await wait_for(settled, 10, what="a cancelled job with no ETA")


async def test_flags_after_the_subcommand_and_help_text(nats_server: NatsServer) -> None:
    code, out, err = await servemesh("models", "list", "--json", "--log-level", "ERROR", "--nats", nats_server.url)
    assert code == 0 and isinstance(json.loads(out), list), err
    code, out, _ = await servemesh("--version")
    assert code == 0 and out.startswith("servemesh ")
    for args in (["--help"], ["up", "--help"], ["models", "add", "--help"], ["routes", "shadow", "--help"]):
        code, out, _ = await servemesh(*args)
        assert code == 0 and "usage:" in out
    code, out, _ = await servemesh("infer", "--help")
    assert "(default: 5.0)" in out and "(default: normal)" in out
    code, _, err = await servemesh("models")
    assert code == 2
    one_line(err, "servemesh models: error", "ACTION")
    assert "models_command" not in err


def _answers(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return False
    return True


async def test_metrics_and_health_bind_loopback_unless_widened() -> None:
    from prometheus_client import CollectorRegistry

    from servemesh.cli import _parser
    from telemetry.endpoint import HttpEndpoint

    default = await HttpEndpoint(0, CollectorRegistry(), lambda: True).start()
    wide = await HttpEndpoint(0, CollectorRegistry(), lambda: True, host="0.0.0.0").start()
    try:
        assert default.host == "127.0.0.1" and default.port > 0
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{default.port}/health/live") as answer:
            assert answer.status == 200
        # 127.0.0.2 is another address of the loopback interface: it reaches what is bound to every
        # address, not what is bound to 127.0.0.1 alone.
        assert _answers("127.0.0.2", wide.port) and not _answers("127.0.0.2", default.port)
    finally:
        await default.close()
        await wide.close()
    args = _parser().parse_args(["worker", "--http-port", "9102", "--http-host", "0.0.0.0"])
    assert (args.http_port, args.http_host) == (9102, "0.0.0.0")


async def test_top_once_piped_keeps_its_headers_and_drops_a_stopped_shadow(
    nats_server: NatsServer, ident: tuple[Path, str]
) -> None:
    from servemesh.commands.top import _shadow_table

    repo, name = ident
    async with serving(nats_server.url, repo, [name]):
        code, out, err = await servemesh("top", "--once", "--nats", nats_server.url)  # stdout is a pipe here
    assert code == 0, err
    assert "lag high/normal/low (msgs, oldest s)" in out and "memory used/budget MiB" in out and "…" not in out
    results = {name: {"shadow": {"1->2": {"mirrored": 5, "outcomes": {}}}}}
    assert _shadow_table(results, {name}) is not None
    assert _shadow_table(results, set()) is None  # `routes shadow --off`: its old tally is not shown
