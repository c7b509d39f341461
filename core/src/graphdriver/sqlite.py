"""graphdriver's one way to open a SQLite database: WAL, a busy timeout, versioned migrations,
and one boundary where SQLite's errors become one-line :class:`StoreError`.

Every catalogue (the layers' ``metadata.db``, the volumes' ``.metadata.db``, devmapper's
``devices.db``, the containerd proxy's ``snapshots.db``) opens through :func:`open_db` with a
:class:`Schema`: the statements that make a new database and, per version, what each version
adds to the one before. The version is kept in ``PRAGMA user_version``, or, for the databases
that predate this module, in the ``schema_version`` row of their ``meta`` table
(``version_in="meta"``), so that an existing database opens unchanged. A database newer than
the code is refused. Every statement runs through :class:`_Cursor`, so a full disk, an I/O
error or a lock held too long is one line that says what to do, whoever ran the statement.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import faults
from .errors import StoreError

log = logging.getLogger(__name__)

#: the room a new file must find for an I/O error on the database not to be a full filesystem
FULL_BELOW = 1 << 20
#: seconds a database opened held alone on a full disk waits for another command holding it so
ALONE_WAIT = 5.0
#: seconds a statement waits for another process's write transaction before giving up
BUSY_TIMEOUT = 60
#: whether a database the disk has no room to share (no ``-shm``) may be opened held alone:
#: only in a process that runs one command and exits (:func:`one_command`); a server that
#: kept such a connection would lock every other process out for its whole life
_alone_when_full = False
#: whether a database with no room for ``-wal`` may be read as no one changes it: only in a
#: one-command process whose command only reads (:func:`reads_only`)
_frozen_when_full = False


def one_command() -> None:
    """Say that this process runs one command and exits (the CLI, and each command server
    worker): on a full disk its databases are then still opened, held alone, to be read."""
    global _alone_when_full
    _alone_when_full = True


def reads_only() -> None:
    """Say that this process's one command only reads (``ls``, ``inspect``, ``check``
    without ``--repair``...): on a disk with no room for ``-wal`` its databases are then read
    as no one changes them (:func:`open_frozen`), and its store opens recover nothing."""
    global _frozen_when_full
    one_command()
    _frozen_when_full = True


def when_full() -> tuple[bool, bool]:
    """(:func:`one_command`, :func:`reads_only`) said of this process."""
    return _alone_when_full, _frozen_when_full


def check_hint(path: Path) -> str:
    """The command that diagnoses the store whose database is *path* (``<root>/<driver>/...``)."""
    return f"graphdriver --root {path.parent.parent} --driver {path.parent.name} check"


def sqlite_error(exc: sqlite3.Error | OSError, where: str, hint: str | None = None) -> StoreError:
    """Turn a SQLite failure on the database *where* into a one-line :class:`StoreError`;
    *hint* is the command that diagnoses it (default: :func:`check_hint`)."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    path = Path(where)
    hint = hint or check_hint(path)
    if name == "SQLITE_FULL" or code in (errno.ENOSPC, errno.EDQUOT) or _is_full(path, name):
        return full_error(exc, where)
    if name.startswith("SQLITE_IOERR") or code == errno.EIO:
        return StoreError(
            f"I/O error on {where} ({exc}): the disk or filesystem is failing; look at "
            f"`dmesg`, then run `{hint}`",
            errno_=errno.EIO,
        )
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        if _no_room(path):  # a one-command process holds it alone (open_db)
            what = (
                f"the filesystem holding it is full, and a command reading it meanwhile holds "
                f"it alone: free space there, or wait for that command (`fuser -v {where}`), "
                f"and run the command again"
            )
        else:
            what = f"find it with `fuser -v {where}` and run the command again once it is done"
        return StoreError(
            f"{where} stayed locked by another process for {BUSY_TIMEOUT} s ({exc}); {what}",
            errno_=errno.EBUSY,
        )
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return StoreError(f"{where} is damaged ({exc}); run `{hint}`")
    if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM")):
        return StoreError(
            f"cannot write {where} ({exc}): is its filesystem mounted read-only, or are you "
            f"not root?",
            errno_=errno.EACCES,
        )
    return StoreError(f"metadata database {where}: {exc}")


def full_error(exc: sqlite3.Error | OSError, where: str) -> StoreError:
    """The one line for a database whose filesystem is full."""
    return StoreError(
        f"the filesystem holding {where} is full ({exc}); nothing was recorded: free "
        f"space there and run the command again",
        errno_=errno.ENOSPC,
    )


