"""containerd's own snapshotter test suite against `graphdriver serve containerd`.

``gosuite/snapshotter_test.go`` runs ``testsuite.SnapshotterSuite`` (containerd 1.6, as Debian
ships its sources) through containerd's ``snapshots/proxy`` client over a unix socket, one proxy
per case. It is built once per session, offline, in GOPATH mode with Debian's Go; each driver
then runs it with TMPDIR on the filesystem the driver needs, so the cases' roots are there.
Every case must pass; the only skip allowed is the one containerd's suite makes itself
(``Rename``: "rename test still fails on some kernels with overlay").
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphdriver.linux.mount import unmount_all_under
from graphdriver.testing import Backing, backing_or_skip
from graphdriver.testing.require import host_lacks

pytestmark = pytest.mark.privileged

HERE = Path(__file__).parent
GOCODE = Path("/usr/share/gocode/src/github.com/containerd/containerd/snapshots/testsuite")
#: skips containerd's suite makes itself, whatever the snapshotter
SUITE_SKIPS = {"Rename"}
CASES = 21


@pytest.fixture(scope="session")
def suite_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        host_lacks("the suite mounts what the snapshotter returns: it needs root", "root")
    go = shutil.which("go")
    if go is None or not GOCODE.is_dir():
        host_lacks(
            "Go and containerd's sources (golang-go, golang-github-containerd-containerd-dev)",
            "containerd",
        )
    gopath = tmp_path_factory.mktemp("gopath")
    src = gopath / "src" / "gosuite"
    src.parent.mkdir(parents=True)
    shutil.copytree(HERE / "gosuite", src)
    binary = gopath / "gosuite.test"
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": f"{gopath}:/usr/share/gocode",
        "GOFLAGS": "",
        "GOCACHE": str(gopath / "cache"),
        "CGO_ENABLED": "1",
    }
    done = subprocess.run(
        [go, "test", "-c", "-o", str(binary), "."],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, f"building the Go suite failed:\n{done.stdout}{done.stderr}"
    return binary


@pytest.fixture(params=["overlay-loop-xfs", "overlay-loop-ext4", "btrfs-loop-btrfs", "vfs-tmpdir"])
def where(request: pytest.FixtureRequest) -> Iterator[tuple[str, Backing]]:
    driver, _, kind = request.param.partition("-")
    for backing in backing_or_skip(kind):
        try:
            yield driver, backing
        finally:
            unmount_all_under(backing.root)


def _outcomes(output: str) -> dict[str, str]:
    case = re.compile(r"^\s+--- (PASS|FAIL|SKIP): TestGraphdriverSnapshotter/(\S+)", re.M)
    return {m.group(2): m.group(1) for m in case.finditer(output)}


def test_containerd_snapshotter_suite(suite_binary: Path, where: tuple[str, Backing]) -> None:
    driver, backing = where
    tmp = backing.root / "suite"
    tmp.mkdir()
    env = {
        **os.environ,
        "GRAPHDRIVER": str(Path(sys.executable).parent / "graphdriver"),
        "GD_DRIVER": driver,
        "GD_OPTS": ",".join(f"{k}={v}" for k, v in backing.options.items()),
        "TMPDIR": str(tmp),
    }
    done = subprocess.run(
        [str(suite_binary), "-test.v", "-test.timeout", "600s"],
        env=env,
        capture_output=True,
        text=True,
        timeout=660,
        check=False,
    )
    output = done.stdout + done.stderr
    outcomes = _outcomes(output)
    failed = sorted(name for name, result in outcomes.items() if result == "FAIL")
    skipped = sorted(name for name, result in outcomes.items() if result == "SKIP")
    assert done.returncode == 0 and not failed, f"cases failed: {failed}\n{output[-20000:]}"
    assert set(skipped) <= SUITE_SKIPS, f"skipped beyond containerd's own: {skipped}"
    assert len(outcomes) == CASES, f"expected {CASES} cases, saw {sorted(outcomes)}"
    left = [
        line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(tmp) in line
    ]
    assert not left, f"mounts left under {tmp}: {left}"
