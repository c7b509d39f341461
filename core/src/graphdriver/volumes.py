"""Volumes: directories that live outside any layer and outlive the containers that use them.

The layout is Docker's: ``<root>/volumes/<name>/_data`` for the ``local`` driver, and the
catalogue in ``<root>/volumes/.metadata.db`` (SQLite, WAL). Volumes belong to the root, not to
one layer driver, so ``volume ls`` needs no storage driver and containers of any driver under
the root can share them. Volume drivers are plugins (entry point group
``graphdriver.volume_drivers``), ``local`` among them; the store keeps names, labels, options,
references and mount counts, so a driver only moves data.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import secrets
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from . import faults
from .errors import (
    AlreadyExists,
    DriverLoadError,
    GraphDriverError,
    InUse,
    InvalidOption,
    StoreError,
    VolumeNotFound,
    call_os,
    from_oserror,
)
from .linux.mount import is_mountpoint
from .locking import FileLock
from .metadata import transaction
from .plugins import entry_point_names, load_plugin

log = logging.getLogger(__name__)

VOLUME_DRIVER_GROUP = "graphdriver.volume_drivers"
DEFAULT_VOLUME_DRIVER = "local"


class VolumeDriver(ABC):
    """What a volume driver implements. Every call gets the volume's recorded options.

    ``home`` is a directory of the driver's own (``<root>/volumes/_drivers/<name>``, made on
    first use); ``volumes_dir`` is ``<root>/volumes``, where ``local`` keeps its data.
    """

    name: ClassVar[str]
    #: option keys the driver accepts (``volume create --opt KEY=VALUE``) -> one line of help
    options: ClassVar[Mapping[str, str]] = {}

    def __init__(self, home: Path, volumes_dir: Path) -> None:
        self.home = home
        self.volumes_dir = volumes_dir

    def validate(self, options: Mapping[str, str]) -> None:
        """Raise InvalidOption for a combination of options the driver cannot use."""

    @abstractmethod
    def create(self, name: str, options: Mapping[str, str]) -> None:
        """Make the volume's storage (empty)."""

    @abstractmethod
    def remove(self, name: str, options: Mapping[str, str]) -> None:
        """Delete the volume's storage and data; a missing volume is not an error."""

    @abstractmethod
    def mount(self, name: str, options: Mapping[str, str]) -> Path:
        """Make the data reachable and return the directory to bind into containers.
        Called once for the first container that mounts it (the store counts)."""

    @abstractmethod
    def unmount(self, name: str, options: Mapping[str, str]) -> None:
        """Undo :meth:`mount`, after the last container unmounted the volume."""

    @abstractmethod
    def path(self, name: str, options: Mapping[str, str]) -> Path:
        """Where the data is (``Mountpoint`` in ``volume inspect``)."""

    def status(self, name: str, options: Mapping[str, str]) -> dict[str, str]:
        """Extra key/values for ``volume inspect``."""
        return {}


def installed_volume_drivers() -> dict[str, str]:
    """Installed volume driver names -> "module:Class"."""
    return dict(sorted(entry_point_names(VOLUME_DRIVER_GROUP).items()))


def load_volume_driver(name: str) -> type[VolumeDriver]:
    """Import the volume driver registered as *name*, like a storage driver."""
    cls = load_plugin(VOLUME_DRIVER_GROUP, name, installed_volume_drivers(), "volume")
    if not (isinstance(cls, type) and issubclass(cls, VolumeDriver)):
        raise DriverLoadError(f"volume driver {name!r} is not a graphdriver.VolumeDriver")
    return cls


