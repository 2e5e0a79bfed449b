"""``servemesh pipelines ...``: name a chain of models once, then call it like a model."""

from __future__ import annotations

import argparse
import itertools
import json
from typing import Any

from broker.registry import Registry
from schemas.spec import ModelSpec
from schemas.subjects import check_name
from servemesh.commands.support import CliError, Parser, UsageError, command_group, on_registry

__all__ = ["add_parsers", "run"]


async def _add(registry: Registry, args: argparse.Namespace) -> Any:
    try:
        check_name(args.name)
        for stage in args.stages:
            name, _, version = stage.partition(":")
            check_name(name, version or None)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    specs = []
    for stage in args.stages:
        name, _, version = stage.partition(":")
        spec = await registry.get_spec(name)
        if spec is None or (version and version not in spec.versions):
            raise CliError(f"stage {stage!r}: no such model{' version' if version else ''} registered")
        specs.append(spec)
    if await registry.get_spec(args.name) is not None:
        raise CliError(f"{args.name!r} is a model's name; a pipeline needs a name of its own")
    for (before, spec_a), (after, spec_b) in itertools.pairwise(zip(args.stages, specs, strict=True)):
        problem = _mismatch(spec_a, spec_b)
        if problem:
            raise CliError(f"{before} → {after}: {problem}")
    await registry.put_pipeline(args.name, list(args.stages))
    return {"added": args.name, "stages": args.stages}


def _mismatch(first: ModelSpec, then: ModelSpec) -> str | None:
    """Why ``first``'s outputs cannot be ``then``'s inputs, where both signatures are declared."""
    if not first.outputs or not then.inputs:
        return None  # a signature not declared is read from the model when it loads: checked then
    outputs = {t.name: t for t in first.outputs}
    for wanted in then.inputs:
        given = outputs.get(wanted.name)
        if given is None:
            return (f"{then.name} takes input {wanted.name!r}, which {first.name} does not give "
                    f"(its outputs: {', '.join(outputs)})")  # fmt: skip
        if given.dtype != wanted.dtype:
            return f"{first.name} gives {wanted.name!r} as {given.dtype}; {then.name} takes {wanted.dtype}"
    return None


async def _list(registry: Registry, args: argparse.Namespace) -> Any:
    return await registry.pipelines()


async def _rm(registry: Registry, args: argparse.Namespace) -> Any:
    if await registry.get_pipeline(args.name) is None:
        raise CliError(f"no pipeline {args.name!r}")
    await registry.delete_pipeline(args.name)
    return {"removed": args.name}


_COMMANDS = {"add": _add, "list": _list, "rm": _rm}


async def run(args: argparse.Namespace) -> int:
    result = await on_registry(args.nats, lambda registry: _COMMANDS[args.pipelines_command](registry, args))
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.pipelines_command == "list":
        for name, stages in sorted(result.items()):
            print(f"{name}: {' → '.join(stages)}")
    elif args.pipelines_command == "add":
        print(f"registered pipeline {result['added']}: {' → '.join(result['stages'])}")
    else:
        print(f"removed pipeline {result['removed']}")
    return 0


def add_parsers(sub: argparse._SubParsersAction, common: Parser) -> None:  # type: ignore[type-arg]
    action = command_group(sub, "pipelines", "name chains of models, called like a model", common, "pipelines_command")
    add = action("add", "register NAME as the stages STAGE... (model or model:version), each one's outputs the "
                 "next one's inputs")  # fmt: skip
    add.add_argument("name")
    add.add_argument("stages", nargs="+", metavar="STAGE")
    action("list", "registered pipelines")
    action("rm", "unregister a pipeline").add_argument("name")
