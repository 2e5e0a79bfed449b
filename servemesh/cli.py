"""servemesh: a model-serving mesh on NATS JetStream. Run its processes, manage its models, routes,
pipelines and batch jobs, and send it requests from a shell. Every command takes --nats URL (default
$SERVEMESH_NATS_URL, else nats://127.0.0.1:4222) and --json where it prints results."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from broker.loop import run
from broker.settings import Settings
from servemesh.commands.support import CliError, Parser, UsageError, common_flags, guarded, kv_pairs
from telemetry.logs import configure_logging

__all__ = ["main"]

# Commands that run until stopped log what they do; the others only what went wrong.
_LONG_RUNNING = {"up", "nats", "worker", "router", "gateway"}


def _settings(args: argparse.Namespace, **overrides: Any) -> Settings:
    return Settings.from_env(nats_url=args.nats, **overrides)


async def _provision(settings: Settings, tenants: list[str]) -> list[str]:
    from broker.connection import Connection
    from broker.provision import provision

    conn = await Connection.open(settings, name="servemesh-provision")
    try:
        return await provision(conn, tenants)
    finally:
        await conn.close()


def _stop_on_sigterm() -> None:
    """SIGTERM ends the command as Ctrl-C does, so that what it started is stopped on the way out."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _wait_for_signal() -> None:
    """Until SIGINT or SIGTERM (either raises KeyboardInterrupt: the caller's cleanup runs)."""
    _stop_on_sigterm()
    while True:
        signal.pause()


def _start_server(port: int, store_dir: Path | None) -> Any:
    from broker.server import NatsServer

    server = NatsServer(port=port, store_dir=store_dir)
    try:
        return server.start()
    except RuntimeError as exc:
        server.close()
        if "address already in use" in str(exc):
            raise CliError(f"port {port} is in use (another nats-server or `servemesh up`?): "
                           "choose another with --port, or -1 for any free one") from None  # fmt: skip
        raise CliError(f"nats-server did not start: {str(exc).splitlines()[0]}") from None


def _cmd_nats(args: argparse.Namespace) -> int:
    _stop_on_sigterm()
    server = _start_server(args.port, Path(args.store_dir) if args.store_dir else None)
    try:
        # Its own server: this is the admin step that provisions it (as `servemesh up` does).
        asyncio.run(_provision(_settings(args, nats_url=server.url), []))
        print(f"nats-server ready at {server.url} (JetStream data in {server.store_dir}), provisioned; "
              "Ctrl-C stops it", flush=True)  # fmt: skip
        _wait_for_signal()
    except KeyboardInterrupt:
        print("stopping nats-server", flush=True)
    finally:
        server.close()
    return 0


def _cmd_provision(args: argparse.Namespace) -> int:
    """The admin step: the only command that creates or changes the mesh's streams and buckets."""
    settings = _settings(args, replicas=args.replicas, max_queue=args.max_queue, storage=args.storage)
    done = asyncio.run(_provision(settings, args.tenant))
    if args.json:
        print(json.dumps({"nats": settings.nats_url, "done": done}))
    else:
        for line in done:
            print(line)
        print(f"the mesh at {settings.nats_url} is provisioned" + ("" if done else "; nothing to change"))
    return 0


def _check(settings: Settings) -> int:
    """``--check``: exit 0 when the process serving this machine's HTTP port says it is ready."""
    from telemetry.endpoint import check_ready

    if not settings.http_port:
        raise UsageError("--check needs the HTTP endpoint: set SERVEMESH_HTTP_PORT or --http-port")
    ready = check_ready(settings.http_port)
    print("ready" if ready else "not ready")
    return 0 if ready else 1


