"""The archive engine: what changed between two trees, OCI layer tars both ways, safe apply.

Its names are imported on first use (module ``__getattr__``), so that importing one part (the
tree compare a driver uses) does not import the tar code and zstandard with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..lazy import lazy_attribute

if TYPE_CHECKING:
    from .apply import ApplyResult, apply_layer
    from .changes import (
        Change,
        ChangeKind,
        changes_size,
        changes_usage,
        overlay_changes,
        tree_changes,
    )
    from .tar_writer import write_changes_tar

_WHERE = {
    "ApplyResult": ".apply",
    "apply_layer": ".apply",
    "Change": ".changes",
    "ChangeKind": ".changes",
    "changes_size": ".changes",
    "changes_usage": ".changes",
    "overlay_changes": ".changes",
    "tree_changes": ".changes",
    "write_changes_tar": ".tar_writer",
}

__all__ = [
    "ApplyResult",
    "Change",
    "ChangeKind",
    "apply_layer",
    "changes_size",
    "changes_usage",
    "overlay_changes",
    "tree_changes",
    "write_changes_tar",
]


def __getattr__(name: str) -> Any:
    return lazy_attribute(globals(), _WHERE, name)
