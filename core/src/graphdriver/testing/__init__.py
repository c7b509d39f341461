"""The conformance suite every graphdriver driver runs to prove it behaves like the others.

Use it from a driver package's tests::

    from graphdriver.testing import DriverConformance

    class TestMyDriver(DriverConformance):
        driver = "mydriver"
        backing = "loop-xfs"      # loop-ext4 | loop-xfs | loop-btrfs | thin-pool | tmpdir
        options = {}              # --opt values for the driver

Every case belongs to one group (:data:`GROUPS`: lifecycle, depth, mount, quota, diff,
streams, bad-input). A class runs them all unless it names the ones it runs, with why the
others need not run there (say, a second class of the same driver on another pool kind)::

    class TestMyDriverOtherPool(DriverConformance):
        ...
        groups = {"lifecycle", "mount", "quota"}
        groups_why = "diffs, streams and bad input are the store's code: TestMyDriver runs them"

The other groups' cases are deselected at collection, not skipped: the header says which class
left how many out and why, and pytest's summary counts them as deselected (:mod:`.groups`).

Cases follow moby's graphtest, containers/storage's graphtest and containerd's snapshotter
testsuite on real storage. Skips always say why: the host lacks something, or the driver does
not declare a capability. ``GRAPHDRIVER_REQUIRE`` (see :mod:`.require`) turns the first kind into
failures; a driver package's own tests say "host lacks it" through :func:`host_lacks` (or
:func:`backing_or_skip`, :func:`quota_or_skip`) so that it does the same for them.
"""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite(
    "graphdriver.testing.base",
    "graphdriver.testing.cases_layers",
    "graphdriver.testing.cases_mounts",
    "graphdriver.testing.mountspec",
    "graphdriver.testing.cases_diff",
    "graphdriver.testing.cases_streams",
    "graphdriver.testing.cases_exact",
    "graphdriver.testing.cases_canonical",
    "graphdriver.testing.cases_bad_input",
    "graphdriver.testing.trees",
    "graphdriver.testing.require",
    "graphdriver.testing.groups",
)

from .backings import (  # noqa: E402
    BACKINGS,
    Backing,
    BackingUnavailable,
    fill_filesystem,
    freed,
    make_backing,
)
from .base import backing_or_skip, quota_or_skip  # noqa: E402
from .groups import GROUPS, group  # noqa: E402
from .require import REQUIREMENTS, host_lacks, needs_root, required  # noqa: E402
from .suite import DriverConformance  # noqa: E402

__all__ = [
    "BACKINGS",
    "GROUPS",
    "REQUIREMENTS",
    "Backing",
    "BackingUnavailable",
    "DriverConformance",
    "backing_or_skip",
    "fill_filesystem",
    "freed",
    "group",
    "host_lacks",
    "make_backing",
    "needs_root",
    "quota_or_skip",
    "required",
]
