"""The conformance suite every graphdriver driver runs to prove it behaves like the others.

Use it from a driver package's tests::

    from graphdriver.testing import DriverConformance

    class TestMyDriver(DriverConformance):
        driver = "mydriver"
        backing = "loop-xfs"      # loop-ext4 | loop-xfs | loop-btrfs | thin-pool | tmpdir
        options = {}              # --opt values for the driver

Cases follow moby's graphtest, containers/storage's graphtest and containerd's snapshotter
testsuite on real storage. Skips always say why: the host lacks something, or the driver does
not declare a capability.
"""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite(
    "graphdriver.testing.base",
    "graphdriver.testing.cases_layers",
    "graphdriver.testing.cases_diff",
    "graphdriver.testing.cases_bad_input",
    "graphdriver.testing.trees",
)

from .backings import BACKINGS, Backing, BackingUnavailable, make_backing  # noqa: E402
from .base import backing_or_skip  # noqa: E402
from .suite import DriverConformance  # noqa: E402

__all__ = [
    "BACKINGS",
    "Backing",
    "BackingUnavailable",
    "DriverConformance",
    "backing_or_skip",
    "make_backing",
]
