"""``graphdriver check``: find what is inconsistent in a store, and repair what is safe.

Like ``podman system check``. It reads the catalogue and the driver's storage directly (not
through :class:`~graphdriver.store.LayerStore`, whose opening would already fix some of it), with
the store's lock held, and reports one :class:`Problem` per finding:

======================  ==============================================  =====================
kind                    what                                            --repair
======================  ==============================================  =====================
database                integrity_check fails, empty, unreadable, lost  moved aside, rebuilt
cycle                   parents that loop                               no
dangling-parent         a parent without a record                       no
no-storage              a record whose storage is gone                  no (``rm`` it)
orphan-storage          storage without a record                        removed (see below)
mount-count             counted mounts vs /proc/self/mountinfo          counts fixed
in-flight               creating/applying/removing left behind          store recovery
container               its layer or image is gone                      row dropped (layer)
volume, volume-ref      missing volume; ref to a missing container      ref dropped
digest                  (--digests) diff sha256 differs from diff_id    no
driver                  the driver's own state (devmapper pool)         no
======================  ==============================================  =====================

Repair never deletes a layer that has a record, and removes orphaned storage only when the
catalogue can be trusted: not after a rebuild (then a layer without a record may simply be one
the rebuild could not place).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

from .check_rebuild import adopt, diagnose_db, has_records, rebuild
from .driver import Driver, KernelMounts
from .errors import ArchiveError, GraphDriverError, StoreError, call_os
from .linux.mount import mountinfo
from .locking import FileLock, LayerLocks
from .metadata import IN_FLIGHT, LayerRecord, Metadata
from .plugins import choose_driver, load_driver
from .recovery import layer_info
from .volume_records import VolumeCatalog, held_catalog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    """One inconsistency: its kind, what it concerns (layer, container...), and what is wrong."""

    kind: str
    subject: str
    what: str
    repairable: bool
    #: the other party, where there is one (the container of a volume-ref)
    other: str = ""

    def line(self) -> str:
        fix = "--repair fixes this" if self.repairable else "not repairable"
        return f"{self.kind} {self.subject}: {self.what} ({fix})"

    def done(self) -> Repair:
        """What repair did, once this problem is gone."""
        what = _DONE.get(self.kind, "fixed {kind} {subject}: {what}").format(**self.__dict__)
        return Repair(self.kind, self.subject, what)

    def as_json(self) -> dict[str, object]:
        return {**self.__dict__, "repaired": False}


@dataclass(frozen=True)
class Repair:
    """One thing ``--repair`` did."""

    kind: str
    subject: str
    what: str

    def line(self) -> str:
        return f"repaired: {self.what}"

    def as_json(self) -> dict[str, object]:
        return {**self.__dict__, "repairable": True, "repaired": True}


_DONE = {
    "orphan-storage": (
        "recorded the storage of {subject} as a layer again (label graphdriver.check); "
        "`graphdriver rm {subject}` deletes it"
    ),
    "mount-count": "set the mount count of {subject} to what is mounted ({what})",
    "in-flight": "rolled back {subject}, {what}",
    "container": "dropped container {subject}: {what}",
    "volume-ref": "dropped the reference to volume {subject} from {other}, which does not exist",
}


@dataclass
class Report:
    """What ``check`` found (after ``--repair``: what remains) and what repair did."""

    problems: list[Problem] = field(default_factory=list)
    repaired: list[Repair] = field(default_factory=list)


def check_store(
    root: Path,
    driver: str | None,
    options: Mapping[str, str],
    *,
    repair: bool = False,
    digests: bool = False,
) -> Report:
    """Check the store of *driver* under *root*; with *repair*, fix what is safe first."""
    name = driver or choose_driver(root)
    home = root / name
    if not home.is_dir():
        raise StoreError(f"there is no {name} store under {root}; check --root and --driver")
    checker = _Checker(root, home, load_driver(name), options)
    report = Report(problems=checker.scan())
    if repair:
        before = report.problems
        report.repaired = checker.repair(before)
        report.problems = checker.scan()
        fixed = [p for p in before if p not in report.problems and p.kind != "database"]
        report.repaired += [p.done() for p in fixed]
    if digests and not any(p.kind == "database" for p in report.problems):
        report.problems += checker.digests()
    return report


class _Checker:
    def __init__(
        self, root: Path, home: Path, driver_cls: type[Driver], options: Mapping[str, str]
    ) -> None:
        self.root = root
        self.home = home
        self.driver_cls = driver_cls
        self.options = options
        self.db_path = home / "metadata.db"

    @contextlib.contextmanager
    def _session(self) -> Iterator[tuple[Metadata, Driver]]:
        """The store's lock, its catalogue (no recovery) and a driver, for one pass."""
        lock = FileLock(self.home / "lock")
        try:
            with lock.held():
                driver = self.driver_cls(self.home, self.options)
                try:
                    meta = Metadata(self.db_path)
                    try:
                        yield meta, driver
                    finally:
                        meta.close()
                finally:
                    driver.close()
        finally:
            lock.close()

    # ------------------------------------------------------------------------------ scan

    def scan(self) -> list[Problem]:
        broken = diagnose_db(self.db_path)
        if broken is None and self._stored() and not has_records(self.db_path):
            # never "storage without a record" for every layer: that is a lost catalogue
            broken = (
                "the database has no layer records"
                if self.db_path.exists()
                else "the database is missing"
            )
        if broken is not None:
            return [self._database_problem(broken)]
        try:
            with self._session() as (meta, driver):
                return self._scan(meta, driver)
        except GraphDriverError as exc:
            return [Problem("driver", self.driver_cls.name, str(exc), False)]

    def _stored(self) -> Mapping[str, str | None] | None:
        """The driver's stored layers, for a store whose catalogue cannot be opened."""
        lock = FileLock(self.home / "lock")
        try:
            with lock.held():
                driver = self.driver_cls(self.home, self.options)
                try:
                    return driver.stored_layers()
                finally:
                    driver.close()
        except (GraphDriverError, OSError) as exc:
            log.warning("the %s driver cannot be used: %s", self.driver_cls.name, exc)
            return None
        finally:
            lock.close()

    def _database_problem(self, broken: str) -> Problem:
        stored = self._stored()
        left = (
            "; the driver cannot list its layers, so --repair cannot rebuild the records"
            if stored is None
            else f"; the driver has storage for {len(stored)} layer(s)"
        )
        return Problem("database", str(self.db_path), broken + left, stored is not None)

    def _scan(self, meta: Metadata, driver: Driver) -> list[Problem]:
        records = {r.id: r for r in meta.all()}
        problems = _parent_problems(records)
        live = LayerLocks(self.home)
        for rec in records.values():
            if rec.state in IN_FLIGHT and not live.busy(rec.id):  # busy: a live command's work
                problems.append(
                    Problem(
                        "in-flight",
                        rec.id,
                        f"left {rec.state} by a process that died",
                        True,
                    )
                )
        problems += self._storage_problems(meta, driver, records)
        problems += _mount_problems(driver, records)
        problems += self._container_problems(meta, driver, records)
        return problems

    def _storage_problems(
        self, meta: Metadata, driver: Driver, records: Mapping[str, LayerRecord]
    ) -> list[Problem]:
        stored = driver.stored_layers()
        if stored is None:
            return []
        problems = [
            Problem(
                "no-storage",
                rec.id,
                f"has a record but the {driver.name} driver has no storage for it (its files "
                f"are gone); drop the record with `graphdriver rm {rec.id}`",
                False,
            )
            for rec in records.values()
            if rec.state == "ready" and rec.id not in stored
        ]
        rebuilt = meta.get_meta("rebuilt")
        needed = {p for p in stored.values() if p} | {
            r.parent for r in records.values() if r.parent
        }
        for layer_id in sorted(set(stored) - set(records)):
            where = f"storage of {driver.name} layer {layer_id} under {self.home} has no record"
            if layer_id in needed:
                users = sorted(
                    [i for i, p in stored.items() if p == layer_id]
                    + [r.id for r in records.values() if r.parent == layer_id]
                )
                what = f"{where}, but layers are built on it ({', '.join(sorted(set(users)))})"
                problems.append(Problem("orphan-storage", layer_id, what, False))
            elif rebuilt:
                problems.append(
                    Problem(
                        "orphan-storage",
                        layer_id,
                        f"{where}; the records were rebuilt ({rebuilt}), so it is left for you "
                        f"to judge",
                        False,
                    )
                )
            elif self._mounted_in(layer_id):
                problems.append(Problem("orphan-storage", layer_id, f"{where}; in use", False))
            elif stored[layer_id] is not None and stored[layer_id] not in records:
                what = f"{where}, and neither has the layer it is built on ({stored[layer_id]})"
                problems.append(Problem("orphan-storage", layer_id, what, False))
            else:
                problems.append(Problem("orphan-storage", layer_id, where, True))
        return problems

    def _mounted_in(self, layer_id: str) -> bool:
        mark = f"/{layer_id}/"
        home = f"{self.home}/"
        return any(
            m.mountpoint.startswith(home) and mark in m.mountpoint + "/" for m in mountinfo()
        )

    def _container_problems(
        self, meta: Metadata, driver: Driver, records: Mapping[str, LayerRecord]
    ) -> list[Problem]:
        rows = sorted(meta.containers.all(), key=lambda r: str(r["name"]))
        problems = []
        with held_catalog(self.root) as volumes:
            for row in rows:
                problems += _container_row_problems(row, records, volumes)
            prefix = f"{driver.name}:"
            names = {row["name"] for row in rows}
            for volume, container in volumes.refs() if volumes else []:
                if container.startswith(prefix) and container[len(prefix) :] not in names:
                    what = (
                        f"is referenced by container {container[len(prefix) :]}, which does "
                        f"not exist"
                    )
                    problems.append(Problem("volume-ref", volume, what, True, container))
        return problems

    # ------------------------------------------------------------------------------ repair

    def repair(self, problems: list[Problem]) -> list[Repair]:
        """Fix what is safe; return what was done (problems that went away are added later)."""
        done: list[Repair] = []
        database = [p for p in problems if p.kind == "database"]
        if database:
            if not database[0].repairable:
                return done
            done += self._rebuild()
        if diagnose_db(self.db_path) is not None:
            return done
        self._recover()
        try:
            with self._session() as (meta, driver):
                self._fix(meta, driver, self._scan(meta, driver))
        except GraphDriverError as exc:
            log.warning("repair stopped: %s", exc)
        return done

    def _recover(self) -> None:
        """Open the store and its containers: their recovery rolls back what dead processes
        left in flight and matches mount counts to the kernel's mounts (of the layers
        counted or marked: :func:`_fix` unmounts the others' uncounted mounts)."""
        from .containers import ContainerStore
        from .store import open_store

        try:
            store = open_store(self.root, self.driver_cls.name, self.options)
        except GraphDriverError as exc:
            log.warning("the store's own recovery failed: %s", exc)
            return
        try:
            ContainerStore(store).close()
        except GraphDriverError as exc:
            log.warning("the containers' recovery failed: %s", exc)
        finally:
            store.close()

    def _fix(self, meta: Metadata, driver: Driver, problems: list[Problem]) -> None:
        stored = driver.stored_layers() or {}
        for p in (p for p in problems if p.repairable):
            if p.kind == "orphan-storage":
                # never deleted: a lost record (a restored or damaged database) must not cost
                # the user the layer's files; recorded again, the user decides with `rm`
                adopt(meta, p.subject, stored.get(p.subject))
            elif p.kind == "mount-count" and (rec := meta.get(p.subject)) is not None:
                if rec.mount_count:
                    with meta.transaction():
                        meta.update(p.subject, mount_count=0, mount_path=None)
                elif not LayerLocks(self.home).busy(rec.id):  # uncounted, unmarked, not read
                    call_os(driver.unmount, layer_info(rec), doing=f"unmount layer {rec.id}")
            elif p.kind == "container":
                meta.containers.delete(p.subject)
                self._drop_refs(None, f"{driver.name}:{p.subject}")
            elif p.kind == "volume-ref":
                self._drop_refs(p.subject, p.other)

    def _drop_refs(self, volume: str | None, container: str) -> None:
        """Forget the references *container* holds (to *volume*, or to any volume)."""
        with held_catalog(self.root) as volumes:
            if volumes is not None:
                volumes.drop_refs(container, volume)

    def _rebuild(self) -> list[Repair]:
        """Move a broken database aside and rebuild the records from what can be known."""
        lock = FileLock(self.home / "lock")
        try:
            with lock.held():
                driver = self.driver_cls(self.home, self.options)
                try:
                    stored = driver.stored_layers()
                    if stored is None:
                        return []
                    done = rebuild(self.db_path, stored, driver.name)
                    return [Repair("database", str(self.db_path), what) for what in done]
                finally:
                    driver.close()
        finally:
            lock.close()

    # ------------------------------------------------------------------------------ digests

    def digests(self) -> list[Problem]:
        """Each applied layer's diff, hashed, against its recorded diff_id."""
        from .store import open_store

        problems = []
        with open_store(self.root, self.driver_cls.name, self.options) as store:
            for layer_id in store.layers():
                rec = store.meta.get(layer_id)
                if rec is None or not rec.diff_id or rec.mount_count:
                    continue
                sink = _Sha256()
                try:
                    result = store.export(layer_id, cast("IO[bytes]", sink))
                except ArchiveError as exc:  # a replayed record that does not hash right
                    problems.append(Problem("digest", layer_id, str(exc), False))
                    continue
                got = f"sha256:{sink.hash.hexdigest()}"
                if got != rec.diff_id:
                    why = result.reason or "its files changed after apply-diff"
                    what = (
                        f"its diff is {got}, not the recorded diff_id {rec.diff_id}: the diff "
                        f"was generated, because {why}"
                    )
                    problems.append(Problem("digest", layer_id, what, False))
        return problems


