"""DriverConformance: the test cases every driver passes, on real storage.

Subclass it with ``driver`` and ``backing`` set; see :mod:`graphdriver.testing`. The cases live
in eight modules: :mod:`.cases_layers`, :mod:`.cases_mounts`, :mod:`.cases_diff`,
:mod:`.cases_streams`, :mod:`.cases_exact`, :mod:`.cases_canonical`, :mod:`.cases_native` and
:mod:`.cases_bad_input`;
each case is marked with its group (:mod:`.groups`), and a subclass may run only some groups.
"""

from __future__ import annotations

from .base import ConformanceBase, hostile_tars
from .cases_bad_input import BadInputCases
from .cases_canonical import CanonicalCases
from .cases_diff import DiffCases
from .cases_exact import ExactDiffCases
from .cases_layers import LayerCases
from .cases_mounts import MountCases
from .cases_native import NativeDiffCases
from .cases_streams import StreamCases

__all__ = ["ConformanceBase", "DriverConformance", "hostile_tars"]


class DriverConformance(
    LayerCases,
    MountCases,
    DiffCases,
    StreamCases,
    ExactDiffCases,
    CanonicalCases,
    NativeDiffCases,
    BadInputCases,
):
    """Every conformance case; a subclass sets ``driver``, ``backing`` and maybe ``options``."""