#: what a read of a database as no one changes it (:mod:`.sqlite_readonly`) meets where it was
#: changed meanwhile (space freed, another command's checkpoint): never proof of damage
_TORN = ("SQLITE_CORRUPT", "SQLITE_NOTADB")


def frozen_error(where: str, write: bool) -> StoreError:
    """The "full" line of a database read as no one changes it, on a disk with no room for
    its ``-wal`` (:mod:`.sqlite_readonly`): for a write, or for what such a read cannot judge
    (damage, or a change made meanwhile)."""
    why = "no room for its -wal" if write else "no room for its -wal: read without its locks"
    return full_error(sqlite3.OperationalError(why), where)


def unreadable(exc: BaseException) -> bool:
    """Whether a StoreError from :func:`open_db` is a file that is not (or no longer) SQLite."""
    if getattr(exc, "errno", None) == errno.ENOSPC:  # (a full disk's read: frozen_error)
        return False
    name = getattr(exc.__cause__, "sqlite_errorname", "") or ""
    return name.startswith(_TORN)


def _is_full(path: Path, name: str) -> bool:
    """Whether an I/O error is a full filesystem: SQLite reports one that stops its shared
    memory file from growing (WAL) as SQLITE_IOERR_SHMSIZE or another IOERR, not as FULL,
    and one with no room for a new file (a full XFS has no free inode for ``-wal``) as
    SQLITE_CANTOPEN."""
    return name.startswith(("SQLITE_IOERR", "SQLITE_CANTOPEN")) and _no_room(path)


def _no_room(path: Path, size: int = FULL_BELOW) -> bool:
    """Whether the filesystem of *path* has no room for a new file of *size* bytes beside
    it (0: for a name), tried as this process (root may write ext4's reserved blocks; a disk
    may be out of inodes, or btrfs of metadata space, with blocks free): a named file (what
    SQLite makes; btrfs found room for an unnamed O_TMPFILE one with its metadata full),
    unlinked at once, written, gone at its close; where none can be made for another reason,
    the free blocks statvfs counts."""
    probe = path.parent / f".room-probe.{os.getpid()}.{os.urandom(4).hex()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        try:
            os.unlink(probe)
        except OSError:
            os.close(fd)
            raise
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        try:
            st = os.statvfs(path.parent)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < FULL_BELOW
    try:
        if size:
            os.write(fd, bytes(size))
    except OSError as exc:
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    finally:
        os.close(fd)
    return False


class _Cursor(sqlite3.Cursor):
    """A cursor whose SQLite errors are :class:`StoreError`."""

    connection: _Connection

    def _fail(self, exc: sqlite3.Error) -> StoreError:
        name = getattr(exc, "sqlite_errorname", "") or ""
        if self.connection.frozen and name.startswith(("SQLITE_READONLY", *_TORN)):
            return frozen_error(self.connection.where, write=name.startswith("SQLITE_READONLY"))
        return sqlite_error(exc, self.connection.where, self.connection.hint)

    def execute(self, sql: str, parameters: Any = (), /) -> _Cursor:
        try:
            return super().execute(sql, parameters)
        except sqlite3.Error as exc:
            raise self._fail(exc) from exc

    def fetchone(self) -> Any:
        try:
            return super().fetchone()
        except sqlite3.Error as exc:
            raise self._fail(exc) from exc

    def fetchall(self) -> list[Any]:
        try:
            return super().fetchall()
        except sqlite3.Error as exc:
            raise self._fail(exc) from exc

    def __next__(self) -> Any:
        try:
            return super().__next__()
        except sqlite3.Error as exc:
            raise self._fail(exc) from exc


class _Connection(sqlite3.Connection):
    """A connection whose statements run through :class:`_Cursor`."""

    def __init__(self, database: str | Path, *args: Any, **kwargs: Any) -> None:
        super().__init__(database, *args, **kwargs)
        self.where = str(database)
        self.hint: str | None = None
        #: read as a file no one changes, on a full disk (:func:`open_frozen`)
        self.frozen = False

    def cursor(self, factory: Any = _Cursor) -> Any:
        return super().cursor(factory)

    def execute(self, sql: str, parameters: Any = (), /) -> _Cursor:
        cur: _Cursor = self.cursor()
        return cur.execute(sql, parameters)


def uri(path: Path, query: str) -> str:
    """*path* as an SQLite URI with *query* (``immutable=1``, ``mode=ro``)."""
    return f"{path.absolute().as_uri()}?{query}"


