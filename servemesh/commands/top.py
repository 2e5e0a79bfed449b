"""``servemesh top``: a live terminal view of models (lag, replicas, rps, latency), workers, and
shadow traffic (how often each candidate version agrees with its primary)."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from rich.console import Group
from rich.live import Live
from rich.table import Table

from broker.connection import Connection
from broker.registry import Registry
from broker.settings import Settings
from broker.storage import latest_report
from servemesh.commands.support import require_provisioned

__all__ = ["render", "run_top"]


def _models_table(specs: list[Any], statuses: dict[str, Any], beats: dict[str, Any]) -> Table:
    table = Table(title="models", expand=True)
    for column in ("model:version", "replicas want/ready", "lag high/normal/low (msgs, oldest s)", "rps", "p50/p99 ms"):
        table.add_column(column)
    for spec in specs:
        versions = (statuses.get(spec.name) or {}).get("versions", {})
        for version in sorted(spec.versions):
            st = versions.get(version, {})
            lags = [st.get("lag", {}).get(p, {}) for p in ("high", "normal", "low")]
            lag = " / ".join(f"{x.get('messages', 0)} ({x.get('age_s', 0):.1f})" for x in lags)
            loaded = [m for b in beats.values() for m in b.get("models", {}).values()
                      if m["model"] == spec.name and m["version"] == version]  # fmt: skip
            p50 = max((m["stats"].get("p50_ms") or 0 for m in loaded), default=0)
            p99 = max((m["stats"].get("p99_ms") or 0 for m in loaded), default=0)
            rps = sum(m.get("rps", 0.0) for m in loaded)
            table.add_row(f"{spec.name}:{version}", f"{len(st.get('desired', []))}/{len(loaded)}", lag,
                          f"{rps:.1f}", f"{p50:.1f}/{p99:.1f}")  # fmt: skip
    return table


def _gpu_memory(beat: dict[str, Any]) -> str:
    """Planned/budget MiB of GPU memory, and what the device has free; "-" on a CPU worker."""
    device = beat.get("device") or {}
    if device.get("kind", "cpu") == "cpu":
        return "-"
    free = device.get("memory_free_mb")
    return f"{beat.get('gpu_memory_used_mb', 0)}/{beat.get('gpu_memory_mb', 0)}" + (f" ({free} free)" if free else "")


def _workers_table(beats: dict[str, Any]) -> Table:
    table = Table(title="workers", expand=True)
    for column in ("worker", "device", "labels", "loaded", "memory used/budget MiB", "GPU MiB", "busy %"):
        table.add_column(column)
    for worker_id, beat in sorted(beats.items()):
        models = beat.get("models", {})
        busy = max((m.get("busy", 0.0) for m in models.values()), default=0.0)
        labels = ",".join(f"{k}={v}" for k, v in beat.get("labels", {}).items()) or "-"
        device = beat.get("device") or {}
        shown = device.get("id", "cpu") + (f" {device['name']}" if device.get("kind") == "cuda" else "")
        table.add_row(worker_id, shown, labels, ", ".join(models) or "-",
                      f"{beat.get('memory_used_mb', 0)}/{beat.get('memory_mb', 0)}", _gpu_memory(beat),
                      f"{100 * busy:.0f}")  # fmt: skip
    return table


def _shadow_table(statuses: dict[str, Any], shadowing: set[str]) -> Table | None:
    """Shadow results of the models that mirror now (``shadowing``): turned off, a model's go."""
    rows = [(model, pair, results) for model, st in sorted(statuses.items()) if model in shadowing
            for pair, results in sorted(((st or {}).get("shadow") or {}).items())]  # fmt: skip
    if not rows:
        return None
    table = Table(title="shadow traffic", expand=True)
    for column in ("model primary->candidate", "mirrored", "agree %", "errors/timeouts", "max |diff|",
                   "p50/p99 ms primary", "p50/p99 ms candidate"):  # fmt: skip
        table.add_column(column)
    for model, pair, r in rows:
        outcomes = r.get("outcomes", {})
        agreement = r.get("agreement")
        latency = [(r.get("latency_ms") or {}).get(side) or {} for side in ("primary", "shadow")]
        table.add_row(f"{model} {pair}", str(r.get("mirrored", 0)),
                      "-" if agreement is None else f"{100 * agreement:.1f}",
                      f"{outcomes.get('shadow_error', 0)}/{outcomes.get('shadow_timeout', 0)}",
                      f"{r.get('max_abs_diff', 0):.3g}",
                      *(f"{x.get('p50', 0):.1f}/{x.get('p99', 0):.1f}" for x in latency))  # fmt: skip
    return table


async def render(registry: Registry) -> Group:
    specs = await registry.list_specs()
    statuses = {spec.name: await registry.get_status(spec.name) for spec in specs}
    beats = await registry.heartbeats()
    stamp = time.strftime("%H:%M:%S")
    routes = {spec.name: await registry.get_route(spec.name) for spec in specs}
    shadow = _shadow_table(statuses, {name for name, route in routes.items() if route and route.get("shadow")})
    tables = [_models_table(specs, statuses, beats), _workers_table(beats), *([shadow] if shadow else [])]
    report = await latest_report(registry.conn) if registry.conn is not None else None
    unwritable = report.unwritable if report is not None else {}
    storage = [f"[bold red]STORAGE: stream {stream} {why}[/]" for stream, why in unwritable.items()]
    return Group(f"servemesh top — {stamp}", *storage, *tables)


async def run_top(settings: Settings, interval_s: float = 1.0, once: bool = False) -> None:
    conn = await Connection.open(settings, name="servemesh-top")
    try:
        await require_provisioned(conn)
        registry = await Registry.open(conn)
        if once:
            from rich.console import Console

            # Piped, a frame is as wide as it needs (a terminal's width would cut its headers).
            Console(width=None if sys.stdout.isatty() else 200).print(await render(registry))
            return
        with Live(await render(registry), refresh_per_second=4, screen=False) as live:
            while True:
                await asyncio.sleep(interval_s)
                live.update(await render(registry))
    finally:
        await conn.close()
