"""How many CPUs this process may really use: its affinity mask, capped by a container's CPU quota.

``os.cpu_count()`` is the host's count: a pod limited to 2 CPUs on a 64-core node sees 64 there, and stage
processes sized from it would fight over 2 cores (on a 2-core host, 4 loader + 4 writer processes cost ~25%
more CPU per image than 2 + 2: bench/RESULTS.md, "Host budget").
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """The CPUs this process may run on (affinity), no more than its cgroup's quota rounded up; at least 1."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


def cgroup_cpu_quota(cgroup_root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota in CPUs (cgroup v2's ``cpu.max``, else v1's ``cpu.cfs_quota_us``); None: no limit."""
    v2 = _read(cgroup_root / "cpu.max")  # "max 100000" (no limit) or "200000 100000" (2 CPUs)
    if v2 is not None:
        quota, _, period = v2.partition(" ")
        return _ratio(quota, period or "100000")
    for folder in ("cpu", "cpu,cpuacct"):
        quota_v1 = _read(cgroup_root / folder / "cpu.cfs_quota_us")  # -1: no limit
        if quota_v1 is not None:
            return _ratio(quota_v1, _read(cgroup_root / folder / "cpu.cfs_period_us") or "100000")
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _ratio(quota: str, period: str) -> float | None:
    try:
        value, per = int(quota), int(period)
    except ValueError:  # "max": no limit
        return None
    if value <= 0 or per <= 0:  # v1 writes -1 for no limit
        return None
    return value / per
