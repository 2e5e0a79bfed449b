"""``servemesh pipelines ...``: name a chain of models once, then call it like a model."""

from __future__ import annotations

import argparse
import json
from typing import Any

from broker.registry import Registry
from router.cli_support import add_common_flags, on_registry
from schemas.subjects import check_name

__all__ = ["add_parsers", "run"]


async def _add(registry: Registry, args: argparse.Namespace) -> Any:
    check_name(args.name)
    for stage in args.stages:
        name, _, version = stage.partition(":")
        check_name(name, version or None)
        spec = await registry.get_spec(name)
        if spec is None or (version and version not in spec.versions):
            raise SystemExit(f"stage {stage!r}: no such model{' version' if version else ''} registered")
    if await registry.get_spec(args.name) is not None:
        raise SystemExit(f"{args.name!r} is a model's name; a pipeline needs a name of its own")
    await registry.put_pipeline(args.name, list(args.stages))
    return {"added": args.name, "stages": args.stages}


async def _list(registry: Registry, args: argparse.Namespace) -> Any:
    return await registry.pipelines()


async def _rm(registry: Registry, args: argparse.Namespace) -> Any:
    if await registry.get_pipeline(args.name) is None:
        raise SystemExit(f"no pipeline {args.name!r}")
    await registry.delete_pipeline(args.name)
    return {"removed": args.name}


_COMMANDS = {"add": _add, "list": _list, "rm": _rm}


async def run(args: argparse.Namespace) -> int:
    result = await on_registry(args.nats, lambda registry: _COMMANDS[args.pipelines_command](registry, args))
    if args.json or args.pipelines_command != "list":
        print(json.dumps(result, indent=2 if args.json else None))
    else:
        for name, stages in sorted(result.items()):
            print(f"{name}: {' → '.join(stages)}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    pipelines = sub.add_parser("pipelines", help="name chains of models, called like a model")
    psub = pipelines.add_subparsers(dest="pipelines_command", required=True)
    add = psub.add_parser("add", help="register NAME as the stages STAGE... (model or model:version)")
    add.add_argument("name")
    add.add_argument("stages", nargs="+")
    psub.add_parser("list", help="registered pipelines")
    rm = psub.add_parser("rm", help="unregister a pipeline")
    rm.add_argument("name")
    add_common_flags(psub.choices.values())
