"""apply_layer on its own, into a plain directory: owners and modes as the tar says, where
the kernel would give a new entry something else (a setgid directory's group and bit)."""

from __future__ import annotations

import contextlib
import ctypes
import gzip
import hashlib
import io
import logging
import os
import pickle
import random
import resource
import signal
import stat
import struct
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from subprocess import PIPE
from typing import BinaryIO

import pytest

from graphdriver.archive import ApplyResult, apply_layer, exact, feed, tarsplit
from graphdriver.archive.tar import TarEntry
from graphdriver.archive.tar_reader import write_all
from graphdriver.archive.tar_writer import TarWriter
from graphdriver.errors import ArchiveError, UnsafeArchive
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
        _apply(target, data, how, tmp_path / "layer.tar")
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


def test_large_bodies_from_a_file_and_from_a_pipe(tmp_path: Path) -> None:
    """Without a record, a large body is moved by the kernel (copy_file_range from a tar in
    a file, splice from a pipe); the files hold the tar's bytes, and a tar cut inside a
    large body is refused as truncated."""
    big = os.urandom(3 << 20) + b"end"
    small = b"x" * 700
    data = _tar(
        (_with_size(_info("big", tarfile.REGTYPE, 0o600), len(big)), big),
        (_with_size(_info("small", tarfile.REGTYPE, 0o644), len(small)), small),
    )
    (tmp_path / "layer.tar").write_bytes(data)
    for how in ("file", "pipe"):
        target = tmp_path / how
        target.mkdir()
        if how == "file":
            with open(tmp_path / "layer.tar", "rb") as f:
                apply_layer(target, f)
        else:  # a pipe: what `cat layer.tar | graphdriver apply-diff` hands over
            with subprocess.Popen(["cat", str(tmp_path / "layer.tar")], stdout=PIPE) as cat:
                assert cat.stdout is not None
                apply_layer(target, cat.stdout)
        assert (target / "big").read_bytes() == big, how
        assert (target / "small").read_bytes() == small, how
    (tmp_path / "cut.tar").write_bytes(data[: 512 + (2 << 20)])
    (tmp_path / "cut").mkdir()
    with open(tmp_path / "cut.tar", "rb") as f, pytest.raises(ArchiveError, match="truncated"):
        apply_layer(tmp_path / "cut", f)


def _apply(target: Path, data: bytes, how: str, scratch: Path) -> None:
    """Apply the tar *data* from a file (at *scratch*) or from a stream."""
    if how == "file":
        scratch.write_bytes(data)
        with open(scratch, "rb") as f:
            apply_layer(target, f)
    else:
        apply_layer(target, io.BytesIO(data))


def _with_size(info: tarfile.TarInfo, size: int) -> tarfile.TarInfo:
    info.size = size
    return info


def _acl(user: int, group: int, other: int) -> bytes:
    """A POSIX ACL as the kernel stores it in system.posix_acl_*: u::, g::, o:: entries."""
    undefined = 0xFFFFFFFF
    entries = ((0x01, user), (0x04, group), (0x20, other))
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, undefined) for t, p in entries)


def test_entries_under_a_default_acl_get_the_tar_s_mode(tmp_path: Path) -> None:
    """A directory with a default ACL (the layer's root, or a directory copied from its parent
    layer, under a host's `setfacl -d`) gives a new entry the ACL's permissions, not the umask's:
    the tar says 0755 and 0644, and wins."""
    data = _tar(
        (_info("d", tarfile.DIRTYPE, 0o755), b""),
        (_info("d/e", tarfile.DIRTYPE, 0o751), b""),
        (_info("d/f", tarfile.REGTYPE, 0o644), b""),
        (_info("d/e/g", tarfile.REGTYPE, 0o640), b""),
        (_info("top", tarfile.REGTYPE, 0o644), b""),
        (_info("implicit/h", tarfile.REGTYPE, 0o604), b""),
    )
    for how in ("file", "stream"):
        target = tmp_path / how
        target.mkdir()
        os.setxattr(target, "system.posix_acl_default", _acl(7, 0, 0))
        _apply(target, data, how, tmp_path / "layer.tar")
        got = {
            p: oct(stat.S_IMODE(os.lstat(target / p).st_mode))
            for p in ("d", "d/e", "d/f", "d/e/g", "top", "implicit/h")
        }
        assert got == {
            "d": "0o755",
            "d/e": "0o751",
            "d/f": "0o644",
            "d/e/g": "0o640",
            "top": "0o644",
            "implicit/h": "0o604",
        }, how


