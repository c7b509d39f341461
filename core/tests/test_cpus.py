"""The CPUs a process may keep busy (linux/cpus.py), read from real cgroups: a process is put
in a cgroup made with a CPU quota and reports what it reads, as the apply's parent does when it
chooses how many threads write its files (archive/feed.py ``writers``)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from graphdriver.linux.mount import mountinfo
from graphdriver.testing import host_lacks, needs_root

#: what the process in the cgroup prints
_REPORT = """
import json, os
from graphdriver.archive import feed
from graphdriver.linux.cpus import cgroup_cpu_limit, usable_cpus
print(json.dumps({"limit": cgroup_cpu_limit(), "usable": usable_cpus(),
                  "writers": feed.writers(), "affinity": len(os.sched_getaffinity(0))}))
"""

#: the period both versions are given, microseconds
_PERIOD = 100_000


def _v1_top() -> Path | None:
    for m in mountinfo(fstypes=("cgroup",)):
        if "cpu" in m.super_options.split(",") and m.root == "/":
            return Path(m.mountpoint)
    return None


def _v2_top() -> Path | None:
    for m in mountinfo(fstypes=("cgroup2",)):
        top = Path(m.mountpoint)
        if m.root == "/" and "cpu" in (top / "cgroup.subtree_control").read_text().split():
            return top
    return None


def _set_v1(cgroup: Path, cpus: float | None) -> None:
    (cgroup / "cpu.cfs_period_us").write_text(str(_PERIOD))
    quota = -1 if cpus is None else round(cpus * _PERIOD)
    (cgroup / "cpu.cfs_quota_us").write_text(str(quota))


def _set_v2(cgroup: Path, cpus: float | None) -> None:
    quota = "max" if cpus is None else str(round(cpus * _PERIOD))
    (cgroup / "cpu.max").write_text(f"{quota} {_PERIOD}")


Made = Callable[..., dict[str, object]]


@pytest.fixture(params=["v1", "v2"])
def in_cgroups(request: pytest.FixtureRequest) -> Iterator[Made]:
    """``in_cgroups(1.5, None, 3)``: nested cgroups with those CPU quotas (None: none), top
    first, made under the hierarchy's root; a process run in the innermost one reports what
    it reads. Every cgroup is removed after the test, whatever it did."""
    needs_root("makes cgroups and moves a process into them")
    if request.param == "v1":
        top, setter = _v1_top(), _set_v1
        if top is None:
            host_lacks("no cgroup v1 hierarchy with the cpu controller", "cpu-cgroup")
    else:
        top, setter = _v2_top(), _set_v2
        if top is None:
            host_lacks("no cgroup v2 with +cpu in the root's subtree_control", "cpu-cgroup2")
    made: list[Path] = []

    def run(*quotas: float | None) -> dict[str, object]:
        here = top / f"graphdriver-test-{uuid.uuid4().hex[:12]}"
        for i, cpus in enumerate(quotas):
            if i:
                if request.param == "v2":  # (a v2 parent hands the controller down)
                    (here / "cgroup.subtree_control").write_text("+cpu")
                here = here / f"level{i}"
            here.mkdir()
            made.append(here)
            setter(here, cpus)
        join = f'echo $$ > "{here}/cgroup.procs" && exec "$0" -c "$1"'
        got = subprocess.run(
            ["sh", "-c", join, sys.executable, _REPORT],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        report: dict[str, object] = json.loads(got.stdout)
        return report

    try:
        yield run
    finally:
        for cgroup in reversed(made):  # (its process exited: run waited for it)
            cgroup.rmdir()


def test_a_quota_under_the_affinity_is_the_limit(in_cgroups: Made) -> None:
    got = in_cgroups(0.5)
    assert got["limit"] == 0.5
    assert got["usable"] == 0.5
    assert got["writers"] == 1


def test_the_smallest_quota_on_the_path_up_counts(in_cgroups: Made) -> None:
    """A container's limit is often set on a cgroup above the one its processes are in (v1
    refuses a child's quota larger than its parent's, so the levels below have none)."""
    got = in_cgroups(1.5, None, None)
    assert got["limit"] == 1.5
    assert got["usable"] == min(1.5, got["affinity"])  # type: ignore[type-var]
    assert got["writers"] == 1  # a CPU and a half: the parent's parse and one writer
    assert in_cgroups(None, 0.25)["limit"] == 0.25


def test_no_quota_leaves_the_affinity(in_cgroups: Made) -> None:
    got = in_cgroups(None)
    assert got["limit"] is None
    assert got["usable"] == got["affinity"]
    assert got["writers"] == (2 if got["affinity"] >= 2 else 1)  # type: ignore[operator]
    if got["affinity"] >= 2:  # type: ignore[operator]
        assert in_cgroups(2)["writers"] == 2
