"""Runs ``servemesh worker`` with part of tracing cut out, for bench_tracing.py: ``--strip``, the hooks
replaced by bare no-ops (the "build without the instrumentation path" that tracing-off is compared against);
``--unexported``, spans recorded as usual but dropped where they would be queued for export (what recording
costs, without the export)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


HOOKS = (
    "enabled", "start_producer", "start_consumer", "start_batch", "start_inference", "end", "end_requests",
    "configure_from_env",
)  # fmt: skip
SUBMITS = ("submit", "submit_many", "submit_columns")


def nothing(*args: object, **kwargs: object) -> None:
    return None


Swapped = tuple[object, dict[str, object]]  # whose attributes were swapped, and what they were


def _swap(owner: object, names: tuple[str, ...]) -> Swapped:
    originals = {name: getattr(owner, name) for name in names}
    for name in names:
        setattr(owner, name, nothing)
    return owner, originals


def restore(swapped: Swapped | None) -> None:
    if swapped is not None:
        owner, originals = swapped
        for name, value in originals.items():
            setattr(owner, name, value)


def strip_tracing() -> Swapped:
    """Swap every hook for the cheapest callable that keeps the call sites working (``enabled()`` → None,
    which call sites read as false); :func:`restore` puts them back."""
    from broker import tracing

    return _swap(tracing, HOOKS)


def unexported() -> Swapped:
    """Let the span exporter drop every span it is handed; :func:`restore` undoes it."""
    from broker.span_export import OtlpExporter

    return _swap(OtlpExporter, SUBMITS)


if __name__ == "__main__":
    cut, args = (sys.argv[1] if len(sys.argv) > 1 else ""), sys.argv[2:]
    if cut not in ("--strip", "--unexported"):
        raise SystemExit(f"usage: stripped_worker.py --strip|--unexported <servemesh worker arguments>: not {cut}")
    strip_tracing() if cut == "--strip" else unexported()
    from router.cli import main

    raise SystemExit(main(["worker", *args]))
