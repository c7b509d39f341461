"""How many CPUs this process may keep busy: its affinity, and the CPU bandwidth limits of its
cgroups (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``), the smallest
from its cgroup up to the root its mount shows, as the JVM reads a container's limit (Go's
runtime reads the process's own cgroup only). A container on a large machine sees all its
CPUs in its affinity and its limit only here."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from .mount import MountEntry, mountinfo

#: reads a cgroup directory's CPU limit (CPUs; None: none)
Reader = Callable[[Path], float | None]


def usable_cpus() -> float:
    """The CPUs of this process's affinity, or fewer where a cgroup's quota lets it run less
    (a fraction then: 1.5 for 150 ms of CPU time in every 100 ms)."""
    cpus = float(len(os.sched_getaffinity(0)))
    limit = cgroup_cpu_limit()
    return cpus if limit is None else min(cpus, limit)


def cgroup_cpu_limit() -> float | None:
    """The smallest CPU quota over period of this process's cgroup and those above it, in
    whichever hierarchy holds the cpu controller (v2, or v1's ``cpu``); None where none is set
    or none can be read (no /proc, a cgroup outside what this mount namespace shows, a
    mountinfo line it cannot parse; a /proc/self/cgroup line it cannot parse is passed over):
    a limit is a hint, never a reason for an apply to fail."""
    try:
        with open("/proc/self/cgroup", encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
        places = cgroup_dirs(text, mountinfo(fstypes=("cgroup", "cgroup2")))
        limits = [_walk(top, here, read) for top, here, read in places]
    except (OSError, ValueError, IndexError):
        return None
    found = [x for x in limits if x is not None]
    return min(found) if found else None


def cgroup_dirs(text: str, mounts: Iterable[MountEntry]) -> list[tuple[Path, Path, Reader]]:
    """Where the CPU limits of the process whose /proc/PID/cgroup is *text* are, given the
    cgroup mounts *mounts*: (a hierarchy's mount point, the process's cgroup directory under
    it, the reader of its limit files), for v2 and for v1's hierarchy with the cpu controller
    (alone or joint, ``cpu,cpuacct``). Of several mounts of a hierarchy, the one whose root is
    nearest the top (a bind of a cgroup deeper down would hide the limits above it). A path
    outside every mount's root, or outside its cgroup namespace's root (``/..``), is left
    out: the limits on its way up cannot be read from here."""
    mounts = list(mounts)
    found: list[tuple[Path, Path, Reader]] = []
    for line in text.splitlines():
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        if not path.startswith("/") or ".." in path.split("/"):
            continue
        if controllers == "":  # v2: whether it has the cpu controller is its files' business
            kind, read = "cgroup2", _v2_limit
        elif "cpu" in controllers.split(","):
            kind, read = "cgroup", _v1_limit
        else:
            continue
        held = [
            m
            for m in mounts
            if m.fstype == kind
            and (kind == "cgroup2" or "cpu" in m.super_options.split(","))
            and _within(path, m.root.rstrip("/"))
        ]
        if held:
            m = min(held, key=lambda m: len(m.root))
            top = Path(m.mountpoint)
            found.append((top, top / path[len(m.root.rstrip("/")) :].lstrip("/"), read))
    return found


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root + "/")


def _walk(top: Path, here: Path, read: Reader) -> float | None:
    """The smallest limit *read* finds from the cgroup directory *here* up to the mount point
    *top*."""
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
