"""A thin, typed wrapper over the ``dmsetup`` command (in the shape of containerd's dmsetup.go).

Every call runs without udev (``--noudevsync`` and DM_DISABLE_UDEV=1, so dmsetup makes the
/dev/mapper nodes itself) and turns dmsetup's error text back into an errno, so that callers
can tell a busy device (EBUSY) from a missing one (ENXIO/ENODATA) or a duplicate (EEXIST).
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_ERRORS = (
    ("Device or resource busy", errno.EBUSY),
    ("File exists", errno.EEXIST),
    ("No data available", errno.ENODATA),
    ("No such device or address", errno.ENXIO),
    ("No space left on device", errno.ENOSPC),
    ("Invalid argument", errno.EINVAL),
    ("not found", errno.ENXIO),
    ("does not exist", errno.ENXIO),
)


class DmsetupError(OSError):
    """dmsetup failed; ``errno`` is recovered from its message where it names one."""

    #: a dmsetup that gave no answer in time and outlived SIGKILL (stuck in the kernel, which
    #: may still carry out what it asked): the caller may wait for it
    pending: subprocess.Popen[str] | None = None


def _errno_of(text: str) -> int:
    for needle, code in _ERRORS:
        if needle in text:
            return code
    return errno.EIO


TIMEOUT = 120.0  # seconds a dmsetup call may take before it counts as stuck


def _kernel_wait(pid: int) -> str:
    """Where process *pid* sleeps in the kernel: the functions of /proc/PID/stack (root only),
    innermost first, else its wchan; empty when neither can be read."""
    try:
        lines = Path(f"/proc/{pid}/stack").read_text().splitlines()
        # "[<0>] dm_wait_event+0x8e/0xc0 [dm_mod]"
        names = [line.split()[1].split("+")[0] for line in lines if len(line.split()) > 1]
        names = [name for name in names if not name.startswith(("entry_", "do_syscall"))]
        if names:
            return " < ".join(names[:10])
    except OSError:
        pass
    try:
        wchan = Path(f"/proc/{pid}/wchan").read_text().strip()
    except OSError:
        return ""
    return "" if wchan == "0" else wchan


def _run(*args: str, timeout: float | None = None) -> str:
    timeout = TIMEOUT if timeout is None else timeout
    env = {**os.environ, "DM_DISABLE_UDEV": "1"}
    name = next((a for a in args[1:] if not a.startswith("-")), "")
    what = f"dmsetup {args[0]} {name}".rstrip()
    proc = subprocess.Popen(
        ["dmsetup", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # say where the kernel holds it, then stop it; one stuck in an uninterruptible sleep
        # dies only when the kernel lets go, so it is not waited for long (and what it asked
        # of the kernel may still happen then)
        where = _kernel_wait(proc.pid)
        proc.kill()
        try:
            proc.communicate(timeout=5)
            pending = None
        except subprocess.TimeoutExpired:
            pending = proc
        error = DmsetupError(
            errno.ETIMEDOUT,
            f"{what}: no answer in {timeout:g} s"
            + (f"; waiting in {where}" if where else "")
            + (" (it outlived SIGKILL: the kernel may still carry it out)" if pending else ""),
        )
        error.pending = pending
        raise error from None
    except BaseException:  # Ctrl-C: no dmsetup left running behind the caller
        proc.kill()
        raise
    if proc.returncode != 0:
        text = (stderr or stdout).strip().replace("\n", "; ")
        raise DmsetupError(_errno_of(text), f"{what}: {text}")
    return stdout


def create(name: str, table: str, *, read_only: bool = False) -> None:
    _run("create", name, "--noudevsync", "--table", table, *(["--readonly"] if read_only else []))


def reload(name: str, table: str) -> None:
    _run("reload", name, "--noudevsync", "--table", table)


def message(name: str, sector: int, msg: str) -> None:
    _run("message", name, str(sector), msg)


def suspend(name: str) -> None:
    _run("suspend", "--noudevsync", name)


def resume(name: str) -> None:
    _run("resume", "--noudevsync", name)


@contextlib.contextmanager
def suspended(name: str) -> Iterator[None]:
    """The device suspended (its writes flushed) for the with-block, then resumed.

    A suspend that failed is followed by a resume too, and its error raised: one that timed
    out may have been carried out after its dmsetup was killed. A dmsetup still stuck in the
    kernel is waited for (up to twice the timeout) first, since a resume before the suspend is
    done changes nothing and the device would then stay suspended; if it is still stuck, the
    error says so and how to resume the device.
    """
    try:
        suspend(name)
    except DmsetupError as exc:
        if exc.pending is not None:
            try:
                exc.pending.communicate(timeout=2 * TIMEOUT)
            except subprocess.TimeoutExpired:
                exc.strerror = (
                    f"{exc.strerror}; {name} may be left suspended: dmsetup resume {name}"
                )
                raise
        with contextlib.suppress(DmsetupError):
            resume(name)
        raise
    try:
        yield
    finally:
        resume(name)


def remove(name: str, *, retries: int = 200, delay: float = 0.1, deferred: bool = False) -> None:
    """Remove a device; a busy one is retried (*retries* x *delay*), or its removal deferred
    until its last user closes it. A device that is already gone is not an error."""
    for attempt in range(retries + 1):
        try:
            _run("remove", "--noudevsync", *(["--deferred"] if deferred else []), name)
            return
        except DmsetupError as exc:
            if exc.errno == errno.ENXIO:
                return
            if exc.errno != errno.EBUSY or attempt == retries or deferred:
                raise
            time.sleep(delay)


@dataclass(frozen=True)
class DeviceInfo:
    """``dmsetup info`` of one device."""

    name: str
    major: int
    minor: int
    open_count: int
    segments: int
    #: it has a live table (a device whose create was cut short has none)
    live: bool
    suspended: bool


def info(name: str) -> DeviceInfo | None:
    """The device's info, or None if no device has that name."""
    try:
        out = _run(
            "info",
            "--columns",
            "--noheadings",
            "--separator",
            ";",
            "-o",
            "name,major,minor,open,segments,attr",
            name,
        )
    except DmsetupError as exc:
        if exc.errno == errno.ENXIO:
            return None
        raise
    fields = out.strip().split(";")
    return DeviceInfo(
        name=fields[0],
        major=int(fields[1]),
        minor=int(fields[2]),
        open_count=int(fields[3]),
        segments=int(fields[4]),
        # attr: L (live table), I (inactive table), s (suspended), r or w, ...
        live=fields[5][0:1] == "L",
        suspended=fields[5][2:3] == "s",
    )


def status(name: str) -> str:
    return _run("status", name).strip()


def table(name: str) -> str:
    return _run("table", name).strip()


def version() -> dict[str, str]:
    """{"Library version": "1.02.185 ...", "Driver version": "4.47.0"}"""
    out: dict[str, str] = {}
    for line in _run("version").splitlines():
        key, _, value = line.partition(":")
        out[key.strip()] = value.strip()
    return out


def mknodes(name: str) -> None:
    _run("mknodes", name)
