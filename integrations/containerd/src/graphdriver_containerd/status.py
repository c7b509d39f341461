"""What the core asks the containerd proxy's catalogue, from any process that opens a store it
serves: ``graphdriver status`` (how many of its layers are containerd's snapshots, of which
kind, and whether a proxy runs), and whether a layer may go (``graphdriver_releasing``: the
layer of a snapshot is containerd's, and so is the mount the proxy holds for one). A hook
plugin (entry point group ``graphdriver``), loaded by every command: it imports nothing until
a hook calls it (sqlite3 then, never grpc)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import TYPE_CHECKING

from graphdriver import hookimpl

if TYPE_CHECKING:  # every command loads this plugin: what it needs is imported when used
    import sqlite3
    from collections.abc import Iterator, Sequence
    from pathlib import Path

    from graphdriver import LayerStore

#: the label on every layer the proxy made (``graphdriver ls``/``inspect`` show it)
OWNER_LABEL = "graphdriver.containerd"
#: the roots this process serves as the proxy: what it releases is its own
_SERVED: set[str] = set()


def proxy_of(root: Path, on: bool = True) -> None:
    """Say that this process is (or, *on* False, no longer is) the proxy of the store at
    *root*: its own removals and unmounts are what containerd asked for."""
    (_SERVED.add if on else _SERVED.discard)(os.path.realpath(root))


def _proxy(lock: Path) -> str:
    """Who holds the serve lock: "running (pid N)" or "not running"."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return "not running"
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            return f"running (pid {pid})"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return "not running"
    finally:
        os.close(fd)


@contextlib.contextmanager
def _catalog(path: Path) -> Iterator[sqlite3.Connection]:
    """The catalogue, read-only; where SQLite cannot map its ``-shm`` (a full disk and no
    proxy) and no ``-wal`` holds changes the file lacks, read as a file no one changes (no
    proxy writes it then); else the error (the caller refuses: it cannot tell)."""
    import sqlite3

    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        db.execute("SELECT count(*) FROM snapshots")
    except sqlite3.Error:
        db.close()
        wal = path.with_name(path.name + "-wal")
        if wal.exists() and wal.stat().st_size:
            raise
        db = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    with contextlib.closing(db):
        yield db


@hookimpl
def graphdriver_status(store: LayerStore) -> Sequence[tuple[str, str]] | None:
    import sqlite3

    home = store.root / "containerd" / store.name
    db_path = home / "snapshots.db"
    if not db_path.exists():
        return None
    counts = {"committed": 0, "active": 0, "view": 0}
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
            for kind, count in db.execute(
                "SELECT kind, count(*) FROM snapshots WHERE state='ready' GROUP BY kind"
            ):
                counts[kind] = count
    except sqlite3.Error as exc:  # a full disk, say: no room for its -shm
        snapshots = f"unreadable ({exc})"
    else:
        detail = ", ".join(f"{n} {kind}" for kind, n in counts.items())
        snapshots = f"{sum(counts.values())} ({detail})"
    return [
        ("containerd Snapshots", snapshots),
        ("containerd Proxy", _proxy(home / "serve.lock")),
    ]


@hookimpl
def graphdriver_releasing(store: LayerStore, what: str, layer_id: str | None) -> None:
    """Refuse, but in the proxy itself: the removal of a snapshot's layer, and while a proxy
    runs (its references are counted then: it takes them again as it starts) the last
    unmount of the mount it holds for one (a container binds it: the proxy's Mounts would make
    it again, a second overlay on the same upper directory) and a cleanup of such mounts."""
    import sqlite3

    from graphdriver import LayerInUse

    db_path = store.root / "containerd" / store.name / "snapshots.db"
    if os.path.realpath(store.root) in _SERVED or not db_path.exists():
        return
    if layer_id is not None:
        labels = store.metadata(layer_id).get("labels")
        if not isinstance(labels, dict) or OWNER_LABEL not in labels:
            return  # not the proxy's
    if what != "remove" and _proxy(db_path.parent / "serve.lock") == "not running":
        # a stopped proxy mounts again, as it starts, what it holds and finds unmounted (as
        # after a reboot or a cleanup, which reset the counts: the one left may be a user's)
        return
    try:
        found = _in_the_way(db_path, what, layer_id)
    except sqlite3.Error as exc:  # unreadable: it may be in use
        of = f"layer {layer_id!r}" if layer_id else "the store"
        raise LayerInUse(f"cannot tell whether containerd's snapshots use {of}: {exc}") from None
    if not found:
        return
    shown = ", ".join(repr(key) for key in found[:3]) + (" ..." if len(found) > 3 else "")
    if what == "remove":
        raise LayerInUse(
            f"layer {layer_id!r} holds containerd snapshot {shown}: remove it through "
            f"containerd (`ctr snapshots rm`, or the image or container that uses it)"
        )
    raise LayerInUse(
        f"the containerd proxy holds the mount of snapshot {shown} (a container binds it); "
        f"containerd releases it when it removes the snapshot"
    )


def _in_the_way(db_path: Path, what: str, layer_id: str | None) -> list[str]:
    """The keys of the snapshots that keep *what* from happening to *layer_id*: any that
    names it, for a removal; for an unmount, one whose mount the proxy holds; for a cleanup,
    any whose held mount is a kernel mount (vfs and btrfs hold directories: nothing to
    unmount under a container)."""
    import json

    from graphdriver.toolkit import is_mountpoint

    held = "SELECT key, mounts FROM snapshots WHERE held=1 AND state!='preparing'"
    with _catalog(db_path) as db:
        if what == "remove":
            rows = db.execute("SELECT key, mounts FROM snapshots WHERE layer=?", (layer_id,))
        elif layer_id is not None:
            rows = db.execute(held + " AND layer=?", (layer_id,))
        else:
            return [
                key
                for key, mounts in db.execute(held)
                if any(is_mountpoint(source) for _, source, _ in json.loads(mounts or "[]"))
            ]
        return [key for key, _ in rows]