def _cmd_worker(args: argparse.Namespace) -> int:
    from workers.device import DeviceError, gpu_budget_mb, resolve_device
    from workers.process import run_worker

    settings = _settings(args, http_port=args.http_port, http_host=args.http_host)
    if args.check:
        return _check(settings)
    models = Path(args.models) if args.models else None
    if models is not None and not models.is_dir():
        raise CliError(f"--models {models}: no such model repository")
    try:  # CUDA's own variable, read here at the entry point like every setting
        device = resolve_device(args.device, os.environ.get("CUDA_VISIBLE_DEVICES"))
        gpu_mb = gpu_budget_mb(device, args.gpu_memory_mb)
    except DeviceError as exc:
        raise CliError(str(exc)) from None
    with contextlib.suppress(KeyboardInterrupt):
        run(run_worker(settings, models, args.id, memory_mb=args.memory_mb, labels=args.labels, device=device,
                       gpu_memory_mb=gpu_mb), settings.loop)  # fmt: skip
    return 0


def _workers(text: str) -> int | str:
    if text.strip().lower() == "gpu":
        return "gpu"
    try:
        return int(_positive(int)(text))
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc}: give a number of workers, or gpu") from None


def _device(text: str) -> str:
    from workers.device import parse_device

    try:
        return parse_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cmd_router(args: argparse.Namespace) -> int:
    from router.process import run_router

    settings = _settings(args, http_port=args.http_port, http_host=args.http_host)
    if args.check:
        return _check(settings)
    with contextlib.suppress(KeyboardInterrupt):
        run(run_router(settings, args.id, args.tick), settings.loop)
    return 0


