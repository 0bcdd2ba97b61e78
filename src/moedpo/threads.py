"""How many CPU threads PyTorch's intra-op pool gets: by default, the cores that other work leaves free now.

PyTorch starts one thread per core whatever else runs. On a shared machine its threads then wait for each other on
cores that another process holds. Measured on 2 cores with the default ``moedpo train`` (150 steps; training speed,
then wall time from start to report):

| other busy processes | 2 threads (PyTorch's default) | 1 thread |
|---|---|---|
| 0 | 13.1 steps/s, 21 s | 10.1 steps/s, 25 s |
| 1 | 3.3 steps/s, 59 s | 11.3 steps/s, 24 s |
| 2 | 3.1 steps/s, 69 s | 8.4 steps/s, 33 s |

``auto`` samples the busy share of this process's cores for 0.2 s (``/proc/stat``; elsewhere the 1-minute load
average) and takes the free ones, at least 1 and at most the cores divided among the local processes. An
``OMP_NUM_THREADS`` in the environment (``torchrun`` sets 1) is the user's choice and is kept. One step's losses
and gradients agree to rounding between 1 and 2 threads, but the rounding compounds: a small Llama's LoRA weights
were 2e-4 apart after 40 steps, so a run is repeatable bit for bit only at the same count (set it, or
OMP_NUM_THREADS, when that matters).
"""

from __future__ import annotations

import contextlib
import math
import os
import time

import torch

AUTO = "auto"


def cores() -> list[int]:
    """The CPUs this process may run on (its affinity; all CPUs where the platform has no affinity)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def busy_cores(cpus: list[int], interval: float = 0.2) -> float:
    """How many of ``cpus`` other work keeps busy: their non-idle share over ``interval`` seconds, in cores."""
    first = _cpu_times(cpus)
    if first is None:  # no /proc/stat: the load average counts runnable processes over the last minute
        return min(float(len(cpus)), os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0.0
    time.sleep(interval)
    second = _cpu_times(cpus)
    busy = total = 0
    for (idle0, all0), (idle1, all1) in zip(first, second):
        total += all1 - all0
        busy += (all1 - all0) - (idle1 - idle0)
    return len(cpus) * busy / total if total > 0 else 0.0


def _cpu_times(cpus: list[int]) -> list[tuple[int, int]] | None:
    """Per CPU in ``cpus``: (idle + iowait, all) jiffies from ``/proc/stat``, or None where it cannot be read."""
    try:
        with open("/proc/stat") as stat:
            lines = stat.read().splitlines()
    except OSError:
        return None
    wanted, times = {f"cpu{c}" for c in cpus}, []
    for line in lines:
        name, *fields = line.split()
        if name in wanted:
            values = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
            times.append((values[3] + values[4], sum(values)))
    return times if len(times) == len(cpus) else None


def choose(setting: int | str, processes: int = 1) -> int:
    """The thread count for ``setting`` (an integer >= 1, or ``auto``) with ``processes`` local processes."""
    if setting != AUTO:
        return int(setting)
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cpus = cores()
    share = max(1, len(cpus) // max(1, processes))
    free = len(cpus) - busy_cores(cpus)
    return max(1, min(share, math.floor(free / max(1, processes) + 0.5)))


@contextlib.contextmanager
def cpu_threads(setting: int | str, processes: int = 1):
    """Run the block with :func:`choose`'s thread count; the previous count comes back afterwards."""
    before, n = torch.get_num_threads(), choose(setting, processes)
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)