class _Sha256(io.RawIOBase):
    """A write-only sink that hashes what is written."""

    def __init__(self) -> None:
        super().__init__()
        self.hash = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        view = memoryview(data)
        self.hash.update(view)
        return view.nbytes


def _container_row_problems(
    row: Mapping[str, Any], records: Mapping[str, LayerRecord], volumes: VolumeCatalog | None
) -> list[Problem]:
    """What is wrong with one container's row: in flight, its layers gone, volumes missing."""
    name = row["name"]
    problems = []
    if row["state"] != "ready":
        what = f"left {row['state']} by a process that died"
        problems.append(Problem("in-flight", f"container:{name}", what, True))
    layer = records.get(row["layer"])
    if layer is None or layer.state not in ("ready", *IN_FLIGHT):
        what = f"its read-write layer {row['layer']} is gone"
        problems.append(Problem("container", name, what, True))
    if row["image"] not in records:
        what = f"its image layer {row['image']} is gone"
        problems.append(Problem("container", name, what, False))
    for mp in row["mounts"]:
        if mp.type == "volume" and volumes and not volumes.find(mp.source, any_state=True):
            what = (
                f"uses volume {mp.source} at {mp.destination}, which does not exist; "
                f"recreate it with `graphdriver volume create {mp.source}`"
            )
            problems.append(Problem("volume", name, what, False))
    return problems


