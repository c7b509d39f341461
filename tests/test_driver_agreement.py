"""Every driver applies the same layer tars to the same layers: random chains of layers, each
a tar of what real tools write (new, rewritten and deleted files, whiteouts of names that are
and are not below, opaque directories and an opaque root, a directory replaced by a file and
back, hardlinks to a parent's files and to the tar's own, symlinks, fifos and devices, other
owners, setuid and sticky modes, xattrs, chmods, and entries below a symlink, which every
driver refuses), applied on vfs (a plain tree, where a whiteout deletes: the reference),
overlay (an upper over lower dirs, where the extractor writes overlayfs's whiteouts) and
btrfs (snapshots), then compared as a user sees them: the mounted tree, the changes, the
exact diff, the generated diff, and the refusals.

The tars name the directories they change, as Docker's do, in one half of the seeds, and only
some of them in the other (a directory left out is the parent's, or a plain 0755 one); one
seed in four applies without exact-diff records, so that generated diffs are compared. With
names of one or two of five letters, entries collide with the parent's and with each other
often. GRAPHDRIVER_AGREEMENT_SEEDS sets how many chains run (200, and a quarter as many
containers; 1,100 chains and 500 containers passed when the test was written). Overlayfs's own
differences, which Docker's overlay2 has too, are left out: see :func:`_seen` and the hardlink
step.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import shutil
import stat
import struct
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from graphdriver import LayerStore, open_store
from graphdriver.errors import GraphDriverError
from graphdriver.testing import Backing, backing_or_skip
from graphdriver.testing.trees import differences, snapshot

#: (driver, backing), the first the reference; vfs on XFS as overlay, as filesystems differ in
#: what a user sees (a truncate to the same size dates the file on ext4, not on XFS or btrfs)
DRIVERS = [("vfs", "loop-xfs"), ("overlay", "loop-xfs"), ("btrfs", "loop-btrfs")]
SEEDS = range(int(os.environ.get("GRAPHDRIVER_AGREEMENT_SEEDS", "200")))
LAYERS = 4
NAMES = "abcdx"
MTIME = 1_650_000_000
_DIR, _REG, _LNK, _SYM = tarfile.DIRTYPE, tarfile.REGTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE

#: name, type, data (bytes), link target (str) or mode (int), and owner, mode or xattrs
Member = tuple[str, bytes, object, dict[str, Any]]


@pytest.fixture(scope="module")
def backings() -> Iterator[dict[str, Backing]]:
    with contextlib.ExitStack() as stack:  # each unmounted and detached, even after a failure
        made = contextlib.contextmanager(backing_or_skip)
        yield {kind: stack.enter_context(made(kind)) for kind in {k: 0 for _, k in DRIVERS}}


@pytest.fixture
def stores(
    backings: dict[str, Backing], request: pytest.FixtureRequest
) -> Iterator[list[LayerStore]]:
    name = request.node.name.replace("[", "-").replace("]", "")
    roots = [backings[kind].root / f"{name}-{driver}" for driver, kind in DRIVERS]
    opened: list[LayerStore] = []
    try:
        for (driver, _), root in zip(DRIVERS, roots, strict=True):
            opened.append(open_store(root, driver))
        yield opened
    finally:
        for store in opened:
            store.cleanup()
            store.close()
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)


def _view(root: Path) -> dict[str, str]:
    """The layer's paths (relative, no leading slash), each with its kind: d, f, h (a regular
    file with other names) or l (any other)."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not (dirpath == str(root) and d == "lost+found")]
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            kind = "d" if stat.S_ISDIR(st.st_mode) else "l"
            if stat.S_ISREG(st.st_mode):
                kind = "f" if st.st_nlink == 1 else "h"
            out[os.path.relpath(path, root)] = kind
    return out