def _cmd_gateway(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from servemesh.gateway.core import GatewaySettings
    from servemesh.gateway.process import Listening, check_gateway_settings, run_gateway

    flags = {"host": args.host, "http_port": args.http_port, "grpc_port": args.grpc_port, "keys_file": args.keys,
             "tls_cert": args.tls_cert, "tls_key": args.tls_key, "processes": args.processes}  # fmt: skip
    try:
        gw = GatewaySettings(**{k: v for k, v in flags.items() if v is not None})
        check_gateway_settings(gw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise UsageError(f"SERVEMESH_GATEWAY_{'_'.join(map(str, first['loc'])).upper()}: {first['msg']}") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    settings = _settings(args, http_port=args.metrics_port, http_host=args.metrics_host)

    def listening(where: Listening) -> None:
        print(f"gateway: REST {where.http or 'off'}, gRPC {where.grpc or 'off'}", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        run(run_gateway(settings, gw, listening), settings.loop)
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from servemesh.commands.models import run as run_models

    return run(run_models(args), "asyncio")


def _cmd_pipelines(args: argparse.Namespace) -> int:
    from servemesh.commands.pipelines import run as run_pipelines

    return run(run_pipelines(args), "asyncio")


def _cmd_jobs(args: argparse.Namespace) -> int:
    from servemesh.commands.jobs import run as run_jobs

    return run(run_jobs(args), "asyncio")


def _cmd_routes(args: argparse.Namespace) -> int:
    from servemesh.commands.routes import run as run_routes

    return run(run_routes(args), "asyncio")


def _cmd_top(args: argparse.Namespace) -> int:
    from servemesh.commands.top import run_top

    with contextlib.suppress(KeyboardInterrupt):
        run(run_top(_settings(args), args.interval, args.once), "asyncio")
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    from servemesh.local import LocalMesh

    models = Path(args.models)
    if not models.is_dir():
        raise CliError(f"--models {models}: no such model repository")
    state = Path(args.state_dir) if args.state_dir else None
    if -1 in (args.gateway_http_port, args.gateway_grpc_port) and not args.no_gateway:
        raise UsageError("the gateway's ports are fixed ones (1-65535); --no-gateway starts none")
    gateway = None if args.no_gateway else (args.gateway_http_port, args.gateway_grpc_port)
    gpus = None
    if args.workers == "gpu":
        from workers.device import DeviceError, gpu_uuids

        try:
            gpus = gpu_uuids(os.environ.get("CUDA_VISIBLE_DEVICES"))
        except DeviceError as exc:
            raise CliError(f"--workers gpu: {exc}") from None
    mesh = LocalMesh(models, workers=args.workers if gpus is None else len(gpus), routers=args.routers,
                     port=args.port, state_dir=state, gateway=gateway, gpus=gpus)  # fmt: skip
    _stop_on_sigterm()  # from here on, SIGTERM and Ctrl-C both stop whatever was started
    try:
        try:
            asyncio.run(mesh.start(say=lambda line: print(line, flush=True)))
        except RuntimeError as exc:
            if "address already in use" in str(exc):
                raise CliError(f"port {args.port} is in use (another nats-server or `servemesh up`?): choose "
                               "another with --port, or -1 for any free one") from None  # fmt: skip
            raise
        failed = [label for label, outcome in mesh.outcome.items() if not outcome.startswith("ready")]
        print(f"servemesh up: nats at {mesh.url}; {len(mesh.outcome) - len(failed)} of {len(mesh.outcome)} "
              f"model version(s) ready; logs in {mesh.log_dir}; Ctrl-C stops everything", flush=True)  # fmt: skip
        print(f"try: servemesh models list --nats {mesh.url}", flush=True)
        _wait_for_signal()
    except KeyboardInterrupt:
        print("stopping the mesh ...", flush=True)
    finally:
        mesh.stop()
    return 0


def _load_inputs(items: list[str]) -> dict[str, Any]:
    """``NAME=FILE.npy`` and ``FILE.npz`` (its arrays by name) → arrays, each file checked."""
    import numpy as np

    inputs: dict[str, Any] = {}
    for item in items:
        name, sep, path = item.rpartition("=") if "=" in item else ("", "", item)
        if not sep and not path.endswith(".npz"):
            raise UsageError(f"--input takes NAME=FILE.npy or FILE.npz, got {item!r}")
        file = Path(path)
        if not file.is_file():
            raise CliError(f"--input {item}: no such file")
        try:
            loaded = np.load(file, allow_pickle=False)
        except ValueError:
            raise CliError(f"{file} is not a NumPy .npy/.npz array file (pickled Python objects are not read); "
                           "save arrays with numpy.save or numpy.savez") from None
        except OSError as exc:
            raise CliError(f"{file} cannot be read as NumPy data: {exc}") from None
        if isinstance(loaded, np.lib.npyio.NpzFile):
            if sep:
                raise UsageError(f"--input {item}: an .npz holds arrays by name; give it as --input {path}")
            inputs.update({key: loaded[key] for key in loaded.files})
        else:
            inputs[name] = loaded
    return inputs


def _cmd_infer(args: argparse.Namespace) -> int:
    inputs = _load_inputs(args.input)
    reply = asyncio.run(_infer(args, inputs))
    timing = _timing(reply)
    if args.json:
        outputs = {name: value.tolist() for name, value in reply.outputs.items()}
        print(json.dumps({"outputs": outputs, "version": reply.timing.version, "timing": timing}))
    else:
        for name, value in reply.outputs.items():
            print(f"{name} {value.dtype}{list(value.shape)}:\n{value}")
        print(f"answered by {args.model}:{reply.timing.version or '?'} on {reply.timing.worker}; "
              + ", ".join(f"{k}={v}" for k, v in timing.items() if k != "worker"))  # fmt: skip
    return 0


def _timing(reply: Any) -> dict[str, Any]:
    t = reply.timing
    return {"queue_ms": round(t.queue_ms, 3), "compute_ms": round(t.compute_ms, 3), "batch_size": t.batch_size,
            "worker": t.worker, "attempt": t.attempt}  # fmt: skip


async def _infer(args: argparse.Namespace, inputs: dict[str, Any]) -> Any:
    from servemesh.client import MeshClient
    from telemetry import tracing

    tracing.configure_from_env("servemesh-cli")
    async with await MeshClient.connect(settings=_settings(args)) as client:
        return await client.infer_reply(
            args.model, inputs, version=args.version, priority=args.priority, timeout=args.timeout
        )


# A process id names its key in the registry's buckets: what a JetStream KV key may hold.
_PROCESS_ID = re.compile(r"[-_=A-Za-z0-9]{1,128}")


def _process_id(text: str) -> str:
    if not _PROCESS_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r}: use letters, digits, '-', '_' and '=' (at most 128)")
    return text


def _positive(kind: type[int] | type[float]) -> Any:
    def check(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} must be above 0")
        return value

    check.__name__ = kind.__name__
    return check


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not (value == -1 or 0 < value < 65536):
        raise argparse.ArgumentTypeError(f"{text}: a port is 1..65535 (-1: any free one)")
    return value


def _listener_port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not -1 <= value < 65536:
        raise argparse.ArgumentTypeError(f"{text}: a port is 1..65535 (0: any free one, -1: off)")
    return value


def _version() -> str:
    try:
        return version("servemesh")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    common = common_flags()
    parser = Parser(prog="servemesh", description=__doc__, parents=[common_flags(top=True)])
    parser.add_argument("--version", action="version", version=f"servemesh {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    def command(name: str, about: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=about, description=about, parents=[common])

    up = command("up", "the whole mesh on this machine (embedded nats-server, routers, workers) until Ctrl-C")
    up.add_argument("--models", required=True, help="model repository directory (<model>/<version>/model.onnx)")
    up.add_argument("--workers", type=_workers, default=1, help="worker processes on the CPU, or gpu: one per "
                    "visible GPU (CUDA_VISIBLE_DEVICES respected)")  # fmt: skip
    up.add_argument("--routers", type=_positive(int), default=1, help="router processes")
    up.add_argument("--port", type=_port, default=4222, help="nats-server port (-1: any free port)")
    up.add_argument("--state-dir", help="keep JetStream data and logs here (default: a temporary directory)")
    up.add_argument("--gateway-http-port", type=_port, default=8000, help="the gateway's REST port")
    up.add_argument("--gateway-grpc-port", type=_port, default=8001, help="the gateway's gRPC port")
    up.add_argument("--no-gateway", action="store_true", help="start no Open Inference Protocol gateway")
    up.set_defaults(run=_cmd_up)

    nats_cmd = command("nats", "the embedded nats-server alone, provisioned, until Ctrl-C")
    nats_cmd.add_argument("--port", type=_port, default=4222, help="port (-1: any free port)")
    nats_cmd.add_argument("--store-dir", help="JetStream data directory (default: a temporary directory)")
    nats_cmd.set_defaults(run=_cmd_nats)

    prov = command("provision", "create (or bring in line) the mesh's streams and buckets: the admin step")
    prov.add_argument("--tenant", action="append", default=[], metavar="NAME",
                      help="also make this tenant's claims bucket (owners of registered models get theirs anyway)")
    prov.add_argument("--replicas", type=_positive(int), help="stream and bucket replicas (3 in a cluster; "
                      "default $SERVEMESH_REPLICAS, else 1)")  # fmt: skip
    prov.add_argument("--max-queue", type=_positive(int), help="messages one subject may hold "
                      "(default $SERVEMESH_MAX_QUEUE, else 10000)")  # fmt: skip
    prov.add_argument("--storage", choices=["file", "memory"], help="default $SERVEMESH_STORAGE, else file")
    prov.add_argument("--json", action="store_true", help="machine-readable output")
    prov.set_defaults(run=_cmd_provision)

    worker = command("worker", "serve what the router assigns (or, with --models, a repository as it is)")
    worker.add_argument("--models", help="serve every model of this repository instead of following the router")
    worker.add_argument("--id", type=_process_id, help="stable worker id (default: host-pid)")
    worker.add_argument("--memory-mb", type=_positive(int), default=4096, help="host memory budget for loaded models")
    worker.add_argument("--device", type=_device, default="auto", help="cpu or cuda:N (CUDA_VISIBLE_DEVICES "
                        "numbering); auto: cuda:0 where a GPU is visible and onnxruntime can use it, else cpu")
    worker.add_argument("--gpu-memory-mb", type=_positive(int), help="GPU memory budget for loaded models "
                        "(default: 90%% of what is free on the device at start)")  # fmt: skip
    worker.add_argument("--labels", type=kv_pairs, default={}, help="k=v,... (e.g. tier=fast,zone=a) for placement")
    worker.set_defaults(run=_cmd_worker)

    router = command("router", "placement and autoscaling (run 2 or more for high availability: one leads)")
    router.add_argument("--id", type=_process_id, help="router id (default: router-host-pid)")
    router.add_argument("--tick", type=_positive(float), default=0.5, help="seconds between placement rounds")
    router.set_defaults(run=_cmd_router)
    for process in (worker, router):
        process.add_argument("--http-port", type=_port, help="serve /metrics and /health/* on this port "
                             "(default $SERVEMESH_HTTP_PORT, else off)")  # fmt: skip
        process.add_argument("--http-host", help="address the HTTP endpoint binds (default "
                             "$SERVEMESH_HTTP_HOST, else 127.0.0.1; 0.0.0.0 for every interface)")  # fmt: skip
        process.add_argument("--check", action="store_true", help="probe the running process: exit 0 when ready")

    gateway = command("gateway", "the Open Inference Protocol (KServe v2) front door: REST and gRPC")
    gateway.add_argument("--http-port", type=_listener_port, help="REST port (0: any free one, -1: off; "
                         "default $SERVEMESH_GATEWAY_HTTP_PORT, else 8000)")  # fmt: skip
    gateway.add_argument("--grpc-port", type=_listener_port, help="gRPC port (0: any free one, -1: off; "
                         "default $SERVEMESH_GATEWAY_GRPC_PORT, else 8001)")  # fmt: skip
    gateway.add_argument("--host", help="address both listen on (default $SERVEMESH_GATEWAY_HOST, else 127.0.0.1)")
    gateway.add_argument("--processes", type=_positive(int), help="processes sharing the ports (default 1)")
    gateway.add_argument("--keys", help="YAML file of API keys, each with its tenant's NATS credentials "
                         "(default $SERVEMESH_GATEWAY_KEYS_FILE; unset: no key is asked for)")  # fmt: skip
    gateway.add_argument("--tls-cert", help="PEM certificate: both listeners speak TLS (with --tls-key)")
    gateway.add_argument("--tls-key", help="PEM private key of --tls-cert")
    gateway.add_argument("--metrics-port", type=_port, help="serve /metrics and /health/* on this port (default "
                         "$SERVEMESH_HTTP_PORT, else off; with --processes, process i takes this + i)")  # fmt: skip
    gateway.add_argument("--metrics-host", help="address the metrics endpoint binds (default $SERVEMESH_HTTP_HOST, "
                         "else 127.0.0.1)")  # fmt: skip
    gateway.set_defaults(run=_cmd_gateway)

    top = command("top", "live view of models, workers, lag and storage")
    top.add_argument("--interval", type=_positive(float), default=1.0, help="seconds between frames")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.set_defaults(run=_cmd_top)

    from servemesh.commands import jobs as job_commands
    from servemesh.commands import models as model_commands
    from servemesh.commands import pipelines as pipeline_commands
    from servemesh.commands import routes as route_commands

    for module, name, runner in ((model_commands, "models", _cmd_models), (pipeline_commands, "pipelines",
                                 _cmd_pipelines), (job_commands, "jobs", _cmd_jobs),
                                 (route_commands, "routes", _cmd_routes)):  # fmt: skip
        module.add_parsers(sub, common)
        sub.choices[name].set_defaults(run=runner)

    infer = command("infer", "send one request and print the outputs, and which version answered")
    infer.add_argument("model", help="model, or model:version, or a registered pipeline")
    infer.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy|FILE.npz", required=True,
                       help="an input from a .npy file, or all of them from an .npz (repeat for several)")
    infer.add_argument("--version", help="this version, not the model's route")
    infer.add_argument("--priority", default="normal", choices=["high", "normal", "low"], help="its queue")
    infer.add_argument("--timeout", type=_positive(float), default=5.0, help="seconds")
    infer.add_argument("--json", action="store_true", help="machine-readable output")
    infer.set_defaults(run=_cmd_infer)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = args.log_level or ("INFO" if args.command in _LONG_RUNNING else "WARNING")
    as_json = args.log_json or os.environ.get("SERVEMESH_LOG_JSON", "").lower() in ("1", "true", "yes")
    try:
        configure_logging(level, as_json=as_json)
    except ValueError:
        print(f"servemesh: error: --log-level {level!r}: give DEBUG, INFO, WARNING or ERROR", file=sys.stderr)
        return 2
    action = getattr(args, f"{args.command}_command", None)
    prog = f"servemesh {args.command}" + (f" {action}" if action else "")
    return guarded(lambda: int(args.run(args)), prog, args.debug, as_json=bool(getattr(args, "json", False)))
