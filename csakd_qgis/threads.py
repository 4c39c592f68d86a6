"""How many CPU threads torch uses, and how they wait: a policy that holds up on a busy desktop.

torch's OpenMP threads spin (busy-wait) between parallel regions by default. Beside any other CPU
load (QGIS redrawing, a browser, a second job) a spinning thread holds a core the other work needs
and waits for a preempted partner: on 2 cores the Berlin pair took 70–86 s with the defaults and
15–22 s with ``OMP_WAIT_POLICY=PASSIVE`` or one thread. So:

- ``prefer_passive_waiting()`` asks OpenMP to let waiting threads sleep. The OpenMP runtime reads
  the variable when it is loaded, i.e. when torch is first imported, so it is called before that
  (the plugin does it before it imports torch; an explicit setting by the user is kept).
- ``configure_torch_threads()`` sets torch's thread count to the cores that are really free: the
  cores this process may run on minus the cores busy right now (measured over a tenth of a second
  from /proc/stat, whose 100 ticks a second still resolve a twentieth of a core on 2 cores; a
  quarter second was 4 % of a 512² fusion; the 1-minute load average where there is none), at
  least one. An explicit ``OMP_NUM_THREADS`` wins. (The 1-minute average lags: after a minute of work by QGIS itself,
  or by the previous step of a benchmark, it still counts that work and halved the threads of an
  idle machine, making a 2048² fusion 28 % slower.)
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional


def prefer_passive_waiting() -> bool:
    """Set OMP_WAIT_POLICY=PASSIVE unless the user chose a policy; True if passive is now asked for.

    Takes effect only for an OpenMP runtime loaded after the call, so nothing is set once torch
    has been imported (the log would then claim a policy that is not in effect).
    """
    if "torch" in sys.modules:
        return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return os.environ["OMP_WAIT_POLICY"].strip().upper() == "PASSIVE"


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _cpu_times():
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]), idle


def system_load(interval: float = 0.1) -> Optional[float]:
    """Cores busy now: the share of CPU time not idle over ``interval`` seconds (/proc/stat,
    Linux) times the cores; else the 1-minute load average; None where the OS has neither."""
    import time

    try:
        total0, idle0 = _cpu_times()
        time.sleep(interval)
        total1, idle1 = _cpu_times()
        if total1 > total0:
            return (1.0 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def free_cores(cores: int, load: Optional[float]) -> int:
    """Cores not taken by other work: ``cores`` minus the load, rounded, between 1 and ``cores``."""
    if load is None:
        return cores
    return max(1, min(cores, int(round(cores - load))))


def configure_torch_threads(log: Callable[[str], None] = lambda message: None) -> int:
    """Set torch's intra-op thread count from the free cores; log and return it.

    An explicit ``OMP_NUM_THREADS`` is kept as the count. The log line also says whether OpenMP
    threads sleep or spin while waiting (see ``prefer_passive_waiting``).
    """
    import torch

    cores = usable_cores()
    load = system_load()
    explicit = os.environ.get("OMP_NUM_THREADS", "").strip()
    if explicit.isdigit() and int(explicit) > 0:
        threads, why = int(explicit), "OMP_NUM_THREADS"
    else:
        threads = free_cores(cores, load)
        why = f"{cores} core(s), load {load:.1f}" if load is not None else f"{cores} core(s)"
    torch.set_num_threads(threads)
    waiting = os.environ.get("OMP_WAIT_POLICY", "").strip().upper() or "ACTIVE (OpenMP default)"
    log(f"torch {torch.__version__}: {threads} thread(s) ({why}); OpenMP wait policy {waiting}")
    return threads
