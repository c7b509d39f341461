"""devmapper passes the whole conformance suite on an external pool, and on its own loop pool
the groups of cases that depend on the pool.

The kernel here may have no device-mapper: then these run in a guest (vm/run), which
`tox -e conformance-devmapper` arranges by itself, and where every thin-pool operation costs
seconds.
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
    """The pool the driver makes on its own loop files: it comes up at open, goes down at
    cleanup and comes back for a second store or process, and sizes the layers. Once it is up,
    a layer's thin device is the same as in any pool."""

    driver = "devmapper"
    backing = "tmpdir"
    options = {**SMALL, "dm.loopdatasize": "2G", "dm.loopmetadatasize": "64M"}
    groups = {"lifecycle", "mount", "quota"}
    groups_why = (
        "a long chain of snapshots, diffs, tar streams and bad input work on thin devices "
        "alike in any pool; TestDevmapperThinPool runs them on the same driver"
    )
