"""The CPUs a process may keep busy (linux/cpus.py), read from real cgroups: a process is put
in a cgroup made with a CPU quota and reports what it reads, and how many threads the apply's
sandbox then writes its files with (archive/feed.py ``writers``, read by the parent and used by
the chrooted child). Where the cgroups are is parsed from /proc/PID/cgroup and the cgroup
mounts: that parse is also tested on the lines a container, a cgroup namespace or a bind
mount of a cgroup gives."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from graphdriver.archive import fastpath
from graphdriver.linux import cpus
from graphdriver.linux.mount import MountEntry, mountinfo
from graphdriver.testing import host_lacks, needs_root
from graphdriver.testing.leftovers import remove_cgroup

#: what the process in the cgroup runs: it reads its limit, then applies a layer of 100 plain
#: files (a run the C loop writes) with a spy on the C call, which runs in the sandbox child
#: and says on fd 2 (which the child keeps) how many threads it was given
_REPORT = """
import io, json, os, pathlib, sys, tarfile, tempfile
from graphdriver.archive import apply, fastpath, feed
from graphdriver.linux.cpus import cgroup_cpu_limit, usable_cpus
real = fastpath.write_plain_files
def spy(*args):
    assert len(args) == 12, args  # (the writers are the last of the C call's arguments)
    os.write(2, b"writers %d\\n" % args[-1])
    return real(*args)
fastpath.write_plain_files = spy
layer = io.BytesIO()
with tarfile.open(fileobj=layer, mode="w") as tar:
    for i in range(100):
        info = tarfile.TarInfo(f"f{i}")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
layer.seek(0)
with tempfile.TemporaryDirectory(dir=sys.argv[1]) as target:
    apply.apply_layer(pathlib.Path(target), layer)
    made = len(os.listdir(target))
