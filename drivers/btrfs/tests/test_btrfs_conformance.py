"""btrfs passes the whole conformance suite on a loop-backed btrfs, quota included."""

from __future__ import annotations

from graphdriver.testing import DriverConformance


class TestBtrfsLoopBtrfs(DriverConformance):
    driver = "btrfs"
    backing = "loop-btrfs"
