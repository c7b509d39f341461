"""vfs passes the whole conformance suite on every backing it can run on."""

from __future__ import annotations

from graphdriver.testing import DriverConformance


class TestVfsTmpdir(DriverConformance):
    driver = "vfs"
    backing = "tmpdir"


class TestVfsLoopExt4(DriverConformance):
    driver = "vfs"
    backing = "loop-ext4"


class TestVfsLoopXfs(DriverConformance):
    driver = "vfs"
    backing = "loop-xfs"


class TestVfsLoopBtrfs(DriverConformance):
    driver = "vfs"
    backing = "loop-btrfs"
