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


def strip_tracing() -> dict[str, object]:
    """Swap every hook for the cheapest callable that keeps the call sites working; returns the originals."""
    from broker import tracing

    originals = {hook: getattr(tracing, hook) for hook in HOOKS}
    for hook in HOOKS:
        setattr(tracing, hook, nothing)  # enabled() → None, which call sites read as false
    return originals


def restore_tracing(originals: dict[str, object]) -> None:
    from broker import tracing

    for hook, fn in originals.items():
        setattr(tracing, hook, fn)


def unexported() -> dict[str, object]:
    """Let the span exporter drop every span it is handed; returns what to give :func:`exported` back."""
    from broker.span_export import OtlpExporter

    originals = {name: getattr(OtlpExporter, name) for name in SUBMITS}
    for name in SUBMITS:
        setattr(OtlpExporter, name, nothing)
    return originals


def exported(originals: dict[str, object]) -> None:
    from broker.span_export import OtlpExporter

    for name, fn in originals.items():
        setattr(OtlpExporter, name, fn)


if __name__ == "__main__":
    cut, args = sys.argv[1], sys.argv[2:]
    if cut not in ("--strip", "--unexported"):
        raise SystemExit(f"usage: stripped_worker.py --strip|--unexported <servemesh worker arguments>: not {cut}")
    strip_tracing() if cut == "--strip" else unexported()
    from router.cli import main

    raise SystemExit(main(["worker", *args]))
