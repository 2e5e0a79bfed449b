"""Runs ``servemesh worker`` with the tracing hooks replaced by bare no-ops: the "build without the
instrumentation path" that bench_tracing.py compares tracing-off against."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


HOOKS = (
    "enabled", "start_producer", "start_consumer", "start_batch", "start_inference", "end", "end_requests",
    "configure_from_env",
)  # fmt: skip


def strip_tracing() -> dict[str, object]:
    """Swap every hook for the cheapest callable that keeps the call sites working; returns the originals."""
    from broker import tracing

    def nothing(*args: object, **kwargs: object) -> None:
        return None

    originals = {hook: getattr(tracing, hook) for hook in HOOKS}
    for hook in HOOKS:
        setattr(tracing, hook, nothing)  # enabled() → None, which call sites read as false
    return originals


def restore_tracing(originals: dict[str, object]) -> None:
    from broker import tracing

    for hook, fn in originals.items():
        setattr(tracing, hook, fn)


if __name__ == "__main__":
    strip_tracing()
    from router.cli import main

    raise SystemExit(main(["worker", *sys.argv[1:]]))