def _parent_problems(records: Mapping[str, LayerRecord]) -> list[Problem]:
    problems = []
    reported: set[str] = set()
    for rec in records.values():
        if rec.parent is not None and rec.parent not in records:
            what = f"its parent {rec.parent} has no record"
            problems.append(Problem("dangling-parent", rec.id, what, False))
        path: list[str] = []
        cur: LayerRecord | None = rec
        while cur is not None and cur.id not in path and cur.id not in reported:
            path.append(cur.id)
            cur = records.get(cur.parent) if cur.parent else None
        if cur is not None and cur.id in path:
            loop = path[path.index(cur.id) :]
            reported.update(loop)
            what = f"the parents loop: {' -> '.join([*loop, cur.id])}"
            problems.append(Problem("cycle", min(loop), what, False))
    return problems


def _mount_problems(driver: Driver, records: Mapping[str, LayerRecord]) -> list[Problem]:
    if not isinstance(driver, KernelMounts):
        return []
    problems = []
    for rec in records.values():
        if rec.state != "ready":
            continue
        mounted = driver.is_mounted(layer_info(rec))
        if mounted is None:
            continue
        if rec.mount_count and not mounted:
            what = f"counted as mounted {rec.mount_count} time(s) but not mounted"
            problems.append(Problem("mount-count", rec.id, what, True))
        elif not rec.mount_count and mounted:
            what = "mounted but not counted (left by a process that died)"
            problems.append(Problem("mount-count", rec.id, what, True))
    return problems
