"""Bad ids, parents and tars: refused, and nothing lost."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import pytest
import zstandard

from .. import ArchiveError, InvalidLayerId, LayerExists, LayerInUse, LayerNotFound, LayerStore
from .backings import Backing
from .base import (
    APPLIES,
    ConformanceBase,
    _member,
    _tar,
    anchor_accepted_tars,
    hostile_tars,
)
from .groups import group
from .require import needs_root
from .trees import make_base, random_content, snapshot


#: what Docker and containerd read without refusing it: names relative to the layer's root (so
#: ``/abs-escape`` lands in the layer, a hardlink to ``/etc/passwd`` needs the layer's own) and a
#: 0-byte stream as an empty layer (moby#18170)
def _sparse_tar(pax: dict[str, str], data: bytes, name: str = "GNUSparseFile.0/f") -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.pax_headers = {"GNU.sparse.name": "f", **pax}
    return _tar((info, data))


def _sparse_0_0(regions: int) -> bytes:
    """A PAX 0.0 sparse file: its map is one offset and one numbytes record per region."""
    records = b"23 GNU.sparse.offset=0\n25 GNU.sparse.numbytes=0\n" * regions
    ext = tarfile.TarInfo("PaxHeaders/f")
    ext.type, ext.size = tarfile.XHDTYPE, len(records)
    return _tar((ext, records), _member("f", data=b""))


def _map_1_0(*numbers: int) -> bytes:
    text = b"".join(b"%d\n" % n for n in numbers)
    return text + b"\0" * (-len(text) % 512)


def bad_layers() -> dict[str, tuple[bytes, str]]:
    """Compressed streams and sparse files that must be refused: (bytes, what the one-line
    error says)."""
    good = _tar(_member("ok", data=b"fine"), _member("big", data=random_content(200_000, 5)))
    return {**_bad_streams(good), **_bad_sparse_files()}


def _bad_streams(good: bytes) -> dict[str, tuple[bytes, str]]:
    """Corrupt gzip and zstd streams of the tar *good*, and a tar that starts with a zero block."""
    gz = gzip.compress(good)
    zst = zstandard.ZstdCompressor(write_checksum=True).compress(good)
    flipped = bytearray(gz)
    flipped[len(gz) // 2] ^= 0xFF
    skippable = (0x184D2A50).to_bytes(4, "little") + (0xFFFFFFF0).to_bytes(4, "little")
    return {
        "gzip-magic-then-garbage": (
            b"\x1f\x8b" + random_content(4000, 3),
            "corrupt gzip stream at byte",
        ),
        "gzip-corrupt": (bytes(flipped), "corrupt gzip stream at byte"),
        "gzip-trailing-garbage": (gz + b"GARBAGE", f"trailing data at byte {len(gz)}"),
        "gzip-garbage-after-padding": (gz + b"\0" * 10 + b"x", f"at byte {len(gz) + 10}"),
        "zstd-truncated": (zst[:-100], "truncated zstd stream"),
        "zstd-corrupt": (zst[:-4] + b"\0\0\0\0", f"the checksum at byte {len(zst) - 4}"),
        "zstd-reserved-block-type": (  # magic, a 2-byte frame header, a block of type 3
            b"\x28\xb5\x2f\xfd\0\0\x07\0\0" + b"\0" * 100,
            "at byte 6 (in the frame that starts at byte 0) does not decode",
        ),
        "zstd-trailing-garbage": (zst + b"GARBAGE!", f"trailing data at byte {len(zst)}"),
        "zstd-absurd-skippable-frame": (
            zst + skippable + b"short",
            f"skippable frame at byte {len(zst)}, which declares 4294967280 bytes",
        ),
        "lone-zero-block": (b"\0" * 512 + good, "lone zero block"),
    }


def _bad_sparse_files() -> dict[str, tuple[bytes, str]]:
    """Sparse files whose maps are impossible, or too big to follow."""
    v01 = {"GNU.sparse.size": "100"}
    return {
        "sparse-past-end": (
            _sparse_tar({**v01, "GNU.sparse.map": "90,20"}, b"x" * 20),
            "points past the file's size",
        ),
        "sparse-overlap": (
            _sparse_tar({**v01, "GNU.sparse.map": "0,10,5,10"}, b"x" * 20),
            "overlaps itself or is out of order",
        ),
        "sparse-out-of-order": (
            _sparse_tar({**v01, "GNU.sparse.map": "50,10,0,10"}, b"x" * 20),
            "overlaps itself or is out of order",
        ),
        "sparse-map-not-the-data": (
            _sparse_tar({**v01, "GNU.sparse.map": "0,10"}, b"x" * 20),
            "carries 20 bytes of data but its map describes 10",
        ),
        "sparse-many-tib": (
            _sparse_tar({"GNU.sparse.size": str(1 << 60), "GNU.sparse.map": "0,4"}, b"data"),
            "a sparse file may have here",
        ),
        "sparse-1.0-millions-of-regions": (
            _sparse_tar(
                {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": "9"},
                _map_1_0(5_000_000, 0, 1) + b"x",
            ),
            "map of 5000000 regions",
        ),
        "sparse-0.1-map-too-long": (
            _sparse_tar({**v01, "GNU.sparse.map": ",".join(["0,0"] * 200_000)}, b""),
            "map of 200000 regions",
        ),
        "sparse-0.0-millions-of-records": (_sparse_0_0(300_000), "map of 131073 regions"),
        "sparse-1.0-map-cut-short": (
            _sparse_tar(
                {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": "9"},
                _map_1_0(2, 0, 1),
            ),
            "corrupt sparse map",
        ),
    }


class BadInputCases(ConformanceBase):
    """Bad ids, parents and tars: refused, and nothing lost."""

    # ------------------------------------------------------------------ bad input

    @group("bad-input")
    @pytest.mark.parametrize(
        "bad", ["../x", "/x", "", "a" * 129, "a\0b", ".hidden", "a/b", "-rf", "x y"]
    )
    def test_invalid_ids(self, store: LayerStore, bad: str) -> None:
        with pytest.raises(InvalidLayerId):
            store.create(bad)
        with pytest.raises(InvalidLayerId):
            store.create("ok", bad)
        assert store.layers() == []

    @group("bad-input")
    def test_unknown_parent_and_duplicate(self, store: LayerStore) -> None:
        with pytest.raises(LayerNotFound):
            store.create("orphan", "missing")
        assert store.layers() == []
        store.create("once")
        with pytest.raises(LayerExists):
            store.create("once")
        with pytest.raises(LayerNotFound):
            store.get("missing")
        with pytest.raises(LayerNotFound):
            store.remove("missing")
        assert store.layers() == ["once"]

    @group("bad-input")
    def test_max_id_length(self, store: LayerStore) -> None:
        store.create("a" * 128)
        assert store.exists("a" * 128)

    @group("bad-input")
    @pytest.mark.parametrize("case", sorted(hostile_tars()))
    def test_bad_tar_refused_and_rolled_back(
        self, store: LayerStore, case: str, gd_backing: Backing
    ) -> None:
        data, error = hostile_tars()[case]
        outside = gd_backing.root / "outside-sentinel"
        outside.mkdir(exist_ok=True)
        before_outside = snapshot(outside)
        self.base_with(store, make_base)
        store.create("sibling", "base")
        self.fill(store, "sibling", lambda r: (r / "mine").write_text("keep"))
        want_sibling = self.snap(store, "sibling")
        want_base = self.snap(store, "base")
        store.create("target", "base")
        with pytest.raises(error):
            store.apply("target", io.BytesIO(data))
        assert store.exists("target")
        assert store.changes("target") == []
        assert self.snap(store, "target") == want_base
        assert self.snap(store, "base") == want_base
        assert self.snap(store, "sibling") == want_sibling
        assert snapshot(outside) == before_outside
        assert not Path("/abs-escape").exists() and not Path("/etc/escape").exists()
        assert not (gd_backing.root / "escape").exists()
        # the rolled-back layer takes a good tar afterwards
        good = _tar(_member("good", data=b"good"))
        assert store.apply_diff("target", io.BytesIO(good)) == 4

    @group("bad-input")
    def test_apply_refused_on_used_layer(self, store: LayerStore) -> None:
        good = _tar(_member("f", data=b"data"))
        self.base_with(store, make_base)
        store.create("child", "base")
        with pytest.raises(LayerInUse):
            store.apply_diff("base", io.BytesIO(good))
        store.create("mounted")
        store.get("mounted")
        with pytest.raises(LayerInUse):
            store.apply_diff("mounted", io.BytesIO(good))
        store.put("mounted")
        store.create("fresh")
        assert store.apply_diff("fresh", io.BytesIO(good)) == 4
        with pytest.raises(LayerInUse):
            store.apply_diff("fresh", io.BytesIO(good))

    @group("streams")
    def test_absolute_names_and_empty_input_as_docker_reads_them(self, store: LayerStore) -> None:
        needs_root(APPLIES)
        store.create("empty")
        assert store.apply_diff("empty", io.BytesIO(anchor_accepted_tars()["empty"])) == 0
        store.create("target")
        store.apply_diff("target", io.BytesIO(anchor_accepted_tars()["absolute"]))
        with store.mounted("target") as root:
            assert (root / "abs-escape").read_bytes() == b"evil"
        assert not Path("/abs-escape").exists()
        store.create("other")
        with pytest.raises(ArchiveError, match="is not in the layer"):
            store.apply_diff("other", io.BytesIO(hostile_tars()["hardlink-absolute"][0]))
        assert store.changes("other") == []

    @group("bad-input")
    @pytest.mark.parametrize("case", sorted(bad_layers()))
    def test_bad_layer_stream_refused_in_one_line(self, store: LayerStore, case: str) -> None:
        data, says = bad_layers()[case]
        self.base_with(store, make_base)
        want = self.snap(store, "base")
        store.create("target", "base")
        with pytest.raises(ArchiveError) as caught:
            store.apply("target", io.BytesIO(data))
        message = str(caught.value)
        assert says in message and "\n" not in message, message
        assert store.changes("target") == []
        assert self.snap(store, "target") == want

    @group("bad-input")
    def test_entries_through_a_parents_non_directories_are_alike_on_every_driver(
        self, store: LayerStore
    ) -> None:
        """A tar entry below a parent layer's symlink goes through it and one below its file
        finds no directory: refused on every driver (overlay made a directory there, hiding
        the link or file). A directory the tar whites out and makes again is new and empty
        on every driver (overlay showed the deleted one's files through it again)."""
        needs_root(APPLIES)
        parent = _tar(
            _member("etc", tarfile.DIRTYPE),
            _member("etc/passwd", data=b"root"),
            _member("lnk", tarfile.SYMTYPE, linkname="etc"),
        )
        store.create("parent")
        store.apply("parent", io.BytesIO(parent))
        device = _member("etc", tarfile.CHRTYPE)  # 0/0: overlayfs's whiteout, a tree's device
        refused = [[_member("lnk/x")], [_member("etc/passwd/.wh.x")], [_member("etc/passwd/x")]]
        for i, members in enumerate([*refused, [_member(".wh.etc"), device, _member("etc/x")]]):
            store.create(f"refused-{i}", "parent")
            with pytest.raises(ArchiveError):  # UnsafeArchive for the symlink
                store.apply(f"refused-{i}", io.BytesIO(_tar(*members)))
            assert store.changes(f"refused-{i}") == [], members
        remade = {  # what etc holds after: whited out or replaced by a file, then remade
            (".wh.etc", "etc/", "etc/new"): ["new"],
            (".wh.etc", "etc/new"): ["new"],
            (".wh.etc", "etc/.wh.passwd"): [],
            ("etc", "etc/", "etc/new"): ["new"],
            ("etc/.wh.passwd", "etc/.wh..wh..opq", "etc/new"): ["new"],
        }
        for i, (names, listing) in enumerate(remade.items()):
            kinds = [tarfile.DIRTYPE if n.endswith("/") else tarfile.REGTYPE for n in names]
            applied = _tar(*map(_member, names, kinds))
            store.create(f"again-{i}", "parent")
            store.apply(f"again-{i}", io.BytesIO(applied))
            with store.mounted(f"again-{i}") as root:
                assert sorted(os.listdir(root / "etc")) == listing, names
            if len({n.rstrip("/") for n in names}) == len(names):  # (else: no record kept)
                with store.diff(f"again-{i}") as stream:
                    assert stream.read() == applied, names

    @group("bad-input")
    def test_a_layer_deeper_than_python_is_rolled_back_and_removed(self, store: LayerStore) -> None:
        """A tar 1,200 directories deep refused at its last entry: the layer is empty again;
        one applied is removed. The removal called itself once a level and stopped at
        Python's recursion limit: the refused layer stayed half-made, and every later
        command warned of it; an applied one could not be removed."""
        needs_root(APPLIES)
        deep = _member("a/" * 1199 + "f", data=b"x")
        store.create("parent")
        store.apply("parent", io.BytesIO(_tar(_member("q"))))
        store.create("refused", "parent")
        with pytest.raises(ArchiveError):
            store.apply("refused", io.BytesIO(_tar(deep, _member("bad", b"1", linkname="x"))))
        assert store.changes("refused") == []
        store.create("deep", "parent")
        store.apply("deep", io.BytesIO(_tar(deep)))
        for layer in ("refused", "deep"):
            store.remove(layer)
        assert store.layers() == ["parent"]

    @group("bad-input")
    def test_a_create_never_deletes_storage_it_did_not_make(self, store: LayerStore) -> None:
        """Storage whose record is gone (a lost database that ``check --repair`` rebuilt: it
        keeps what it cannot place) refuses a create of its id, with or without a parent, in
        one line, and is kept. The create's rollback deleted it: "File exists", then the
        files gone."""
        needs_root(APPLIES)
        store.create("parent")
        store.create("kept")
        store.apply("kept", io.BytesIO(_tar(_member("f", data=b"precious"))))
        rec = store.meta.get("kept")
        assert rec is not None
        with store.meta.transaction():
            store.meta.delete("kept")
        for parent in (None, "parent"):
            with pytest.raises(LayerExists, match="has storage without a record, left as it is"):
                store.create("kept", parent)
            assert store.layers() == ["parent"]
        with store.meta.transaction():
            store.meta.insert(rec)
        with store.mounted("kept") as root:
            assert (root / "f").read_bytes() == b"precious"
