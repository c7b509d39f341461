"""A process killed with SIGKILL in the middle of a mutation loses nothing but its own layer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

from conftest import GD

from graphdriver.testing.trees import random_content


def _big_tar(path: Path, files: int = 400, size: int = 256 * 1024) -> None:
    src = path.parent / "src"
    src.mkdir()
    for i in range(files):
        (src / f"f{i:04d}").write_bytes(random_content(size, i))
    with tarfile.open(path, "w") as tf:
        tf.add(src, arcname=".")


def _wait_for(pred, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError("timed out")


def test_sigkill_during_apply_diff(gd: GD, tmp_path: Path) -> None:
    tar = tmp_path / "big.tar"
    _big_tar(tar)
    data = tar.read_bytes()
    gd("create", "base")
    gd("apply-diff", "base", input=_small_tar(tmp_path))
    gd("create", "--rw", "--parent", "base", "keep")
    keep_path = gd("mount", "keep").out.strip()
    gd("create", "--parent", "base", "victim")
    proc = subprocess.Popen(
        gd.argv("apply-diff", "victim"), stdin=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdin is not None
    half = len(data) // 2
    proc.stdin.write(data[:half])
    proc.stdin.flush()
    victim_dir = gd.root / "vfs" / "dir" / "victim"
    _wait_for(lambda: len(os.listdir(victim_dir)) > 5)
    # the sandbox child is busy writing files; kill the command itself
    children = _children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdin.close()
    for pid in children:  # the sandbox dies with its parent (PR_SET_PDEATHSIG)
        _wait_for(
            lambda pid=pid: (
                not Path(f"/proc/{pid}").exists()
                or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
            )
        )
    # the next open empties the half-applied layer (the user created it: it stays) and keeps
    # everything else
    assert gd("ls").out.split() == ["base", "keep", "victim"]
    assert gd("changes", "victim").out == ""
    meta = json.loads(gd("inspect", "keep").out)
    assert meta["mount_count"] == 1 and meta["mount_path"] == keep_path
    assert gd("changes", "base").out.splitlines() == ["A /small"]
    gd("umount", "keep")
    # and the layer can be filled again
    gd("apply-diff", "victim", input=data)
    assert len(os.listdir(victim_dir)) == 401


def test_sigkill_during_create(gd: GD, tmp_path: Path) -> None:
    tar = tmp_path / "big.tar"
    _big_tar(tar, files=1500, size=64 * 1024)
    gd("create", "base")
    gd("apply-diff", "base", str(tar))
    proc = subprocess.Popen(gd.argv("create", "--parent", "base", "child"), stderr=subprocess.PIPE)
    child_dir = gd.root / "vfs" / "dir" / "child"
    _wait_for(
        lambda: (child_dir.exists() and len(os.listdir(child_dir)) > 20) or proc.poll() is not None
    )
    killed = proc.poll() is None
    assert killed, "create finished before it could be killed; make the parent bigger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert gd("ls").out.split() == ["base"]
    assert not child_dir.exists()
    assert len(gd("changes", "base").out.splitlines()) == 1500


def _small_tar(tmp_path: Path) -> bytes:
    src = tmp_path / "small"
    src.mkdir()
    (src / "small").write_bytes(b"small")
    out = tmp_path / "small.tar"
    with tarfile.open(out, "w") as tf:
        tf.add(src / "small", arcname="small")
    return out.read_bytes()


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]
