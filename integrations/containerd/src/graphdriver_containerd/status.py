"""``graphdriver status`` on a store the containerd proxy serves: how many of its layers are
containerd's snapshots, of which kind, and whether a proxy runs. A hook plugin (entry point
group ``graphdriver``), loaded by every command: it imports nothing until ``status`` calls it
(sqlite3 then, never grpc)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import TYPE_CHECKING

from graphdriver import hookimpl

if TYPE_CHECKING:  # every command loads this plugin: what it needs is imported when used
    from collections.abc import Sequence
    from pathlib import Path

    from graphdriver import LayerStore


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