def connect(
    path: Path, *, timeout: float = BUSY_TIMEOUT, hint: str | None = None, frozen: bool = False
) -> sqlite3.Connection:
    """An autocommit connection (``isolation_level=None``) to *path*, rows as ``sqlite3.Row``,
    whose errors are :class:`StoreError` (naming *hint*, the command that diagnoses it);
    *frozen*: read as a file no one changes (:func:`open_frozen`)."""
    try:
        db = sqlite3.connect(
            uri(path, "immutable=1") if frozen else path,
            isolation_level=None,
            timeout=timeout,
            check_same_thread=False,
            factory=_Connection,
            uri=frozen,
        )
    except sqlite3.Error as exc:
        raise sqlite_error(exc, str(path), hint) from exc
    db.where, db.hint, db.frozen = str(path), hint, frozen
    db.row_factory = sqlite3.Row
    return db


def close_checkpointed(db: sqlite3.Connection) -> None:
    """Close *db* with its WAL written into the database file and emptied, even if another
    connection is open (which a plain close would leave it to): for a database that is then
    renamed as one file. A checkpoint another connection keeps from finishing is an error."""
    busy = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
    if busy:
        raise StoreError(
            f"{getattr(db, 'where', 'database')}: its WAL could not be emptied "
            f"(another process has it open); try again"
        )
    db.close()


def nocow_on_btrfs(path: Path) -> None:
    """On btrfs, create the database *path* (if new) and its ``-wal`` and ``-shm`` (if absent;
    SQLite removes both at the last close) no-copy-on-write, before SQLite opens them.

    SQLite maps ``-shm`` into memory and writes its pages in place. On a copy-on-write
    filesystem every such write needs a free block, and on a full btrfs the kernel kills the
    process with SIGBUS (no message, exit 135), in whatever command touches the database
    next, even ``ls``, until space is freed by hand. A no-copy-on-write file rewrites its
    blocks in place: a full disk is then SQLite's one-line "full" error. That needs a kernel
    with btrfs's 2025 fix for memory-mapped writes into no-copy-on-write files on a full
    disk (6.17; the CI machine runs 6.18); on older ones the rollback freeing a failed
    layer's blocks before the database is written is what keeps an apply that fills the
    disk from SIGBUS. Such files have no btrfs checksums (``check`` runs SQLite's own
    ``PRAGMA integrity_check``).

    Best effort: a file that exists is left as it is (a database made before keeps
    copy-on-write; so does a ``-shm`` another process's last close removes between this
    and SQLite's open, which then makes it anew), and a refusal leaves SQLite to make the
    file as it would."""
    from .linux.fs import BTRFS_MAGIC, create_nocow, fs_magic  # ctypes: only on open

    try:
        if fs_magic(path.parent) != BTRFS_MAGIC:
            return
        for each in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            create_nocow(each)
    except OSError as exc:
        log.debug("%s stays copy-on-write: %s", path, exc)


def full_disk(exc: sqlite3.Error, path: Path) -> bool:
    """Whether SQLite's *exc* on the database *path* is its filesystem being full, for telling
    a full disk from damage: FULL, or an error opening or writing its files (IOERR, CANTOPEN;
    BUSY from a ``mode=ro`` connection that cannot make ``-shm``) while there is no room."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name == "SQLITE_FULL":
        return True
    return name.startswith(("SQLITE_IOERR", "SQLITE_CANTOPEN", "SQLITE_BUSY")) and _no_room(path)


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT on an autocommit connection (``isolation_level=None``),
    rolled back on any exception, a failed COMMIT (disk full) included; inside an open
    transaction it only yields."""
    if db.in_transaction:
        yield db
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        try:
            faults.point("metadata.commit")
        except OSError as exc:
            raise sqlite_error(exc, getattr(db, "where", "metadata")) from exc
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


@dataclass(frozen=True)
class Schema:
    """What a database holds, version by version.

    *create* makes a new database at *version*; ``migrations[n]`` turns version n-1 into n.
    *version_in* is where the version is kept: ``"user_version"`` (the pragma), or ``"meta"``
    (the ``schema_version`` row of table ``meta``, which *create* must make). *unversioned*
    is the version of a database that has tables but no version recorded (made before its
    code kept one: devmapper's ``devices.db`` would say 1); None refuses such a database.
    *label* names the database in messages.
    """

    version: int
    create: str
    migrations: Mapping[int, str] = field(default_factory=dict)
    version_in: Literal["user_version", "meta"] = "user_version"
    label: str = "database"
    unversioned: int | None = None


def _statements(script: str) -> list[str]:
    return [s for s in script.split(";") if s.strip()]


