"""The one handle on the C library, the system calls glibc has no wrapper for, and their errors.

Every module under ``linux/`` that calls into libc uses :data:`LIBC`, so argument types are set
once per function and ``errno`` is read the same way everywhere. The syscall numbers are the
ones every architecture shares (424 and up were allocated together for all of them).
"""

from __future__ import annotations

import ctypes
import os

#: libc, loaded by its soname: ``ctypes.util.find_library`` would run ldconfig
LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
LIBC.syscall.restype = ctypes.c_long

SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_FSOPEN = 430
SYS_FSCONFIG = 431
SYS_FSMOUNT = 432
SYS_OPENAT2 = 437
SYS_MOUNT_SETATTR = 442
SYS_QUOTACTL_FD = 443

#: the ``dirfd`` that means the current directory (a path argument is then used as is)
AT_FDCWD = -100


def errno_error(path: str | os.PathLike[str] | None = None) -> OSError:
    """The ``OSError`` for the errno the last failed libc call left, naming *path*."""
    code = ctypes.get_errno()
    return OSError(code, os.strerror(code), None if path is None else os.fspath(path))


def syscall(number: int, *args: object, path: str | os.PathLike[str] | None = None) -> int:
    """Call syscall(2) with *args* (ints, bytes, None or ctypes values); a negative result
    raises the errno as ``OSError`` naming *path*."""
    rc = int(LIBC.syscall(number, *args))
    if rc < 0:
        raise errno_error(path)
    return rc
