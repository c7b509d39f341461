"""Rebuilding a store's catalogue after its database was damaged or lost (``check --repair``).

Rows that can still be read from the damaged database are kept; every other layer that has
storage is recorded from what the driver says its files need (:meth:`Driver.stored_layers`):
overlay names the parent its ``lower`` stack needs, vfs, btrfs and devmapper layers are complete
copies and are recorded without a parent. Rebuilt records carry the :data:`REBUILT_LABEL` label
and ``dirty`` (so ``apply-diff`` never resets them); the meta key ``rebuilt`` tells ``check``
not to delete storage without a record from then on. The new database is made beside the old
one and renamed into place, so a crash midway leaves the damaged one where it was.
:func:`diagnose_db` says what is wrong with a database, read-only.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import sqlite3
from collections.abc import Mapping
from pathlib import Path

from .metadata import LayerRecord, Metadata, refuse_reason
from .sqlite import close_checkpointed, frozen_error, full_disk, full_error
from .sqlite_readonly import connect_readonly, is_frozen

log = logging.getLogger(__name__)

#: label on records that ``check --repair`` rebuilt
REBUILT_LABEL = "graphdriver.check"


def rebuild(db_path: Path, stored: Mapping[str, str | None], name: str) -> list[str]:
    """Move the damaged database at *db_path* aside (if there is one) and put in its place one
    rebuilt from what can be known; return what was done. Call it with the store's lock held."""
    salvaged = _salvage(db_path)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    fresh = db_path.parent / "metadata.db.rebuild"
    made = (fresh, *_sidecars(fresh), Path(f"{fresh}.present"))
    for leftover in made:
        leftover.unlink(missing_ok=True)
    try:
        meta = Metadata(fresh)
        try:
            counts = _fill(meta, stored, salvaged, f"{stamp} by graphdriver check --repair")
            meta.set_meta("driver", name)
            close_checkpointed(meta.db)  # it is renamed below as one file: its WAL emptied
        finally:
            meta.close()
    except BaseException:  # a full disk, say: nothing of the rebuild is left behind
        for leftover in made:
            leftover.unlink(missing_ok=True)
        raise
    done: list[str] = []
    # the old database's WAL goes with it, or alone when the database is lost (a killed
    # process leaves one): a WAL beside the rebuilt file would be read into it
    old = [src for src in (db_path, *_sidecars(db_path)) if src.exists()]
    if old:
        aside = db_path.parent / f"metadata.db.corrupt-{stamp}"
        moved = [db_path.parent / (aside.name + src.name[len("metadata.db") :]) for src in old]
        for src, dst in zip(old, moved, strict=True):
            src.rename(dst)
        if db_path in old:
            done.append(f"moved the damaged database aside to {aside}")
        else:
            done.append(f"moved what the lost database left aside, as {', '.join(map(str, moved))}")
    fresh.rename(db_path)
    for leftover in (*_sidecars(fresh), Path(f"{fresh}.present")):
        leftover.unlink(missing_ok=True)
    what = (
        f"rebuilt the records of {counts[0]} layer(s) ({counts[1]} from the old database, "
        f"the rest from the driver's storage, labelled {REBUILT_LABEL}) and "
        f"{counts[2]} container(s)"
    )
    done.append(what)
    return done


def _sidecars(path: Path) -> list[Path]:
    return [path.with_name(path.name + s) for s in ("-wal", "-shm")]


def _salvage(path: Path) -> dict[str, list[sqlite3.Row]]:
    """The layer, container and exact-diff record rows that can still be read from a
    damaged database."""
    out: dict[str, list[sqlite3.Row]] = {"layers": [], "containers": [], "tar_split": []}
    if not path.exists() or path.stat().st_size == 0:
        return out
    try:
        db = connect_readonly(path)
    except sqlite3.Error:
        return out
    for table in out:
        with contextlib.suppress(sqlite3.Error):
            out[table] = db.execute(f"SELECT * FROM {table}").fetchall()  # noqa: S608
    db.close()
    return out


