"""Loop devices through the LOOP_* ioctls, always with autoclear.

With LO_FLAGS_AUTOCLEAR the kernel detaches the device when its last user goes away, so a
loop device can never outlive the mount made on it, even if the process that made it is killed.
Keep the :class:`LoopDevice` open until the filesystem on it is mounted.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time
from pathlib import Path
from types import TracebackType

LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82

LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4

# struct loop_info64: 5 x u64, 4 x u32, name[64], crypt_name[64], key[32], 2 x u64
_INFO64 = struct.Struct("=5Q4I64s64s32s2Q")
# struct loop_config: u32 fd, u32 block_size, loop_info64, 8 x u64 reserved
_CONFIG = struct.Struct("=II" + _INFO64.format.lstrip("=") + "8Q")


def _info(backing: Path, flags: int) -> tuple[object, ...]:
    name = os.fsencode(backing)[:63]
    return (0, 0, 0, 0, 0, 0, 0, 0, flags, name, b"", b"", 0, 0)


class LoopDevice:
    """An attached loop device; ``close()`` lets autoclear detach it once nothing uses it."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> LoopDevice:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LoopDevice({self.path!r})"


def attach(backing: Path, *, read_only: bool = False) -> LoopDevice:
    """Attach *backing* to a free loop device with autoclear and return it, open."""
    flags = LO_FLAGS_AUTOCLEAR | (LO_FLAGS_READ_ONLY if read_only else 0)
    file_fd = os.open(backing, os.O_RDONLY if read_only else os.O_RDWR | os.O_CLOEXEC)
    try:
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(64):
                number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
                path = f"/dev/loop{number}"
                dev_fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
                try:
                    _configure(dev_fd, file_fd, backing, flags)
                except OSError as exc:
                    os.close(dev_fd)
                    if exc.errno == errno.EBUSY:  # another process took it first
                        time.sleep(0.01)
                        continue
                    raise
                return LoopDevice(path, dev_fd)
            raise OSError(errno.EBUSY, "no free loop device", str(backing))
        finally:
            os.close(ctl)
    finally:
        os.close(file_fd)


def _configure(dev_fd: int, file_fd: int, backing: Path, flags: int) -> None:
    config = _CONFIG.pack(file_fd, 0, *_info(backing, flags), *([0] * 8))
    try:
        fcntl.ioctl(dev_fd, LOOP_CONFIGURE, config)
        return
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTTY):
            raise
    # kernels before 5.8: two steps
    fcntl.ioctl(dev_fd, LOOP_SET_FD, file_fd)
    try:
        fcntl.ioctl(dev_fd, LOOP_SET_STATUS64, _INFO64.pack(*_info(backing, flags)))
    except OSError:
        fcntl.ioctl(dev_fd, LOOP_CLR_FD, 0)
        raise


def backing_file(device: str) -> str | None:
    """The file behind an attached loop device, from sysfs, or None if it is free."""
    name = os.path.basename(device)
    try:
        return Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
    except OSError:
        return None
