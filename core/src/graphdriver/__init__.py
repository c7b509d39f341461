"""graphdriver: pluggable storage drivers for container image layers.

The public API: open a :class:`LayerStore` with :func:`open_store`, implement a :class:`Driver`
to add a storage driver or a :class:`VolumeDriver` to add a volume driver, catch
:class:`GraphDriverError`. Containers and volumes: :mod:`graphdriver.containers`,
:mod:`graphdriver.volumes`.
"""

from __future__ import annotations

from .lazy import lazy_attribute

# typing is not imported: the command client (:mod:`.command_client`) imports this package
# and starts in a few milliseconds; mypy takes any name TYPE_CHECKING to be true
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .archive import ApplyResult, Change, ChangeKind
    from .driver import (
        ApplyLowers,
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
    from .plugins import hookimpl
    from .store import LayerStore, open_store, validate_id
    from .volumes import VolumeDriver, VolumeStore

__version__ = "0.1.0"

#: the public names, each imported from its module on first use (a CLI call imports only
#: what it runs)
_WHERE = {
    "AlreadyExists": ".errors",
    "ApplyLowers": ".driver",
    "ApplyResult": ".archive.apply",
    "ArchiveError": ".errors",
    "Capabilities": ".driver",
    "Change": ".archive.changes",
    "ChangeKind": ".archive.changes",
    "ContainerNotFound": ".errors",
    "CreateOpts": ".driver",
    "Driver": ".driver",
    "KernelMounts": ".driver",
    "DriverError": ".errors",
    "DriverLoadError": ".errors",
    "DriverNotFound": ".errors",
    "DriverUnavailable": ".errors",
    "GraphDriverError": ".errors",
    "InUse": ".errors",
    "InvalidLayerId": ".errors",
    "InvalidMountSpec": ".errors",
    "InvalidOption": ".errors",
    "LayerExists": ".errors",
    "LayerInUse": ".errors",
    "LayerInfo": ".driver",
    "LayerNotFound": ".errors",
    "LayerStore": ".store",
    "MaxDepthExceeded": ".errors",
    "MountEntry": ".driver",
    "MountSpec": ".driver",
    "NativeApply": ".driver",
    "NativeDiff": ".driver",
    "NotFound": ".errors",
    "NotMounted": ".errors",
    "StoreError": ".errors",
    "UnsafeArchive": ".errors",
    "VolumeDriver": ".volumes",
    "VolumeNotFound": ".errors",
    "VolumeStore": ".volumes",
    "hookimpl": ".plugins",
    "open_store": ".store",
    "validate_id": ".store",
}

__all__ = [
    "AlreadyExists",
    "ApplyLowers",
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


def __getattr__(name: str) -> Any:
    return lazy_attribute(globals(), _WHERE, name)
