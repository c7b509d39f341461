"""What a private engine under test (containerd, dockerd) leaves behind when it stops.

- runc's shims, which outlive the containerd they serve: :func:`kill_shims`.
- Cgroups: runc makes each container's cgroup under a parent in every hierarchy
  (containerd's namespace, ``/<namespace>/<id>``; dockerd's ``--cgroup-parent``, ``/docker``
  by default) and removes only the container's own when it is deleted: the parent stays,
  empty, one more after every run, unless the test removes it: :func:`remove_cgroup`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from ..linux.mount import mountinfo


def remove_cgroup(name: str, timeout: float = 5.0) -> None:
    """Remove the top-level cgroup *name* and those below it, deepest first, in every cgroup
    hierarchy mounted here (v1's and v2), killing (SIGKILL) what is still in them: give it a
    name the test made unique, never a shared one (``docker``). A cgroup whose last process
    is still exiting is tried again until *timeout*; RuntimeError names what is left then."""
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"not a top-level cgroup name: {name!r}")
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for m in mountinfo(fstypes=("cgroup", "cgroup2")):
            for here, _, _ in os.walk(Path(m.mountpoint) / name, topdown=False):
                _kill_all(Path(here))
                try:
                    os.rmdir(here)
                except FileNotFoundError:
                    pass
                except OSError as exc:  # EBUSY: a process in it, still exiting
                    left.append(f"{here} ({exc.strerror})")
        if not left:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"cgroups left behind: {', '.join(left)}")
        time.sleep(0.05)


def _kill_all(cgroup: Path) -> None:
    """SIGKILL what is in *cgroup*: by its ``cgroup.kill`` (v2, Linux 5.14), else each pid of
    its ``cgroup.procs``, where v2 may list an exiting task as 0, which kill(2) would take for
    this process's whole group."""
    with contextlib.suppress(OSError):  # (v1 has none; a cgroup gone has none either)
        (cgroup / "cgroup.kill").write_text("1")
        return
    try:
        pids = [int(x) for x in (cgroup / "cgroup.procs").read_text().split()]
    except OSError:  # (gone already)
        return
    for pid in pids:
        if pid > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def kill_shims(address: Path) -> None:
    """SIGKILL the runc shims that serve the containerd at *address*."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"containerd-shim-runc-v2") and os.fsencode(address) in argv:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)