print(json.dumps({"limit": cgroup_cpu_limit(), "usable": usable_cpus(), "made": made,
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
def in_cgroups(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Made]:
    """``in_cgroups(1.5, None)``: nested cgroups with those CPU quotas (None: none), top
    first, made under the hierarchy's root; a process run in the innermost one reports what
    it reads and what its apply's sandbox was given. Every cgroup is removed after the test,
    whatever it did."""
    needs_root("makes cgroups, moves a process into them and applies a layer")
    if request.param == "v1":
        top, setter, read = _v1_top(), _set_v1, cpus._v1_limit
        if top is None:
            host_lacks("no cgroup v1 hierarchy with the cpu controller", "cpu-cgroup")
        requirement = "cpu-cgroup"
    else:
        top, setter, read = _v2_top(), _set_v2, cpus._v2_limit
        if top is None:
            host_lacks("no cgroup v2 with +cpu in the root's subtree_control", "cpu-cgroup2")
        requirement = "cpu-cgroup2"
    above = read(top)  # (a root a cgroup namespace shows: a container's own limit)
    if above is not None:
        host_lacks(f"the cgroup root seen here has a CPU quota ({above:g} CPUs)", requirement)
    if not fastpath.ENABLED:
        host_lacks("the apply's C loop (_fastpath), which takes the threads", "fastpath")
    name = f"graphdriver-test-{uuid.uuid4().hex[:12]}"

    def run(*quotas: float | None) -> dict[str, object]:
        here = top / name / uuid.uuid4().hex[:8]
        if not here.parent.exists():
            here.parent.mkdir()
        for i, cpus_ in enumerate(quotas):
            if i:
                if request.param == "v2":  # (a v2 parent hands the controller down)
                    (here / "cgroup.subtree_control").write_text("+cpu")
                here = here / f"level{i}"
            elif request.param == "v2":
                (here.parent / "cgroup.subtree_control").write_text("+cpu")
            here.mkdir()
            setter(here, cpus_)
        join = f'echo $$ > "{here}/cgroup.procs" && exec "$0" -c "$1" "$2"'
        got = subprocess.run(
            ["sh", "-c", join, sys.executable, _REPORT, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        report: dict[str, object] = json.loads(got.stdout)
        said = got.stderr.split("\n")
        report["child"] = sorted({x for x in said if x.startswith("writers ")})
        assert report["made"] == 100
        return report

    try:
        yield run
    finally:
        remove_cgroup(name)


def test_a_quota_under_one_cpu_is_the_limit_and_one_thread_writes(in_cgroups: Made) -> None:
    got = in_cgroups(0.5)
    assert got["limit"] == 0.5
    assert got["usable"] == 0.5
    assert got["writers"] == 1
    assert got["child"] == ["writers 1"]
    # two threads were no faster at 1.25 CPUs and slower at 1 (feed.writers)
    assert in_cgroups(1)["child"] == ["writers 1"]
    assert in_cgroups(1.25)["child"] == ["writers 1"]


def test_the_smallest_quota_on_the_path_up_counts(in_cgroups: Made) -> None:
    """A container's limit is often set on a cgroup above the one its processes are in (v1
    refuses a child's quota larger than its parent's, so the levels below have none)."""
    got = in_cgroups(0.75, None, None)
    assert got["limit"] == 0.75
    assert got["child"] == ["writers 1"]
    assert in_cgroups(None, 0.25)["limit"] == 0.25


def test_no_quota_leaves_the_affinity(in_cgroups: Made) -> None:
    """Without a quota the threads follow the affinity: two on two CPUs or more; a quota of
    one CPU and a half still gives two (measured faster there: feed.writers)."""
    got = in_cgroups(None)
    assert got["limit"] is None
    assert got["usable"] == got["affinity"]
    two = got["affinity"] >= 2  # type: ignore[operator]
    assert got["child"] == ["writers 2" if two else "writers 1"]
    assert in_cgroups(1.5)["child"] == ["writers 2" if two else "writers 1"]


# ------------------------------------------------------------------ where the cgroups are


def _mount(root: str, point: str, fstype: str, options: str = "rw") -> MountEntry:
    return MountEntry(30, 25, "0:26", root, point, "rw", fstype, fstype, options)


def _places(text: str, *mounts: MountEntry) -> list[tuple[str, str, str]]:
    return [
        (str(top), str(here), read.__name__) for top, here, read in cpus.cgroup_dirs(text, mounts)
    ]


def test_both_versions_and_a_joint_v1_hierarchy_are_found() -> None:
    text = "5:memory:/m\n4:cpu,cpuacct:/a/b\n0::/c\n"
    got = _places(
        text,
        _mount("/", "/sys/fs/cgroup/memory", "cgroup", "rw,memory"),
        _mount("/", "/sys/fs/cgroup/cpu,cpuacct", "cgroup", "rw,cpu,cpuacct"),
        _mount("/", "/sys/fs/cgroup/unified", "cgroup2"),
    )
    assert got == [
        ("/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpu,cpuacct/a/b", "_v1_limit"),
        ("/sys/fs/cgroup/unified", "/sys/fs/cgroup/unified/c", "_v2_limit"),
    ]
    # the root cgroup is the mount point itself
    assert _places("0::/\n", _mount("/", "/sys/fs/cgroup", "cgroup2")) == [
        ("/sys/fs/cgroup", "/sys/fs/cgroup", "_v2_limit")
    ]


def test_a_mount_of_a_deeper_cgroup_is_read_from_its_root() -> None:
    """A container without its own cgroup namespace: the hierarchy's mount shows the
    container's cgroup as its root; of two mounts the one nearest the top is taken (the
    other would hide the limits between them)."""
    deep = _mount("/docker/id", "/sys/fs/cgroup/cpu", "cgroup", "rw,cpu")
    assert _places("4:cpu:/docker/id\n", deep) == [
        ("/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu", "_v1_limit")
    ]
    assert _places("4:cpu:/docker/idother\n", deep) == []  # (not under its root)
    full = _mount("/", "/mnt/full", "cgroup", "rw,cpu")
    assert _places("4:cpu:/docker/id/x\n", deep, full) == [
        ("/mnt/full", "/mnt/full/docker/id/x", "_v1_limit")
    ]


def test_a_cgroup_outside_its_namespace_and_bad_lines_are_left_out() -> None:
    v2 = _mount("/", "/sys/fs/cgroup", "cgroup2")
    assert _places("0::/../other\n", v2) == []  # (a process moved out of its namespace)
    assert _places("garbage\n::\n0::\n:cpu:\n7:cpu\n", v2) == []


def test_a_limit_the_files_cannot_give_is_none(tmp_path: Path) -> None:
    """The readers on a cgroup's files as the kernel writes them, and on what they are not."""
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpus._v2_limit(tmp_path) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpus._v2_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("50000 100000 0\n")
    assert cpus._v2_limit(tmp_path) is None
    assert cpus._v1_limit(tmp_path) is None  # (no files)
    (tmp_path / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu.cfs_period_us").write_text("100000\n")
    assert cpus._v1_limit(tmp_path) is None
    (tmp_path / "cpu.cfs_quota_us").write_text("25000\n")
    assert cpus._v1_limit(tmp_path) == 0.25
