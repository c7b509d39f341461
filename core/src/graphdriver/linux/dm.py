"""Whether this kernel's device-mapper answers.

``/dev/mapper/control`` existing says nothing: libdevmapper makes the node (char 10:236) on
its first call when it is missing, and a container's devtmpfs may hold it too, on a kernel
built without device-mapper. Opening it is the test: the kernel answers ENODEV when no driver
is behind the number, and loads dm-mod for it where the module is there to load.
"""

from __future__ import annotations

import errno
import os
import stat

CONTROL = "/dev/mapper/control"


def device_mapper_missing() -> str | None:
    """None when this kernel has device-mapper, else one line saying what is missing."""
    try:
        fd = os.open(CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return f"this kernel has no device-mapper ({CONTROL} is missing)"
    except PermissionError:
        # not root: what the kernel has registered is still listed
        try:
            with open("/proc/misc", "rb") as misc:
                if any(line.split()[1:] == [b"device-mapper"] for line in misc):
                    return None
        except OSError as e:
            return f"{CONTROL} is not ours to open, and /proc/misc does not read ({e.strerror})"
        return "this kernel has no device-mapper (none in /proc/misc)"
    except OSError as e:
        if e.errno in (errno.ENODEV, errno.ENXIO):
            return f"this kernel has no device-mapper ({CONTROL} exists, but no driver answers)"
        return f"{CONTROL} does not open ({e.strerror})"
    try:
        if not stat.S_ISCHR(os.fstat(fd).st_mode):
            return f"{CONTROL} is not a device node"
    finally:
        os.close(fd)
    return None
