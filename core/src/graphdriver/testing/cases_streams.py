"""Layer tars as real tools write them (compressed, GNU tar, sparse, nanosecond times, root
entries, directories a tar does not name), applied into the driver's layers."""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import os
import shutil
import struct
import tarfile
from pathlib import Path

import pytest

from .. import LayerStore
from .base import APPLIES, ConformanceBase
from .groups import group
from .require import needs_root, run_tool
from .trees import listing, make_rich, random_content, snapshot


class StreamCases(ConformanceBase):
    """Layer tars as real tools write them, applied into the driver's layers."""

    @group("streams")
    def test_apply_compressed_streams(self, store: LayerStore) -> None:
        import zstandard

        self.base_with(store, make_rich)
        with store.diff("base") as stream:
            plain = stream.read()
        digest = "sha256:" + hashlib.sha256(plain).hexdigest()
        for layer_id, data in (
            ("gz", gzip.compress(plain)),
            ("zst", zstandard.ZstdCompressor().compress(plain)),
        ):
            store.create(layer_id)
            result = store.apply(layer_id, io.BytesIO(data))
            assert result.diff_id == digest
            assert result.compression == {"gz": "gzip", "zst": "zstd"}[layer_id]
            assert self.snap(store, layer_id) == self.snap(store, "base")

    @group("streams")
    def test_apply_tar_from_gnu_tar(self, store: LayerStore) -> None:
        # the source tree lives in a layer: the driver's filesystem keeps user.* xattrs, where
        # a temp dir on tmpfs (before Linux 6.6) would not
        self.base_with(store, make_rich, "source")
        with store.mounted("source") as src:
            proc = run_tool(
                [
                    "tar",
                    "--xattrs",
                    "--xattrs-include=*",
                    "--numeric-owner",
                    "-C",
                    str(src),
                    "-cf",
                    "-",
                    ".",
                ],
                capture_output=True,
                check=True,
            )
            want = snapshot(src)
        store.create("layer")
        store.apply("layer", io.BytesIO(proc.stdout))
        with store.mounted("layer") as root:
            assert snapshot(root) == want

    # ------------------------------------------------------------------ layers real tools write

    @group("streams")
    def test_empty_layer_applies(self, store: LayerStore) -> None:
        needs_root(APPLIES)
        # Docker's commit of an unchanged container writes this layer; so does our own diff
        store.create("unchanged")
        with store.diff("unchanged") as stream:
            data = stream.read()
        assert data == b"\0" * 1024
        gz = run_tool(["gzip", "-n", "-c"], input=data, capture_output=True, check=True)
        for layer_id, blob in (("copy", data), ("copy-gz", gz.stdout)):
            store.create(layer_id)
            result = store.apply(layer_id, io.BytesIO(blob))
            assert result.size == 0
            assert result.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
            with store.mounted(layer_id) as root:
                assert listing(root) == []

    @group("streams")
    def test_root_named_entries_set_the_layer_root(self, store: LayerStore) -> None:
        needs_root(APPLIES)
        # umoci writes a "/" entry; GNU tar writes "./"; Docker and containerd read
        # "/etc/x" as "etc/x"
        members: list[tuple[tarfile.TarInfo, bytes | None]] = []
        for name, mode in (("/", 0o750), ("./", 0o750), (".", 0o750)):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, mode, 7, 8
            info.mtime = 1_600_000_000
            info.pax_headers = {"SCHILY.xattr.user.root": "yes"}
            members.append((info, None))
        for name in ("./etc/x", "/abs/file", "/../up/file"):
            info = tarfile.TarInfo(name)
            info.size, info.mode = 4, 0o644
            members.append((info, b"data"))
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for info, body in members:
                tf.addfile(info, io.BytesIO(body) if body is not None else None)
        store.create("layer")
        assert store.apply_diff("layer", io.BytesIO(buf.getvalue())) == 12
        with store.mounted("layer") as root:
            st = os.lstat(root)
            assert oct(st.st_mode & 0o7777) == oct(0o750)
            assert (st.st_uid, st.st_gid) == (7, 8)
            assert st.st_mtime_ns == 1_600_000_000 * 10**9
            assert os.getxattr(root, "user.root") == b"yes"
            for rel in ("etc/x", "abs/file", "up/file"):
                assert (root / rel).read_bytes() == b"data"

    @group("streams")
    def test_multi_frame_zstd_and_multi_member_gzip(self, store: LayerStore) -> None:
        # zstd:chunked (podman, buildah) is zstd frames with skippable frames between and
        # after them; pigz and `cat a.gz b.gz` make several gzip members
        self.base_with(store, make_rich)
        with store.diff("base") as stream:
            plain = stream.read()
        cuts = [0, 700, len(plain) // 2, len(plain) - 1500, len(plain)]
        parts = [plain[a:b] for a, b in itertools.pairwise(cuts)]

        def tool(argv: list[str], data: bytes) -> bytes:
            return run_tool(argv, input=data, capture_output=True, check=True).stdout

        def skippable(payload: bytes, magic: int = 0x184D2A50) -> bytes:
            return magic.to_bytes(4, "little") + len(payload).to_bytes(4, "little") + payload

        zst = skippable(b"") + b"".join(
            tool(["zstd", "-q", "-c"], p) + skippable(b"toc" * i, 0x184D2A5E)
            for i, p in enumerate(parts)
        )
        gz = b"".join(tool(["gzip", "-c"], p) for p in parts)
        layers = {
            "zstd-frames": zst,
            "zstd-padded": zst + b"\0" * 1024,
            "gzip-members": gz,
            "gzip-padded": tool(["gzip", "-c"], plain) + b"\0" * 1024,  # as `gzip -dc` reads it
        }
        want = self.snap(store, "base")
        for layer_id, blob in layers.items():
            store.create(layer_id)
            result = store.apply(layer_id, io.BytesIO(blob))
            assert result.diff_id == "sha256:" + hashlib.sha256(plain).hexdigest(), layer_id
            assert self.snap(store, layer_id) == want, layer_id

    @group("streams")
    @pytest.mark.parametrize(
        "tar_args",
        [
            ["--format=pax", "--sparse-version=0.0"],
            ["--format=pax", "--sparse-version=0.1"],
            ["--format=pax", "--sparse-version=1.0"],
            ["--format=gnu"],
        ],
        ids=["pax-0.0", "pax-0.1", "pax-1.0", "gnu"],
    )
    def test_sparse_files_keep_their_holes(
        self, store: LayerStore, tmp_path: Path, tar_args: list[str]
    ) -> None:
        needs_root(APPLIES)
        src = tmp_path / "src"
        src.mkdir()
        seed = tmp_path / "seed"
        seed.write_bytes(random_content(4096 * 9, 11))
        # a few regions (fits a GNU header) and many (needs GNU extension headers)
        for name, regions in (("few", 3), ("many", 9)):
            f = src / name
            run_tool(["truncate", "-s", "64M", str(f)], check=True)
            for i in range(regions):
                run_tool(
                    ["dd", f"if={seed}", f"of={f}", "bs=4096", "count=1", f"skip={i}",
                     f"seek={i * 1500 + 7}", "conv=notrunc", "status=none"],
                    check=True,
                )  # fmt: skip
        tar = run_tool(
            ["tar", *tar_args, "-S", "-C", str(src), "-cf", "-", "."],
            capture_output=True,
            check=True,
        ).stdout
        store.create("layer")
        assert store.apply_diff("layer", io.BytesIO(tar)) == 2 * (64 << 20)
        store.create("child", "layer", rw=True)  # (vfs copies them: a copy keeps holes too)
        for layer in ("layer", "child"):
            with store.mounted(layer) as root:
                assert listing(root) == ["few", "many"]
                for name in ("few", "many"):
                    got, want = os.stat(root / name), os.stat(src / name)
                    assert got.st_size == want.st_size == 64 << 20
                    assert (root / name).read_bytes() == (src / name).read_bytes()
                    assert got.st_blocks * 512 < 1 << 20, f"{layer}: holes written as zeros"

    @group("streams")
    def test_nanosecond_times(self, store: LayerStore, tmp_path: Path) -> None:
        needs_root(APPLIES)
        src = tmp_path / "src"
        (src / "dir").mkdir(parents=True)
        (src / "dir" / "file").write_bytes(b"ns")
        (src / "whole").write_bytes(b"s")
        os.symlink("whole", src / "link")
        stamps = {
            "dir/file": 1_700_000_000_123_456_789,
            "dir": 1_700_000_001_000_000_001,
            "link": 1_700_000_002_999_999_999,
            "whole": 1_700_000_003_000_000_000,
        }
        for rel, ns in stamps.items():
            os.utime(src / rel, ns=(ns - 5, ns), follow_symlinks=False)
        tar = run_tool(
            ["tar", "--format=pax", "-C", str(src), "-cf", "-", "."],
            capture_output=True,
            check=True,
        ).stdout
        store.create("layer")
        store.apply_diff("layer", io.BytesIO(tar))
        with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
            atimes = {m.name.lstrip("./"): m.pax_headers.get("atime") for m in tf}
        with store.mounted("layer") as root:
            for rel, ns in stamps.items():
                st = os.lstat(root / rel)
                assert st.st_mtime_ns == ns, rel
                atime = atimes[rel]
                if atime:  # GNU tar records atime too
                    whole, _, frac = atime.partition(".")
                    assert st.st_atime_ns == int(whole) * 10**9 + int(frac.ljust(9, "0")), rel
        # the applied layer's diff is GNU tar's own bytes again; a diff we generate (a layer
        # filled through its mount) keeps them: a PAX mtime for a fraction of a second, none
        # for whole ones
        with store.diff("layer") as stream:
            assert stream.read() == tar

        def fill(root: Path) -> None:
            shutil.copytree(src, root, symlinks=True, dirs_exist_ok=True)
            for rel, ns in stamps.items():
                os.utime(root / rel, ns=(ns - 5, ns), follow_symlinks=False)

        self.base_with(store, fill, "made")
        _size, data = self.roundtrip(store, "made", "copy")
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            pax = {m.name.rstrip("/"): m.pax_headers for m in tf}
        assert pax["dir/file"]["mtime"] == "1700000000.123456789"
        assert "mtime" not in pax["whole"]
        with store.mounted("copy") as root:
            for rel, ns in stamps.items():
                assert os.lstat(root / rel).st_mtime_ns == ns, rel

    @group("streams")
    def test_directories_a_tar_does_not_name_keep_their_attributes(self, store: LayerStore) -> None:
        needs_root(APPLIES)

        # a tar may hold tmp/x without an entry for tmp/: the layer's tmp is the parent's
        # (mode 1777, owner, xattrs), as when the file is made through a mount; overlay copies
        # the directory up from the lower layer as the kernel does
        def base(r: Path) -> None:
            (r / "tmp").mkdir()
            os.chmod(r / "tmp", 0o1777)
            (r / "var" / "mail").mkdir(parents=True)
            os.chown(r / "var" / "mail", 0, 8)
            os.chmod(r / "var" / "mail", 0o2775)
            os.setxattr(r / "var" / "mail", "user.kept", b"yes")

        self.base_with(store, base)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for name in ("tmp/x", "var/mail/y", "var/.wh.gone"):
                info = tarfile.TarInfo(name)
                info.size = 1
                tf.addfile(info, io.BytesIO(b"1"))
        store.create("child", "base")
        store.apply("child", io.BytesIO(buf.getvalue()))
        with store.mounted("child") as root:
            assert oct((root / "tmp").stat().st_mode) == oct(0o41777)
            mail = (root / "var" / "mail").stat()
            assert (oct(mail.st_mode), mail.st_uid, mail.st_gid) == (oct(0o42775), 0, 8)
            assert os.getxattr(root / "var" / "mail", "user.kept") == b"yes"
            assert (root / "tmp" / "x").read_bytes() == b"1"

    @group("streams")
    def test_a_directory_a_tar_names_has_the_xattrs_its_entry_carries(
        self, store: LayerStore
    ) -> None:
        """A directory of the parent that the tar names, the root, and one the tar names twice
        (in this layer or below): their xattrs are the last entry's, as overlay's new upper
        directory has them (a container's ``setfacl -k`` or ``setfattr -x`` on a directory
        survives its diff's apply). vfs and btrfs kept the parent's others."""
        needs_root(APPLIES)

        def tar(*entries: tuple[str, dict[str, str]]) -> bytes:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
                for name, pairs in entries:
                    info = tarfile.TarInfo(name)
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in pairs.items()}
                    tf.addfile(info)
            return buf.getvalue()

        twice: tuple[tuple[str, dict[str, str]], ...] = (("t", {"user.a": "1"}), ("t/", {}))
        store.create("base")
        store.apply(
            "base",
            io.BytesIO(tar(("./", {"user.r": "1"}), ("d", {"user.x": "1", "user.y": "2"}), *twice)),
        )
        store.create("child", "base")
        store.apply("child", io.BytesIO(tar(("./", {}), ("d", {"user.y": "3"}), *twice)))
        for layer in ("base", "child"):
            with store.mounted(layer) as root:
                assert [k for k in os.listxattr(root / "t") if k.startswith("user.")] == []
        with store.mounted("child") as root:
            assert [k for k in os.listxattr(root) if k.startswith("user.")] == []
            assert [k for k in os.listxattr(root / "d") if k.startswith("user.")] == ["user.y"]
            assert os.getxattr(root / "d", "user.y") == b"3"

    @group("streams")
    def test_a_directory_the_tar_made_keeps_its_inherited_acl_in_either_order(
        self, store: LayerStore
    ) -> None:
        """A directory under one with a default ACL inherits it, whether the tar names it
        before what it holds or after (made then as their parent): the entry's xattrs
        replace only those of a directory that was there before the apply."""
        needs_root(APPLIES)
        u = 0xFFFFFFFF  # (no id: the owner's, the group's, the mask's and others' entries)
        entries = ((1, 7, u), (2, 5, 1234), (4, 5, u), (0x10, 7, u), (0x20, 5, u))
        acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)

        def base(r: Path) -> None:
            (r / "e").mkdir()
            os.setxattr(r / "e", "system.posix_acl_default", acl)

        self.base_with(store, base)
        found = []
        for n, names in enumerate((["e/d/", "e/d/f"], ["e/d/f", "e/d/"])):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
                for name in names:
                    info = tarfile.TarInfo(name)
                    info.type = tarfile.DIRTYPE if name.endswith("/") else tarfile.REGTYPE
                    info.mode = 0o755
                    tf.addfile(info, io.BytesIO(b"") if info.isfile() else None)
            store.create(f"c{n}", "base")
            store.apply(f"c{n}", io.BytesIO(buf.getvalue()))
            with store.mounted(f"c{n}") as root:
                names = os.listxattr(root / "e" / "d")  # (XFS lists its raw ACLs too)
                found.append(sorted(k for k in names if k.startswith("system.")))
        assert found[0] == found[1] == ["system.posix_acl_access", "system.posix_acl_default"]
