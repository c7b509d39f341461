"""A process killed (SIGKILL) or terminated (SIGTERM) in the middle of a mutation loses nothing
but its own half-made work: faults.point kills at every state transition of create, apply,
remove, mount and umount, on vfs and overlay, and the next command finds every other layer
intact, the half-made one gone or complete (an applied layer back to empty), counts right."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import GD, Result

from graphdriver.linux.mount import is_mountpoint, unmount_all_under
from graphdriver.testing import Backing
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


@pytest.fixture(params=["vfs", "overlay"])
def store_gd(loop_ext4: Backing, request: pytest.FixtureRequest) -> Iterator[GD]:
    """The CLI on a fresh root on ext4 with each driver; everything unmounted afterwards."""
    root = loop_ext4.root / request.node.name.replace("/", "_")[:80]
    root.mkdir()
    runner = GD(root, request.param)
    try:
        yield runner
    finally:
        subprocess.run(runner.argv("cleanup"), capture_output=True, timeout=120)
        unmount_all_under(root)
        shutil.rmtree(root, ignore_errors=True)


def _storage(gd: GD, layer: str) -> Path:
    return gd.root / "vfs" / "dir" / layer if gd.driver == "vfs" else gd.root / "overlay" / layer


def _with_fault(gd: GD, point: str, *args: str, input: bytes | None = None) -> Result:
    os.environ["GRAPHDRIVER_FAULT"] = point
    try:
        return gd(*args, input=input, check=False)
    finally:
        del os.environ["GRAPHDRIVER_FAULT"]


def _others_intact(gd: GD, keep_path: str) -> None:
    """The layers the crash did not touch: base's content, keep's mount and count."""
    assert gd("changes", "base").out.splitlines() == ["A /small"]
    meta = json.loads(gd("inspect", "keep").out)
    assert meta["mount_count"] == 1 and meta["mount_path"] == keep_path
    assert (Path(keep_path) / "small").read_bytes() == b"small"
    if gd.driver == "overlay":
        assert is_mountpoint(keep_path)


def _setup(gd: GD, tmp_path: Path) -> str:
    gd("create", "base")
    gd("apply-diff", "base", input=_small_tar(tmp_path))
    gd("create", "--rw", "--parent", "base", "keep")
    return gd("mount", "keep").out.strip()


CREATE_POINTS = ["store.create.recorded", "store.create.after-driver"]
APPLY_POINTS = [
    "store.apply.recorded",
    "store.apply.prepared",
    "store.apply.extracted",
    "store.apply.unmounted",
]
REMOVE_POINTS = ["store.remove.driver", "store.remove.after-driver"]


@pytest.mark.parametrize("point", CREATE_POINTS)
def test_kill_during_create(store_gd: GD, tmp_path: Path, point: str) -> None:
    gd = store_gd
    keep_path = _setup(gd, tmp_path)
    assert _with_fault(gd, point, "create", "--parent", "base", "victim").code == -signal.SIGKILL
    assert gd("ls").out.split() == ["base", "keep"]
    assert not _storage(gd, "victim").exists()
    _others_intact(gd, keep_path)
    gd("create", "--parent", "base", "victim")


@pytest.mark.parametrize("point", APPLY_POINTS)
def test_kill_during_apply(store_gd: GD, tmp_path: Path, point: str) -> None:
    """The layer the user created stays, empty, ready for another apply-diff."""
    gd = store_gd
    keep_path = _setup(gd, tmp_path)
    gd("create", "--parent", "base", "victim")
    tar = _two_files_tar(tmp_path)
    res = _with_fault(gd, point, "apply-diff", "victim", input=tar)
    assert res.code == -signal.SIGKILL, res.err
    assert gd("ls").out.split() == ["base", "keep", "victim"]
    assert gd("changes", "victim").out == ""
    meta = json.loads(gd("inspect", "victim").out)
    assert meta["diff_id"] is None and meta["mount_count"] == 0
    _others_intact(gd, keep_path)
    gd("apply-diff", "victim", input=tar)
    assert gd("changes", "victim").out.split() == ["A", "/one", "A", "/two"]


@pytest.mark.parametrize("point", REMOVE_POINTS)
def test_kill_during_remove(store_gd: GD, tmp_path: Path, point: str) -> None:
    """A half-removed layer is invisible at once and removed for good at the next open."""
    gd = store_gd
    keep_path = _setup(gd, tmp_path)
    gd("create", "--parent", "base", "victim")
    assert _with_fault(gd, point, "rm", "victim").code == -signal.SIGKILL
    assert gd("ls").out.split() == ["base", "keep"]
    assert not _storage(gd, "victim").exists()
    _others_intact(gd, keep_path)
    gd("create", "victim")


def test_kill_during_mount(store_gd: GD, tmp_path: Path) -> None:
    """Mounted but the count not committed: the mount is undone, the count stays 0."""
    gd = store_gd
    keep_path = _setup(gd, tmp_path)
    gd("create", "--parent", "base", "victim")
    assert _with_fault(gd, "store.get.after-driver", "mount", "victim").code == -signal.SIGKILL
    meta = json.loads(gd("inspect", "victim").out)
    assert meta["mount_count"] == 0 and meta["mount_path"] is None
    assert not is_mountpoint(_storage(gd, "victim") / "merged")
    _others_intact(gd, keep_path)
    gd("rm", "victim")


def test_kill_during_umount(store_gd: GD, tmp_path: Path) -> None:
    """Unmounted but the count not committed: a kernel mount that is gone resets the count;
    without kernel mounts (vfs) the umount simply did not happen and can be done again."""
    gd = store_gd
    keep_path = _setup(gd, tmp_path)
    gd("create", "--parent", "base", "victim")
    gd("mount", "victim")
    assert _with_fault(gd, "store.put.after-driver", "umount", "victim").code == -signal.SIGKILL
    meta = json.loads(gd("inspect", "victim").out)
    if gd.driver == "overlay":
        assert meta["mount_count"] == 0
        assert not is_mountpoint(_storage(gd, "victim") / "merged")
    else:
        assert meta["mount_count"] == 1
        gd("umount", "victim")
    _others_intact(gd, keep_path)
    gd("rm", "victim")


def test_term_point_during_apply_rolls_back_to_empty(store_gd: GD, tmp_path: Path) -> None:
    gd = store_gd
    keep_path = _setup(gd, tmp_path)
    gd("create", "--parent", "base", "victim")
    res = _with_fault(
        gd, "store.apply.prepared=term", "apply-diff", "victim", input=_two_files_tar(tmp_path)
    )
    assert res.code == 128 + signal.SIGTERM
    assert res.err.strip().splitlines() == [
        "graphdriver: interrupted by SIGTERM; what it had half done was rolled back"
    ]
    assert json.loads(gd("inspect", "victim").out)["diff_id"] is None
    assert gd("changes", "victim").out == ""
    _others_intact(gd, keep_path)


@pytest.mark.parametrize("how", ["process-group", "command-only", "command-then-group"])
def test_sigterm_during_apply_keeps_the_layer(gd: GD, tmp_path: Path, how: str) -> None:
    """SIGTERM to the process group (a shell's job control), to the command alone (`kill`),
    or to the command and then at once to its group (what coreutils `timeout` does: the
    repeat must not cut the rollback short): the apply rolls back to the empty layer the user
    created earlier, and the sandboxed extraction dies with it."""
    tar = tmp_path / "big.tar"
    _big_tar(tar)
    data = tar.read_bytes()
    gd("create", "victim")
    proc = subprocess.Popen(
        gd.argv("apply-diff", "victim"),
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdin is not None and proc.stderr is not None
    proc.stdin.write(data[: len(data) // 2])
    proc.stdin.flush()
    victim_dir = gd.root / "vfs" / "dir" / "victim"
    _wait_for(lambda: len(os.listdir(victim_dir)) > 5)
    children = _children(proc.pid)
    assert children, "no extraction child"
    if how != "process-group":
        proc.send_signal(signal.SIGTERM)
    if how != "command-only":
        os.killpg(proc.pid, signal.SIGTERM)
    # its input stays open: the signal, not the end of the input, ends the command
    try:
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.stdin.close()
    assert "interrupted by SIGTERM" in proc.stderr.read().decode()
    for pid in children:
        assert not Path(f"/proc/{pid}").exists()
    assert gd("ls").out.split() == ["victim"]
    assert os.listdir(victim_dir) == []
    gd("apply-diff", "victim", input=data)
    assert len(os.listdir(victim_dir)) == 400


def test_a_ctrl_c_at_any_moment_of_an_apply_ends_it(gd: GD, tmp_path: Path) -> None:
    """Ctrl-C at moments spread over an apply-diff from its sandbox's fork on (its decode
    thread starting, its first reads), its input left open: each run ends at once, status 130
    and its rollback. (Earlier, while Python itself starts, a signal is Python's to handle.)"""
    tar = tmp_path / "big.tar"
    _big_tar(tar, files=8, size=4096)
    head = tar.read_bytes()[:8192]
    for i in range(16):
        gd("create", f"l{i}")
        proc = subprocess.Popen(
            gd.argv("apply-diff", f"l{i}"), stdin=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert proc.stdin is not None and proc.stderr is not None
        try:
            proc.stdin.write(head)
            proc.stdin.flush()
            _wait_for(lambda pid=proc.pid: _children(pid), timeout=60)
            time.sleep(i * 0.001)
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=30)
        finally:
            proc.kill()
            proc.stdin.close()
        assert (code, proc.stderr.read().decode()) == (
            128 + signal.SIGINT,
            "graphdriver: interrupted by SIGINT; what it had half done was rolled back\n",
        ), i
        assert os.listdir(gd.root / "vfs" / "dir" / f"l{i}") == []


def _two_files_tar(tmp_path: Path) -> bytes:
    src = tmp_path / "two"
    src.mkdir(exist_ok=True)
    out = tmp_path / "two.tar"
    with tarfile.open(out, "w") as tf:
        for name in ("one", "two"):
            (src / name).write_bytes(random_content(100_000, len(name)))
            tf.add(src / name, arcname=name)
    return out.read_bytes()
