"""The plugin contract: what a driver package implements.

The core (:mod:`graphdriver.store`) owns ids, parents, states, reference counts, locking and hooks;
a driver only moves bytes. A driver is a subclass of :class:`Driver` registered under the entry
point group ``graphdriver.drivers``. Optional abilities are runtime-checkable Protocols
(:class:`NativeDiff`, :class:`NativeApply`, :class:`ApplyLowers`, :class:`MountSpec`,
:class:`KernelMounts`) that the core finds with isinstance(): implementing one is the only way
to have it, so no flag repeats them. :class:`Capabilities` holds what no method can say (a size
limit is given at creation, ``CreateOpts.size`` like moby's CreateOpts, so quota needs no
protocol: a driver that honours it declares ``Capabilities.quota``).
"""

from __future__ import annotations

import abc
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

from .errors import InvalidOption

_LAYER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")


def is_layer_id(name: str) -> bool:
    """Whether *name* has the form of a layer id (what ``Driver.stored_layers`` may list)."""
    return _LAYER_ID.match(name) is not None


@dataclass(frozen=True)
class Capabilities:
    """What a driver declares about itself beyond the Protocols it implements (those are found
    with isinstance(), never declared); the conformance suite skips, saying so, what it does not
    declare."""

    #: ``CreateOpts.size`` limits a read-write layer (writes past it fail with EDQUOT/ENOSPC).
    quota: bool = False
    #: deepest chain (layers including the top one) that the driver can mount.
    max_depth: int = 1 << 20
    #: the driver needs root (mounts, ioctls, device-mapper).
    needs_root: bool = False
    #: a mounted image layer that has children is read-only (writes fail with EROFS).
    readonly_images: bool = False
    #: why an ability the driver has is off on this host, by field or Protocol name
    #: ({"quota": "XFS without prjquota"}, {"native_diff": "turned off by an option"})
    why_not: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CreateOpts:
    """Options for a new layer."""

    #: size limit in bytes for a read-write layer; None for no limit.
    size: int | None = None
    #: SELinux context passed to mounts where the driver supports it.
    mount_label: str | None = None


@dataclass(frozen=True)
class LayerInfo:
    """What a driver is told about a layer; the core keeps the authoritative record."""

    id: str
    parent: str | None
    rw: bool
    size: int | None = None
    mount_label: str | None = None
    #: an image layer that has children: it must never change, so mount it read-only
    sealed: bool = False


class Driver(abc.ABC):
    """A storage driver: creates, removes and mounts layers under its ``home`` directory.

    ``__init__`` raises :class:`~graphdriver.errors.DriverUnavailable` when the host cannot run
    the driver. All methods are called with the store's lock held; they need no locking of their
    own. ``mount`` must be idempotent for an already-mounted layer (a crashed process may have
    left the mount behind), and ``remove``/``unmount`` must accept a half-made layer.
    """

    #: the driver's name, the entry point name it is registered under.
    name: ClassVar[str]
    #: the ``--opt`` keys the driver accepts, with a one-line description each.
    options: ClassVar[Mapping[str, str]] = {}

    capabilities: Capabilities = Capabilities()

    def __init__(self, home: Path, options: Mapping[str, str]) -> None:
        self.home = home
        self.opts = dict(options)

    @classmethod
    def probe(cls, home: Path, options: Mapping[str, str]) -> None:
        """Raise DriverUnavailable if this host cannot run the driver at *home*; change nothing.

        The default accepts every host; a driver that needs a kernel feature overrides it.
        """

    @abc.abstractmethod
    def create(self, layer: LayerInfo, parent: LayerInfo | None, opts: CreateOpts) -> None:
        """Make *layer* as an empty layer, or as a copy-on-write child of *parent*.

        Where the layer's storage exists already (left without a record: ``check`` lists it
        as orphan storage, and keeps it), raise ``FileExistsError`` (EEXIST) before making
        anything: the store then drops only its record, never that storage."""

    def has_storage(self, layer: LayerInfo) -> bool | None:
        """Whether *layer* has storage here, asked before a create records it: a create over
        storage left without a record is refused and never deletes it (a crash between the
        record and ``create``'s EEXIST would have left recovery to remove it). None: this
        driver cannot tell cheaply (the default; its ``create`` raises EEXIST instead)."""
        return None

    @abc.abstractmethod
    def remove(self, layer: LayerInfo) -> None:
        """Delete everything of *layer*; a missing or half-made layer is not an error."""

    @abc.abstractmethod
    def mount(self, layer: LayerInfo, chain: Sequence[LayerInfo]) -> Path:
        """Make the merged view of *layer* and return its path.

        *chain* lists the layer's ancestors, nearest parent first.
        """

    @abc.abstractmethod
    def unmount(self, layer: LayerInfo) -> None:
        """Undo ``mount``; unmounting a layer that is not mounted is not an error."""

    def recover(self, layers: Sequence[LayerInfo]) -> None:
        """Finish or roll back what a process killed inside this driver left half-done.

        Called once per open, after ``__init__``, with the store's exclusive lock held and
        *layers* the layers the store knows (in every state), read from the records when first
        looked at and only during the call (keep a copy, ``list(layers)``, to use them later);
        ``__init__`` must not change shared state, since it runs before the lock is taken. The
        default does nothing.
        """

    def stored_layers(self) -> Mapping[str, str | None] | None:
        """The layers that have storage on disk now, each with the parent that storage
        depends on (None when its files are complete by themselves), or None if the driver
        cannot tell (the default).

        List only what is unmistakably the driver's own (named as a layer id, laid out as
        ``create`` makes it): ``graphdriver check`` reports storage without a record and
        records without storage from it, ``check --repair`` removes the former with
        ``remove``, and rebuilds records from it when the database is lost.
        """
        return None

    def status(self) -> list[tuple[str, str]]:
        """Key/value lines like the storage section of ``docker info``."""
        return []

    def cleanup(self) -> None:
        """Called by ``LayerStore.cleanup`` after every layer was unmounted: release what
        the driver keeps active between processes (devmapper deactivates its devices)."""

    def close(self) -> None:
        """Release what this object holds open (files, databases); layers stay mounted."""


