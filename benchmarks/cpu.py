"""CPU use of named processes over an interval, so a table can show which side of a run was saturated."""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["CpuMeter", "cpu_seconds"]

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of every thread of ``pid`` so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces; the fields after its closing parenthesis are fixed.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


class CpuMeter:
    """``start()`` then ``stop()``: each process's CPU over that time, in % of one core (200 = two cores busy)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._t0 = 0.0
        self._c0: dict[str, float] = {}

    def start(self) -> None:
        self._c0 = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._t0 = time.monotonic()

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self._t0
        return {name: (cpu_seconds(pid) - self._c0[name]) / wall * 100 for name, pid in self.pids.items()}