def read_version(db: sqlite3.Connection, path: Path, schema: Schema) -> int | None:
    """The database's schema version, or None when it is new (holds no table)."""
    if schema.version_in == "meta":
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name='meta'").fetchone():
            return None
        row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        version = int(row[0]) if row is not None else 0
    else:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version == 0 and not db.execute("SELECT 1 FROM sqlite_master").fetchone():
            return None
    if version == 0:
        if schema.unversioned is None:
            raise StoreError(
                f"{schema.label} {path} holds tables but no schema version: it was not made "
                f"by graphdriver; move it aside"
            )
        return schema.unversioned
    return version


def _write_version(db: sqlite3.Connection, schema: Schema, version: int) -> None:
    if schema.version_in == "meta":
        db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(version),))
    else:
        db.execute(f"PRAGMA user_version={int(version)}")


def migrate(db: sqlite3.Connection, path: Path, schema: Schema) -> bool:
    """Make the schema (a new database: True) or bring it to ``schema.version``, in one
    transaction; a database newer than *schema* is refused."""
    with transaction(db):
        version = read_version(db, path, schema)
        if version is None:
            for stmt in _statements(schema.create):
                db.execute(stmt)
            _write_version(db, schema, schema.version)
            return True
        if version > schema.version:
            raise newer_error(path, schema, version)
        for step in range(version + 1, schema.version + 1):
            for stmt in _statements(schema.migrations[step]):
                db.execute(stmt)
            _write_version(db, schema, step)
        return False


def newer_error(path: Path, schema: Schema, version: int) -> StoreError:
    return StoreError(
        f"{schema.label} {path} has schema version {version}, newer than this graphdriver "
        f"({schema.version}); upgrade graphdriver"
    )


def open_db(
    path: Path,
    schema: Schema,
    *,
    timeout: float = BUSY_TIMEOUT,
    hint: str | None = None,
) -> tuple[sqlite3.Connection, bool]:
    """Open *path* (WAL, ``synchronous=NORMAL``, foreign keys, *timeout* seconds of waiting
    for a writer), make or migrate its schema, and return (connection, whether it was made
    now). Errors are :class:`StoreError`; on one the connection is closed.

    On a full disk, where SQLite cannot make its shared-memory file (``-shm``), the database
    is opened again by a connection that holds it alone (``locking_mode=EXCLUSIVE``: that
    index then lives in memory), so that its records can still be read (``ls``, ``inspect``,
    ``check``); a write needs room for the WAL and is the same one-line "full" error. Only in
    a :func:`one_command` process: it holds the database until it exits. Where not even
    ``-wal`` can be made and none is left, a command that only reads reads the file as no one
    changes it (:func:`open_frozen`)."""
    nocow_on_btrfs(path)
    try:
        return _open_db(path, schema, timeout, hint, alone=False)
    except StoreError as exc:
        if not _alone_when_full or exc.errno != errno.ENOSPC or not _has_content(path):
            raise
    try:
        return _open_db(path, schema, min(timeout, ALONE_WAIT), hint, alone=True)
    except StoreError as exc:
        if _frozen_when_full and exc.errno == errno.ENOSPC and not os.path.lexists(f"{path}-wal"):
            return open_frozen(path, schema, hint), False
        if exc.errno != errno.EBUSY:
            raise
        raise StoreError(
            f"the filesystem holding {path} is full, and another command is reading the "
            f"database meanwhile, holding it alone; free space there and run the command again",
            errno_=errno.ENOSPC,
        ) from exc


def open_frozen(path: Path, schema: Schema, hint: str | None) -> sqlite3.Connection:
    """*path* read as a file no one changes, where :func:`open_db` found no room for ``-wal``
    and none there, for a command that only reads (:mod:`.sqlite_readonly` says why that
    holds, and what such a read may miss); its errors are :class:`StoreError`, a write and a
    page found torn the one-line "full" error (:func:`frozen_error`)."""
    db = connect(path, hint=hint, frozen=True)
    try:
        db.execute("PRAGMA query_only=ON")
        version = read_version(db, path, schema)
        if version is None or version < schema.version:  # a migration is a write
            raise full_error(sqlite3.OperationalError("no room to migrate it"), str(path))
        if version > schema.version:
            raise newer_error(path, schema, version)
    except BaseException:
        db.close()
        raise
    return db


def _has_content(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


def _open_db(
    path: Path, schema: Schema, timeout: float, hint: str | None, alone: bool
) -> tuple[sqlite3.Connection, bool]:
    db = connect(path, timeout=timeout, hint=hint)
    try:
        if alone:  # before the first read: no shared memory is ever made
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
        db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL survives a killed process; a power cut may lose the last commits
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        created = migrate(db, path, schema)
    except BaseException:
        db.close()
        raise
    return db, created