_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE volumes (
    name        TEXT PRIMARY KEY,
    driver      TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('creating', 'ready', 'removing')),
    anonymous   INTEGER NOT NULL,
    created     REAL NOT NULL,
    labels      TEXT NOT NULL,
    options     TEXT NOT NULL,
    mount_count INTEGER NOT NULL DEFAULT 0,
    mountpoint  TEXT
);
CREATE TABLE refs (
    volume    TEXT NOT NULL REFERENCES volumes(name),
    container TEXT NOT NULL,
    mounted   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (volume, container)
);
"""
SCHEMA_VERSION = 2
#: what each schema version adds to the one before
_MIGRATIONS = {2: "ALTER TABLE refs ADD COLUMN mounted INTEGER NOT NULL DEFAULT 0"}


@dataclass
class VolumeRecord:
    name: str
    driver: str
    state: str
    anonymous: bool
    created: float
    labels: dict[str, str] = field(default_factory=dict)
    options: dict[str, str] = field(default_factory=dict)
    mount_count: int = 0
    mountpoint: str | None = None


def _record(row: sqlite3.Row) -> VolumeRecord:
    return VolumeRecord(
        name=row["name"],
        driver=row["driver"],
        state=row["state"],
        anonymous=bool(row["anonymous"]),
        created=row["created"],
        labels=json.loads(row["labels"]),
        options=json.loads(row["options"]),
        mount_count=row["mount_count"],
        mountpoint=row["mountpoint"],
    )


def anonymous_name() -> str:
    """A random 64-hex name, like Docker's anonymous volumes."""
    return secrets.token_hex(32)