def _fill(
    meta: Metadata,
    stored: Mapping[str, str | None],
    salvaged: Mapping[str, list[sqlite3.Row]],
    when: str,
) -> tuple[int, int, int]:
    """Insert records for the stored layers, parents first: the salvaged row where there is
    one, else a record with the parent the storage needs (none for a complete copy).
    A layer whose needed parent is not stored is left out. Returns (layers, salvaged,
    containers)."""
    old = {r["id"]: r for r in salvaged["layers"] if r["id"] in stored}
    placed: set[str] = set()
    from_old = 0
    with meta.transaction():
        pending = sorted(stored)
        while pending:
            later = []
            for layer_id in pending:
                row = old.get(layer_id)
                parent = row["parent"] if row is not None else stored[layer_id]
                if stored[layer_id] is not None and stored[layer_id] != parent:
                    parent = stored[layer_id]  # the storage's own word wins
                if parent is not None and parent not in placed:
                    later.append(layer_id)
                    continue
                meta.insert(_rebuilt_record(layer_id, parent, row, when))
                from_old += row is not None
                placed.add(layer_id)
            if len(later) == len(pending):
                for layer_id in later:
                    log.warning(
                        "layer %s needs parent %s, which is gone", layer_id, stored[layer_id]
                    )
                break
            pending = later
        containers = [c for c in salvaged["containers"] if c["layer"] in placed]
        for c in containers:
            meta.containers.restore(c)
        # exact-diff records of the layers kept from the old database (their digest still
        # refuses one the damage changed)
        for r in salvaged["tar_split"]:
            row = old.get(r["layer"])
            if r["layer"] in placed and row is not None and row["diff_id"]:
                meta.set_tar_split(r["layer"], str(r["digest"]), bytes(r["data"]))
        meta.set_meta("rebuilt", when)
    return len(placed), from_old, len(containers)


def adopt(meta: Metadata, layer_id: str, parent: str | None) -> None:
    """Record storage that has no record as a layer (on *parent* when its files need it)."""
    when = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    with meta.transaction():
        meta.insert(
            _rebuilt_record(layer_id, parent, None, f"{when} by graphdriver check --repair")
        )


def _rebuilt_record(
    layer_id: str, parent: str | None, row: sqlite3.Row | None, when: str
) -> LayerRecord:
    if row is not None:
        labels = json.loads(row["labels"] or "{}")
        return LayerRecord(
            id=layer_id,
            parent=parent,
            state="ready",
            rw=bool(row["rw"]),
            size_limit=row["size_limit"],
            mount_label=row["mount_label"],
            created=row["created"],
            boundary_ns=row["boundary_ns"],
            dirty=bool(row["dirty"]),
            diff_id=row["diff_id"],
            unpacked_size=row["unpacked_size"],
            labels={**labels, REBUILT_LABEL: f"salvaged {when}"},
            volumes=json.loads(row["volumes"]) if "volumes" in row.keys() else [],  # noqa: SIM118
        )
    note = "parent unknown: diffs are against nothing" if parent is None else "from storage"
    return LayerRecord(
        id=layer_id,
        parent=parent,
        state="ready",
        rw=False,
        size_limit=None,
        mount_label=None,
        created=datetime.datetime.now(datetime.UTC).timestamp(),
        dirty=True,  # it has content: apply-diff must never reset it
        labels={REBUILT_LABEL: f"rebuilt {when}; {note}"},
    )


def has_records(path: Path) -> bool:
    """Whether the (healthy) database at *path* records any layer."""
    if not path.exists() or path.stat().st_size == 0:
        return False
    db = connect_readonly(path)
    try:
        return db.execute("SELECT 1 FROM layers LIMIT 1").fetchone() is not None
    except sqlite3.Error as exc:
        _not_full(exc, path, db)
        return False
    finally:
        db.close()


def diagnose_db(path: Path) -> str | None:
    """What is wrong with the database at *path* (None: healthy, or not made yet)."""
    why = refuse_reason(path)
    if why is not None:
        return f"the database {why}"
    if not path.exists() or path.stat().st_size == 0:  # not made yet (refuse_reason: no marker)
        return None
    try:
        db = connect_readonly(path)
    except sqlite3.Error as exc:
        _not_full(exc, path)
        return f"the database cannot be opened: {exc}"
    try:
        lines = [r[0] for r in db.execute("PRAGMA integrity_check(20)")]
        if lines == ["ok"]:
            db.execute("SELECT count(*) FROM layers").fetchone()
            return None
        why = "integrity_check: " + "; ".join(lines)
    except sqlite3.Error as exc:
        _not_full(exc, path, db)
        return f"the database is unreadable: {exc}"
    finally:
        db.close()
    if is_frozen(db):  # read without its locks: maybe another command's checkpoint half done
        raise frozen_error(str(path), write=False)
    return why


def _not_full(exc: sqlite3.Error, path: Path, db: sqlite3.Connection | None = None) -> None:
    """Raise the one-line "full" error if *exc* is a full disk, not a damaged database (which
    ``--repair`` would move aside and rebuild); so is any error of a connection *db* that
    reads the database as no one changes it, on a disk with no room for its ``-wal``."""
    if db is not None and is_frozen(db):
        raise frozen_error(str(path), write=False) from exc
    if full_disk(exc, path):
        raise full_error(exc, str(path)) from exc
