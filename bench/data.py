"""The benchmark's data, built once, reproducibly, and cached under /var/tmp/graphdriver-bench.

- ``debian-minbase.tar``: ``debootstrap --variant=minbase bookworm`` from the Debian archive,
  packed with GNU tar (numeric owners, xattrs): a real root filesystem, ~200 MB, ~6,800 entries.
- ``debian-apt-layer.tar``: the layer a Dockerfile ``RUN apt-get install ...`` makes on it: the
  minbase unpacked into an overlay layer, ``apt-get install`` of a few packages in a chroot of
  it, documentation removed (whiteouts), the result taken with ``graphdriver diff``. It adds,
  modifies and deletes.
- ``small-10k.tar``: 10,000 files of 1-8 KiB in 100 directories (seeded, so always the same).
- ``one-1g.tar``: one file of 1 GiB (seeded pseudo-random data).
- ``debian-minbase.tar.gz`` and ``.tar.zst``: the minbase tar compressed as registries serve
  layers (``gzip -6 -n``, docker's and containerd's default level; ``zstd -3``, their zstd
  default), for apply-diff's decompression.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from bench_core import CACHE, rootfs_tar

from graphdriver import open_store
from graphdriver.linux.mount import MS_BIND, mount, unmount
from graphdriver.testing.backings import loop_filesystem

APT_PACKAGES = ["ca-certificates", "curl", "python3-minimal", "less"]
APT_SCRIPT = (
    "set -e; export DEBIAN_FRONTEND=noninteractive; apt-get update -qq; "
    f"apt-get install -y -qq --no-install-recommends {' '.join(APT_PACKAGES)} >/dev/null; "
    "apt-get clean; rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* "
    "/usr/share/info/*"
)


def minbase() -> tuple[Path, str]:
    return rootfs_tar()


def apt_layer() -> Path:
    """The apt-get install layer on top of minbase, as an OCI layer tar."""
    out = CACHE / "debian-apt-layer.tar"
    if out.exists():
        return out
    base, what = minbase()
    if "debootstrap" not in what:
        sys.exit("bench: the apt layer needs the debootstrap minbase (is debootstrap installed?)")
    print("bench: building the apt-get install layer (a minute or two)", file=sys.stderr)
    with loop_filesystem("ext4", size=8 << 30) as backing:
        store = open_store(backing.root / "store", "overlay")
        try:
            store.create("base")
            with open(base, "rb") as f:
                store.apply("base", f)
            store.create_rw("apt", "base")
            root = store.get("apt")
            done: list[Path] = []
            try:
                mount("proc", root / "proc", "proc")
                done.append(root / "proc")
                mount("/dev", root / "dev", None, MS_BIND)
                done.append(root / "dev")
                mount("/etc/resolv.conf", root / "etc" / "resolv.conf", None, MS_BIND)
                done.append(root / "etc" / "resolv.conf")
                subprocess.run(["chroot", str(root), "sh", "-c", APT_SCRIPT], check=True)
            finally:
                for path in reversed(done):
                    unmount(path)
                store.put("apt")
            partial = out.with_suffix(".partial")
            with open(partial, "wb") as f:
                store.write_diff("apt", f)
            partial.replace(out)
        finally:
            store.cleanup()
            store.close()
    return out


def small_files() -> Path:
    out = CACHE / "small-10k.tar"
    if out.exists():
        return out
    rng = random.Random(10_000)
    partial = out.with_suffix(".partial")
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tf:
        for d in range(100):
            info = tarfile.TarInfo(f"d{d:02d}")
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tf.addfile(info)
            for i in range(100):
                data = rng.randbytes(rng.randint(1024, 8192))
                info = tarfile.TarInfo(f"d{d:02d}/f{i:03d}")
                info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
                tf.addfile(info, io.BytesIO(data))
    partial.replace(out)
    return out


def one_big_file() -> Path:
    out = CACHE / "one-1g.tar"
    if out.exists():
        return out
    size = 1 << 30
    block = random.Random(1).randbytes(8 << 20)
    partial = out.with_suffix(".partial")
    info = tarfile.TarInfo("big.bin")
    info.size, info.mode, info.mtime = size, 0o644, 1_700_000_000
    with open(partial, "wb") as f:
        f.write(info.tobuf(tarfile.PAX_FORMAT))
        for i in range(size // len(block)):
            f.write(block[i:] + block[:i])
        f.write(b"\0" * 1024)  # end of archive
    partial.replace(out)
    return out


#: compressed data set -> (suffix, the command that writes it from the plain tar on stdin)
COMPRESSED = {
    "gz": (".gz", ["gzip", "-6", "-n", "-c"]),
    "zst": (".zst", ["zstd", "-3", "-q", "-c"]),
}


def compressed(plain: Path, kind: str) -> Path:
    """*plain* compressed as *kind* (a key of :data:`COMPRESSED`), next to it (made again when
    the plain tar is newer, rebuilt since)."""
    suffix, cmd = COMPRESSED[kind]
    out = plain.with_name(plain.name + suffix)
    if out.exists() and out.stat().st_mtime >= plain.stat().st_mtime:
        return out
    partial = out.with_name(out.name + ".partial")
    with open(plain, "rb") as src, open(partial, "wb") as dst:
        subprocess.run(cmd, stdin=src, stdout=dst, check=True)
    partial.replace(out)
    return out


def plain_of(path: Path) -> Path:
    """The plain tar a compressed data set was made from (*path* itself if it is plain)."""
    for suffix, _ in COMPRESSED.values():
        if path.name.endswith(suffix):
            return path.with_name(path.name[: -len(suffix)])
    return path


def all_data() -> dict[str, tuple[Path, str]]:
    base, what = minbase()
    CACHE.mkdir(parents=True, exist_ok=True)
    return {
        "minbase": (base, what),
        "minbase.gz": (compressed(base, "gz"), "the minbase tar, gzip -6 (docker's level)"),
        "minbase.zst": (compressed(base, "zst"), "the minbase tar, zstd -3 (its default)"),
        "apt": (apt_layer(), f"apt-get install {' '.join(APT_PACKAGES)} on it, docs removed"),
        "small10k": (small_files(), "10,000 files of 1-8 KiB"),
        "big1g": (one_big_file(), "one 1 GiB file"),
    }


def tar_stats(path: Path) -> tuple[int, int]:
    """(entries, regular files) of a tar (of the plain tar of a compressed one)."""
    entries = files = 0
    with tarfile.open(plain_of(path)) as tf:
        for m in tf:
            entries += 1
            files += m.isfile()
    return entries, files


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if os.path.exists(path):
        subprocess.run(["rm", "-rf", str(path)], check=False)
