"""graphdriver: pluggable storage drivers for container image layers.

The public API: open a :class:`LayerStore` with :func:`open_store`, implement a :class:`Driver`
to add a storage driver, catch :class:`GraphDriverError`.
"""

from __future__ import annotations

from .archive import ApplyResult, Change, ChangeKind
from .driver import Capabilities, CreateOpts, Driver, LayerInfo, NativeApply, NativeDiff
from .errors import (
    ArchiveError,
    DriverError,
    DriverLoadError,
    DriverNotFound,
    DriverUnavailable,
    GraphDriverError,
    InvalidLayerId,
    InvalidOption,
    LayerExists,
    LayerInUse,
    LayerNotFound,
    MaxDepthExceeded,
    NotMounted,
    StoreError,
    UnsafeArchive,
)
from .hookspecs import hookimpl
from .store import LayerStore, open_store, validate_id

__version__ = "0.1.0"

__all__ = [
    "ApplyResult",
    "ArchiveError",
    "Capabilities",
    "Change",
    "ChangeKind",
    "CreateOpts",
    "Driver",
    "DriverError",
    "DriverLoadError",
    "DriverNotFound",
    "DriverUnavailable",
    "GraphDriverError",
    "InvalidLayerId",
    "InvalidOption",
    "LayerExists",
    "LayerInUse",
    "LayerInfo",
    "LayerNotFound",
    "LayerStore",
    "MaxDepthExceeded",
    "NativeApply",
    "NativeDiff",
    "NotMounted",
    "StoreError",
    "UnsafeArchive",
    "hookimpl",
    "open_store",
    "validate_id",
]
