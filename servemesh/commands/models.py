"""``servemesh models ...``: register, inspect and remove models in the mesh's registry."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from broker.registry import Registry
from broker.storage import latest_report
from schemas.spec import ModelSpec, VersionSpec
from schemas.subjects import PRIORITIES, check_name
from servemesh.commands.support import CliError, Parser, UsageError, command_group, kv_pairs, on_registry, priorities
from workers.repository import ModelConfigError, read_model, read_repository
from workers.s3_repository import read_s3_model, read_s3_repository
from workers.store import ArtifactStore, StoreSettings

__all__ = ["add_parsers", "run"]


def _placement(text: str) -> tuple[str, dict[str, str]]:
    """``PRIORITY:k=v,...`` → (priority, labels), checked."""
    priority, sep, labels = text.partition(":")
    if priority not in PRIORITIES or not sep or not labels.strip():
        raise argparse.ArgumentTypeError(f"expected PRIORITY:k=v,... with PRIORITY one of {', '.join(PRIORITIES)}, "
                                         f"got {text!r}")  # fmt: skip
    return priority, kv_pairs(labels)


async def _from_source(name: str, source: str, version: str | None) -> ModelSpec:
    try:
        return await _read_source(name, source, version)
    except ModelConfigError as exc:
        raise CliError(str(exc)) from None


async def _read_source(name: str, source: str, version: str | None) -> ModelSpec:
    if source.startswith("s3://"):
        spec = await read_s3_model(ArtifactStore(StoreSettings.from_env()), source)
        return _one_version(spec.model_copy(update={"name": name}), version, source)
    path = Path(source)
    if path.is_dir():
        return _one_version(read_model(path).model_copy(update={"name": name}), version, source)
    if path.is_file():
        fmt = {".pt2": "torch_export", ".pt": "torchscript", ".pth": "torchscript"}.get(path.suffix, "onnx")
        vspec = VersionSpec(uri=path.resolve().as_uri(), format=fmt, size=path.stat().st_size)
        return ModelSpec(name=name, versions={version or "1": vspec})
    raise CliError(f"--from {source}: no such model directory or artifact file")


def _one_version(spec: ModelSpec, version: str | None, source: str) -> ModelSpec:
    """A repository's versions are its subdirectories: ``--version`` picks one of them."""
    if version is None:
        return spec
    if version not in spec.versions:
        raise UsageError(f"--version {version}: {source} holds version(s) {', '.join(sorted(spec.versions))} "
                         "(a directory's versions are its subdirectories); name one of them or drop --version")
    return spec.model_copy(update={"versions": {version: spec.versions[version]}})


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {
        "min_replicas": args.min_replicas, "max_replicas": args.max_replicas, "memory_mb": args.memory_mb,
        "max_batch_size": args.max_batch_size, "max_delay_ms": args.max_delay_ms, "instances": args.instances,
        "tenant": args.tenant, "priorities": args.priorities, "labels": args.labels,
        "placement": dict(args.placement) if args.placement else None,
    }  # fmt: skip
    return {k: v for k, v in values.items() if v is not None}


async def _add(registry: Registry, args: argparse.Namespace) -> Any:
    try:
        check_name(args.name)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.min_replicas is not None and args.max_replicas is not None and args.min_replicas > args.max_replicas:
        raise UsageError(f"--min-replicas {args.min_replicas} exceeds --max-replicas {args.max_replicas}")
    new = await _from_source(args.name, args.source, args.version)
    existing = await registry.get_spec(args.name)
    merged = new.model_dump()
    if existing is not None:  # a new version of a known model keeps the model's settings
        merged = {**existing.model_dump(), "versions": {**existing.model_dump()["versions"], **merged["versions"]}}
    merged.update(_overrides(args))
    if args.max_replicas is None and merged.get("max_replicas", 1) < merged.get("min_replicas", 1):
        merged["max_replicas"] = merged["min_replicas"]  # only --min-replicas given: the bound follows it
    spec = ModelSpec.model_validate(merged)
    await registry.put_spec(spec)
    return {"added": spec.name, "versions": sorted(spec.versions)}


