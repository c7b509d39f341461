"""GRAPHDRIVER_REQUIRE turns "host lacks it" skips into failures with the same reason, and only
those: a driver that does not declare a capability still skips."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from graphdriver.testing import host_lacks

GENERATED = """
from pathlib import Path

import pytest

from graphdriver import open_store
from graphdriver.testing import backing_or_skip, quota_or_skip


@pytest.fixture
def xfs():
    yield from backing_or_skip("loop-xfs")


@pytest.fixture
def pool():
    yield from backing_or_skip("thin-pool")


def test_on_xfs(xfs):
    pass


def test_on_thin_pool(pool):
    pass


def test_vfs_has_no_quota(tmp_path):
    with open_store(tmp_path, "vfs") as store:
        quota_or_skip(store, "loop-xfs")
"""


def run_generated(tmp_path: Path, require: str | None) -> tuple[int, str]:
    """Run GENERATED in a pytest of its own, with a PATH that has no mkfs and no dmsetup."""
    (tmp_path / "test_generated.py").write_text(GENERATED)
    (tmp_path / "empty-bin").mkdir(exist_ok=True)
    env = {**os.environ, "PATH": str(tmp_path / "empty-bin")}
    env.pop("GRAPHDRIVER_REQUIRE", None)
    if require is not None:
        env["GRAPHDRIVER_REQUIRE"] = require
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-rsfE", "-p", "no:cacheprovider", "test_generated.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:  # unprivileged, every backing lacks root before it lacks mkfs
        host_lacks("these cases need root to reach the mkfs and dmsetup checks", "root")


def test_without_it_a_host_that_lacks_something_skips(tmp_path: Path) -> None:
    code, out = run_generated(tmp_path, None)
    assert code == 0, out
    assert "3 skipped" in out, out
    assert "host lacks it: backing loop-xfs needs mkfs.xfs (apt-get install xfsprogs)" in out
    assert "host lacks it: backing thin-pool needs" in out
    assert "driver vfs does not declare the quota capability" in out


def test_naming_a_backing_fails_its_tests_with_the_reason(tmp_path: Path) -> None:
    code, out = run_generated(tmp_path, "loop-xfs, thin-pool,xfs-quota")
    assert code == 1, out
    assert "1 skipped, 2 errors" in out, out  # fixtures fail: the tests are errors
    assert (
        "host lacks it: backing loop-xfs needs mkfs.xfs (apt-get install xfsprogs) "
        "(GRAPHDRIVER_REQUIRE requires loop-xfs)"
    ) in out
    assert "(GRAPHDRIVER_REQUIRE requires thin-pool)" in out
    # a capability the driver does not declare is no host requirement
    assert "driver vfs does not declare the quota capability" in out


def test_naming_something_else_still_skips(tmp_path: Path) -> None:
    code, out = run_generated(tmp_path, "root,loop-btrfs")
    assert code == 0, out
    assert "3 skipped" in out, out


def test_an_unknown_name_stops_the_run(tmp_path: Path) -> None:
    code, out = run_generated(tmp_path, "loop-xfs,loop-zfs")
    assert code == pytest.ExitCode.USAGE_ERROR, out
    assert "GRAPHDRIVER_REQUIRE names unknown requirements loop-zfs; choose from root," in out


TOOL_USER = """
from graphdriver.testing.require import run_tool


def test_gzips():
    run_tool(["gzip", "-c"], input=b"x", capture_output=True, check=True)
"""


@pytest.mark.parametrize("require", [None, "host-tools"])
def test_a_missing_host_tool_is_a_host_that_lacks_it(tmp_path: Path, require: str | None) -> None:
    """A tool the suite runs (tar, gzip, zstd, truncate, dd) missing: "host lacks it" with the
    package to install, a failure when GRAPHDRIVER_REQUIRE names host-tools; never a bare
    FileNotFoundError."""
    (tmp_path / "test_tool.py").write_text(TOOL_USER)
    (tmp_path / "empty-bin").mkdir()
    env = {**os.environ, "PATH": str(tmp_path / "empty-bin")}
    env.pop("GRAPHDRIVER_REQUIRE", None)
    if require is not None:
        env["GRAPHDRIVER_REQUIRE"] = require
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-rsfE", "-p", "no:cacheprovider", "test_tool.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert "host lacks it: gzip (Debian package gzip) is not on PATH" in out, out
    assert "FileNotFoundError" not in out, out
    if require is None:
        assert proc.returncode == 0 and "1 skipped" in out, out
    else:
        assert proc.returncode == 1 and "(GRAPHDRIVER_REQUIRE requires host-tools)" in out, out