def test_entries_in_a_setgid_layer_root_get_the_tar_s_group(tmp_path: Path) -> None:
    """A layer made under a setgid directory is setgid itself (the kernel's inheritance): its
    top-level entries are the tar's 0:0 all the same."""
    if os.geteuid() != 0:
        host_lacks("needs root to set owners", "root")
    data = _tar(
        (_info("d", tarfile.DIRTYPE, 0o755), b""),
        (_info("f", tarfile.REGTYPE, 0o644), b""),
        (_info("implicit/g", tarfile.REGTYPE, 0o644), b""),
    )
    target = tmp_path / "layer"
    target.mkdir()
    os.chown(target, 0, 5)
    target.chmod(0o2775)
    apply_layer(target, io.BytesIO(data))
    got = {p: (oct(stat.S_IMODE((target / p).lstat().st_mode)), (target / p).lstat().st_gid)
           for p in ("d", "f", "implicit/g")}  # fmt: skip
    assert got == {"d": ("0o755", 0), "f": ("0o644", 0), "implicit/g": ("0o644", 0)}


def _drop_dac_capabilities() -> None:
    """This process (root) loses CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH: like root on an
    NFS export with root_squash, or on a user's FUSE mount, it cannot open others' files."""
    libc = ctypes.CDLL(None, use_errno=True)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # (effective, permitted, inheritable) x 2
    if libc.capget(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    data[0] &= ~0b110
    data[1] &= ~0b110
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def test_a_tar_file_root_cannot_open_again(tmp_path: Path) -> None:
    """`sudo graphdriver apply-diff L < ~/layer.tar` with the home on NFS (root_squash) or
    FUSE: the fd is the user's, and root cannot open the file again for an offset of its own;
    the tar is read from the fd it was given."""
    if os.geteuid() != 0:
        host_lacks("needs root to apply a layer", "root")
    secret = tmp_path / "layer.tar"
    secret.write_bytes(_tar((_with_size(_info("f", tarfile.REGTYPE, 0o644), 2), b"hi")))
    os.chown(secret, 65534, 65534)
    secret.chmod(0o600)
    target = tmp_path / "layer"
    target.mkdir()
    r, w = os.pipe()
    with open(secret, "rb") as f:  # opened by the user's shell
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe
            try:
                _drop_dac_capabilities()
                apply_layer(target, f)
                os.write(w, b"ok")
            except BaseException as exc:
                os.write(w, repr(exc).encode())
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as result:
        outcome = result.read().decode()
    os.waitpid(pid, 0)
    assert outcome == "ok"
    assert (target / "f").read_bytes() == b"hi"


def _mixed_tar() -> bytes:
    """A tar that crosses every seam of the apply pipeline (archive/feed.py): more entries
    than one frame holds, a body larger than a frame's data with small files after it, a
    PAX header larger than the pipe, an empty file, a whiteout carrying data (not written),
    a hardlink and a symlink."""
    rng = random.Random(15)
    members: list[tuple[tarfile.TarInfo, bytes]] = [(_info("d", tarfile.DIRTYPE, 0o755), b"")]
    for i in range(700):
        body = rng.randbytes(rng.randrange(0, 3000))
        members.append((_with_size(_info(f"d/f{i}", tarfile.REGTYPE, 0o644), len(body)), body))
        if i == 300:
            big = rng.randbytes((5 << 19) + 7)
            members.append((_with_size(_info("big", tarfile.REGTYPE, 0o600), len(big)), big))
    long = _with_size(_info("long", tarfile.REGTYPE, 0o644), 3)
    long.pax_headers = {"comment": "c" * (3 << 19)}
    members.append((long, b"abc"))
    members.append((_with_size(_info("d/.wh.gone", tarfile.REGTYPE, 0o644), 10), b"0123456789"))
    hard = _info("d/hard", tarfile.LNKTYPE, 0o644)
    hard.linkname = "d/f7"
    soft = _info("d/soft", tarfile.SYMTYPE, 0o777)
    soft.linkname = "f8"
    members += [(hard, b""), (soft, b""), (_info("empty", tarfile.REGTYPE, 0o640), b"")]
    return _tar(*members)


def _tree(root: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(root)): (
            os.lstat(p).st_mode,
            os.readlink(p).encode() if p.is_symlink() else p.read_bytes() if p.is_file() else b"",
        )
        for p in sorted(root.rglob("*"))
    }


