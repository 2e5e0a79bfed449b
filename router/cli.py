"""The ``servemesh`` command: run the mesh's processes and send requests from a shell."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
from pathlib import Path
from typing import Any

import numpy as np

from broker import tracing
from broker.client import MeshClient
from broker.logs import configure_logging
from broker.loop import run
from broker.server import NatsServer
from broker.settings import Settings
from schemas.errors import MeshError

__all__ = ["main"]


def _cmd_nats(args: argparse.Namespace) -> int:
    with NatsServer(port=args.port, store_dir=args.store_dir) as server:
        # Its own server: this is the admin step that provisions it (as `servemesh up` does).
        asyncio.run(_provision(Settings.from_env(nats_url=server.url), []))
        print(f"nats-server ready at {server.url} (JetStream data in {server.store_dir}), provisioned; "
              "Ctrl-C stops it", flush=True)  # fmt: skip
        _wait_for_signal()
    return 0


async def _provision(settings: Settings, tenants: list[str]) -> list[str]:
    from broker.connection import Connection
    from broker.provision import provision

    conn = await Connection.open(settings, name="servemesh-provision")
    try:
        return await provision(conn, tenants)
    finally:
        await conn.close()


def _cmd_provision(args: argparse.Namespace) -> int:
    """The admin step: the only command that creates or changes the mesh's streams and buckets."""
    settings = Settings.from_env(nats_url=args.nats, replicas=args.replicas, max_queue=args.max_queue,
                                 storage=args.storage)  # fmt: skip
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
    from broker.endpoint import check_ready

    if not settings.http_port:
        raise SystemExit("--check needs the HTTP endpoint: set SERVEMESH_HTTP_PORT or --http-port")
    ready = check_ready(settings.http_port)
    print("ready" if ready else "not ready")
    return 0 if ready else 1


def _cmd_worker(args: argparse.Namespace) -> int:
    from workers.process import run_worker

    settings = Settings.from_env(nats_url=args.nats, http_port=args.http_port)
    if args.check:
        return _check(settings)
    models = Path(args.models) if args.models else None
    labels = _labels(args.labels)
    run(run_worker(settings, models, args.id, memory_mb=args.memory_mb, labels=labels), settings.loop)
    return 0


def _labels(text: str | None) -> dict[str, str]:
    pairs = [item.partition("=") for item in (text or "").split(",") if item]
    if any(not sep for _, sep, _ in pairs):
        raise SystemExit(f"--labels takes k=v,..., got {text!r}")
    return {k.strip(): v.strip() for k, _, v in pairs}


def _cmd_router(args: argparse.Namespace) -> int:
    from router.process import run_router

    settings = Settings.from_env(nats_url=args.nats, http_port=args.http_port)
    if args.check:
        return _check(settings)
    run(run_router(settings, args.id, args.tick), settings.loop)
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from router.model_commands import run as run_models

    return run(run_models(args), "asyncio")


def _cmd_pipelines(args: argparse.Namespace) -> int:
    from router.pipeline_commands import run as run_pipelines

    return run(run_pipelines(args), "asyncio")


def _cmd_jobs(args: argparse.Namespace) -> int:
    from router.job_commands import run as run_jobs

    return run(run_jobs(args), "asyncio")


def _cmd_routes(args: argparse.Namespace) -> int:
    from router.route_commands import run as run_routes

    return run(run_routes(args), "asyncio")


def _cmd_top(args: argparse.Namespace) -> int:
    from router.top import run_top

    with contextlib.suppress(KeyboardInterrupt):
        run(run_top(Settings.from_env(nats_url=args.nats), args.interval, args.once), "asyncio")
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    from router.local import LocalMesh

    state = Path(args.state_dir) if args.state_dir else None
    mesh = LocalMesh(Path(args.models), workers=args.workers, routers=args.routers, port=args.port, state_dir=state)
    asyncio.run(mesh.start())
    try:
        print(f"servemesh up: nats at {mesh.url}, {args.workers} worker(s), {args.routers} router(s), "
              f"models from {args.models}", flush=True)  # fmt: skip
        print(f"logs in {mesh.log_dir}; try: servemesh infer MODEL --input NAME=FILE.npy --nats {mesh.url}", flush=True)
        _wait_for_signal()
    finally:
        mesh.stop()
    return 0


def _cmd_infer(args: argparse.Namespace) -> int:
    inputs = {}
    for item in args.input:
        name, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"--input takes NAME=FILE.npy, got {item!r}")
        inputs[name] = np.load(path, allow_pickle=False)
    try:
        reply = asyncio.run(_infer(args, inputs))
    except MeshError as err:
        print(json.dumps(err.to_wire()) if args.json else f"error {err.status} ({err.code}): {err.message}")
        return 1
    if args.json:
        outputs = {name: value.tolist() for name, value in reply.outputs.items()}
        print(json.dumps({"outputs": outputs, "timing": _timing(reply)}))
    else:
        for name, value in reply.outputs.items():
            print(f"{name} {value.dtype}{list(value.shape)}:\n{value}")
        print("timing:", ", ".join(f"{k}={v}" for k, v in _timing(reply).items()))
    return 0