async def _add_repo(registry: Registry, args: argparse.Namespace) -> Any:
    if args.dir.startswith("s3://"):
        specs, errors = await read_s3_repository(ArtifactStore(StoreSettings.from_env()), args.dir)
    elif not Path(args.dir).is_dir():
        raise CliError(f"{args.dir}: no such model repository")
    else:
        specs, errors = read_repository(Path(args.dir))
    for spec in specs:
        await registry.put_spec(spec)
    return {"added": [s.name for s in specs], "skipped": {e.model: e.reason for e in errors}}


def _summary(spec: ModelSpec, status: dict[str, Any] | None) -> dict[str, Any]:
    versions = (status or {}).get("versions", {})
    return {
        "name": spec.name, "versions": sorted(spec.versions), "default": spec.resolve_version(None),
        "replicas": {"min": spec.min_replicas, "max": spec.max_replicas},
        "ready": {v: len(s.get("ready", [])) for v, s in versions.items()},
        "lag": {v: sum(p["messages"] for p in s.get("lag", {}).values()) for v, s in versions.items()},
    }  # fmt: skip


async def _storage(registry: Registry) -> dict[str, str]:
    """Streams that store no writes, as a router last found (nothing when no router answers)."""
    report = await latest_report(registry.conn) if registry.conn is not None else None
    return report.unwritable if report is not None else {}


async def _list(registry: Registry, args: argparse.Namespace) -> Any:
    _print_storage(await _storage(registry))  # to stderr: the listing itself stays a list
    return [_summary(spec, await registry.get_status(spec.name)) for spec in await registry.list_specs()]


async def _show(registry: Registry, args: argparse.Namespace) -> Any:
    spec = await registry.get_spec(args.name)
    if spec is None:
        raise CliError(f"no model {args.name!r}")
    status = await registry.get_status(args.name) or {}
    return {"spec": json.loads(spec.model_dump_json()), "status": status.get("versions", {}),
            "leader": status.get("leader"), "storage": await _storage(registry)}  # fmt: skip


async def _rm(registry: Registry, args: argparse.Namespace) -> Any:
    if await registry.get_spec(args.name) is None:
        raise CliError(f"no model {args.name!r}")
    using = sorted(name for name, stages in (await registry.pipelines()).items()
                   if any(stage.partition(":")[0] == args.name for stage in stages))  # fmt: skip
    if using and not args.force:
        raise CliError(f"pipeline(s) {', '.join(using)} use {args.name}: remove them first, or pass --force")
    await registry.delete_spec(args.name)
    return {"removed": args.name, "pipelines_left_dangling": using}


def _print_storage(storage: dict[str, str], file: Any = sys.stderr) -> None:
    for stream, why in storage.items():
        print(f"STORAGE: stream {stream} {why}", file=file)


def _print_human(command: str, result: Any) -> None:
    if command == "list":
        print(f"{'MODEL':<24} {'VERSIONS':<12} {'REPLICAS':<9} {'READY':<12} LAG")
        for m in result:
            ready = ",".join(f"{v}:{n}" for v, n in m["ready"].items()) or "-"
            lag = ",".join(f"{v}:{n}" for v, n in m["lag"].items()) or "-"
            print(f"{m['name']:<24} {','.join(m['versions']):<12} {m['replicas']['min']}..{m['replicas']['max']:<6} "
                  f"{ready:<12} {lag}")  # fmt: skip
    elif command == "show":
        _print_show(result)
    elif command == "add":
        print(f"registered {result['added']}: version(s) {', '.join(result['versions'])}")
    elif command == "add-repo":
        print(f"registered {len(result['added'])} model(s): {', '.join(result['added']) or 'none'}")
        for model, reason in result["skipped"].items():
            print(f"skipped {model}: {reason}")
    elif command == "rm":
        print(f"removed {result['removed']}")
        if result["pipelines_left_dangling"]:
            print(f"pipelines that still name it: {', '.join(result['pipelines_left_dangling'])}")