@runtime_checkable
class KernelMounts(Protocol):
    """A driver whose ``mount`` makes kernel mounts (they show in /proc/self/mountinfo and go
    away at reboot): the store checks them against its mount counts after a crash. A driver
    whose mount only returns a directory (vfs, btrfs) does not implement it."""

    def is_mounted(self, layer: LayerInfo) -> bool | None:
        """Whether the kernel mount of *layer* exists now; None when this layer needs none
        (overlay's bottom layer is its own diff dir), so there is nothing to check."""


@runtime_checkable
class NativeDiff(Protocol):
    """A driver that knows what a layer changed without walking its parent (the name
    ``native_diff`` in ``Capabilities.why_not`` says why its methods return None here)."""

    def changes(
        self, layer: LayerInfo, chain: Sequence[LayerInfo]
    ) -> Sequence[tuple[str, int]] | None:
        """(path, kind) pairs against the direct parent (``Change`` is one), or None for the
        naive walk."""

    def diff_source(self, layer: LayerInfo) -> Path | None:
        """The directory that holds exactly this layer's changes (overlay's upper), or None."""


@runtime_checkable
class NativeApply(Protocol):
    """A driver that unpacks a layer tar into its own storage without a merged mount."""

    def apply_target(self, layer: LayerInfo) -> tuple[Path, str] | None:
        """(directory, whiteout format) to extract into, or None to use a merged mount.

        The whiteout format is ``"delete"`` (remove the named file) or ``"overlay"`` (write a
        0/0 character device and ``trusted.overlay.opaque``).
        """


@runtime_checkable
class ApplyLowers(Protocol):
    """A :class:`NativeApply` driver whose ``"overlay"`` target has lower dirs the apply may
    copy a hardlink's target up from (optional: without it such a hardlink is refused)."""

    def apply_lowers(self, layer: LayerInfo) -> Sequence[Path]:
        """The read-only lower dirs below ``apply_target``'s directory, nearest first, holding
        overlayfs whiteouts and opaque markers."""


@dataclass(frozen=True)
class MountEntry:
    """One mount that another program makes itself: ``mount -t TYPE -o OPTIONS SOURCE target``
    (containerd's ``Mount`` type; the options are mount(8)'s, ``ro``/``rw`` and ``rbind``
    included)."""

    type: str
    source: str
    options: tuple[str, ...] = ()


@runtime_checkable
class MountSpec(Protocol):
    """A driver whose layer another program can mount itself, the way containerd mounts what
    its snapshotters return; without it, or when it returns None, the caller binds the mount
    this store holds (``LayerStore.get``)."""

    def mount_spec(
        self, layer: LayerInfo, chain: Sequence[LayerInfo], readonly: bool
    ) -> Sequence[MountEntry] | None:
        """The mounts that show *layer* over *chain* (its ancestors, nearest first), writes
        going to the layer's own storage, or nothing writable when *readonly*; None when one
        mount cannot say it (overlay: lower dirs past one page of options)."""


_SIZE = re.compile(r"(?i)^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$")


def parse_size(text: str) -> int:
    """``50M``, ``1.5G``, ``4096``, ``10GiB`` -> bytes (binary multiples, like Docker)."""
    m = _SIZE.match(text)
    if not m:
        raise InvalidOption(
            f"invalid size {text!r}: use a number with an optional K, M, G, T suffix, like 50M"
        )
    unit = "kmgtp".find(m.group(2).lower()) + 1 if m.group(2) else 0
    return int(float(m.group(1)) * (1024**unit))
