"""A container's mount points: the ``-v`` spec forms Docker users know, and their record."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import GraphDriverError, InvalidMountSpec
from .ids import container_path, validate_id

_MODES = ("ro", "rw", "nocopy")


@dataclass
class MountPoint:
    """One volume or bind of a container."""

    destination: str
    #: "volume" (managed, by name) or "bind" (a host path)
    type: str
    #: the volume's name, or the host path of a bind
    source: str
    rw: bool = True
    #: "cli", "image" or "volumes-from:<container>"
    origin: str = "cli"
    anonymous: bool = False
    #: fill an empty volume with the image's content at the destination on first mount
    copy: bool = True
    copied: bool = False
    #: the bind is in place (set by container mount, cleared first by umount)
    bound: bool = False
    #: where the bind is mounted on the host, to check it is still there
    target: str | None = None


def parse_spec(spec: str) -> MountPoint:
    """``NAME:/path[:MODE]``, ``/host/dir:/path[:MODE]`` or ``/path``; MODE is a comma list
    of ``ro``, ``rw``, ``nocopy``."""
    parts = spec.split(":")

    def bad(why: str) -> InvalidMountSpec:
        return InvalidMountSpec(f"invalid volume spec {spec!r}: {why}")

    if len(parts) > 3 or not all(parts):
        raise bad("use NAME:/path[:ro], /host/path:/path[:ro] or /path")
    modes: list[str] = []
    if len(parts) == 3:
        modes = parts[2].split(",")
        unknown = [m for m in modes if m not in _MODES]
        if unknown or ("ro" in modes and "rw" in modes):
            raise bad(f"mode {parts[2]!r} is not a comma list of {', '.join(_MODES)}")
    if len(parts) == 2 and set(parts[1].split(",")) <= set(_MODES):
        raise bad("a volume without a source takes no mode; use /path, or NAME:/path:MODE")
    try:
        destination = container_path(parts[-1] if len(parts) < 3 else parts[1])
    except ValueError as exc:
        raise bad(f"the path inside the container {exc}") from None
    rw = "ro" not in modes
    copy = "nocopy" not in modes
    if len(parts) == 1:
        return MountPoint(destination, "volume", "", rw, anonymous=True, copy=copy)
    source = parts[0]
    if source.startswith("/"):
        if "nocopy" in modes:
            raise bad("nocopy is for volumes, not for binds")
        return MountPoint(destination, "bind", os.path.normpath(source), rw, copy=False)
    if source.startswith("."):
        raise bad("a bind source must be an absolute host path")
    try:
        validate_id(source, "volume name")
    except GraphDriverError as exc:
        raise bad(str(exc)) from None
    return MountPoint(destination, "volume", source, rw, copy=copy)


def depth_order(mounts: Sequence[MountPoint]) -> list[MountPoint]:
    return sorted(mounts, key=lambda m: (m.destination.count("/"), m.destination))
