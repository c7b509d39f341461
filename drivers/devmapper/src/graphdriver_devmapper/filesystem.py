"""The filesystem on the thin devices (``dm.fs``: ext4 or xfs): made once on the base device,
grown on a layer asked to be larger than its parent."""

from __future__ import annotations

import subprocess

from graphdriver import DriverError


def make_filesystem(fs: str, args: list[str], dev: str) -> None:
    """mkfs *fs* on *dev* with the extra ``dm.mkfsarg`` *args*; its first error line is the
    ``DriverError``'s. ext4 gets no periodic fsck (every snapshot would inherit the count)."""
    if fs == "ext4":
        cmd = [
            "mkfs.ext4",
            "-q",
            "-F",
            "-E",
            "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
            *args,
            dev,
        ]
    else:
        cmd = ["mkfs.xfs", "-q", "-f", "-K", *args, dev]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        said = next((line.strip() for line in proc.stderr.splitlines() if line.strip()), "")
        fix = (
            f"fix dm.mkfsarg ({' '.join(args)!r}) and open again"
            if args
            else "open again once it is fixed"
        )
        raise DriverError(f"{cmd[0]} of the base device failed ({said}); {fix}")
    if fs == "ext4":
        subprocess.run(["tune2fs", "-c", "-1", "-i", "0", dev], capture_output=True, check=True)


def grow_filesystem(fs: str, dev: str, mountpoint: str) -> None:
    """Grow the *fs* on *dev*, mounted at *mountpoint*, to the device's size."""
    cmd = ["resize2fs", dev] if fs == "ext4" else ["xfs_growfs", mountpoint]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DriverError(f"{cmd[0]} failed: {proc.stderr.strip()}")
