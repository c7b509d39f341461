"""overlay passes the whole conformance suite on xfs and ext4, with both mount APIs."""

from __future__ import annotations

from graphdriver.testing import DriverConformance


class TestOverlayLoopXfs(DriverConformance):
    driver = "overlay"
    backing = "loop-xfs"
    deep_chain = 500


class TestOverlayLoopExt4(DriverConformance):
    driver = "overlay"
    backing = "loop-ext4"


class TestOverlayClassicMountLoopExt4(DriverConformance):
    driver = "overlay"
    backing = "loop-ext4"
    options = {"overlay.mount_api": "classic"}
