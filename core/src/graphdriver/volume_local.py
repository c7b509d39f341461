"""The ``local`` volume driver: ``<root>/volumes/<name>/_data``, as Docker's.

Without options the volume is that directory. With ``type``, ``device`` and ``o`` (Docker's
local driver options) the device is mounted on ``_data`` while some container uses the volume:
``--opt type=tmpfs --opt device=tmpfs --opt o=size=64m``, ``--opt type=ext4 --opt
device=/dev/loop3``, ``--opt type=none --opt device=/srv/data --opt o=bind``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from .errors import InvalidOption
from .linux import mount as m
from .linux.bind import reaches_root, root_devices
from .linux.tree import remove_tree
from .volume_driver import VolumeDriver

#: mount(8) option words that are flags, not filesystem data: word -> (set, clear)
_FLAGS: dict[str, tuple[int, int]] = {
    "ro": (m.MS_RDONLY, 0),
    "rw": (0, m.MS_RDONLY),
    "nosuid": (m.MS_NOSUID, 0),
    "suid": (0, m.MS_NOSUID),
    "nodev": (m.MS_NODEV, 0),
    "dev": (0, m.MS_NODEV),
    "noexec": (0x8, 0),
    "exec": (0, 0x8),
    "sync": (0x10, 0),
    "async": (0, 0x10),
    "noatime": (0x400, 0),
    "atime": (0, 0x400),
    "nodiratime": (0x800, 0),
    "relatime": (1 << 21, 0),
    "strictatime": (1 << 24, 0),
    "bind": (m.MS_BIND, 0),
    "rbind": (m.MS_BIND | m.MS_REC, 0),
}


def parse_mount_options(text: str) -> tuple[int, str]:
    """Split ``o=`` into mount(2) flags and the filesystem's data string."""
    flags = 0
    data = []
    for word in filter(None, (w.strip() for w in text.split(","))):
        if word in _FLAGS:
            on, off = _FLAGS[word]
            flags = (flags | on) & ~off
        else:
            data.append(word)
    return flags, ",".join(data)


class LocalVolumeDriver(VolumeDriver):
    """Volumes as directories under ``<root>/volumes``, optionally backed by a mount."""

    name = "local"
    options = {
        "type": "filesystem type to mount on the volume (tmpfs, ext4, xfs, nfs, none for bind)",
        "device": "what to mount: a block device, a host directory with o=bind, tmpfs",
        "o": "mount options, comma-separated (size=64m, uid=1000, bind, ro, ...)",
    }

    def _base(self, name: str) -> Path:
        return self.volumes_dir / name

    def path(self, name: str, options: Mapping[str, str]) -> Path:
        return self._base(name) / "_data"

    def validate(self, options: Mapping[str, str]) -> None:
        if options and not {"type", "device"} <= set(options):
            raise InvalidOption(
                "the local volume driver needs both --opt type=... and --opt device=... to "
                "mount something (e.g. type=tmpfs device=tmpfs)"
            )
        flags, _data = parse_mount_options(options.get("o", ""))
        if not flags & m.MS_BIND:
            self._check_device(options.get("device", ""))
        else:
            device = options.get("device", "")
            if not device.startswith("/"):
                raise InvalidOption("a bind volume needs an absolute host path as --opt device=")
            try:
                fd = os.open(device, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                return  # checked again at mount, on the fd that is bound
            try:
                self._check_bind_source(fd, device)
            finally:
                os.close(fd)

    def _check_bind_source(self, fd: int, device: str) -> None:
        root = self.volumes_dir.parent
        how = reaches_root(fd, str(root))
        if how is not None:
            raise InvalidOption(
                f"bind device {device} {how} the graphdriver root {root}; a volume must not "
                f"reach the store's own files"
            )

    def create(self, name: str, options: Mapping[str, str]) -> None:
        base = self._base(name)
        base.mkdir(0o711)
        (base / "_data").mkdir(0o755)
        os.chmod(base / "_data", 0o755)

    def remove(self, name: str, options: Mapping[str, str]) -> None:
        base = self._base(name)
        m.unmount_all_under(base)
        if base.exists():
            remove_tree(base)

    def _check_device(self, device: str) -> None:
        """Refuse a block device that holds the root's filesystem (checked at create, and
        again at every mount: the path may name another device by then)."""
        try:
            st = os.stat(device)
        except OSError:  # no path: tmpfs, a server's export; or one that is not there yet
            return
        root = self.volumes_dir.parent
        if stat.S_ISBLK(st.st_mode) and st.st_rdev in root_devices(str(root)):
            raise InvalidOption(
                f"device {device} holds the filesystem of the graphdriver root {root}; a volume "
                f"must not reach the store's own files"
            )

    def has_storage(self, name: str, options: Mapping[str, str]) -> bool:
        return os.path.lexists(self._base(name))

    def mount(self, name: str, options: Mapping[str, str]) -> Path:
        data = self.path(name, options)
        if not data.is_dir():
            raise FileNotFoundError(2, "the volume's directory is missing", str(data))
        if options:
            flags, extra = parse_mount_options(options.get("o", ""))
            device = options["device"]
            if flags & m.MS_BIND:
                self._bind(device, data, flags, extra)
            else:
                self._check_device(device)
                m.mount(device, data, options["type"], flags, extra or None)
            if flags & m.MS_BIND and flags & m.MS_RDONLY:  # a bind ignores ro until a remount
                m.mount("none", data, None, m.MS_REMOUNT | m.MS_BIND | m.MS_RDONLY)
        return data

    def _bind(self, device: str, data: Path, flags: int, extra: str) -> None:
        """Bind *device* from an fd checked not to reach the root, so what is checked is what
        is bound, whatever the path names by then."""
        try:
            fd = os.open(device, os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            raise FileNotFoundError(2, "bind source of the volume does not exist", device) from None
        try:
            self._check_bind_source(fd, device)
            m.mount(f"/proc/self/fd/{fd}", data, None, flags, extra or None)
        finally:
            os.close(fd)

    def mounted(self, name: str, options: Mapping[str, str]) -> bool:
        return not options or m.is_mountpoint(self.path(name, options))

    def unmount(self, name: str, options: Mapping[str, str]) -> None:
        if options:
            m.unmount(self.path(name, options))
