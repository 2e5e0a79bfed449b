"""``servemesh routes ...``: split a model's traffic across its versions; promote safely, roll back;
mirror a share of it to a candidate version (shadow) and see how often the candidate agrees."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from pydantic import ValidationError

from broker.registry import Registry
from broker.routes import default_weights, ready_counts
from router.cli_support import add_common_flags, on_registry
from schemas.shadow import ShadowConfig

__all__ = ["add_parsers", "run"]


def _weights(pairs: list[str]) -> dict[str, float]:
    weights = {}
    for pair in pairs:
        version, sep, weight = pair.partition("=")
        if not sep:
            raise SystemExit(f"expected VERSION=WEIGHT, got {pair!r}")
        weights[version] = float(weight)
    if not any(w > 0 for w in weights.values()):
        raise SystemExit("at least one version needs a positive weight")
    return weights


async def _current(registry: Registry, name: str) -> dict[str, float]:
    route = await registry.get_route(name)
    if route is not None and route.get("weights"):
        return dict(route["weights"])
    spec = await registry.get_spec(name)
    if spec is None:
        raise SystemExit(f"no model {name!r}")
    # No route yet: what requests for the bare name get now (the default version once it is ready).
    weights = default_weights(spec.resolve_version(None), spec.versions, ready_counts(await registry.get_status(name)))
    return {version: 100.0 * weight / sum(weights.values()) for version, weight in weights.items()}


async def _set(registry: Registry, args: argparse.Namespace) -> Any:
    spec = await registry.get_spec(args.name)
    if spec is None:
        raise SystemExit(f"no model {args.name!r}")
    weights = _weights(args.weights)
    unknown = sorted(set(weights) - set(spec.versions))
    if unknown:
        raise SystemExit(f"{args.name} has no version(s) {unknown}")
    old = await registry.get_route(args.name) or {}
    route = {**old, "weights": weights, "previous": await _current(registry, args.name), "updated": time.time()}
    await registry.put_route(args.name, route)
    return route


async def _rollback(registry: Registry, args: argparse.Namespace) -> Any:
    route = await registry.get_route(args.name)
    if route is None or not route.get("previous"):
        raise SystemExit(f"{args.name} has no earlier route to go back to")
    back = {**route, "weights": route["previous"], "previous": route["weights"], "updated": time.time()}
    await registry.put_route(args.name, back)
    return back


async def _show(registry: Registry, args: argparse.Namespace) -> Any:
    route = await registry.get_route(args.name) or {}
    shown = {**route, "weights": await _current(registry, args.name)}
    results = ((await registry.get_status(args.name)) or {}).get("shadow")
    if results:
        shown["shadow_results"] = results  # since the leading router started
    return shown


async def _shadow(registry: Registry, args: argparse.Namespace) -> Any:
    route = await registry.get_route(args.name) or {}
    if args.off:
        route.pop("shadow", None)
    else:
        if args.version is None:
            raise SystemExit("name the version to mirror to, or pass --off")
        spec = await registry.get_spec(args.name)
        if spec is None:
            raise SystemExit(f"no model {args.name!r}")
        if args.version not in spec.versions:
            raise SystemExit(f"{args.name} has no version {args.version!r}")
        try:
            config = ShadowConfig(version=args.version, percent=args.percent, rtol=args.rtol, atol=args.atol)
        except ValidationError as exc:
            raise SystemExit(f"invalid shadow settings: {exc.errors()[0]['msg']}") from None
        route["shadow"] = config.model_dump()
    route["updated"] = time.time()
    await registry.put_route(args.name, route)
    return route


async def _rm(registry: Registry, args: argparse.Namespace) -> Any:
    await registry.delete_route(args.name)
    return {"removed": args.name}


_COMMANDS = {"set": _set, "rollback": _rollback, "show": _show, "rm": _rm, "shadow": _shadow}


async def run(args: argparse.Namespace) -> int:
    result = await on_registry(args.nats, lambda registry: _COMMANDS[args.routes_command](registry, args))
    print(json.dumps(result, indent=2 if args.json else None))
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    routes = sub.add_parser("routes", help="weighted routes across a model's versions (canary, A/B, rollback)")
    rsub = routes.add_subparsers(dest="routes_command", required=True)
    set_ = rsub.add_parser("set", help="e.g. `routes set iris 1=90 2=10`; a new version gets its share once ready")
    set_.add_argument("name")
    set_.add_argument("weights", nargs="+", metavar="VERSION=WEIGHT")
    for verb in ("rollback", "show", "rm"):
        rsub.add_parser(verb).add_argument("name")
    shadow = rsub.add_parser("shadow", help="e.g. `routes shadow iris 2 --percent 10`: mirror 10%% of the "
                             "requests to version 2, compare its replies, never return them; --off stops")  # fmt: skip
    shadow.add_argument("name")
    shadow.add_argument("version", nargs="?")
    shadow.add_argument("--percent", type=float, default=10.0, help="share of requests mirrored (default 10)")
    shadow.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance for agreement")
    shadow.add_argument("--atol", type=float, default=1e-6, help="absolute tolerance for agreement")
    shadow.add_argument("--off", action="store_true", help="stop mirroring")
    add_common_flags(rsub.choices.values())
