"""The graphdriver command end to end on a loop-ext4 root: the workflow of the README."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
from pathlib import Path

from conftest import GD

from graphdriver.testing import Backing
from graphdriver.testing.trees import make_rich, snapshot


def _rootfs_tar(tmp_path: Path) -> bytes:
    src = tmp_path / "rootfs"
    src.mkdir()
    make_rich(src)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.add(src, arcname=".")
    return buf.getvalue()


def test_workflow(gd: GD, tmp_path: Path) -> None:
    layer = tmp_path / "layer.tar"
    layer.write_bytes(_rootfs_tar(tmp_path))
    assert gd("create", "base").out.strip() == "base"
    out = gd("apply-diff", "base", str(layer), "--json").out
    applied = json.loads(out)
    assert applied["diff_id"] == "sha256:" + hashlib.sha256(layer.read_bytes()).hexdigest()
    gd("create", "--rw", "--parent", "base", "c1")
    merged = Path(gd("mount", "c1").out.strip())
    assert (merged / "etc" / "hostname").read_bytes() == b"layer\n"
    (merged / "etc" / "hostname").write_bytes(b"container\n")
    (merged / "new-file").write_bytes(b"new")
    (merged / "big.bin").unlink()
    gd("umount", "c1")
    assert gd("changes", "c1").out.splitlines() == [
        "D /big.bin",
        "C /etc",
        "C /etc/hostname",
        "A /new-file",
    ]
    assert gd("diff-size", "c1").out.strip() == str(len(b"container\n") + 3)
    diff_file = tmp_path / "c1.tar"
    with open(diff_file, "wb") as f:
        gd("diff", "c1", stdout=f.fileno())
    with tarfile.open(diff_file) as tf:
        names = tf.getnames()
    assert names == [".wh.big.bin", "etc", "etc/hostname", "new-file"]
    # apply the diff on a fresh child from stdin: the same tree as c1
    gd("create", "--parent", "base", "c1-copy")
    res = gd("apply-diff", "c1-copy", input=diff_file.read_bytes())
    size, diff_id = res.out.split()
    assert int(size) == 13
    assert diff_id == "sha256:" + hashlib.sha256(diff_file.read_bytes()).hexdigest()
    a = Path(gd("mount", "c1").out.strip())
    b = Path(gd("mount", "c1-copy").out.strip())
    assert snapshot(a) == snapshot(b)
    gd("umount", "c1")
    gd("umount", "c1-copy")
    assert gd("ls").out.split() == ["base", "c1", "c1-copy"]
    meta = json.loads(gd("inspect", "c1").out)
    assert meta["parent"] == "base" and meta["rw"] is True and meta["mount_count"] == 0
    status = json.loads(gd("status", "--json").out)
    assert status["Storage Driver"] == "vfs" and status["Layers"] == "3"
    assert gd("exists", "c1").code == 0
    assert gd("exists", "nope", check=False).code == 1
    gd("rm", "c1-copy", "c1")
    gd("rm", "base")
    assert gd("ls").out == ""


def test_compressed_diff_roundtrip(gd: GD, tmp_path: Path) -> None:
    gd("create", "base")
    gd("apply-diff", "base", input=_rootfs_tar(tmp_path))
    plain = gd("diff", "base").raw
    for comp, magic in (("gzip", b"\x1f\x8b"), ("zstd", b"\x28\xb5\x2f\xfd")):
        out = tmp_path / f"base.tar.{comp}"
        gd("diff", "base", "--compress", comp, "-o", str(out))
        assert out.read_bytes().startswith(magic)
        gd("create", f"from-{comp}")
        res = json.loads(gd("apply-diff", f"from-{comp}", str(out), "--json").out)
        assert res["compression"] == comp
        assert res["diff_id"] == "sha256:" + hashlib.sha256(plain).hexdigest()


def test_mount_in_one_process_umount_in_another(gd: GD) -> None:
    gd("create", "--rw", "c")
    path = gd("mount", "c").out.strip()
    assert gd("mount", "c").out.strip() == path
    assert json.loads(gd("inspect", "c").out)["mount_count"] == 2
    gd("umount", "c")
    gd("umount", "c")
    res = gd("umount", "c", check=False)
    assert res.code == 1 and "not mounted" in res.err


def test_drivers_lists_vfs(gd: GD) -> None:
    rows = json.loads(gd("drivers", "--json").out)
    vfs = next(r for r in rows if r["name"] == "vfs")
    assert vfs["works"] is True and vfs["target"] == "graphdriver_vfs:VfsDriver"
    assert "vfs" in gd("drivers").out


def test_default_driver_is_the_one_with_state(gd: GD) -> None:
    gd("create", "x")
    argv = [a for a in gd.argv("ls") if a not in ("--driver", "vfs")]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, env={**os.environ})
    assert out.stdout.split() == ["x"]


def test_progress_bar_on_a_terminal_only(gd: GD, tmp_path: Path) -> None:
    import pty
    import select

    src = tmp_path / "big"
    src.mkdir()
    (src / "blob").write_bytes(os.urandom(8 << 20))
    layer = tmp_path / "big.tar"
    with tarfile.open(layer, "w") as tf:
        tf.add(src / "blob", arcname="blob")
    gd("create", "quiet")
    assert gd("apply-diff", "quiet", str(layer)).err == ""  # stderr is a pipe: no bar
    gd("create", "loud")
    primary, secondary = pty.openpty()
    env = {**os.environ, "GRAPHDRIVER_PROGRESS_DELAY": "0"}
    proc = subprocess.Popen(
        gd.argv("apply-diff", "loud", str(layer)), stderr=secondary, stdout=subprocess.PIPE, env=env
    )
    os.close(secondary)
    seen = b""
    while True:
        ready, _, _ = select.select([primary], [], [], 30)
        if not ready:
            break
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        seen += chunk
    proc.wait(timeout=60)
    os.close(primary)
    assert proc.returncode == 0
    assert b"apply loud:" in seen and b"8.01M" in seen and b"B/s" in seen, seen


def test_a_refused_driver_leaves_no_store_behind(loop_ext4: Backing, tmp_path: Path) -> None:
    """`--driver btrfs` on ext4 fails; it must not leave a btrfs catalogue that the default
    driver choice would then take for existing btrfs state."""
    root = loop_ext4.root / "refused-driver"
    vfs = GD(root, "vfs")
    btrfs = GD(root, "btrfs")
    res = btrfs("ls", check=False)
    assert res.code == 1 and res.err.count("\n") == 1, res.err
    assert not (root / "btrfs" / "metadata.db").exists()
    vfs("create", "base")
    auto = subprocess.run(
        [*vfs.base, "--root", str(root), "ls"], capture_output=True, text=True, timeout=120
    )
    assert (auto.returncode, auto.stdout.split()) == (0, ["base"]), auto.stderr
    btrfs("ls", check=False)
    auto = subprocess.run(
        [*vfs.base, "--root", str(root), "ls"], capture_output=True, text=True, timeout=120
    )
    assert (auto.returncode, auto.stdout.split()) == (0, ["base"]), auto.stderr
    vfs("rm", "base")


def test_diff_output_is_written_to_not_replaced(gd: GD, tmp_path: Path) -> None:
    """`diff -o /dev/null` (or /dev/stdout, a FIFO, a symlink) writes to what the name is; only
    a regular file is made beside and renamed over (as root, renaming over /dev/null replaced
    the host's device with a file)."""
    gd("create", "L")
    gd("apply-diff", "L", input=_rootfs_tar(tmp_path))
    want = gd("diff", "L").raw
    null = tmp_path / "null"
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a copy of /dev/null
    gd("diff", "L", "-o", str(null))
    assert stat.S_ISCHR(null.lstat().st_mode)
    link = tmp_path / "link.tar"
    link.symlink_to(tmp_path / "real.tar")
    gd("diff", "L", "-o", str(link))
    assert link.is_symlink() and (tmp_path / "real.tar").read_bytes() == want
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with (
        open(tmp_path / "read.tar", "wb") as out,
        subprocess.Popen(["cat", str(fifo)], stdout=out) as reader,
    ):
        gd("diff", "L", "-o", str(fifo))
        reader.wait(timeout=60)
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert (tmp_path / "read.tar").read_bytes() == want
    gd("diff", "L", "-o", str(tmp_path / "plain.tar"))
    assert (tmp_path / "plain.tar").read_bytes() == want
    assert gd("diff", "L", "-o", "-").raw == want  # stdout, as apply-diff reads '-' as stdin
    assert not Path("-").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")) == []


def test_a_reader_that_stops_early_gets_no_error(gd: GD) -> None:
    """`graphdriver ls | head -1`: the reader closes the pipe before the command writes. Like
    a Unix tool killed by SIGPIPE the command says nothing and exits 141; it printed
    "error: ls: Broken pipe" ("diff of layer a: Broken pipe"). An error on a stdout that is
    not gone is still one line."""
    gd("create", "a")
    gd("create", "b")
    files = io.BytesIO()
    with tarfile.open(fileobj=files, mode="w") as tf:
        for i in range(64):  # more than a pipe holds
            info = tarfile.TarInfo(f"f{i}")
            info.size = 8192
            tf.addfile(info, io.BytesIO(os.urandom(8192)))
    gd("apply-diff", "a", input=files.getvalue())
    verbs = (["ls"], ["inspect", "a"], ["--json", "ls"], ["diff", "a"], ["diff", "a", "-o", "-"])
    for buffered in (True, False):  # the interpreter's own flush at exit too (CI buffers)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED" or not buffered}
        for args in verbs:
            proc = subprocess.Popen(
                gd.argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
            )
            assert proc.stdout is not None and proc.stderr is not None
            proc.stdout.close()  # before the store is even open
            err = proc.stderr.read()
            assert (proc.wait(timeout=60), err) == (141, b""), (args, buffered)
        for args in verbs[:3]:
            with open("/dev/full", "wb") as full:
                res = subprocess.run(
                    gd.argv(*args), stdout=full, stderr=subprocess.PIPE, text=True, env=env
                )
            assert res.returncode == 1 and "No space left on device" in res.stderr, res.stderr
            assert len(res.stderr.strip().splitlines()) == 1, (args, buffered, res.stderr)
