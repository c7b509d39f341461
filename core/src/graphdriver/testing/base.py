"""Fixtures and helpers shared by the conformance cases (see :mod:`graphdriver.testing`)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import tarfile
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from .. import (
    ArchiveError,
    ChangeKind,
    DriverUnavailable,
    LayerStore,
    UnsafeArchive,
    open_store,
    reserve,
)
from ..linux.tree import remove_tree
from .backings import Backing, BackingUnavailable, make_backing
from .require import REQUIREMENTS, host_lacks, needs_root
from .trees import random_content, snapshot

C, A, D = ChangeKind.MODIFY, ChangeKind.ADD, ChangeKind.DELETE
MiB = 1 << 20

#: why a case that applies a layer tar needs root (see :func:`.require.needs_root`)
APPLIES = "apply-diff unpacks in a sandbox that chroots into the layer (CAP_SYS_CHROOT)"


def _tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _member(
    name: str, kind: bytes = tarfile.REGTYPE, data: bytes | None = b"", linkname: str = ""
) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.linkname = linkname
    if kind == tarfile.REGTYPE and data is not None:
        info.size = len(data)
    return info, data if kind == tarfile.REGTYPE else None


def _patched(name: str, offset: int, raw: bytes) -> bytes:
    """A one-file ustar tar whose header has *raw* at *offset* (a base-256 number, say),
    its checksum made again."""
    info, _ = _member(name)
    block = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    block[offset : offset + len(raw)] = raw
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block) + bytes(1024)


def _pax_record(name: str, key: str, value: str) -> bytes:
    info, _ = _member(name)
    info.pax_headers = {key: value}
    return bytes(info.tobuf(tarfile.PAX_FORMAT)) + bytes(1024)


def _writer(name: str, text: str) -> Callable[[Path], object]:
    return lambda root: (root / name).write_text(text)


def backing_or_skip(kind: str, size: int = 1 << 30) -> Iterator[Backing]:
    """:func:`make_backing` for a pytest fixture (``yield from``): a host that lacks the
    backing skips the tests that need it, saying what is missing (fails them when
    GRAPHDRIVER_REQUIRE names the backing or what it lacks)."""
    try:
        with make_backing(kind, size=size) as backing:
            yield backing
            return
    except BackingUnavailable as exc:
        lacking = exc
    # outside the except: a failure shows the reason alone, not a chained traceback
    if lacking.requirement == "root" and os.geteuid() != 0:
        needs_root(f"backing {kind} makes loop devices and mounts")
    host_lacks(str(lacking), *sorted({kind, lacking.requirement or kind} & REQUIREMENTS.keys()))


def quota_or_skip(store: LayerStore, backing: str) -> None:
    """Return if *store*'s driver limits rw layers' size here; else skip, saying whether the
    host lacks it (a failure when GRAPHDRIVER_REQUIRE has ``xfs-quota`` and the backing is
    loop-xfs) or the driver does not declare quota."""
    caps = store.driver.capabilities
    if caps.quota:
        return
    if "quota" in caps.why_not:
        host_lacks(caps.why_not["quota"], *(["xfs-quota"] if backing == "loop-xfs" else []))
    pytest.skip(f"driver {store.driver.name} does not declare the quota capability")


def anchor_accepted_tars() -> dict[str, bytes]:
    """Inputs that look hostile but that Docker and containerd apply, and so do we: a 0-byte
    stream is an empty layer (moby#18170), and an absolute name is relative to the layer."""
    return {
        "empty": b"",
        "absolute": _tar(_member("/abs-escape", data=b"evil")),
    }


def hostile_tars() -> dict[str, tuple[bytes, type[Exception]]]:
    """Tars that must be refused, with the error class they must raise."""
    good = _tar(
        _member("ok", data=b"fine"),
        _member("dir", tarfile.DIRTYPE),
        _member("dir/file", data=b"x" * 3000),
    )
    return {
        "truncated": (good[:1500], ArchiveError),
        "not-a-tar": (random_content(4096, 7), ArchiveError),
        "dotdot": (_tar(_member("../escape", data=b"evil")), UnsafeArchive),
        "dotdot-nested": (_tar(_member("a/../../escape", data=b"evil")), UnsafeArchive),
        "symlink-escape": (
            _tar(
                _member("evil", tarfile.SYMTYPE, linkname="/"),
                _member("evil/etc/escape", data=b"evil"),
            ),
            UnsafeArchive,
        ),
        "symlink-dotdot-escape": (
            _tar(
                _member("up", tarfile.SYMTYPE, linkname="../../.."),
                _member("up/escape", data=b"evil"),
            ),
            UnsafeArchive,
        ),
        "hardlink-outside": (
            _tar(_member("pw", tarfile.LNKTYPE, linkname="../../etc/passwd")),
            UnsafeArchive,
        ),
        "hardlink-absolute": (  # /etc/passwd means the layer's etc/passwd, which is not there
            _tar(_member("pw", tarfile.LNKTYPE, linkname="/etc/passwd")),
            ArchiveError,
        ),
        "hardlink-through-symlink": (
            _tar(
                _member("evil", tarfile.SYMTYPE, linkname="/"),
                _member("pw", tarfile.LNKTYPE, linkname="evil/etc/passwd"),
            ),
            UnsafeArchive,
        ),
        "whiteout-dotdot": (
            _tar(
                _member("sub", tarfile.DIRTYPE),
                _member("sub/.wh..."),
            ),
            UnsafeArchive,
        ),
        "whiteout-dot": (_tar(_member(".wh..")), UnsafeArchive),
        "corrupt-gzip": (gzip.compress(good)[:-40], ArchiveError),
        # numbers no file can have, and a NUL in a name: one line, not an OverflowError
        "size-base256-huge": (_patched("big", 124, b"\x80" + b"\xff" * 11), ArchiveError),
        "size-base256-negative": (_patched("neg", 124, b"\xff" * 12), ArchiveError),
        "uid-base256-negative": (_patched("uid", 108, b"\xff" * 8), ArchiveError),
        "pax-size-huge": (_pax_record("big", "size", str(1 << 64)), ArchiveError),
        "pax-uid-huge": (_pax_record("uid", "uid", "99999999999"), ArchiveError),
        "pax-mtime-huge": (_pax_record("time", "mtime", str(10**20)), ArchiveError),
        "pax-path-nul": (_pax_record("nul", "path", "a\0b"), ArchiveError),
    }


class ConformanceBase:
    """Fixtures and helpers; a subclass sets ``driver``, ``backing`` and maybe ``options``."""

    driver: ClassVar[str]
    backing: ClassVar[str] = "tmpdir"
    options: ClassVar[dict[str, str]] = {}
    #: chain depth for the deep-read case (moby uses 128 for overlay2)
    deep_chain: ClassVar[int] = 128
    #: the case groups this class runs (see :mod:`.groups`); None: all of them
    groups: ClassVar[Collection[str] | None] = None
    #: with ``groups``: one line saying where the other groups' cases are covered
    groups_why: ClassVar[str] = ""

    # ------------------------------------------------------------------ fixtures

    @pytest.fixture(scope="class")
    @classmethod
    def gd_backing(cls, request: pytest.FixtureRequest) -> Iterator[Backing]:
        yield from backing_or_skip(cls.backing)

    @pytest.fixture
    def store_root(self, gd_backing: Backing, request: pytest.FixtureRequest) -> Iterator[Path]:
        root = gd_backing.root / re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:80]
        root.mkdir()
        yield root

    @pytest.fixture
    def store_options(self, store_root: Path, gd_backing: Backing) -> Iterator[dict[str, str]]:
        """Driver options for this test's store: the backing's, fresh per-store storage's
        (a thin pool), and the class's own."""
        if gd_backing.per_store is None:
            yield {**gd_backing.options, **self.options}
            return
        with gd_backing.per_store(store_root) as extra:
            yield {**gd_backing.options, **extra, **self.options}

    @pytest.fixture
    def open_again(
        self, store_root: Path, store_options: dict[str, str]
    ) -> Iterator[Callable[[], LayerStore]]:
        opened: list[LayerStore] = []

        def opener() -> LayerStore:
            s: LayerStore | None = None
            try:
                s = open_store(store_root, self.driver, store_options)
            except DriverUnavailable as exc:
                if os.geteuid() == 0:
                    raise
                why = f"driver {self.driver} is unavailable to this user: {exc}"
            else:
                opened.append(s)
                why = f"driver {self.driver} declares Capabilities.needs_root"
            if s is None or s.driver.capabilities.needs_root:
                needs_root(why)  # skipped outside the except: no chained traceback
            assert s is not None  # root, or an unavailable driver skipped as non-root
            return s

        yield opener
        for s in opened:
            s.close()

    @pytest.fixture
    def store(self, open_again: Callable[[], LayerStore], store_root: Path) -> Iterator[LayerStore]:
        s = open_again()
        try:
            yield s
        finally:
            s.cleanup()
            removed = list(reversed(s.layers()))  # children were created after parents
            for layer_id in removed:
                s.remove(layer_id)
            assert s.layers() == []
            stored = s.driver.stored_layers()  # what `graphdriver check` reads
            kept = sorted(set(removed) & set(stored or ()))
            assert not kept, f"removed layers still have storage (stored_layers()): {kept}"
            # the store's reserve goes too: a class's stores share one filesystem, and a
            # hundred reserves would fill a small one (graphdriver.reserve)
            remove_tree(store_root / reserve.NAME)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def fill(store: LayerStore, layer_id: str, fn: Callable[[Path], object]) -> None:
        with store.mounted(layer_id) as root:
            fn(root)

    def base_with(
        self, store: LayerStore, fn: Callable[[Path], object], layer_id: str = "base"
    ) -> str:
        store.create(layer_id)
        self.fill(store, layer_id, fn)
        return layer_id

    @staticmethod
    def snap(store: LayerStore, layer_id: str) -> dict[str, Any]:
        with store.mounted(layer_id) as root:
            return snapshot(root)

    def roundtrip(self, store: LayerStore, layer_id: str, copy_id: str) -> tuple[int, bytes]:
        """diff *layer_id*, apply it on a fresh child of the same parent, return (size, tar)."""
        needs_root(APPLIES)
        with store.diff(layer_id) as stream:
            data = stream.read()
        parent = store.metadata(layer_id)["parent"]
        store.create(copy_id, parent if isinstance(parent, str) else None)
        result = store.apply(copy_id, io.BytesIO(data))
        assert result.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
        assert self.snap(store, copy_id) == self.snap(store, layer_id)
        return result.size, data