WAYS = ["file", "pipe", "chunks", "gzip", "gzip-over-pipe", "raw-gzip", "nonblocking",
        "nonblocking-raw-gzip", "nonblocking-fd-1500"]  # fmt: skip


@pytest.mark.parametrize("how", WAYS)
def test_every_way_in_gives_the_same_layer_and_record(tmp_path: Path, how: str) -> None:
    """From a tar file (the sandbox reads the data itself), a pipe (read straight from its fd),
    a pipe written in odd pieces (each read ends anywhere: in a header, in a body), a gzip
    stream and a GzipFile reading a pipe (whose ``fileno()`` is the pipe's, not its data's;
    the data follows each frame on the pipe), gzip from a raw pipe whose writer wrote one
    byte first (a read gives that byte alone: the compression is told from 8 bytes all the
    same), and a non-blocking pipe, buffered, raw, and at fd 1500 (a read with nothing yet is
    not the end; it is waited out with poll, which takes any fd, where select takes 1023):
    the same files, the tar's sha256 as diff_id, and a record whose replay is the tar, byte
    for byte."""
    data = _mixed_tar()
    (tmp_path / "layer.tar").write_bytes(data)
    target = tmp_path / "layer"
    target.mkdir()
    if how == "file":
        with open(tmp_path / "layer.tar", "rb") as f:
            result = apply_layer(target, f, record=True)
    elif how == "pipe":
        with subprocess.Popen(["cat", str(tmp_path / "layer.tar")], stdout=PIPE) as cat:
            assert cat.stdout is not None
            result = apply_layer(target, cat.stdout, record=True)
    elif how == "chunks":
        with _written_in_pieces(data) as stream:
            result = apply_layer(target, stream, record=True)
    elif how == "gzip":
        result = apply_layer(target, io.BytesIO(gzip.compress(data, 1)), record=True)
    elif how.startswith(("raw", "nonblocking")):
        sent = gzip.compress(data, 1) if how.endswith("gzip") else data
        fd_at = 1500 if how.endswith("1500") else None
        blocking = not how.startswith("nonblocking")
        with _written_in_pieces(sent, "raw" in how, blocking, fd_at) as raw:
            result = apply_layer(target, raw, record=True)
    else:
        with (
            _written_in_pieces(gzip.compress(data, 1)) as stream,
            gzip.GzipFile(fileobj=stream) as plain,
        ):
            assert os.fstat(plain.fileno()).st_mode & stat.S_IFIFO
            result = apply_layer(target, plain, record=True)  # type: ignore[arg-type]
    assert result.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
    assert result.tar_size == len(data)
    assert result.no_record is None and result.record is not None
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        expected = tmp_path / "expected"
        expected.mkdir()
        tf.extractall(expected, filter="fully_trusted")
    os.unlink(expected / "d/.wh.gone")
    assert _tree(target) == _tree(expected)
    assert replayed(result, target, tmp_path / "replayed.tar") == data