def _print_show(result: Any) -> None:
    _print_storage(result.get("storage") or {}, sys.stdout)
    spec = result["spec"]
    print(f"{spec['name']}: batch ≤ {spec['max_batch_size']}, delay {spec['max_delay_ms']} ms, "
          f"{spec.get('instances', 1)} instance(s) per replica, replicas "
          f"{spec['min_replicas']}..{spec['max_replicas']}, priorities {','.join(spec['priorities'])}")  # fmt: skip
    for version in sorted(spec["versions"]):
        st = result["status"].get(version, {})
        print(f"  version {version}: ready on {', '.join(st.get('ready', [])) or 'no worker'}; "
              f"assigned to {', '.join(st.get('desired', [])) or 'none'}; {st.get('rps', 0)} req/s")  # fmt: skip
        for priority, lag in st.get("lag", {}).items():
            print(f"    {priority:<7} lag {lag['messages']} msgs, oldest {lag['age_s']} s")
        for worker, reason in st.get("failed", {}).items():
            print(f"    FAILED on {worker}: {reason}")
        for worker, reason in st.get("stalled", {}).items():
            print(f"    NOT SERVING on {worker}: {reason}")
        if st.get("last_decision"):
            d = st["last_decision"]
            print(f"    last decision: {d['action']}{' on ' + d['worker'] if d.get('worker') else ''}: {d['reason']}")


_COMMANDS = {"add": _add, "add-repo": _add_repo, "list": _list, "show": _show, "rm": _rm}


async def run(args: argparse.Namespace) -> int:
    result = await on_registry(args.nats, lambda registry: _COMMANDS[args.models_command](registry, args))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_human(args.models_command, result)
    return 0


def add_parsers(sub: argparse._SubParsersAction, common: Parser) -> None:  # type: ignore[type-arg]
    action = command_group(sub, "models", "register, list, show and remove models", common, "models_command")
    add = action("add", "register a model (or a new version of one)")
    add.add_argument("name", help="the model's name (letters, digits, '_' and '-')")
    add.add_argument("--from", dest="source", required=True, help="model directory, artifact file or s3:// URI")
    add.add_argument("--version", help="the version to register: of an artifact file (default 1), or one of a "
                     "directory's version subdirectories (default: all of them)")  # fmt: skip
    add.add_argument("--min-replicas", type=int, help="replicas kept loaded (0: scale to zero; default 1)")
    add.add_argument("--max-replicas", type=int, help="most replicas under load (default 1, or --min-replicas)")
    add.add_argument("--memory-mb", type=int, help="memory a replica needs (default: from the artifact's size)")
    add.add_argument("--max-batch-size", type=int, help="requests a batch may hold (0: not batched)")
    add.add_argument("--max-delay-ms", type=float, help="how long a batch waits for company (default 2)")
    add.add_argument("--instances", type=int, help="batches a replica computes at once, sharing its cores (default 1)")
    add.add_argument("--tenant", help="the tenant that owns the model (docs/security.md); its claims bucket is "
                     "made by `servemesh provision`")  # fmt: skip
    add.add_argument("--priorities", type=priorities, help=f"some of {','.join(PRIORITIES)} (default: all)")
    add.add_argument("--labels", type=kv_pairs, help="worker labels the model needs, k=v,...")
    add.add_argument("--placement", type=_placement, action="append", default=[], metavar="PRIORITY:k=v,...",
                     help="worker labels one priority needs, e.g. high:tier=fast")  # fmt: skip
    repo = action("add-repo", "register every model of a repository (directory or s3://bucket/prefix)")
    repo.add_argument("dir", help="the repository")
    action("list", "registered models with ready replicas and lag")
    show = action("show", "one model: replicas, workers, lag, rps, failures, last decision")
    show.add_argument("name")
    rm = action("rm", "unregister a model (its replicas are unloaded)")
    rm.add_argument("name")
    rm.add_argument("--force", action="store_true", help="even if pipelines use it")