def _timing(reply: Any) -> dict[str, Any]:
    t = reply.timing
    return {"queue_ms": round(t.queue_ms, 3), "compute_ms": round(t.compute_ms, 3), "batch_size": t.batch_size,
            "worker": t.worker, "attempt": t.attempt}  # fmt: skip


async def _infer(args: argparse.Namespace, inputs: dict[str, np.ndarray[Any, Any]]) -> Any:
    tracing.configure_from_env("servemesh-cli")
    settings = Settings.from_env(nats_url=args.nats)
    async with await MeshClient.connect(settings=settings) as client:
        return await client.infer_reply(
            args.model, inputs, version=args.version, priority=args.priority, timeout=args.timeout
        )


def _wait_for_signal() -> None:
    received: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: received.append(signum))
    while not received:
        signal.pause()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="servemesh", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-json", action="store_true", help="JSON log lines with trace and request ids")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="embedded nats-server + workers on this machine, until Ctrl-C")
    up.add_argument("--models", required=True, help="model repository directory")
    up.add_argument("--workers", type=int, default=1)
    up.add_argument("--routers", type=int, default=1)
    up.add_argument("--port", type=int, default=4222, help="nats port (-1: any free port)")
    up.add_argument("--state-dir", help="keep JetStream data and logs here (default: a temp dir)")
    up.set_defaults(run=_cmd_up)

    nats_cmd = sub.add_parser("nats", help="run the embedded nats-server alone")
    nats_cmd.add_argument("--port", type=int, default=4222)
    nats_cmd.add_argument("--store-dir")
    nats_cmd.set_defaults(run=_cmd_nats)

    prov = sub.add_parser("provision", help="create (or bring in line) the mesh's streams and buckets: the admin step")
    prov.add_argument("--tenant", action="append", default=[], metavar="NAME",
                      help="also make this tenant's claims bucket (owners of registered models get theirs anyway)")
    prov.add_argument("--replicas", type=int, help="stream and bucket replicas ($SERVEMESH_REPLICAS; 3 in a cluster)")
    prov.add_argument("--max-queue", type=int, help="messages one subject may hold ($SERVEMESH_MAX_QUEUE)")
    prov.add_argument("--storage", choices=["file", "memory"], help="$SERVEMESH_STORAGE")
    prov.add_argument("--json", action="store_true", help="machine-readable output")
    prov.add_argument("--nats", help="NATS URL (default: $SERVEMESH_NATS_URL)")
    prov.set_defaults(run=_cmd_provision)

    worker = sub.add_parser("worker", help="serve what the router assigns (or, with --models, a repository)")
    worker.add_argument("--models", help="serve every model of this repository instead of following the router")
    worker.add_argument("--id", help="stable worker id (default: host-pid)")
    worker.add_argument("--memory-mb", type=int, default=4096, help="memory budget for loaded models")
    worker.add_argument("--labels", help="k=v,... (e.g. tier=fast,zone=a) for placement rules")
    worker.add_argument("--nats", help="NATS URL (default: $SERVEMESH_NATS_URL)")
    worker.set_defaults(run=_cmd_worker)

    router = sub.add_parser("router", help="placement and autoscaling (run 2+ for HA; one leads)")
    router.add_argument("--id", help="router id (default: host-pid)")
    router.add_argument("--tick", type=float, default=0.5, help="seconds between placement rounds")
    router.add_argument("--nats", help="NATS URL (default: $SERVEMESH_NATS_URL)")
    router.set_defaults(run=_cmd_router)
    for process in (worker, router):
        process.add_argument("--http-port", type=int, help="serve /metrics and /health/* here ($SERVEMESH_HTTP_PORT)")
        process.add_argument("--check", action="store_true", help="probe the running process: exit 0 when ready")

    top = sub.add_parser("top", help="live view of models and workers")
    top.add_argument("--interval", type=float, default=1.0)
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.add_argument("--nats", help="NATS URL (default: $SERVEMESH_NATS_URL)")
    top.set_defaults(run=_cmd_top)

    from router import job_commands, model_commands, pipeline_commands, route_commands

    model_commands.add_parsers(sub)
    sub.choices["models"].set_defaults(run=_cmd_models)
    pipeline_commands.add_parsers(sub)
    sub.choices["pipelines"].set_defaults(run=_cmd_pipelines)
    job_commands.add_parsers(sub)
    sub.choices["jobs"].set_defaults(run=_cmd_jobs)
    route_commands.add_parsers(sub)
    sub.choices["routes"].set_defaults(run=_cmd_routes)

    infer = sub.add_parser("infer", help="send one request and print the outputs")
    infer.add_argument("model")
    infer.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy", required=True)
    infer.add_argument("--version")
    infer.add_argument("--priority", default="normal", choices=["high", "normal", "low"])
    infer.add_argument("--timeout", type=float, default=5.0)
    infer.add_argument("--json", action="store_true", help="machine-readable output")
    infer.add_argument("--nats", help="NATS URL (default: $SERVEMESH_NATS_URL)")
    infer.set_defaults(run=_cmd_infer)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.log_level, as_json=args.log_json or Settings.from_env().log_json)
    result: int = args.run(args)
    return result