@contextlib.contextmanager
def _written_in_pieces(
    data: bytes, raw: bool = False, blocking: bool = True, fd_at: int | None = None
) -> Iterator[BinaryIO]:
    """The read end of a pipe (a buffered stream; *raw*: a FileIO, whose reads give what has
    been written so far; not *blocking*: O_NONBLOCK; *fd_at*: moved to that fd, the limit of
    open files raised for it) that a thread of this process writes
    *data* to, its first byte alone, then in pieces of random sizes, 1 byte to 200 KiB,
    pausing now and then: reads end anywhere.
    The write end is this process's own, so a sandbox that kept it would keep the apply from
    ever seeing the end: after a minute the thread kills this process's children (the
    sandbox among them) and the test fails, rather than hang."""
    r, w = os.pipe()
    rng = random.Random(len(data))
    applied = threading.Event()
    stuck: list[int] = []

    def write() -> None:
        with open(w, "wb", buffering=0) as out:
            view, at = memoryview(data), 1
            write_all(out.fileno(), view[:1])
            time.sleep(0.02)
            while at < len(data):
                n = rng.choice((1, 7, 511, 513, 4096, 65537, 200 << 10))
                write_all(out.fileno(), view[at : at + n])
                at += n
                if rng.random() < 0.05:
                    time.sleep(0.001)
        if not applied.wait(60):
            for task in Path("/proc/self/task").iterdir():
                for pid in (task / "children").read_text().split():
                    stuck.append(int(pid))
                    os.kill(int(pid), signal.SIGKILL)

    writer = threading.Thread(target=write)
    writer.start()
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    if fd_at is not None:
        room = fd_at + 1
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(limits[0], room), max(limits[1], room)))
        os.dup2(r, fd_at, inheritable=False)
        os.close(r)
        r = fd_at
    os.set_blocking(r, blocking)
    try:
        with open(r, "rb", buffering=0 if raw else -1) as stream:
            yield stream
    finally:
        applied.set()
        writer.join()
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
    assert not stuck, "the apply never saw the end of its input: the sandbox kept the pipe"


def replayed(result: ApplyResult, target: Path, out: Path, check: bool = True) -> bytes:
    """The diff of the layer at *target* that *result*'s record replays (written at *out*;
    with *check* False, not hashed)."""
    assert result.record is not None, result.no_record
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        writer = TarWriter(fd=fd)
        exact.replay(
            tarsplit.Record(result.record), str(target), writer, result.diff_id, check=check
        )
        writer.flush()
    finally:
        os.close(fd)
    return out.read_bytes()


