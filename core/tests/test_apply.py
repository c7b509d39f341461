"""apply_layer on its own, into a plain directory: owners and modes as the tar says, where
the kernel would give a new entry something else (a setgid directory's group and bit)."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

from graphdriver.archive import apply_layer
from graphdriver.testing import host_lacks


def _tar(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _info(name: str, kind: bytes, mode: int, gid: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, 0, gid, 1_700_000_000
    return info


def test_entries_in_a_setgid_directory_get_the_tar_s_owner_and_mode(tmp_path: Path) -> None:
    """A directory, file and symlink made in a setgid directory inherit its group (and a
    directory its setgid bit) from the kernel; the tar says 0:0 and 0755, and wins."""
    if os.geteuid() != 0:
        host_lacks("needs root to set owners", "root")
    link = _info("s/l", tarfile.SYMTYPE, 0o777)
    link.linkname = "f"
    data = _tar(
        (_info("s", tarfile.DIRTYPE, 0o2775, gid=5), b""),
        (_info("s/sub", tarfile.DIRTYPE, 0o755), b""),
        (_info("s/g", tarfile.DIRTYPE, 0o2750, gid=7), b""),
        (_info("s/g/inner", tarfile.DIRTYPE, 0o700), b""),
        (_info("s/f", tarfile.REGTYPE, 0o644), b""),
        (link, b""),
        (_info("plain", tarfile.DIRTYPE, 0o751), b""),
    )
    target = tmp_path / "layer"
    target.mkdir()
    for how in ("file", "stream"):
        if how == "file":
            (tmp_path / "layer.tar").write_bytes(data)
            with open(tmp_path / "layer.tar", "rb") as f:
                apply_layer(target, f)
        else:
            apply_layer(target, io.BytesIO(data))
        got = {
            p: (stat.S_IMODE(os.lstat(target / p).st_mode), os.lstat(target / p).st_gid)
            for p in ("s", "s/sub", "s/g", "s/g/inner", "s/f", "plain")
        }
        assert got == {
            "s": (0o2775, 5),
            "s/sub": (0o755, 0),
            "s/g": (0o2750, 7),
            "s/g/inner": (0o700, 0),
            "s/f": (0o644, 0),
            "plain": (0o751, 0),
        }, how
        assert os.lstat(target / "s/l").st_gid == 0
