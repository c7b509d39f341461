"""The error tree of graphdriver.

Every error the library raises on purpose is a :class:`GraphDriverError`; its message is one line
(the class joins the lines of a longer one, such as a command's stderr, with "; ") that says
what went wrong and, where there is one, what to do about it::

    GraphDriverError
    ├── InvalidLayerId          id not of the form [A-Za-z0-9][A-Za-z0-9_.-]{0,127}
    ├── LayerNotFound           unknown layer or parent
    ├── LayerExists             duplicate id
    ├── LayerInUse              remove/apply while mounted or while it has children
    ├── NotMounted              put() without a matching get()
    ├── InvalidOption           unknown --opt key, bad value, --size where the driver has no quota
    │   └── InvalidMountSpec    a -v / --volumes-from spec that cannot be used (bad path, ...)
    ├── MaxDepthExceeded        chain deeper than the driver can mount
    ├── ArchiveError            truncated, corrupt or unreadable layer tar
    │   ├── UnsafeArchive       entry that would land outside the layer
    │   └── RecordError         an exact-diff record that cannot be used (archive.tarsplit)
    ├── StoreError              metadata or lock problem (corrupt database, newer schema)
    ├── NotFound                unknown container or volume
    │   ├── ContainerNotFound
    │   └── VolumeNotFound
    ├── AlreadyExists           duplicate container name, volume name with another driver
    ├── InUse                   container mounted, volume used by a container
    └── DriverError             the driver failed to move bytes
        ├── DriverUnavailable   this host cannot run the driver (missing fs, kernel feature, root)
        ├── DriverNotFound      no installed driver of that name
        └── DriverLoadError     the driver's package failed to import

Low-level failures are ``OSError`` (a wrapper of a command raises an OSError subclass with the
errno its stderr names, like devmapper's ``DmsetupError``), and they are turned into these at one
boundary, :func:`from_oserror` (:func:`call_os` around a call), not everywhere; the CLI maps what
is left the same way. The integrations add subclasses for their protocols' error codes.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import TypeVar


class GraphDriverError(Exception):
    """Base of every error graphdriver raises on purpose."""

    #: errno of the underlying failure, when there is one (ENOSPC, EDQUOT, EBUSY...).
    errno: int | None = None

    def __init__(self, message: str, *, errno_: int | None = None) -> None:
        super().__init__("; ".join(line.strip() for line in message.splitlines() if line.strip()))
        if errno_ is not None:
            self.errno = errno_


class InvalidLayerId(GraphDriverError):
    """A layer id that is not ``[A-Za-z0-9][A-Za-z0-9_.-]{0,127}``."""


class LayerNotFound(GraphDriverError):
    """No layer with that id (as the operand or as a parent)."""


class LayerExists(GraphDriverError):
    """A layer with that id exists already."""


class LayerInUse(GraphDriverError):
    """The layer is mounted or has children, so it cannot be removed or rewritten."""


class NotMounted(GraphDriverError):
    """``put`` was called more often than ``get``."""


class InvalidOption(GraphDriverError):
    """An option the driver does not know, or a value it cannot use."""


class MaxDepthExceeded(GraphDriverError):
    """The chain would be deeper than the driver can mount."""


class ArchiveError(GraphDriverError):
    """A layer tar that is truncated, corrupt, or in a format we cannot read."""


class UnsafeArchive(ArchiveError):
    """A tar entry that would be written outside the layer (``..``, absolute, link escapes)."""


class StoreError(GraphDriverError):
    """The store's metadata or lock cannot be used."""


class NotFound(GraphDriverError):
    """No container or volume of that name."""


class ContainerNotFound(NotFound):
    """No container of that name."""


class VolumeNotFound(NotFound):
    """No volume of that name."""


class AlreadyExists(GraphDriverError):
    """A container or volume of that name exists already."""


class InUse(GraphDriverError):
    """A mounted container, or a volume that containers use."""


class InvalidMountSpec(InvalidOption):
    """A volume spec (``-v``, ``--volumes-from``, ``--volume``) that cannot be used."""


class DriverError(GraphDriverError):
    """The driver failed while moving bytes."""


class DriverUnavailable(DriverError):
    """This host cannot run the driver; the message names what is missing."""


class DriverNotFound(DriverError):
    """No installed driver has that name."""


class DriverLoadError(DriverError):
    """The driver's package is installed but failed to load."""


T = TypeVar("T")


def call_os(fn: Callable[..., T], *args: object, doing: str) -> T:
    """``fn(*args)``, with an ``OSError`` turned into a one-line error about *doing*."""
    try:
        return fn(*args)
    except OSError as exc:
        raise from_oserror(exc, doing) from exc


def shortened(name: str) -> str:
    """A path for a one-line error: one past PATH_MAX ("File name too long") is thousands of
    bytes, so its middle goes."""
    if len(name) <= 300:
        return name
    return f"{name[:120]}...{name[-120:]}, {len(name.encode(errors='surrogateescape')):,} bytes"


def from_oserror(exc: OSError, doing: str) -> GraphDriverError:
    """Turn an ``OSError`` met while *doing* something into a one-line graphdriver error."""
    code = exc.errno
    what = exc.strerror or str(exc)
    where = f" ({shortened(str(exc.filename))})" if exc.filename else ""
    hint = ""
    if code in (errno.ENOSPC, errno.EDQUOT):
        hint = ": the filesystem or a size limit (a layer's, a volume's) is full"
    elif code == errno.EBUSY:
        hint = ": something still uses it (a mount, an open file, a process cwd)"
    elif code in (errno.EPERM, errno.EACCES) and os.geteuid() != 0:
        hint = ": this needs root"
    return DriverError(f"{doing}: {what}{where}{hint}", errno_=code)
