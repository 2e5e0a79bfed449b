"""CPU use of named processes over an interval, so a table can show which side of a run was saturated."""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["CpuMeter", "cpu_seconds", "machine_busy_seconds", "main_thread"]

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU time of every thread of ``pid`` so far, or of one ``thread`` of it (a thread id)."""
    stat = Path(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat").read_text()
    # The command name may hold spaces; the fields after its closing parenthesis are fixed.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def main_thread(name: str) -> str:
    """The entry of a process's main thread in what :meth:`CpuMeter.stop` returns."""
    return f"{name} (main thread)"


def machine_busy_seconds() -> float:
    """CPU time every core spent on anything but idling, steal included: on a shared box, others' load shows here."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / _TICKS


class CpuMeter:
    """``start()`` then ``stop()``: each process's CPU over that time, in % of one core (200 = two cores busy).

    The ``machine`` entry is every core's busy time, so ``machine`` minus the rest is load we did not start.
    The processes named in ``main_threads`` have their main thread's share too, as :func:`main_thread` names it.
    """

    def __init__(self, pids: dict[str, int], main_threads: tuple[str, ...] = ()) -> None:
        self.pids = pids
        self._main = main_threads
        self._t0 = 0.0
        self._c0: dict[str, float] = {}

    def start(self) -> None:
        self._c0 = self._read()
        self._t0 = time.monotonic()

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self._t0
        now = self._read()
        return {name: (now[name] - self._c0[name]) / wall * 100 for name in now}

    def _read(self) -> dict[str, float]:
        seconds = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        seconds |= {main_thread(name): cpu_seconds(self.pids[name], self.pids[name]) for name in self._main}
        return seconds | {"machine": machine_busy_seconds()}
