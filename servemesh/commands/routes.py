"""``servemesh routes ...``: split a model's traffic across its versions; promote safely, roll back;
mirror a share of it to a candidate version (shadow) and see how often the candidate agrees."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

from pydantic import ValidationError

from broker.registry import Registry
from schemas.shadow import ShadowConfig
from schemas.spec import ModelSpec
from servemesh.commands.support import CliError, Parser, UsageError, command_group, on_registry
from servemesh.routes import default_weights, ready_counts

__all__ = ["add_parsers", "run"]


def _weight(pair: str) -> tuple[str, float]:
    """``VERSION=WEIGHT``, a weight of 0 or more: checked as the command line is read."""
    version, sep, raw = pair.partition("=")
    if not sep or not version:
        raise argparse.ArgumentTypeError(f"expected VERSION=WEIGHT, got {pair!r}")
    try:
        weight = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{pair}: the weight must be a number, got {raw!r}") from None
    if not math.isfinite(weight) or weight < 0:
        raise argparse.ArgumentTypeError(f"{pair}: a weight is a number of 0 or more")
    return version, weight


def _weights(pairs: list[tuple[str, float]]) -> dict[str, float]:
    weights = dict(pairs)
    if not any(w > 0 for w in weights.values()):
        raise UsageError("at least one version needs a positive weight")
    return weights


async def _spec(registry: Registry, name: str) -> ModelSpec:
    spec = await registry.get_spec(name)
    if spec is None:
        raise CliError(f"no model {name!r}")
    return spec


async def _current(registry: Registry, name: str) -> dict[str, float]:
    route = await registry.get_route(name)
    if route is not None and route.get("weights"):
        return dict(route["weights"])
    spec = await _spec(registry, name)
    # No route yet: what requests for the bare name get now (the default version once it is ready).
    weights = default_weights(spec.resolve_version(None), spec.versions, ready_counts(await registry.get_status(name)))
    return {version: 100.0 * weight / sum(weights.values()) for version, weight in weights.items()}


async def _set(registry: Registry, args: argparse.Namespace) -> Any:
    weights = _weights(args.weights)
    spec = await _spec(registry, args.name)
    unknown = sorted(set(weights) - set(spec.versions))
    if unknown:
        raise CliError(f"{args.name} has no version(s) {', '.join(unknown)}; it has {', '.join(sorted(spec.versions))}")
    old = await registry.get_route(args.name) or {}
    route = {**old, "weights": weights, "previous": await _current(registry, args.name), "updated": time.time()}
    await registry.put_route(args.name, route)
    return route


async def _rollback(registry: Registry, args: argparse.Namespace) -> Any:
    await _spec(registry, args.name)
    route = await registry.get_route(args.name)
    if route is None or not route.get("previous"):
        raise CliError(f"{args.name} has no earlier route to go back to")
    back = {**route, "weights": route["previous"], "previous": route["weights"], "updated": time.time()}
    await registry.put_route(args.name, back)
    return back


async def _show(registry: Registry, args: argparse.Namespace) -> Any:
    await _spec(registry, args.name)
    route = await registry.get_route(args.name) or {}
    shown = {**route, "weights": await _current(registry, args.name)}
    results = ((await registry.get_status(args.name)) or {}).get("shadow")
    if results:
        shown["shadow_results"] = results  # since the leading router started
    return shown


async def _shadow(registry: Registry, args: argparse.Namespace) -> Any:
    spec = await _spec(registry, args.name)
    route = await registry.get_route(args.name)
    if args.off:
        if route is None or "shadow" not in route:
            raise CliError(f"{args.name} mirrors nothing: no shadow to turn off")
        route.pop("shadow", None)
    else:
        if args.version is None:
            raise UsageError("name the version to mirror to, or pass --off")
        if args.version not in spec.versions:
            raise CliError(f"{args.name} has no version {args.version!r}")
        try:
            config = ShadowConfig(version=args.version, percent=args.percent, rtol=args.rtol, atol=args.atol)
        except ValidationError as exc:
            raise UsageError(f"invalid shadow settings: {exc.errors()[0]['msg']}") from None
        weights = await _current(registry, args.name)
        if weights.get(args.version, 0) >= sum(weights.values()) > 0:
            print(f"warning: {args.name}:{args.version} already takes all the traffic; only requests to other "
                  "versions are mirrored, so nothing will be", file=sys.stderr)  # fmt: skip
        route = {**(route or {}), "shadow": config.model_dump()}
    route["updated"] = time.time()
    await registry.put_route(args.name, route)
    return route


async def _rm(registry: Registry, args: argparse.Namespace) -> Any:
    await _spec(registry, args.name)
    if await registry.get_route(args.name) is None:
        raise CliError(f"{args.name} has no route to remove")
    await registry.delete_route(args.name)
    return {"removed": args.name}


_COMMANDS = {"set": _set, "rollback": _rollback, "show": _show, "rm": _rm, "shadow": _shadow}


def _print_human(command: str, name: str, result: Any) -> None:
    if command == "rm":
        print(f"removed the route of {name}: requests for it go to its default version")
        return
    weights = result.get("weights") or {}
    total = sum(weights.values()) or 1.0
    print(f"{name}: " + ", ".join(f"version {v} {100 * w / total:.0f}%" for v, w in sorted(weights.items())))
    shadow = result.get("shadow")
    if shadow:
        print(f"  shadow: {shadow['percent']:g}% mirrored to version {shadow['version']}")
    for pair, tally in (result.get("shadow_results") or {}).items():
        print(f"  {pair}: {json.dumps(tally)}")


async def run(args: argparse.Namespace) -> int:
    if args.routes_command == "set":
        _weights(args.weights)  # before connecting: a usage error needs no mesh
    result = await on_registry(args.nats, lambda registry: _COMMANDS[args.routes_command](registry, args))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_human(args.routes_command, args.name, result)
    return 0


def add_parsers(sub: argparse._SubParsersAction, common: Parser) -> None:  # type: ignore[type-arg]
    action = command_group(sub, "routes", "weighted routes across a model's versions (canary, A/B, rollback, "
                           "shadow)", common, "routes_command")  # fmt: skip
    set_ = action("set", "e.g. `routes set iris 1=90 2=10`; a new version gets its share once ready")
    set_.add_argument("name")
    set_.add_argument("weights", nargs="+", type=_weight, metavar="VERSION=WEIGHT",
                      help="weights of 0 or more, one positive")  # fmt: skip
    action("rollback", "go back to the weights before the last `routes set`").add_argument("name")
    action("show", "the weights requests for the model follow now, and how its shadow compares").add_argument("name")
    action("rm", "remove the route: requests go to the model's default version").add_argument("name")
    shadow = action("shadow", "e.g. `routes shadow iris 2 --percent 10`: mirror 10%% of the requests to version 2, "
                    "compare its replies, never return them; --off stops")  # fmt: skip
    shadow.add_argument("name")
    shadow.add_argument("version", nargs="?", help="the candidate version")
    shadow.add_argument("--percent", type=float, default=10.0, help="share of requests mirrored")
    shadow.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance for agreement")
    shadow.add_argument("--atol", type=float, default=1e-6, help="absolute tolerance for agreement")
    shadow.add_argument("--off", action="store_true", help="stop mirroring")