class VolumeStore:
    """The volumes of one root: catalogue, references from containers, mount counts."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / "volumes"
        try:
            # 0700: a volume's data (and a hostile image's setuid files copied into it) is for
            # the containers it is bound into, not for every local user
            self.dir.mkdir(0o700, parents=True, exist_ok=True)
            os.chmod(self.dir, 0o700)
            self._lock = FileLock(self.dir / ".lock")
        except OSError as exc:
            raise from_oserror(exc, f"open volume store {self.dir}") from exc
        self._drivers: dict[str, VolumeDriver] = {}
        path = self.dir / ".metadata.db"
        try:
            self.db = sqlite3.connect(path, isolation_level=None, timeout=60)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            with self.locked(), transaction(self.db):
                if self.db.execute("SELECT 1 FROM sqlite_master WHERE name='meta'").fetchone():
                    row = self.db.execute(
                        "SELECT value FROM meta WHERE key='schema_version'"
                    ).fetchone()
                    version = int(row[0]) if row is not None else 1
                    if version > SCHEMA_VERSION:
                        raise StoreError(
                            f"volume metadata {path} is newer than this graphdriver; upgrade it"
                        )
                    for step in range(version + 1, SCHEMA_VERSION + 1):
                        self.db.execute(_MIGRATIONS[step])
                        self.db.execute(
                            "UPDATE meta SET value=? WHERE key='schema_version'", (str(step),)
                        )
                else:
                    for stmt in _SCHEMA.split(";"):
                        if stmt.strip():
                            self.db.execute(stmt)
                    self.db.execute(
                        "INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                    )
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"volume metadata {path} cannot be used: {exc}") from exc
        with self.locked():
            self._recover()

    def close(self) -> None:
        self.db.close()
        self._lock.close()

    def locked(self) -> contextlib.AbstractContextManager[None]:
        return self._lock.held()

    def _recover(self) -> None:
        """Finish or roll back what a killed process left half-done: a volume being created or
        removed goes; a driver mount nobody counts is undone. A volume that fails to recover is
        logged and retried at the next open; it never stops commands on other volumes."""
        for rec in self._all(include_in_flight=True):
            try:
                if rec.state != "ready":
                    log.warning(
                        "removing volume %s left %s by a process that died", rec.name, rec.state
                    )
                    self._destroy(rec)
                elif not rec.mount_count:
                    drv = self.driver(rec.driver)
                    if is_mountpoint(drv.path(rec.name, rec.options)):
                        log.warning("unmounting volume %s, left mounted by a process that died",
                                    rec.name)  # fmt: skip
                        call_os(drv.unmount, rec.name, rec.options, doing=f"unmount {rec.name}")
            except (GraphDriverError, OSError) as exc:
                log.warning("volume %s could not be recovered (retried at next open): %s",
                            rec.name, exc)  # fmt: skip

    # ------------------------------------------------------------------------------ drivers

    def driver(self, name: str) -> VolumeDriver:
        if name not in self._drivers:
            cls = load_volume_driver(name)
            self._drivers[name] = cls(self.dir / "_drivers" / name, self.dir)
        return self._drivers[name]

    def _check_options(self, driver: VolumeDriver, options: Mapping[str, str]) -> None:
        unknown = sorted(set(options) - set(driver.options))
        if unknown:
            raise InvalidOption(
                f"volume driver {driver.name!r} has no option {unknown[0]!r} (its options: "
                f"{', '.join(sorted(driver.options)) or 'none'})"
            )
        driver.validate(options)

    # ------------------------------------------------------------------------------ lookups

    def _all(self, *, include_in_flight: bool = False) -> list[VolumeRecord]:
        rows = self.db.execute("SELECT * FROM volumes ORDER BY created, name")
        recs = [_record(r) for r in rows]
        return recs if include_in_flight else [r for r in recs if r.state == "ready"]

    def find(self, name: str) -> VolumeRecord | None:
        row = self.db.execute(
            "SELECT * FROM volumes WHERE name=? AND state='ready'", (name,)
        ).fetchone()
        return None if row is None else _record(row)

    def get(self, name: str) -> VolumeRecord:
        from .store import validate_id

        validate_id(name, "volume name")
        rec = self.find(name)
        if rec is None:
            raise VolumeNotFound(f"volume {name!r} does not exist")
        return rec

    def all(self) -> list[VolumeRecord]:
        return self._all()

    def users(self, name: str) -> list[str]:
        """Containers (``<driver>:<name>``) that reference the volume."""
        rows = self.db.execute(
            "SELECT container FROM refs WHERE volume=? ORDER BY container", (name,)
        )
        return [r[0] for r in rows]

    def inspect(self, name: str) -> dict[str, Any]:
        rec = self.get(name)
        drv = self.driver(rec.driver)
        return {
            "Name": rec.name,
            "Driver": rec.driver,
            "Mountpoint": str(drv.path(rec.name, rec.options)),
            "CreatedAt": datetime.datetime.fromtimestamp(rec.created, datetime.UTC).isoformat(),
            "Labels": rec.labels,
            "Options": rec.options,
            "Scope": "local",
            "Anonymous": rec.anonymous,
            "UsedBy": [u.split(":", 1)[1] for u in self.users(name)],
            "MountCount": rec.mount_count,
            "Status": drv.status(rec.name, rec.options),
        }

    def size(self, name: str) -> int:
        """Bytes of file data in the volume (what prune reclaims), counted once per inode."""
        rec = self.get(name)
        top = self.driver(rec.driver).path(rec.name, rec.options)
        seen: set[tuple[int, int]] = set()
        total = 0
        for dirpath, _dirs, files in os.walk(top):
            for f in files:
                with contextlib.suppress(OSError):
                    st = os.lstat(os.path.join(dirpath, f))
                    if (st.st_dev, st.st_ino) not in seen:
                        seen.add((st.st_dev, st.st_ino))
                        total += st.st_blocks * 512
        return total

    # ---------------------------------------------------------------------------- lifecycle

    def create(
        self,
        name: str | None = None,
        driver: str = DEFAULT_VOLUME_DRIVER,
        *,
        labels: Mapping[str, str] | None = None,
        options: Mapping[str, str] | None = None,
        anonymous: bool | None = None,
    ) -> VolumeRecord:
        """Create a volume (a random 64-hex name, anonymous, when *name* is None). Creating
        an existing name with the same driver and options returns it, as Docker does."""
        from .store import validate_id

        anonymous = name is None if anonymous is None else anonymous
        name = anonymous_name() if name is None else validate_id(name, "volume name")
        options = dict(options or {})
        drv = self.driver(driver)
        self._check_options(drv, options)
        with self.locked():
            have = self.existing(name, driver, options)
            if have is not None:
                return have
            rec = VolumeRecord(
                name=name,
                driver=driver,
                state="creating",
                anonymous=anonymous,
                created=time.time(),
                labels=dict(labels or {}),
                options=options,
            )
            with transaction(self.db):
                self.db.execute(
                    "INSERT INTO volumes (name, driver, state, anonymous, created, labels, "
                    "options) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        name,
                        driver,
                        "creating",
                        int(anonymous),
                        rec.created,
                        json.dumps(rec.labels, sort_keys=True),
                        json.dumps(options, sort_keys=True),
                    ),
                )
            faults.point("volumes.create.after-record")
            try:
                call_os(drv.create, name, options, doing=f"create volume {name}")
                faults.point("volumes.create.after-driver")
            except BaseException:
                try:
                    self._destroy(rec)
                except Exception:  # the error that got us here is the one to report
                    log.exception("rolling back volume %s failed; retried at next open", name)
                raise
            with transaction(self.db):
                self.db.execute("UPDATE volumes SET state='ready' WHERE name=?", (name,))
            rec.state = "ready"
            return rec

    def existing(
        self, name: str, driver: str, options: Mapping[str, str] | None = None
    ) -> VolumeRecord | None:
        """The ready volume *name* if it has *driver* and *options*, None if there is no such
        name; AlreadyExists if the name is taken otherwise (or is being created or removed)."""
        have = self.db.execute("SELECT * FROM volumes WHERE name=?", (name,)).fetchone()
        if have is None:
            return None
        rec = _record(have)
        if rec.state == "ready" and rec.driver == driver and rec.options == dict(options or {}):
            return rec
        if rec.state != "ready":
            raise AlreadyExists(
                f"volume {name!r} is still {rec.state}, left so by an interrupted command; "
                f"it is finished at the next open (see the log)"
            )
        raise AlreadyExists(
            f"volume {name!r} already exists with driver {rec.driver!r} and options "
            f"{rec.options or '{}'}"
        )

    def _destroy(self, rec: VolumeRecord) -> None:
        """Remove the driver's data, then the record. Marked removing first, so a crash is
        finished at the next open; a driver that fails leaves a ready volume ready again."""
        drv = self.driver(rec.driver)  # a driver that cannot load refuses before anything
        with transaction(self.db):
            self.db.execute("UPDATE volumes SET state='removing' WHERE name=?", (rec.name,))
        faults.point("volumes.remove.after-mark")
        try:
            if rec.mount_count:
                with contextlib.suppress(GraphDriverError, OSError):
                    drv.unmount(rec.name, rec.options)
            call_os(drv.remove, rec.name, rec.options, doing=f"remove volume {rec.name}")
        except BaseException:
            if rec.state == "ready":
                with transaction(self.db):
                    self.db.execute(
                        "UPDATE volumes SET state='ready', mount_count=0, mountpoint=NULL "
                        "WHERE name=?",
                        (rec.name,),
                    )
            raise
        faults.point("volumes.remove.after-driver")
        with transaction(self.db):
            self.db.execute("DELETE FROM refs WHERE volume=?", (rec.name,))
            self.db.execute("DELETE FROM volumes WHERE name=?", (rec.name,))

    def remove(self, name: str, *, force: bool = False) -> None:
        """Delete a volume and its data. Refused while a container uses it, unless *force*;
        refused even then while a mounted container has it bound in."""
        with self.locked():
            rec = self.get(name)
            users = [u.split(":", 1)[1] for u in self.users(name)]
            if rec.mount_count:
                raise InUse(
                    f"volume {name!r} is mounted in container(s) {', '.join(users) or '?'}; "
                    f"unmount them first"
                )
            if users and not force:
                raise InUse(
                    f"volume {name!r} is in use by container(s) {', '.join(users)}; remove "
                    f"them first, or use -f"
                )
            self._destroy(rec)

    def prune(
        self, *, all_volumes: bool = False, labels: Mapping[str, str] | None = None
    ) -> list[tuple[str, int]]:
        """Remove volumes no container uses: anonymous ones, or all with *all_volumes*; only
        those carrying every label in *labels*. Returns (name, bytes reclaimed)."""
        removed = []
        with self.locked():
            for rec in self._all():
                if self.users(rec.name) or rec.mount_count:
                    continue
                if not (rec.anonymous or all_volumes):
                    continue
                if any(rec.labels.get(k) != v for k, v in (labels or {}).items()):
                    continue
                size = self.size(rec.name)
                self._destroy(rec)
                removed.append((rec.name, size))
        return removed

    # ---------------------------------------------------------------- references and mounts

    def add_ref(self, name: str, container: str) -> None:
        with transaction(self.db):
            self.db.execute(
                "INSERT OR IGNORE INTO refs (volume, container) VALUES (?, ?)", (name, container)
            )

    def drop_refs(self, container: str) -> list[str]:
        """Forget every reference of *container*; return the volumes it referenced."""
        names = [
            r[0] for r in self.db.execute("SELECT volume FROM refs WHERE container=?", (container,))
        ]
        with transaction(self.db):
            self.db.execute("DELETE FROM refs WHERE container=?", (container,))
        return names

    def _ref_mounted(self, name: str, container: str) -> bool:
        row = self.db.execute(
            "SELECT mounted FROM refs WHERE volume=? AND container=?", (name, container)
        ).fetchone()
        return bool(row and row[0])

    def mount(self, name: str, container: str) -> Path:
        """The directory to bind for *name* in *container*; the driver mounts it for the first
        container. Counted once per container, so repeating it (recovery, a second mount
        point of the same volume) never counts twice."""
        with self.locked():
            rec = self.get(name)
            drv = self.driver(rec.driver)
            if rec.mount_count and rec.mountpoint:
                path = rec.mountpoint
            else:
                path = str(call_os(drv.mount, name, rec.options, doing=f"mount volume {name}"))
            if self._ref_mounted(name, container):
                return Path(path)
            faults.point("volumes.mount.after-driver")
            with transaction(self.db):
                self.db.execute(
                    "INSERT OR REPLACE INTO refs (volume, container, mounted) VALUES (?, ?, 1)",
                    (name, container),
                )
                self.db.execute(
                    "UPDATE volumes SET mount_count=?, mountpoint=? WHERE name=?",
                    (rec.mount_count + 1, path, name),
                )
            return Path(path)

    def unmount(self, name: str, container: str) -> None:
        """Release *container*'s mount of *name* (nothing if it holds none); the last one asks
        the driver to unmount."""
        with self.locked():
            rec = self.find(name)
            if rec is None or not self._ref_mounted(name, container):
                return
            if rec.mount_count <= 1:
                drv = self.driver(rec.driver)
                call_os(drv.unmount, name, rec.options, doing=f"unmount volume {name}")
            with transaction(self.db):
                self.db.execute(
                    "UPDATE refs SET mounted=0 WHERE volume=? AND container=?", (name, container)
                )
                self.db.execute(
                    "UPDATE volumes SET mount_count=?, mountpoint=? WHERE name=?",
                    (
                        max(rec.mount_count - 1, 0),
                        rec.mountpoint if rec.mount_count > 1 else None,
                        name,
                    ),
                )

    def cleanup(self) -> None:
        """Unmount every volume the drivers mounted and zero the counts."""
        with self.locked():
            for rec in self._all():
                if rec.mount_count:
                    drv = self.driver(rec.driver)
                    call_os(drv.unmount, rec.name, rec.options, doing=f"unmount {rec.name}")
                    with transaction(self.db):
                        self.db.execute(
                            "UPDATE volumes SET mount_count=0, mountpoint=NULL WHERE name=?",
                            (rec.name,),
                        )
                        self.db.execute("UPDATE refs SET mounted=0 WHERE volume=?", (rec.name,))