class _Layer:
    """The members of one layer tar, written as a tool would: a directory named before what it
    holds (every changed one when *named*, as Docker's diff does; new ones now and then else)."""

    def __init__(
        self, rng: random.Random, view: dict[str, str], named: bool, links: bool = True
    ) -> None:
        self.rng, self.view, self.named, self.links = rng, view, named, links
        self.members: list[Member] = []
        self.dirs_named: set[str] = set()

    def parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(len(parts)):
            d = "/".join(parts[: i + 1])
            if d in self.dirs_named:
                continue
            if self.named or (self.view.get(d) != "d" and self.rng.random() < 0.5):
                self.dirs_named.add(d)
                self.members.append((d, _DIR, 0o755, {}))

    def add(self, name: str, kind: bytes, value: object = None, **attrs: Any) -> None:
        self.parents(name)
        if kind == _DIR:
            self.dirs_named.add(name)
        self.members.append((name, kind, value, attrs))

    def dirs(self) -> list[str]:
        return ["", *sorted(p for p, k in self.view.items() if k == "d")]

    def somewhere(self) -> str:
        """A name in an existing directory or in a new one below it."""
        d = self.rng.choice(self.dirs())
        if self.rng.random() < 0.3:
            d = f"{d}/{self.rng.choice(NAMES)}" if d else self.rng.choice(NAMES)
        name = self.rng.choice(NAMES) + self.rng.choice(NAMES)
        return f"{d}/{name}" if d else name

    def existing(self, kinds: str = "dfhl") -> str | None:
        paths = sorted(p for p, k in self.view.items() if k in kinds)
        return self.rng.choice(paths) if paths else None

    def step(self) -> None:
        rng = self.rng
        op = rng.choice(
            ["file", "file", "rewrite", "delete", "delete", "nothing", "opaque", "dir-over-file",
             "file-over-dir", "remade", "hardlink", "symlink", "chmod", "root-opaque", "owned",
             "xattr", "special", "link-new", "below-link"]
        )  # fmt: skip
        data = rng.randbytes(rng.choice([0, 5, 300]))
        if op in ("hardlink", "link-new") and not self.links:
            op = "file"
        if op == "file" or (op == "rewrite" and not self.existing("fh")):
            self.add(self.somewhere(), _REG, data)
        elif op == "rewrite":
            self.add(self.existing("fh") or "", _REG, data)
        elif op in ("delete", "nothing"):
            path = self.existing() if op == "delete" else self.somewhere()
            if path:
                head, _, base = path.rpartition("/")
                self.add(f"{head}/.wh.{base}" if head else f".wh.{base}", _REG, b"")
        elif op == "opaque":
            d = rng.choice(self.dirs()[1:] or [self.somewhere()])
            self.add(f"{d}/.wh..wh..opq", _REG, b"")
            if rng.random() < 0.7:
                self.add(f"{d}/{rng.choice(NAMES)}", _REG, data)
        elif op == "root-opaque" and rng.random() < 0.3:
            self.add(".wh..wh..opq", _REG, b"")
        elif op == "dir-over-file" and (path := self.existing("fh")):
            self.add(path, _DIR, 0o755)
            self.add(f"{path}/{rng.choice(NAMES)}", _REG, data)
        elif op == "file-over-dir" and (path := self.existing("d")):
            self.add(path, _REG, data)
        elif op == "remade" and (path := self.existing("d")):
            head, _, base = path.rpartition("/")
            self.add(f"{head}/.wh.{base}" if head else f".wh.{base}", _REG, b"")
            if rng.random() < 0.5:
                self.add(path, _DIR, 0o755)
            self.add(f"{path}/{rng.choice(NAMES)}", _REG, data)
        # a file of one name: overlayfs copies up one name of a lower inode that has several,
        # which then has its own inode (as without index=on; Docker's overlay2 the same)
        elif op == "hardlink" and (target := self.existing("f")):
            self.add(self.somewhere(), _LNK, target)
        elif op == "symlink":
            self.add(self.somewhere(), _SYM, rng.choice(["a", "../x", "/etc/passwd"]))
        elif op == "chmod" and (path := self.existing("d")):
            self.add(path, _DIR, rng.choice([0o700, 0o1777, 0o2755]))
        elif op == "owned":
            self.add(self.somewhere(), _REG, data, uid=1000, gid=rng.choice([0, 1000]),
                     mode=rng.choice([0o644, 0o4755, 0o2711]))  # fmt: skip
        elif op == "xattr":
            self.add(self.somewhere(), _REG, data, xattrs={"user.k": rng.choice(["v", "w"])})
        elif op == "special":
            self.add(self.somewhere(), rng.choice([tarfile.FIFOTYPE, tarfile.CHRTYPE]))
        elif op == "link-new":  # to a file of this tar
            made = [m[0] for m in self.members if m[1] == _REG and "/.wh." not in f"/{m[0]}"]
            if made:
                self.add(self.somewhere(), _LNK, rng.choice(made))
        elif op == "below-link" and (path := self.existing("l")):
            self.add(f"{path}/{rng.choice(NAMES)}", _REG, data)  # refused on every driver

    def tar(self) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for name, kind, value, attrs in self.members:
                info = tarfile.TarInfo(name)
                info.type, info.mtime, info.mode = kind, MTIME, 0o644
                info.uid, info.gid = attrs.get("uid", 0), attrs.get("gid", 0)
                xattrs = attrs.get("xattrs", {})
                info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
                body = None
                if kind in (tarfile.FIFOTYPE, tarfile.CHRTYPE):
                    info.devmajor, info.devminor = (1, 3) if kind == tarfile.CHRTYPE else (0, 0)
                elif kind == _DIR:
                    assert isinstance(value, int)
                    info.mode = value
                elif kind in (_LNK, _SYM):
                    assert isinstance(value, str)
                    info.linkname = value
                else:
                    assert isinstance(value, bytes)
                    info.size, body = len(value), io.BytesIO(value)
                    info.mode = attrs.get("mode", 0o644)
                tf.addfile(info, body)
        return buf.getvalue()


