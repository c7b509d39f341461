"""Real storage for the conformance suite: filesystems on loop devices, and a thin pool.

Each backing is a context manager that yields a :class:`Backing` and takes everything down
again (mounts first, then devices) even when the test failed. A host that lacks something
raises :class:`BackingUnavailable` with the reason and the requirement it names (see
:mod:`.require`), which the suite turns into a skip, or a failure when GRAPHDRIVER_REQUIRE
names it.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..linux import loop
from ..linux.dm import device_mapper_missing
from ..linux.mount import mount, unmount_all_under

BACKINGS = ("tmpdir", "loop-ext4", "loop-xfs", "loop-btrfs", "thin-pool")

_MKFS = {
    "ext4": (
        ["mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1"],
        "e2fsprogs",
        "",
    ),
    "xfs": (["mkfs.xfs", "-q", "-f", "-K"], "xfsprogs", "prjquota"),
    "btrfs": (["mkfs.btrfs", "-q", "-f", "-K"], "btrfs-progs", ""),
}


class BackingUnavailable(Exception):
    """This host cannot provide the backing; the message says what is missing, and
    *requirement* is its name in GRAPHDRIVER_REQUIRE (``root``, ``loop-xfs``, ``thin-pool``...)."""

    def __init__(self, message: str, requirement: str | None = None) -> None:
        super().__init__(message)
        self.requirement = requirement


@dataclass
class Backing:
    """Where a store's root goes, and driver options the backing implies."""

    kind: str
    root: Path
    options: dict[str, str] = field(default_factory=dict)
    device: str | None = None
    #: mount options that the kernel refused and that were dropped, with why
    degraded: dict[str, str] = field(default_factory=dict)
    #: storage made afresh for each store root (a thin pool); yields extra driver options
    per_store: Callable[[Path], contextlib.AbstractContextManager[dict[str, str]]] | None = None


def _need_root(kind: str) -> None:
    if os.geteuid() != 0:
        raise BackingUnavailable(
            f"backing {kind} makes loop devices and mounts (needs root)", "root"
        )
    if not Path("/dev/loop-control").exists():
        raise BackingUnavailable(f"backing {kind} needs loop devices (/dev/loop-control)", "root")


def _filesystems() -> set[str]:
    text = Path("/proc/filesystems").read_text()
    return {line.split()[-1] for line in text.splitlines() if line.strip()}


@contextlib.contextmanager
def loop_filesystem(
    fstype: str, size: int = 1 << 30, workdir: Path | None = None
) -> Iterator[Backing]:
    """A fresh *fstype* filesystem on a sparse file on a loop device, mounted."""
    kind = f"loop-{fstype}"
    _need_root(kind)
    cmd, package, options = _MKFS[fstype]
    if shutil.which(cmd[0]) is None:
        raise BackingUnavailable(f"backing {kind} needs {cmd[0]} (apt-get install {package})", kind)
    if fstype not in _filesystems():
        raise BackingUnavailable(f"backing {kind}: the kernel has no {fstype} filesystem", kind)
    with tempfile.TemporaryDirectory(prefix=f"gd-{kind}-", dir=workdir) as tmp:
        image = Path(tmp, "image")
        target = Path(tmp, "mnt")
        target.mkdir()
        with open(image, "wb") as f:
            f.truncate(size)
        try:
            with loop.attach(image) as dev:  # closed at the end: autoclear then detaches it
                subprocess.run([*cmd, dev.path], check=True, capture_output=True, timeout=300)
                degraded = {}
                try:
                    mount(dev.path, target, fstype, 0, options or None)
                except OSError as exc:
                    if not options or exc.errno != errno.EINVAL:
                        raise
                    # e.g. XFS built without CONFIG_XFS_QUOTA refuses prjquota
                    degraded[options] = f"the kernel refused it ({exc.strerror})"
                    mount(dev.path, target, fstype, 0, None)
                device = dev.path
            yield Backing(kind, target, device=device, degraded=degraded)
        finally:
            unmount_all_under(target)
            _wait_detached(image)


def _wait_detached(image: Path) -> None:
    """Autoclear detaches asynchronously; wait so no test run leaves a loop device behind."""
    for _ in range(100):
        if not any(loop.backing_file(d) == str(image) for d in _loop_devices()):
            return
        time.sleep(0.05)


def _loop_devices() -> list[str]:
    return [f"/dev/{p.name}" for p in Path("/sys/block").glob("loop*")]


@contextlib.contextmanager
def tmpdir(workdir: Path | None = None) -> Iterator[Backing]:
    """A plain temporary directory on whatever filesystem holds the temp dir."""
    with tempfile.TemporaryDirectory(prefix="gd-tmpdir-", dir=workdir) as tmp:
        try:
            yield Backing("tmpdir", Path(tmp))
        finally:
            unmount_all_under(tmp)


