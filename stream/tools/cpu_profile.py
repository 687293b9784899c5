"""Per-process and per-thread CPU time from ``/proc/PID/task/TID/stat`` over a window (Linux only).

The bench samples every process under test (workers, broker, Redis, the bench itself) at the start and
the end of a saturation run: :class:`CpuSampler` gives, per process and per thread, the CPU seconds used
in the window as a share of one core, so "where does each core's time go" is a measurement rather than
a guess. Threads are named by their ``comm`` (Python threads all show the interpreter's name unless the
code names them; ``py-spy dump --pid PID`` maps thread ids to Python thread names).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CpuSampler", "ThreadTimes", "read_threads"]

_TICKS: float = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0


@dataclass(frozen=True, slots=True)
class ThreadTimes:
    """One thread's name and CPU seconds (user + system) since it started."""

    tid: int
    comm: str
    cpu_s: float


def _parse_stat(text: str) -> tuple[str, float]:
    # "tid (comm) state ppid ... utime stime ..."; comm may hold spaces and parentheses
    comm = text[text.index("(") + 1 : text.rindex(")")]
    rest = text[text.rindex(")") + 2 :].split()
    utime, stime = int(rest[11]), int(rest[12])
    return comm, (utime + stime) / _TICKS


def read_threads(pid: int) -> dict[int, ThreadTimes]:
    """Every thread of ``pid`` now ({} if the process is gone)."""
    out: dict[int, ThreadTimes] = {}
    task_dir = Path(f"/proc/{pid}/task")
    try:
        tids = [int(t) for t in os.listdir(task_dir)]
    except OSError:
        return out
    for tid in tids:
        try:
            comm, cpu_s = _parse_stat((task_dir / str(tid) / "stat").read_text())
        except (OSError, ValueError, IndexError):
            continue  # the thread ended between listdir and read
        out[tid] = ThreadTimes(tid, comm, cpu_s)
    return out


@dataclass
class CpuSampler:
    """CPU used by named processes between :meth:`start` and :meth:`stop`.

    ``processes`` maps a label (``worker-0``, ``broker``, ``bench``) to a PID. A thread that started
    within the window counts from zero; one that ended within it is missing (its time is lost).
    """

    processes: Mapping[str, int]
    _t0: float = 0.0
    _before: dict[str, dict[int, ThreadTimes]] = field(default_factory=dict)

    def start(self) -> CpuSampler:
        self._t0 = time.monotonic()
        self._before = {label: read_threads(pid) for label, pid in self.processes.items()}
        return self

    def stop(self) -> dict[str, Any]:
        """``{"wall_s", "processes": {label: {"pid", "cpu_core_share", "threads": [...]}}, "total_core_share"}``.

        Shares are CPU seconds / wall seconds (1.0 = one core busy the whole window); threads are listed
        busiest first, with the same share, and grouped by name where several share one (``n``).
        """
        wall = max(1e-9, time.monotonic() - self._t0)
        result: dict[str, Any] = {"wall_s": wall, "processes": {}}
        total = 0.0
        for label, pid in self.processes.items():
            after = read_threads(pid)
            before = self._before.get(label, {})
            per_thread = []
            for tid, t in after.items():
                used = t.cpu_s - (before[tid].cpu_s if tid in before else 0.0)
                per_thread.append((t.comm, tid, max(0.0, used)))
            cpu = sum(u for _, _, u in per_thread)
            total += cpu
            per_thread.sort(key=lambda x: -x[2])
            result["processes"][label] = {
                "pid": pid,
                "threads_n": len(after),
                "cpu_core_share": cpu / wall,
                "threads": [
                    {"comm": comm, "tid": tid, "core_share": used / wall} for comm, tid, used in per_thread if used > 0
                ],
            }
        result["total_core_share"] = total / wall
        return result