def _apply(
    store: LayerStore, layer: str, parent: str | None, data: bytes
) -> tuple[str | None, str | None]:
    """Apply *data* as the new layer *layer*: the kind of error that refused it (or None),
    and why no exact-diff record was kept (None: one was, or records are off)."""
    store.create(layer, parent)
    try:
        result = store.apply(layer, io.BytesIO(data))
    except GraphDriverError as exc:
        assert store.changes(layer) == [], f"{store.name}: {layer} not rolled back"
        store.remove(layer)
        return type(exc).__name__, None
    return None, result.no_record


def _seen(store: LayerStore, layer: str) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The layer's tree and changes. A file's link count is not compared where the layer
    shows one name of it: a lower layer's inode keeps the count of its own names under
    overlayfs, whatever a later layer deleted (Docker's overlay2 shows the same)."""
    with store.mounted(layer) as root:
        tree = snapshot(root)
    groups: dict[object, int] = {}
    for entry in tree.values():
        group = entry.get("hardlink-group")
        groups[group] = groups.get(group, 0) + 1
    for entry in tree.values():
        if entry.get("hardlink-group") is not None and groups[entry["hardlink-group"]] == 1:
            del entry["hardlink-group"]
    changes = sorted((c.path, c.kind.name) for c in store.changes(layer))
    return tree, changes


def _diff(store: LayerStore, layer: str) -> tuple[bytes, bool]:
    out = io.BytesIO()
    result = store.export(layer, out)
    return out.getvalue(), result.exact


def _entries(data: bytes, dated: set[str]) -> list[tuple[object, ...]]:
    """A diff's entries, all they carry, but the mtime of a directory the applied tar did not
    date: one it does not name (not in *dated*), where what apply-diff did (a tree's entries
    removed, an overlay upper's copy made) dates it at the time of the apply or keeps the
    parent's, by driver, or one it named, then deleted and made again (the apply's time)."""
    out: list[tuple[object, ...]] = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for m in tf:
            pax = {k: v for k, v in m.pax_headers.items() if k != "mtime"}
            undated = m.isdir() and (m.name.rstrip("/") not in dated or m.mtime > MTIME)
            mtime = None if undated else m.mtime
            body = tf.extractfile(m).read() if m.isreg() else None  # type: ignore[union-attr]
            out.append((m.name, m.type, m.mode, m.uid, m.gid, mtime, m.linkname, body, pax))
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_random_layer_chains_are_alike_on_every_driver(
    stores: list[LayerStore], seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(seed)
    named = seed % 2 == 0
    if seed % 4 == 1:  # generated diffs, compared byte for byte
        monkeypatch.setenv("GRAPHDRIVER_TAR_SPLIT", "off")
    reference, *others = stores
    parent: str | None = None
    view: dict[str, str] = {}
    for n in range(LAYERS * 3):  # a refused layer is tried again with other members
        layer = _Layer(rng, view, named)
        for _ in range(rng.randint(1, 8)):
            layer.step()
        data = layer.tar()
        label = f"seed {seed}, layer {n} on {parent}: {[m[:2] for m in layer.members]}"
        refused, why = outcome = _apply(reference, f"l{n}", parent, data)
        for store in others:
            assert _apply(store, f"l{n}", parent, data) == outcome, f"{store.name}, {label}"
        if refused:
            continue
        want = _seen(reference, f"l{n}")
        want_diff, exact = _diff(reference, f"l{n}")
        # a record is kept unless records are off or the tar replaces what it wrote itself,
        # and then the diff is the applied tar
        assert why is None or "later in the same tar" in why, f"{why}, {label}"
        assert exact == (seed % 4 != 1 and why is None), f"exact {exact}, {label}"
        for store in others:
            got = _seen(store, f"l{n}")
            assert got[1] == want[1], f"{store.name} changes, {label}"
            assert got[0] == want[0], f"{store.name} tree, {label}"
            got_diff, got_exact = _diff(store, f"l{n}")
            assert got_exact == exact, f"{store.name} exact, {label}"
            if exact:
                assert got_diff == data, f"{store.name} exact diff, {label}"
            else:
                dated = {m[0] for m in layer.members if m[1] == _DIR}
                got_entries = _entries(got_diff, dated)
                assert got_entries == _entries(want_diff, dated), f"{store.name} diff, {label}"
        if exact:
            assert want_diff == data, label
        with reference.mounted(f"l{n}") as root:
            view = _view(root)
        parent = f"l{n}"
        if len(reference.layers()) >= LAYERS:
            break


# --- a container's writes ---------------------------------------------------------------------

Write = tuple[str, ...]


def _writes(rng: random.Random, view: dict[str, str], count: int) -> list[tuple[object, ...]]:
    """What a container does to its layer, as calls on paths below its root: writes, appends,
    deletes (a file, a directory's whole tree), mkdir, renames of files, chmod, chown,
    symlinks, hardlinks, xattrs and truncates, on the parent's names and on new ones."""
    paths = sorted(view)
    dirs = ["", *sorted(p for p, k in view.items() if k == "d")]
    files = sorted(p for p, k in view.items() if k in "fh")

    def new() -> str:
        d = rng.choice(dirs)
        name = rng.choice(NAMES) + rng.choice(NAMES) + rng.choice("123")
        return f"{d}/{name}" if d else name

    out: list[tuple[object, ...]] = []
    for _ in range(count):
        op = rng.choice(
            ["write", "write", "append", "unlink", "rmtree", "mkdir", "rename", "chmod", "chown",
             "symlink", "link", "xattr", "truncate"]
        )  # fmt: skip
        some = rng.choice(paths) if paths else new()
        some_file = rng.choice(files) if files else new()
        data = rng.randbytes(rng.choice([0, 7, 500]))
        if op == "write":
            out.append(("write", rng.choice([new(), some_file]), data))
        elif op == "append":
            out.append(("append", some_file, data))
        elif op in ("unlink", "rmtree", "chmod", "chown", "xattr"):
            value = {"chmod": rng.choice([0o600, 0o755, 0o4755]), "chown": 1000}.get(op, b"v")
            out.append((op, some, value))
        elif op == "mkdir":
            out.append(("mkdir", new()))
        elif op == "rename":  # files only: overlayfs refuses a lower directory (EXDEV)
            out.append(("rename", some_file, rng.choice([new(), some_file])))
        elif op == "symlink":
            out.append(("symlink", new(), rng.choice(["x", "../a"])))
        elif op == "link":  # a file of one name (see the hardlink step of _Layer)
            one = sorted(p for p, k in view.items() if k == "f")
            if one:
                out.append(("link", rng.choice(one), new()))
        elif op == "truncate":
            out.append(("truncate", some_file, rng.choice([0, 3, 4096])))
    return out


def _through_symlink(root: Path, path: str) -> bool:
    """Whether *path* below *root*, or a directory above it, is a symlink: a call there is not
    made, lest it follow a link out of the layer (to the host's /etc/passwd, say)."""
    at = root
    for part in path.split("/"):
        at = at / part
        if at.is_symlink():
            return True
    return False


def _do(root: Path, call: tuple[object, ...]) -> int:
    """Run one of :func:`_writes`'s calls below *root*; 0, the errno it failed with, or -1
    where it would go through a symlink (the same on every driver)."""
    op, path, *args = call
    p = root / str(path)
    if op not in ("unlink", "rmtree", "rename", "symlink") and _through_symlink(root, str(path)):
        return -1
    try:
        if op == "write":
            p.write_bytes(args[0])  # type: ignore[arg-type]
        elif op == "append":
            with open(p, "ab") as f:
                f.write(args[0])  # type: ignore[arg-type]
        elif op == "unlink":
            os.unlink(p)
        elif op == "rmtree":  # (3.11's rmtree opens a fifo before it looks: it would block)
            shutil.rmtree(p) if stat.S_ISDIR(os.lstat(p).st_mode) else os.unlink(p)
        elif op == "mkdir":
            os.mkdir(p)
        elif op == "rename":
            os.rename(p, root / str(args[0]))
        elif op == "chmod":
            os.chmod(p, args[0])  # type: ignore[arg-type]
        elif op == "chown":
            os.chown(p, args[0], args[0], follow_symlinks=False)  # type: ignore[arg-type]
        elif op == "symlink":
            os.symlink(str(args[0]), p)
        elif op == "link":
            os.link(p, root / str(args[0]), follow_symlinks=False)
        elif op == "xattr":
            os.setxattr(p, "user.c", args[0], follow_symlinks=False)  # type: ignore[arg-type]
        elif op == "truncate":
            os.truncate(p, args[0])  # type: ignore[arg-type]
    except OSError as exc:
        return exc.errno or -2
    return 0


@pytest.mark.parametrize("seed", range(len(SEEDS) // 4))
def test_random_container_writes_diff_alike_on_every_driver(
    stores: list[LayerStore], seed: int
) -> None:
    """A container layer written through its mount, on an image of two random layers: every
    call succeeds or fails alike, and the tree, the changes and the diff (its entries, times
    aside: each driver's calls ran at their own time) are the same on every driver. The
    image has no file of several names: overlayfs copies up the one name written to, and the
    others show the old file (as without index=on; Docker's overlay2 the same)."""
    rng = random.Random(10_000 + seed)
    view: dict[str, str] = {}
    parent: str | None = None
    for n in range(2):
        layer = _Layer(rng, view, named=True, links=False)
        for _ in range(rng.randint(3, 10)):
            layer.step()
        data = layer.tar()
        applied = {_apply(store, f"l{n}", parent, data) for store in stores}
        assert len(applied) == 1, applied
        if applied.pop()[0] is not None:
            continue
        with stores[0].mounted(f"l{n}") as root:
            view = _view(root)
        parent = f"l{n}"
    calls = _writes(rng, view, rng.randint(1, 12))
    outcomes, seen, entries = [], [], []
    for store in stores:
        store.create_rw("c", parent)
        with store.mounted("c") as root:
            outcomes.append([_do(root, call) for call in calls])
        tree, changes = _seen(store, "c")
        for entry in tree.values():
            entry.pop("mtime", None)
        seen.append((tree, changes))
        diff, exact = _diff(store, "c")
        assert not exact
        entries.append([e[:5] + e[6:] for e in _entries(diff, set())])
    for store, outcome, got, got_entries in zip(stores, outcomes, seen, entries, strict=True):
        label = f"{store.name}, seed {seed}: {[c[:2] for c in calls]}"
        assert outcome == outcomes[0], label
        only = sorted(set(got[1]) - set(seen[0][1])), sorted(set(seen[0][1]) - set(got[1]))
        assert got[1] == seen[0][1], f"changes only here, only on vfs: {only}, {label}"
        assert got[0] == seen[0][0], f"tree {differences(seen[0][0], got[0])}, {label}"
        assert got_entries == entries[0], f"diff, {label}"


def _acl(*entries: tuple[int, int, int]) -> bytes:
    """A POSIX ACL as its ``system.posix_acl_*`` xattr holds it: (tag, perm, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


#: owner rwx, user 1234 rwx, group r-x, mask rwx, other r-x
ACL = _acl((1, 7, 0xFFFFFFFF), (2, 7, 1234), (4, 5, 0xFFFFFFFF), (0x10, 7, 0xFFFFFFFF),
           (0x20, 5, 0xFFFFFFFF))  # fmt: skip


def test_an_acl_diffs_alike_on_xfs_and_ext4() -> None:
    """A file and a directory given POSIX ACLs in a container diff to the same bytes on XFS
    and on ext4: XFS lists its on-disk ACLs to root as ``trusted.SGI_ACL_FILE`` and
    ``trusted.SGI_ACL_DEFAULT`` too, and they went into the tar. A tar that carries those
    names (GNU tar's ``--xattrs-include='*'`` on XFS) applies without them."""
    tars = []
    for fstype in ("xfs", "ext4"):
        for backing in backing_or_skip(f"loop-{fstype}"):
            with open_store(backing.root / "store", "vfs") as store:
                store.create("c", rw=True)
                with store.mounted("c") as root:
                    (root / "f").write_bytes(b"f")
                    (root / "d").mkdir()
                    os.setxattr(root / "f", "system.posix_acl_access", ACL)
                    os.setxattr(root / "d", "system.posix_acl_default", ACL)
                    for path in (root / "f", root / "d", root):
                        os.utime(path, ns=(1_700_000_000_000_000_000,) * 2)
                out = io.BytesIO()
                store.write_diff("c", out)
                tars.append(out.getvalue())
                carried = _with_xattr(out.getvalue(), "f", "trusted.SGI_ACL_FILE", b"\0" * 16)
                store.create("applied")
                store.apply_diff("applied", io.BytesIO(carried))
                with store.mounted("applied") as root:  # (XFS's own is there on XFS)
                    assert os.getxattr(root / "f", "system.posix_acl_access") == ACL
                    if fstype != "xfs":
                        assert "trusted.SGI_ACL_FILE" not in os.listxattr(root / "f")
    with tarfile.open(fileobj=io.BytesIO(tars[0])) as tar:
        keys = {m.name: sorted(k for k in m.pax_headers if k.startswith("SCHILY")) for m in tar}
    assert keys == {
        "d": ["SCHILY.xattr.system.posix_acl_default"],
        "f": ["SCHILY.xattr.system.posix_acl_access"],
    }
    assert tars[0] == tars[1]


def _with_xattr(tar: bytes, name: str, key: str, value: bytes) -> bytes:
    """*tar* with *name*'s entry carrying one more xattr."""
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(tar)) as src,
        tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as dst,
    ):
        for member in src:
            if member.name == name:
                member.pax_headers = {
                    **member.pax_headers,
                    f"SCHILY.xattr.{key}": value.decode("latin-1"),
                }
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    return out.getvalue()
