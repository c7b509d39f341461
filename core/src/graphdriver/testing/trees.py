"""Deterministic layer content for the suite, and exact snapshots of trees to compare.

Follows moby's graphtest fixtures: the "base" layer of CreateBase, seeded random content,
and a rich tree that holds every kind of file a layer can hold.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
import struct
from pathlib import Path
from typing import Any

from ..linux import xattr
from .require import needs_root

IGNORED = {"lost+found"}

#: where make_rich's absolute symlink points: a top directory no host has, so that a driver that
#: follows a layer's symlink touches nothing of the host's
NOWHERE = "/gd-no-such-top-7c1e9f2b04"

#: a v2 file capability blob as setcap writes it (``cap_net_bind_service=ep``): the magic with
#: the effective flag, then permitted and inheritable of the two 32-bit words, little-endian
FILE_CAPABILITY = struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0)

#: the xattr make_rich sets on the layer's root directory itself
ROOT_XATTR = ("user.layer-root", b"on the root")


def random_content(size: int, seed: int) -> bytes:
    """*size* bytes that depend only on *seed* (moby's randomContent)."""
    return random.Random(seed).randbytes(size)


def make_base(root: Path) -> None:
    """moby's CreateBase: "a subdir" 0705+sticky owned 1:2, "a file" 0222+setuid."""
    needs_root("moby's CreateBase tree has a directory owned by 1:2 (chown)")
    sub = root / "a subdir"
    sub.mkdir()
    os.chmod(sub, 0o705 | stat.S_ISVTX)
    os.chown(sub, 1, 2)
    f = root / "a file"
    f.write_bytes(b"Some data")
    os.chmod(f, 0o222 | stat.S_ISUID)


def make_rich(root: Path) -> None:
    """A tree with every kind of entry: files, dirs, xattrs (a file capability, and one on the
    root itself), hardlinks, symlinks (one owned by 1001:1002, one absolute to :data:`NOWHERE`),
    devices."""
    needs_root("the rich tree has files of other owners, device nodes and trusted.* xattrs")
    (root / "etc").mkdir(mode=0o755)
    (root / "etc" / "hostname").write_bytes(b"layer\n")
    (root / "etc" / "empty").write_bytes(b"")
    big = root / "big.bin"
    big.write_bytes(random_content(1 << 20, 1))
    os.chown(big, 1000, 1000)
    os.chmod(big, 0o640)
    (root / "deep" / "a" / "b" / "c").mkdir(parents=True)
    (root / "deep" / "a" / "b" / "c" / "leaf").write_bytes(random_content(5000, 2))
    x = root / "xattr-file"
    x.write_bytes(b"with xattrs")
    os.setxattr(x, "user.comment", b"hello")
    os.setxattr(x, "trusted.graphdriver", b"\x00\x01binary")
    os.setxattr(root / "etc", "user.dir", b"on a dir")
    (root / "hard1").write_bytes(b"linked")
    os.link(root / "hard1", root / "etc" / "hard2")
    os.symlink("etc/hostname", root / "rel-link")
    os.symlink(f"{NOWHERE}/etc/hostname", root / "abs-link")
    os.symlink("etc/hostname", root / "owned-link")
    os.chown(root / "owned-link", 1001, 1002, follow_symlinks=False)
    os.symlink("nowhere", root / "dangling")
    os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(root / "loopdev", stat.S_IFBLK | 0o660, os.makedev(7, 200))
    os.mkfifo(root / "fifo", 0o600)
    sticky = root / "tmp"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    setuid = root / "suid"
    setuid.write_bytes(b"#!/bin/sh\n")
    os.chmod(setuid, 0o4755)
    os.chown(root / "deep", 3, 4)
    name = root / ("long-" + "n" * 150)
    name.mkdir()
    (name / ("file-" + "m" * 120)).write_bytes(b"long path")
    (root / "sp ace & ünïcödé").write_bytes(b"names")
    os.symlink("t" * 200, root / "long-target-link")
    cap = root / "capable"
    cap.write_bytes(b"#!/bin/sh\n")
    os.chmod(cap, 0o755)
    os.chown(cap, 1000, 1000)  # (a chown drops a file capability: set it after)
    os.setxattr(cap, "security.capability", FILE_CAPABILITY)
    os.setxattr(root, *ROOT_XATTR)


def _xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    return tuple(sorted(xattr.read(path, skip=("trusted.overlay.", "security.selinux"))))


def snapshot(root: Path, *, mtimes: bool = True, exact: bool = False) -> dict[str, Any]:
    """Everything a user can see of a tree: per path its type, mode, owner, size, mtime
    (whole seconds, as tar keeps them; directories' left out), target, device, xattrs,
    content digest and hardlink group. *exact* keeps mtimes to the nanosecond, directories'
    too (what a PAX tar carries and an unpacker restores)."""
    out: dict[str, Any] = {}
    inodes: dict[tuple[int, int], str] = {}
    base = str(root)
    for dirpath, dirnames, filenames in os.walk(base):
        if dirpath == base:
            dirnames[:] = [d for d in dirnames if d not in IGNORED]
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = path[len(base) :]
            st = os.lstat(path)
            entry: dict[str, Any] = {
                "type": stat.S_IFMT(st.st_mode),
                "mode": oct(stat.S_IMODE(st.st_mode)),
                "uid": st.st_uid,
                "gid": st.st_gid,
                "xattrs": _xattrs(path),
            }
            if exact:
                entry["mtime"] = st.st_mtime_ns
            elif mtimes and not stat.S_ISDIR(st.st_mode):
                entry["mtime"] = int(st.st_mtime)
            if stat.S_ISREG(st.st_mode):
                entry["size"] = st.st_size
                with open(path, "rb") as f:
                    entry["sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
                if st.st_nlink > 1:
                    entry["hardlink-group"] = inodes.setdefault((st.st_dev, st.st_ino), rel)
            elif stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                entry["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            out[rel] = entry
    return out


def root_entry(root: Path) -> dict[str, Any]:
    """What :func:`snapshot` leaves out: the root directory's own mode, owner and xattrs."""
    st = os.stat(root)
    return {
        "mode": oct(stat.S_IMODE(st.st_mode)),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "xattrs": _xattrs(str(root)),
    }


def listing(root: Path) -> list[str]:
    """Top-level names of a layer, without the filesystem's own lost+found."""
    return sorted(n for n in os.listdir(root) if n not in IGNORED)


def differences(want: dict[str, Any], got: dict[str, Any], *, names: str = "want/got") -> list[str]:
    """Every difference between two :func:`snapshot` results, one readable line each:
    a path only one side has, or one attribute of a path that both have. *names* labels
    the two sides (``"podman/graphdriver"``)."""
    left, right = names.split("/", 1)
    out: list[str] = []
    for path in sorted(want.keys() | got.keys()):
        if path not in got:
            out.append(f"{path}: only in {left} ({_describe(want[path])})")
        elif path not in want:
            out.append(f"{path}: only in {right} ({_describe(got[path])})")
        else:
            a, b = want[path], got[path]
            for key in sorted(a.keys() | b.keys()):
                if a.get(key) != b.get(key):
                    out.append(
                        f"{path}: {key} {left}={_show(key, a.get(key))} "
                        f"{right}={_show(key, b.get(key))}"
                    )
    return out


def assert_same_tree(want: dict[str, Any], got: dict[str, Any], names: str = "want/got") -> None:
    """Fail listing every difference between two snapshots (see :func:`differences`)."""
    found = differences(want, got, names=names)
    if found:
        raise AssertionError(f"{len(found)} differences ({names}):\n" + "\n".join(found))


_TYPES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char device",
    stat.S_IFBLK: "block device",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


def _show(key: str, value: Any) -> str:
    if key == "type" and isinstance(value, int):
        return _TYPES.get(value, oct(value))
    return repr(value)


def _describe(entry: dict[str, Any]) -> str:
    return _TYPES.get(entry.get("type", 0), "entry")
