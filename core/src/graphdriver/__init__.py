"""graphdriver: pluggable storage drivers for container image layers.

The public API: open a :class:`LayerStore` with :func:`open_store`, implement a :class:`Driver`
to add a storage driver or a :class:`VolumeDriver` to add a volume driver, catch
:class:`GraphDriverError`. Containers and volumes: :mod:`graphdriver.containers`,
:mod:`graphdriver.volumes`.
"""

from __future__ import annotations

from .archive import ApplyResult, Change, ChangeKind
from .driver import (
    Capabilities,
    CreateOpts,
    Driver,
    KernelMounts,
    LayerInfo,
    MountEntry,
    MountSpec,
    NativeApply,
    NativeDiff,
)
from .errors import (
    AlreadyExists,
    ArchiveError,
    ContainerNotFound,
    DriverError,
    DriverLoadError,
    DriverNotFound,
    DriverUnavailable,
    GraphDriverError,
    InUse,
    InvalidLayerId,
    InvalidMountSpec,
    InvalidOption,
    LayerExists,
    LayerInUse,
    LayerNotFound,
    MaxDepthExceeded,
    NotFound,
    NotMounted,
    StoreError,
    UnsafeArchive,
    VolumeNotFound,
)
from .hookspecs import hookimpl
from .store import LayerStore, open_store, validate_id
from .volumes import VolumeDriver, VolumeStore

__version__ = "0.1.0"

__all__ = [
    "AlreadyExists",
    "ApplyResult",
    "ArchiveError",
    "Capabilities",
    "Change",
    "ChangeKind",
    "ContainerNotFound",
    "CreateOpts",
    "Driver",
    "DriverError",
    "DriverLoadError",
    "DriverNotFound",
    "DriverUnavailable",
    "GraphDriverError",
    "InUse",
    "InvalidLayerId",
    "InvalidMountSpec",
    "InvalidOption",
    "KernelMounts",
    "LayerExists",
    "LayerInUse",
    "LayerInfo",
    "LayerNotFound",
    "LayerStore",
    "MaxDepthExceeded",
    "MountEntry",
    "MountSpec",
    "NativeApply",
    "NativeDiff",
    "NotFound",
    "NotMounted",
    "StoreError",
    "UnsafeArchive",
    "VolumeDriver",
    "VolumeNotFound",
    "VolumeStore",
    "hookimpl",
    "open_store",
    "validate_id",
]
