"""How many CPUs this process may keep busy: its affinity, and the CPU bandwidth limits of its
cgroups (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``), the smallest
along the cgroup's path up to the hierarchy's root, as Go's runtime and the JVM read a
container's CPU limit. A container on a large machine sees all its CPUs in its affinity and
its limit only here."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .mount import MountEntry, mountinfo


def usable_cpus() -> float:
    """The CPUs of this process's affinity, or fewer where a cgroup's quota lets it run less
    (a fraction then: 1.5 for 150 ms of CPU time in every 100 ms)."""
    cpus = float(len(os.sched_getaffinity(0)))
    limit = cgroup_cpu_limit()
    return cpus if limit is None else min(cpus, limit)


def cgroup_cpu_limit() -> float | None:
    """The smallest CPU quota over period of this process's cgroup and those above it, in
    whichever hierarchy holds the cpu controller (v2, or v1's ``cpu``); None where none is set
    or none can be read (no /proc, a cgroup outside what this mount namespace sees)."""
    try:
        with open("/proc/self/cgroup", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
        mounts = mountinfo(fstypes=("cgroup", "cgroup2"))
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        if not path.startswith("/"):
            continue
        if controllers == "":  # v2: whether it has the cpu controller is its files' business
            where = _cgroup_dir(mounts, path, lambda m: m.fstype == "cgroup2")
            if where is not None:
                limits.append(_walk(where, _v2_limit))
        elif "cpu" in controllers.split(","):
            where = _cgroup_dir(
                mounts,
                path,
                lambda m: m.fstype == "cgroup" and "cpu" in m.super_options.split(","),
            )
            if where is not None:
                limits.append(_walk(where, _v1_limit))
    found = [x for x in limits if x is not None]
    return min(found) if found else None


def _cgroup_dir(
    mounts: list[MountEntry], path: str, wanted: Callable[[MountEntry], bool]
) -> tuple[Path, Path] | None:
    """(the mount point, the cgroup's directory under it) of *path* in the first mount of the
    hierarchy *wanted* picks whose root holds it."""
    for m in mounts:
        if not wanted(m):
            continue
        root = m.root.rstrip("/")
        if path == root or path.startswith(root + "/"):
            top = Path(m.mountpoint)
            return top, top / path[len(root) :].lstrip("/")
    return None


def _walk(where: tuple[Path, Path], read: Callable[[Path], float | None]) -> float | None:
    """The smallest limit *read* finds from the cgroup's directory up to the mount point."""
    top, here = where
    best: float | None = None
    while True:
        got = read(here)
        if got is not None and (best is None or got < best):
            best = got
        if here == top or top not in here.parents:
            return best
        here = here.parent


def _v2_limit(cgroup: Path) -> float | None:
    """cpu.max: "QUOTA PERIOD" in microseconds, QUOTA "max" for none."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()
        return None if quota == "max" else _ratio(int(quota), int(period))
    except (OSError, ValueError):  # (the root has no cpu.max; nor has a cgroup without cpu)
        return None


def _v1_limit(cgroup: Path) -> float | None:
    """cpu.cfs_quota_us over cpu.cfs_period_us; a quota of -1 for none."""
    try:
        quota = int((cgroup / "cpu.cfs_quota_us").read_text())
        period = int((cgroup / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return _ratio(quota, period)


def _ratio(quota: int, period: int) -> float | None:
    return quota / period if quota > 0 and period > 0 else None
