"""moby's own graph driver test suite against `graphdriver serve docker-graphdriver`.

``graphtest/graphtest_test.go`` runs ``daemon/graphdriver/graphtest`` (Docker 20.10, as
Debian's golang-github-docker-docker-dev ships its sources, the Docker of Debian's docker.io)
through moby's own plugin client: ``graphdriver.GetDriver`` with experimental on, i.e.
``proxy.go``'s graphDriverProxy over the plugin that pkg/plugins discovers in
/run/docker/plugins, as dockerd uses a graphdriver plugin. One plugin process per driver run,
started by the Go test with its store under graphtest's fresh root; the cases run in order on
it, as moby's overlay2 tests run them. It is built once per session, offline, in GOPATH mode
with Debian's Go; each driver then runs it with TMPDIR on the filesystem the driver needs.

Debian's package leaves out two packages the suite's imports need (moby's ``quota`` and
``plugin/v2``): ``graphtest/quota`` and ``graphtest/v2`` stand in for them (each says what of it
is used), and Debian's gotest.tools (3.0.3) is installed under ``gotest.tools``, so it is also
put where graphtest's ``gotest.tools/v3`` imports find it.

Every case must pass. The one skip allowed is the quota case where the driver has no size limit
(vfs; overlay on an XFS the kernel would not mount with prjquota, unless GRAPHDRIVER_REQUIRE
names xfs-quota): graphtest skips it only on moby's own ``quota.ErrQuotaNotSupported``, which an
error that came back through the plugin protocol never is, so the Go test skips it with the
reason the store gives.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphdriver import open_store
from graphdriver.linux.mount import unmount_all_under
from graphdriver.testing import Backing, backing_or_skip
from graphdriver.testing.require import host_lacks, required
from graphdriver_docker.cli import PLUGIN_DIR

pytestmark = pytest.mark.privileged

HERE = Path(__file__).parent / "graphtest"
GOCODE = Path("/usr/share/gocode/src")
DOCKER = GOCODE / "github.com/docker/docker"
#: what Debian's package lacks, and what stands in for it
STUBS = {"quota": "quota", "plugin/v2": "v2"}
CASES = {
    "TestSetup",
    "TestCreateEmpty",
    "TestCreateBase",
    "TestCreateSnap",
    "Test128LayerRead",
    "TestDiffApply10Files",
    "TestChanges",
    "TestSetQuota",
    "TestTeardown",
}
QUOTA_CASE = "TestSetQuota"


@pytest.fixture(scope="session")
def suite_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        host_lacks("the plugin's socket in /run/docker/plugins and its mounts need root", "root")
    go = shutil.which("go")
    sources = (DOCKER / "daemon/graphdriver/graphtest", GOCODE / "github.com/vbatts/tar-split")
    if go is None or not all(d.is_dir() for d in sources):
        host_lacks(
            "Go and moby's sources (golang-go, golang-github-docker-docker-dev and "
            "golang-github-vbatts-tar-split-dev, which it imports but does not depend on)",
            "docker",
        )
    gopath = tmp_path_factory.mktemp("gopath")
    src = gopath / "src"
    (src / "gdgraphtest").mkdir(parents=True)
    shutil.copy(HERE / "graphtest_test.go", src / "gdgraphtest")
    for package, stub in STUBS.items():
        if not (DOCKER / package).is_dir():
            shutil.copytree(HERE / stub, src / "github.com/docker/docker" / package)
    if not (GOCODE / "gotest.tools/v3").is_dir():
        shutil.copytree(GOCODE / "gotest.tools", src / "gotest.tools/v3", symlinks=True)
    binary = gopath / "graphtest.test"
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
        cwd=src / "gdgraphtest",
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, f"building the Go suite failed:\n{done.stdout}{done.stderr}"
    return binary


@pytest.fixture(params=["overlay-loop-xfs", "btrfs-loop-btrfs", "vfs-tmpdir"])
def where(request: pytest.FixtureRequest) -> Iterator[tuple[str, Backing, str]]:
    """(driver, backing, the prefix of the plugins' names and sockets in /run/docker/plugins)"""
    driver, _, kind = request.param.partition("-")
    prefix = f"gd-graphtest-{secrets.token_hex(4)}"
    for backing in backing_or_skip(kind):
        made = [d for d in (PLUGIN_DIR.parent, PLUGIN_DIR) if not d.exists()]
        PLUGIN_DIR.mkdir(parents=True, exist_ok=True)
        try:
            yield driver, backing, prefix
        finally:
            _kill_plugins(prefix)  # a suite that hung or panicked never ran its Cleanup
            unmount_all_under(backing.root)
            for left in PLUGIN_DIR.glob(f"{prefix}-*.sock"):
                left.unlink()
            for made_dir in reversed(made):
                with contextlib.suppress(OSError):
                    made_dir.rmdir()


def _kill_plugins(prefix: str) -> None:
    """SIGKILL the plugin processes a suite run left (their command lines name *prefix*), and
    wait until they are gone: one alive holds its store's lock and mounts, and the backing."""
    left = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if prefix.encode() in (proc / "cmdline").read_bytes():
                    os.kill(int(proc.name), signal.SIGKILL)
                    left.append(proc)
    deadline = time.monotonic() + 30
    while any(p.exists() for p in left) and time.monotonic() < deadline:
        time.sleep(0.05)


def no_quota(driver: str, backing: Backing) -> str:
    """Why *driver* has no size limit on *backing* ("" if it has one), as a store says."""
    with open_store(backing.root / "probe", driver, backing.options) as store:
        caps = store.driver.capabilities
        if caps.quota:
            return ""
        return caps.why_not.get("quota", f"{driver} declares no quota")


def _outcomes(output: str) -> dict[str, str]:
    case = re.compile(r"^--- (PASS|FAIL|SKIP): (\S+)", re.M)
    return {m.group(2): m.group(1) for m in case.finditer(output)}


def test_moby_graphtest(suite_binary: Path, where: tuple[str, Backing, str]) -> None:
    driver, backing, prefix = where
    why = no_quota(driver, backing)
    if why and backing.kind == "loop-xfs" and "xfs-quota" in required():
        host_lacks(why, "xfs-quota")  # fails the test: GRAPHDRIVER_REQUIRE names xfs-quota
    tmp = backing.root / "suite"
    tmp.mkdir()
    env = {
        **os.environ,
        "GRAPHDRIVER": str(Path(sys.executable).parent / "graphdriver"),
        "GD_DRIVER": driver,
        "GD_OPTS": ",".join(f"{k}={v}" for k, v in backing.options.items()),
        "GD_NO_QUOTA": why,
        "GD_PLUGIN_PREFIX": prefix,
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
    skipped = {name for name, result in outcomes.items() if result == "SKIP"}
    assert done.returncode == 0 and not failed, f"cases failed: {failed}\n{output[-20000:]}"
    assert set(outcomes) == CASES, f"expected {sorted(CASES)}, saw {sorted(outcomes)}"
    assert skipped == ({QUOTA_CASE} if why else set()), f"skipped: {skipped}\n{output}"
    left = [
        line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(tmp) in line
    ]
    assert not left, f"mounts left under {tmp}: {left}"
    assert not list(PLUGIN_DIR.glob(f"{prefix}-*.sock")), "a plugin's socket was left"
    if driver != "btrfs":
        # graphtest ends with os.RemoveAll of its root: on btrfs it cannot delete the read-only
        # subvolumes of the layers with children that its cases leave (they go with the backing)
        assert not list(tmp.iterdir()), f"graphtest left {list(tmp.iterdir())}"
