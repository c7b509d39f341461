"""devmapper passes the whole conformance suite, on an external pool and on its own loop pool.

The kernel here may have no device-mapper: then these run in a guest (vm/run), which
`tox -e conformance-devmapper` arranges by itself.
"""

from __future__ import annotations

from graphdriver.testing import DriverConformance

# 50 MiB layers: the suite's quota case asks for a 50 MiB limit, and a devmapper layer is
# never smaller than the base device
SMALL = {"dm.basesize": "50M", "dm.fs": "ext4"}


class TestDevmapperThinPool(DriverConformance):
    driver = "devmapper"
    backing = "thin-pool"
    options = SMALL


class TestDevmapperLoopPool(DriverConformance):
    driver = "devmapper"
    backing = "tmpdir"
    options = {**SMALL, "dm.loopdatasize": "2G", "dm.loopmetadatasize": "64M"}
