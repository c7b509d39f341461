"""``GRAPHDRIVER_REQUIRE``: what the host must provide, so that "host lacks it" fails a test.

A test that finds the host lacking something (root, a filesystem, device-mapper, XFS quota)
skips, saying why: "host lacks it: <what>", or "needs root: <why>" when it runs as another user
(:func:`needs_root`; a driver author may run the suite on ``tmpdir`` without root). CI names
what its machines have in ``GRAPHDRIVER_REQUIRE`` (a comma list of :data:`REQUIREMENTS`), and
then the same finding fails the test with the same reason: a green run means those tests ran.
Skips because a driver does not declare a capability stay skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from typing import Any, NoReturn

import pytest

ENV = "GRAPHDRIVER_REQUIRE"

#: every name GRAPHDRIVER_REQUIRE may list -> what it requires of the host
REQUIREMENTS = {
    "root": "running as root with loop devices (/dev/loop-control): every backing but tmpdir, "
    "every mount, and the cases that chown, make device nodes or apply a layer tar",
    "loop-ext4": "the loop-ext4 backing: mkfs.ext4 (e2fsprogs) and ext4 in the kernel",
    "loop-xfs": "the loop-xfs backing: mkfs.xfs (xfsprogs) and xfs in the kernel",
    "loop-btrfs": "the loop-btrfs backing: mkfs.btrfs (btrfs-progs) and btrfs in the kernel",
    "thin-pool": "the thin-pool backing and the devmapper tests: device-mapper "
    "(/dev/mapper/control opens) and dmsetup",
    "xfs-quota": "XFS project quota (mount -o prjquota; a kernel built with CONFIG_XFS_QUOTA): "
    "overlay's size-limited rw layers",
    "fastpath": "the archive engine's loops in C (graphdriver.archive._fastpath: the apply "
    "sandbox's plain files, an exact diff's replay), compiled when the package is installed: "
    "gcc and Python's headers (python3-dev)",
    "cpu-cgroup": "cgroup v1's cpu controller mounted, in which root makes cgroups with CFS "
    "quotas: the CPU limit the apply reads (core/tests/test_cpus.py)",
    "cpu-cgroup2": "cgroup v2 with the cpu controller enabled for the root cgroup's children "
    "(+cpu in its cgroup.subtree_control): the same for cpu.max",
    "podman": "podman, buildah and crun run rootful on the vfs storage driver, with setfattr "
    "(attr) and setcap (libcap2-bin) to copy into the test image: tests/test_interop.py",
    "umoci": "umoci unpacks an OCI image layout: tests/test_interop.py",
    "containerd": "containerd, ctr and runc run containers (an image umoci builds from "
    "busybox-static: test_engine.py), and Go builds containerd's snapshotter test suite offline "
    "from Debian's golang-github-containerd-containerd-dev: integrations/containerd/tests",
    "host-tools": "the tools the suite writes layers with as real images are made: GNU tar, "
    "gzip, zstd, and coreutils' truncate and dd (cases_streams.py, cases_exact.py)",
    "docker": "Debian's docker.io (dockerd and docker 20.10) runs containers on a private "
    "containerd, with our volume plugin on /run/docker/plugins: integrations/docker/tests",
}


class UnknownRequirement(ValueError):
    """GRAPHDRIVER_REQUIRE, or a test, names something that is not in :data:`REQUIREMENTS`."""


def _check(names: set[str]) -> None:
    unknown = sorted(names - REQUIREMENTS.keys())
    if unknown:
        raise UnknownRequirement(
            f"{ENV} names unknown requirements {', '.join(unknown)}; "
            f"choose from {', '.join(REQUIREMENTS)}"
        )


def required() -> frozenset[str]:
    """The requirements named in ``GRAPHDRIVER_REQUIRE`` (none when it is unset or empty)."""
    names = {n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip()}
    _check(names)
    return frozenset(names)


def host_lacks(reason: str, *requirements: str) -> NoReturn:
    """Skip the running test because the host lacks something (*reason* says what), or fail it
    with the same reason when ``GRAPHDRIVER_REQUIRE`` names one of *requirements*."""
    _skip_or_fail(f"host lacks it: {reason}", requirements)


def needs_root(why: str) -> None:
    """Return when running as root; else skip the running test with "needs root: *why*" (fail
    it when ``GRAPHDRIVER_REQUIRE`` names ``root``)."""
    if os.geteuid() != 0:
        _skip_or_fail(f"needs root: {why}", ("root",))


def _skip_or_fail(message: str, requirements: tuple[str, ...]) -> NoReturn:
    _check(set(requirements))
    demanded = sorted(required() & set(requirements))
    if demanded:
        pytest.fail(f"{message} ({ENV} requires {', '.join(demanded)})", pytrace=False)
    pytest.skip(message)


#: a host tool the suite runs -> the Debian package that has it
TOOLS = {"tar": "tar", "gzip": "gzip", "zstd": "zstd", "truncate": "coreutils", "dd": "coreutils"}


def run_tool(argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    """``subprocess.run(argv, **kwargs)`` of a host tool (:data:`TOOLS`); a host without it
    skips the running test, saying so, or fails it when ``GRAPHDRIVER_REQUIRE`` names
    ``host-tools``: never a bare FileNotFoundError."""
    if shutil.which(argv[0]) is None:
        package = TOOLS.get(argv[0], argv[0])
        host_lacks(f"{argv[0]} (Debian package {package}) is not on PATH", "host-tools")
    proc: subprocess.CompletedProcess[bytes] = subprocess.run(argv, **kwargs)
    return proc
