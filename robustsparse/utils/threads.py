"""CPU threads for torch: no more than the cores this process may really use.

torch starts one OpenMP thread per core it sees. In a container limited to a few CPUs (a cgroup quota) or pinned to
some cores (affinity) it still sees the whole host, and the surplus threads fight over the allowed cores; that,
and OpenMP's busy-waiting threads when other processes share the cores, can make torch 10-35x slower. The CLI
therefore caps torch's threads at `usable_cpus` unless the user chose a count (``OMP_NUM_THREADS`` or
``MKL_NUM_THREADS``). OpenMP's waiting policy is read when torch loads, before any of our code runs: on a shared
machine, start the process with ``OMP_WAIT_POLICY=PASSIVE`` (`robustsparse bench` reports what it ran with).
"""
from __future__ import annotations

import math
import os

USER_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _cgroup_quota() -> float | None:
    """CPUs allowed by a cgroup quota (v2 ``cpu.max``, v1 ``cfs_quota_us / cfs_period_us``), or None."""
    for path, parse in (("/sys/fs/cgroup/cpu.max", lambda s: s.split()),
                        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", None)):
        try:
            with open(path) as fh:
                text = fh.read().strip()
        except OSError:
            continue
        if parse is not None:
            quota, period = (parse(text) + ["100000"])[:2]
        else:
            quota = text
            try:
                with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as fh:
                    period = fh.read().strip()
            except OSError:
                continue
        if quota in ("max", "-1"):
            return None
        try:
            return int(quota) / int(period)
        except (ValueError, ZeroDivisionError):
            return None
    return None


def usable_cpus() -> int:
    """min(cores, cores in this process's affinity mask, the cgroup CPU quota rounded up), at least 1."""
    n = os.cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        n = min(n, len(os.sched_getaffinity(0)))
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def configure_threads() -> int:
    """Cap torch's intra-op threads at `usable_cpus` unless the user set a thread count; return the count used."""
    import torch
    if not any(os.environ.get(v) for v in USER_THREAD_VARS):
        cap = usable_cpus()
        if torch.get_num_threads() > cap:
            torch.set_num_threads(cap)
    return torch.get_num_threads()
