"""The fds of a forked child that runs Python code of its own (the apply sandbox): only those
it needs, the others pointed at /dev/null."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal


def _log_fds() -> list[int]:
    """The fds of the logging handlers' streams (a log file): the child logs there too."""
    fds = []
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", ()):
            with contextlib.suppress(AttributeError, OSError, ValueError):
                fds.append(handler.stream.fileno())
    return fds


def keep_only_fds(*keep: int | None) -> None:
    """In a forked child, make every fd but *keep* (and the log files) an fd of /dev/null.

    A child inherits all of its parent's fds (a fork closes none), and an apply's sandbox that
    held the write end of the pipe its parent reads the layer from (a caller's thread writes
    it) would keep the parent from ever seeing its end: both would wait for good. They are
    not closed: their numbers stay taken, so that what still holds one (a logging handler's
    file, a file object a finalizer closes) writes to /dev/null, never into a layer's file
    that took its number. They are listed from /proc/self/fd (the child is not in its chroot
    yet): a loop of closes up to a limit takes minutes where the kernel has no close_range.
    Nothing is done where either cannot be opened. The parent's objects are frozen: no
    collection finalizes them here. The logging handlers' files are kept (:func:`_log_fds`):
    the child logs there too.
    """
    gc.freeze()
    keep += tuple(_log_fds())
    with contextlib.suppress(ValueError):  # the parent's wakeup fd goes too
        signal.set_wakeup_fd(-1)
    try:
        null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return
    kept = {k for k in keep if k is not None}
    for fd in fds:
        if fd != null and fd not in kept:
            with contextlib.suppress(OSError):  # the listing's own fd, closed since
                os.dup2(null, fd, inheritable=False)
    os.close(null)