def _dmsetup(*args: str) -> str:
    env = {**os.environ, "DM_DISABLE_UDEV": "1"}
    proc = subprocess.run(["dmsetup", *args], capture_output=True, text=True, env=env, timeout=120)
    if proc.returncode != 0:
        raise OSError(f"dmsetup {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


@contextlib.contextmanager
def pool_on_loop_files(
    directory: Path, data_size: int = 2 << 30, meta_size: int = 64 << 20
) -> Iterator[str]:
    """A fresh device-mapper thin pool on two sparse files in *directory*; yields its name.

    64 KiB blocks, ``error_if_no_space`` (a full pool fails writes instead of hanging them).
    The loop devices autoclear once the pool is removed.
    """
    name = f"gd-pool-{os.getpid()}-{secrets.token_hex(4)}"
    files = []
    for part, size in (("pool-data", data_size), ("pool-meta", meta_size)):
        path = directory / part
        with open(path, "wb") as f:
            f.truncate(size)
        files.append(path)
    with loop.attach(files[0]) as data, loop.attach(files[1]) as meta:
        with open(meta.path, "r+b") as f:  # a pool needs zeroed metadata to start from
            f.write(b"\0" * 4096)
        blocks = data_size // 512 // 128
        table = (
            f"0 {blocks * 128} thin-pool {meta.path} {data.path} 128 {max(1, blocks // 10)} "
            f"2 skip_block_zeroing error_if_no_space"
        )
        _dmsetup("create", name, "--noudevsync", "--table", table)
    try:
        yield name
    finally:
        for _ in range(50):
            try:
                _dmsetup("remove", "--noudevsync", name)
                break
            except OSError:
                time.sleep(0.1)
        for path in files:
            _wait_detached(path)
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def _store_pool(root: Path) -> Iterator[dict[str, str]]:
    with pool_on_loop_files(root) as name:
        yield {"dm.thinpooldev": name}


@contextlib.contextmanager
def thin_pool(workdir: Path | None = None) -> Iterator[Backing]:
    """Device-mapper thin pools: each store gets a fresh pool on two loop devices, given to
    the driver as ``dm.thinpooldev`` (an external pool must be empty at first use)."""
    _need_root("thin-pool")
    missing = device_mapper_missing()
    if missing is not None:
        raise BackingUnavailable(
            f"backing thin-pool needs device-mapper: {missing} (run the tests under vm/run)",
            "thin-pool",
        )
    if shutil.which("dmsetup") is None:
        raise BackingUnavailable(
            "backing thin-pool needs dmsetup (apt-get install dmsetup)", "thin-pool"
        )
    with tempfile.TemporaryDirectory(prefix="gd-thin-pool-", dir=workdir) as tmp:
        try:
            yield Backing("thin-pool", Path(tmp), per_store=_store_pool)
        finally:
            unmount_all_under(tmp)


@contextlib.contextmanager
def make_backing(kind: str, workdir: Path | None = None, size: int = 1 << 30) -> Iterator[Backing]:
    """The backing named *kind* (see :data:`BACKINGS`); a loop filesystem of *size* bytes."""
    if kind == "tmpdir":
        cm = tmpdir(workdir)
    elif kind.startswith("loop-") and kind[5:] in _MKFS:
        cm = loop_filesystem(kind[5:], size, workdir=workdir)
    elif kind == "thin-pool":
        cm = thin_pool(workdir=workdir)
    else:
        raise ValueError(f"unknown backing {kind!r}; choose from {', '.join(BACKINGS)}")
    with cm as backing:
        yield backing


def fill_filesystem(where: Path, blocks: bool = True, inodes: bool = True) -> None:
    """Fill the filesystem of the directory *where* (made if missing and there is room) as a
    container that writes without end does: its blocks (one file, a MiB at a time), then its
    inodes (empty files), until the filesystem refuses. Call it again to take what was freed
    meanwhile (its files' names differ from call to call)."""
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        return  # full already
    tag = secrets.token_hex(4)
    with contextlib.suppress(OSError), open(where / f"blocks-{tag}", "wb") as f:
        while blocks:
            f.write(bytes(1 << 20))
            f.flush()
    with contextlib.suppress(OSError):
        for i in itertools.count() if inodes else ():
            (where / f"{tag}-{i}").touch()


def freed(where: Path, size: int, timeout: float = 10) -> bool:
    """Whether the filesystem of *where* has *size* bytes free within *timeout* seconds (XFS
    and btrfs give a removed file's blocks back in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        st = os.statvfs(where)
        if st.f_bavail * st.f_frsize >= size:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
