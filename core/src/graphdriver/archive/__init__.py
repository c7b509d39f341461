"""The archive engine: what changed between two trees, OCI layer tars both ways, safe apply."""

from __future__ import annotations

from .apply import ApplyResult, apply_layer
from .changes import Change, ChangeKind, changes_size, overlay_changes, tree_changes
from .tar import write_changes_tar

__all__ = [
    "ApplyResult",
    "Change",
    "ChangeKind",
    "apply_layer",
    "changes_size",
    "overlay_changes",
    "tree_changes",
    "write_changes_tar",
]
