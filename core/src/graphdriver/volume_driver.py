"""The volume driver contract (entry point group ``graphdriver.volume_drivers``) and loading.

``local`` (:mod:`.volume_local`) is one of them; :class:`~graphdriver.volumes.VolumeStore` keeps
names, labels, options, references and mount counts, so a driver only moves data.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from .errors import DriverLoadError
from .plugins import entry_point_names, load_plugin

VOLUME_DRIVER_GROUP = "graphdriver.volume_drivers"
DEFAULT_VOLUME_DRIVER = "local"


class VolumeDriver(ABC):
    """What a volume driver implements. Every call gets the volume's recorded options.

    ``home`` is a directory of the driver's own (``<root>/volumes/_drivers/<name>``, made on
    first use); ``volumes_dir`` is ``<root>/volumes``, where ``local`` keeps its data.
    """

    name: ClassVar[str]
    #: option keys the driver accepts (``volume create --opt KEY=VALUE``) -> one line of help
    options: ClassVar[Mapping[str, str]] = {}

    def __init__(self, home: Path, volumes_dir: Path) -> None:
        self.home = home
        self.volumes_dir = volumes_dir

    def validate(self, options: Mapping[str, str]) -> None:
        """Raise InvalidOption for a combination of options the driver cannot use."""

    @abstractmethod
    def create(self, name: str, options: Mapping[str, str]) -> None:
        """Make the volume's storage (empty). Where it exists already (left without a
        record), raise ``FileExistsError`` (EEXIST) before making anything: the store then
        drops only its record, never that data."""

    def has_storage(self, name: str, options: Mapping[str, str]) -> bool | None:
        """Whether the volume *name* has storage here, asked before a create records it (see
        ``Driver.has_storage``); None: this driver cannot tell cheaply (the default)."""
        return None

    @abstractmethod
    def remove(self, name: str, options: Mapping[str, str]) -> None:
        """Delete the volume's storage and data; a missing volume is not an error."""

    @abstractmethod
    def mount(self, name: str, options: Mapping[str, str]) -> Path:
        """Make the data reachable and return the directory to bind into containers.
        Called once for the first container that mounts it (the store counts)."""

    @abstractmethod
    def unmount(self, name: str, options: Mapping[str, str]) -> None:
        """Undo :meth:`mount`, after the last container unmounted the volume."""

    @abstractmethod
    def path(self, name: str, options: Mapping[str, str]) -> Path:
        """Where the data is (``Mountpoint`` in ``volume inspect``)."""

    def mounted(self, name: str, options: Mapping[str, str]) -> bool | None:
        """Whether what :meth:`mount` made is still in place (a reboot or an unmount by hand
        takes a mount away while the store still counts it: it is then mounted again);
        None: this driver cannot tell (the default)."""
        return None

    def status(self, name: str, options: Mapping[str, str]) -> dict[str, str]:
        """Extra key/values for ``volume inspect``."""
        return {}


def installed_volume_drivers() -> dict[str, str]:
    """Installed volume driver names -> "module:Class"."""
    return dict(sorted(entry_point_names(VOLUME_DRIVER_GROUP).items()))


def load_volume_driver(name: str) -> type[VolumeDriver]:
    """Import the volume driver registered as *name*, like a storage driver."""
    cls = load_plugin(VOLUME_DRIVER_GROUP, name, installed_volume_drivers(), "volume")
    if not (isinstance(cls, type) and issubclass(cls, VolumeDriver)):
        raise DriverLoadError(f"volume driver {name!r} is not a graphdriver.VolumeDriver")
    return cls