def test_a_cut_stream_loses_its_end_in_every_way_in(tmp_path: Path) -> None:
    """A tar cut inside a body or inside its long PAX header is refused as truncated from a
    file and from a gzip stream alike."""
    data = _mixed_tar()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        long_header = tf.getmember("long").offset
    for cut in (len(data) // 3, long_header + 4096):
        (tmp_path / "cut.tar").write_bytes(data[:cut])
        for how in ("file", "gzip"):
            target = tmp_path / f"{how}{cut}"
            target.mkdir()
            with pytest.raises(ArchiveError, match="truncated"):
                if how == "file":
                    with open(tmp_path / "cut.tar", "rb") as f:
                        apply_layer(target, f, record=True)
                else:
                    apply_layer(target, io.BytesIO(gzip.compress(data[:cut], 1)), record=True)


def test_a_cut_gzip_stream_is_reported_as_such(tmp_path: Path) -> None:
    """gzip cut inside a body large enough to be spliced to the sandbox: the error is the
    decoder's (where the gzip ends), not the sandbox's end of its pipe."""
    data = _mixed_tar()
    packed = gzip.compress(data, 1)
    for cut in (len(packed) // 2, len(packed) - 10):
        target = tmp_path / f"cut{cut}"
        target.mkdir()
        with pytest.raises(ArchiveError, match="truncated gzip stream: input ended at byte"):
            apply_layer(target, io.BytesIO(packed[:cut]), record=True)


def _cut_after(first: tarfile.TarInfo, files: int) -> bytes:
    """A tar of *first*, *files* small files and a last one, cut inside the last one's body."""
    members = [(first, b"")]
    members += [
        (_with_size(_info(f"f{i}", tarfile.REGTYPE, 0o644), 10), b"x" * 10) for i in range(files)
    ]
    members.append((_with_size(_info("last", tarfile.REGTYPE, 0o644), 5000), b"z" * 5000))
    data = _tar(*members)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        last = tf.getmember("last").offset_data
    return data[: last + 2048]


@pytest.mark.parametrize("files", [5, 600])
@pytest.mark.parametrize("how", ["file", "pipe", "gzip"])
def test_a_bad_entry_before_a_cut_is_the_error_reported(
    tmp_path: Path, how: str, files: int
) -> None:
    """Found in review: the parent parses and the sandbox writes, so a tar with a bad entry
    and, later, a cut end has two errors; the one first in the tar is reported (as apply in
    one process did), however many entries lie between them: an unsafe name, a hardlink to
    nothing."""
    evil = _with_size(_info("../evil", tarfile.REGTYPE, 0o644), 0)
    dangling = _info("h", tarfile.LNKTYPE, 0o644)
    dangling.linkname = "missing"
    for first, error, match in (
        (evil, UnsafeArchive, "outside the layer"),
        (dangling, ArchiveError, "target 'missing' is not in the layer"),
    ):
        data = _cut_after(first, files)
        target = tmp_path / f"{first.name.strip('./')}"
        target.mkdir()
        with pytest.raises(error, match=match):
            if how == "file":
                (tmp_path / "cut.tar").write_bytes(data)
                with open(tmp_path / "cut.tar", "rb") as f:
                    apply_layer(target, f, record=True)
            elif how == "pipe":
                apply_layer(target, io.BytesIO(data), record=True)
            else:
                apply_layer(target, io.BytesIO(gzip.compress(data, 1)), record=True)


def test_an_xattr_the_filesystem_refuses_names_the_entry(tmp_path: Path) -> None:
    """Found in review: an xattr over the kernel's 64 KiB limit failed with "Argument list too
    long (6)", the 6 an fd; the one line names the entry and the xattr."""
    info = _with_size(_info("etc/big-xattr", tarfile.REGTYPE, 0o644), 2)
    info.pax_headers = {"SCHILY.xattr.user.big": "a" * (100 << 10)}
    target = tmp_path / "layer"
    target.mkdir()
    with pytest.raises(ArchiveError) as err:
        apply_layer(target, io.BytesIO(_tar((info, b"hi"))))
    assert "etc/big-xattr: xattr user.big" in str(err.value), err.value
    assert "Argument list too long" in str(err.value)


def test_entries_after_their_directory_that_are_not_plain_files(tmp_path: Path) -> None:
    """Once the tar made a directory, a plain regular file in it is written by the
    extractor's short path; a whiteout, a name written twice, or a name spelled with ``./``
    or ``/`` in that directory still get what they mean."""
    target = tmp_path / "layer"
    (target / "d").mkdir(parents=True)
    (target / "d" / "old").write_bytes(b"from the parent")

    def file(name: str, body: bytes) -> tuple[tarfile.TarInfo, bytes]:
        return _with_size(_info(name, tarfile.REGTYPE, 0o644), len(body)), body

    data = _tar(
        (_info("d", tarfile.DIRTYPE, 0o755), b""),
        file("d/.wh.old", b""),
        file("./d/dotted", b"a"),
        file("/d/absolute", b"b"),
        file("d/twice", b"first"),
        file("d/twice", b"second"),
        file("d/plain", b"c"),
    )
    for how in ("file", "stream"):
        _apply(target, data, how, tmp_path / "layer.tar")
        got = {p.name: p.read_bytes() for p in (target / "d").iterdir()}
        assert got == {
            "dotted": b"a",
            "absolute": b"b",
            "twice": b"second",
            "plain": b"c",
        }, how
        for p in (target / "d").iterdir():
            assert stat.S_IMODE(p.lstat().st_mode) == 0o644
            assert p.lstat().st_mtime == 1_700_000_000
        (target / "d" / "old").write_bytes(b"from the parent")  # for the second round


def test_the_record_matches_the_layer_where_a_name_changes_kind(tmp_path: Path) -> None:
    """A directory whited out and then made a file, or a file hardlinked after it was
    written: the layer holds what the tar says last (the file's own mtime, not the removed
    directory's), and the record's check table matches the layer just applied."""

    def entry(
        name: str, kind: bytes, mtime: int, body: bytes = b""
    ) -> tuple[tarfile.TarInfo, bytes]:
        mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
        info = _with_size(_info(name, kind, mode), len(body))
        info.mtime = mtime
        return info, body

    link = entry("g", tarfile.LNKTYPE, 1_700_000_000)
    link[0].linkname = "f"
    data = _tar(
        entry("x", tarfile.DIRTYPE, 1_600_000_000),
        entry(".wh.x", tarfile.REGTYPE, 1_700_000_000),
        entry("x", tarfile.REGTYPE, 2_000_000_000, b"file"),
        entry("a", tarfile.DIRTYPE, 1_700_000_000),
        entry("a/y", tarfile.DIRTYPE, 1_600_000_000),
        entry("a/.wh.y", tarfile.REGTYPE, 1_700_000_000),
        entry("a/y", tarfile.REGTYPE, 2_000_000_000, b"file"),
        entry("f", tarfile.REGTYPE, 1_900_000_000, b"linked"),
        link,
    )
    for how in ("file", "stream"):
        target = tmp_path / how
        target.mkdir()
        if how == "file":
            (tmp_path / "layer.tar").write_bytes(data)
            with open(tmp_path / "layer.tar", "rb") as f:
                result = apply_layer(target, f, record=True)
        else:
            result = apply_layer(target, io.BytesIO(data), record=True)
        assert (target / "x").read_bytes() == b"file", how
        assert (target / "x").stat().st_mtime == 2_000_000_000, how
        assert (target / "a/y").stat().st_mtime == 2_000_000_000, how
        assert (target / "a").stat().st_mtime == 1_700_000_000, how
        assert (target / "g").stat().st_ino == (target / "f").stat().st_ino, how
        assert result.no_record is None and result.record is not None, how
        checks = tarsplit.Record(result.record).checks()
        assert exact._noted_changed(checks, str(target)) is None, how


def test_a_root_entry_that_makes_the_root_setgid_or_gives_it_a_default_acl(
    tmp_path: Path,
) -> None:
    """The tar's ``./`` entry makes the layer's root setgid (group 5) or gives it a default
    ACL: what follows in the root gets the tar's owner and mode all the same."""
    if os.geteuid() != 0:
        host_lacks("needs root to set owners", "root")
    root = _info("./", tarfile.DIRTYPE, 0o2775, gid=5)
    acl_root = _info("./", tarfile.DIRTYPE, 0o755)
    acl = _acl(7, 0, 0).decode("utf-8", "surrogateescape")
    acl_root.pax_headers = {"SCHILY.xattr.system.posix_acl_default": acl}
    rest = (
        (_with_size(_info("f", tarfile.REGTYPE, 0o644), 2), b"hi"),
        (_info("sub", tarfile.DIRTYPE, 0o755), b""),
    )
    for name, first in (("setgid", root), ("acl", acl_root)):
        target = tmp_path / name
        target.mkdir()
        apply_layer(target, io.BytesIO(_tar((first, b""), *rest)))
        got = {p: (oct(stat.S_IMODE((target / p).lstat().st_mode)), (target / p).lstat().st_gid)
               for p in ("f", "sub")}  # fmt: skip
        assert got == {"f": ("0o644", 0), "sub": ("0o755", 0)}, name


def test_an_entry_crosses_the_pipe_to_the_sandbox_whole() -> None:
    """The parent sends each entry to the sandbox as the tuple of its fields, in their
    order, and the sandbox makes the entry again from it: every field arrives."""
    entry = TarEntry(
        name="d/f",
        type=b"0",
        mode=0o4755,
        uid=1,
        gid=2,
        size=3,
        mtime_ns=4,
        atime_ns=5,
        linkname="l",
        devmajor=6,
        devminor=7,
        xattrs={"user.a": b"b"},
        sparse=[(0, 1)],
    )
    sent = pickle.dumps(feed._FIELDS(entry), protocol=pickle.HIGHEST_PROTOCOL)
    assert TarEntry(*pickle.loads(sent)) == entry


def test_a_directory_made_a_file_leaves_what_it_held_gone_in_the_record(tmp_path: Path) -> None:
    """``d/``, a symlink ``d/s``, then ``d`` as a file: the layer holds the file, and the
    record says ``d/s`` is gone (its lstat says ENOTDIR, which once failed the apply; found
    in review)."""
    link = _info("d/s", tarfile.SYMTYPE, 0o777)
    link.linkname = "x"
    data = _tar(
        (_info("d", tarfile.DIRTYPE, 0o755), b""),
        (link, b""),
        (_with_size(_info("d", tarfile.REGTYPE, 0o644), 4), b"file"),
    )
    target = tmp_path / "layer"
    target.mkdir()
    result = apply_layer(target, io.BytesIO(data), record=True)
    assert (target / "d").read_bytes() == b"file"
    assert result.no_record is None and result.record is not None
    checks = tarsplit.Record(result.record).checks()
    assert "d" in checks.present and "d/s" in checks.gone and "d/s" not in checks.present
    assert exact._noted_changed(checks, str(target)) is None


@pytest.mark.parametrize("how", ["file", "stream"])
def test_the_sandbox_logs_to_the_log_file_never_into_a_layer_file(tmp_path: Path, how: str) -> None:
    """The sandbox gives up every fd of its parent's but its own pipes, and a log file's: a
    message it logs while it writes a file (an xattr the filesystem refuses) goes to the log
    file, not into the file that took the number of an fd it gave up."""
    members = []
    for i in range(3):
        info = _with_size(_info(f"f{i}", tarfile.REGTYPE, 0o644), 6)
        info.pax_headers = {"SCHILY.xattr.foo.bar": "x"}  # no such namespace: ENOTSUP
        members.append((info, b"hello\n"))
    data = _tar(*members)
    log_file = tmp_path / "debug.log"
    handler = logging.FileHandler(log_file)
    logger = logging.getLogger("graphdriver.archive.extract")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        (tmp_path / "layer").mkdir()
        _apply(tmp_path / "layer", data, how, tmp_path / "layer.tar")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()
    for i in range(3):
        assert (tmp_path / "layer" / f"f{i}").read_bytes() == b"hello\n"
    assert log_file.read_text().count("xattr foo.bar not kept on f") == 3


class _ReadOnly(io.BufferedIOBase):
    """A stream that has ``read`` and nothing else (io's default ``read1`` raises)."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        return self._data.read(size)


def test_a_stream_that_only_reads_applies(tmp_path: Path) -> None:
    body = b"data\n" * 1000
    data = _tar((_with_size(_info("f", tarfile.REGTYPE, 0o644), len(body)), body))
    result = apply_layer(tmp_path, _ReadOnly(data))  # type: ignore[arg-type]
    assert (tmp_path / "f").read_bytes() == body
    assert result.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()


def test_a_directory_the_tar_only_goes_through_after_a_marker_goes_at_the_next(
    tmp_path: Path,
) -> None:
    """A directory made to hold a whiteout, below one an opaque marker had cleared, is
    cleared by the next marker above it too (it was kept, empty: the first marker's clear
    was taken as still holding), as Docker's unpacker removes it."""
    (tmp_path / "d" / "a").mkdir(parents=True)
    (tmp_path / "d" / "k").write_text("k")
    (tmp_path / "d" / "a" / "x").write_text("x")
    (tmp_path / "e").mkdir()
    data = _tar(
        (_info("d", tarfile.DIRTYPE, 0o755), b""),
        (_info(".wh..wh..opq", tarfile.REGTYPE, 0o644), b""),
        (_info("d/a/.wh.x", tarfile.REGTYPE, 0o644), b""),
        (_info("d/.wh..wh..opq", tarfile.REGTYPE, 0o644), b""),
    )
    apply_layer(tmp_path, io.BytesIO(data))
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["d"]
