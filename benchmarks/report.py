"""The benchmark's results as data, and their rendering as a plain-text table and as JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Check", "Report", "Row", "publish", "render", "write_json"]


@dataclass(slots=True)
class Row:
    """One measured cell: a path under closed-loop load, or direct onnxruntime at one batch size."""

    path: str
    conc: int  # concurrent requests, or the batch size of a direct run
    requests: int
    req_per_s: float
    samples_per_s: float
    p50_ms: float
    p99_ms: float
    mean_batch: float | None = None
    queue_ms: float | None = None  # the worker's mean: stored in the stream → its batch started
    compute_ms: float | None = None  # the worker's mean time in the model per batch
    cpu: dict[str, float] = field(default_factory=dict)  # % of one core, by process


@dataclass(slots=True)
class Check:
    """A ratio or figure with its target; ``passed`` is None for figures shown for information only."""

    name: str
    value: float
    shown: str
    target: str
    passed: bool | None


@dataclass
class Report:
    machine: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(padded).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _num(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _cpu(cpu: dict[str, float]) -> str:
    return "/".join(_num(cpu.get(name)) for name in ("client", "nats", "server", "machine"))


def _verdict(passed: bool | None) -> str:
    return "info" if passed is None else ("PASS" if passed else "FAIL")


def render(report: Report) -> str:
    m = report.machine
    out = [
        f"servemesh mesh benchmark — {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}, "
        f"onnxruntime {m['onnxruntime']}, {m['nats_server']}",
        f"event loop of load generator, worker and echo responder: {m['loop']}; JetStream storage: "
        f"{m['storage']}; {m['cell_s']:g} s per cell after {m['warmup_s']:g} s warm-up; load average at start "
        f"{m['loadavg']}",
        "",
    ]
    rows = [
        [r.path, str(r.conc), _num(r.requests), _num(r.req_per_s), _num(r.samples_per_s), _num(r.p50_ms, 2),
         _num(r.p99_ms, 2), _num(r.mean_batch, 1), _num(r.queue_ms, 2), _num(r.compute_ms, 2), _cpu(r.cpu)]
        for r in report.rows
    ]  # fmt: skip
    headers = ["path", "conc/batch", "requests", "req/s", "samples/s", "p50 ms", "p99 ms", "mean batch",
               "queue ms", "compute ms", "CPU% client/nats/server/all"]  # fmt: skip
    out += _table(headers, rows, right=set(range(1, 11)))
    out += [
        "notes: direct runs: req/s = session.run calls/s, from the median run time (other load on the machine",
        "       discounted). queue ms (stored in the stream → batch started) and compute ms are the worker's own",
        "       timing, as means. CPU% is per process, 100 = one core: server = echo responder or worker,",
        "       all = every process on the machine (so all minus the rest = load this benchmark did not start).",
    ]
    mem = report.memory
    if mem:
        out += [
            "",
            f"worker RSS: {mem['rss_before_mib']:.1f} MiB before, {mem['rss_after_mib']:.1f} MiB after "
            f"{mem['requests']:,} echo_id requests at concurrency {mem['concurrency']} "
            f"({mem['req_per_s']:,.0f} req/s, {mem['growth_pct']:+.1f}%)",
        ]
    checks = [[c.name, c.shown, c.target, _verdict(c.passed)] for c in report.checks]
    out += ["", *_table(["target", "value", "target", "result"], checks, right={1})]
    out += ["", f"total time {report.elapsed_s:.0f} s"]
    return "\n".join(out)


def write_json(report: Report, path: Path) -> None:
    path.write_text(json.dumps(asdict(report), indent=2, allow_nan=True) + "\n")


def publish(table: str, results: Any, json_out: Path | None) -> None:
    """Print a benchmark's table and, when asked, write its results (a dataclass) as JSON."""
    print("\n" + table)
    if json_out is not None:
        json_out.write_text(json.dumps(asdict(results), indent=2) + "\n")
        print(f"results written to {json_out}")
