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
import errno
import logging
import os
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from . import faults, recovery, reserve
from .errors import (
    AlreadyExists,
    GraphDriverError,
    InUse,
    InvalidOption,
    VolumeNotFound,
    call_os,
    from_oserror,
)
from .ids import validate_id
from .linux.mount import is_mountpoint
from .locking import FileLock
from .sqlite_readonly import is_frozen
from .volume_driver import (
    DEFAULT_VOLUME_DRIVER,
    VOLUME_DRIVER_GROUP,
    VolumeDriver,
    installed_volume_drivers,
    load_volume_driver,
)
from .volume_records import VolumeCatalog, VolumeRecord, anonymous_name, labels_match

__all__ = [
    "DEFAULT_VOLUME_DRIVER",
    "VOLUME_DRIVER_GROUP",
    "VolumeDriver",
    "VolumeRecord",
    "VolumeStore",
    "anonymous_name",
    "installed_volume_drivers",
    "load_volume_driver",
]

log = logging.getLogger(__name__)


class VolumeStore:
    """The volumes of one root: catalogue, references from containers, mount counts."""

    def __init__(self, root: Path, *, wait: float | None = None) -> None:
        """*wait* bounds, in seconds, how long a call waits for the volumes' lock (None: for
        ever), as ``open_store``'s does for the store's."""
        self.root = root
        self.dir = root / "volumes"
        try:
            # 0700: a volume's data (and a hostile image's setuid files copied into it) is for
            # the containers it is bound into, not for every local user
            self.dir.mkdir(0o700, parents=True, exist_ok=True)
            os.chmod(self.dir, 0o700)
            self._lock = FileLock(self.dir / ".lock", wait)
        except OSError as exc:
            raise from_oserror(exc, f"open volume store {self.dir}") from exc
        reserve.keep(root, self.dir)
        self._drivers: dict[str, VolumeDriver] = {}
        #: what recovery at this open could not fix, for ``status``
        self.recovery_failures: list[tuple[str, str]] = []
        try:
            with self.locked():
                #: the catalogue's rows (:mod:`.volume_records`)
                self.catalog = VolumeCatalog(self.dir / ".metadata.db")
        except BaseException:
            self._lock.close()
            raise
        if not is_frozen(self.catalog.db):  # (read as it was on a full disk: sqlite_readonly)
            with self.locked():
                self._recover()

    def close(self) -> None:
        self.catalog.close()
        self._lock.close()

    def locked(self) -> contextlib.AbstractContextManager[None]:
        return self._lock.held()

    def _recover(self) -> None:
        """Finish or roll back what a killed process left half-done: a volume being created or
        removed goes; a driver mount nobody counts is undone. A volume that fails to recover is
        logged and retried at the next open; it never stops commands on other volumes."""
        records = self.catalog.all(include_in_flight=True)
        self.recovery_failures = recovery.each(
            "volume", records, lambda rec: rec.name, self._recover_one
        )

    def _recover_one(self, rec: VolumeRecord) -> None:
        if rec.state != "ready":
            log.warning("removing volume %s left %s by a process that died", rec.name, rec.state)
            self._destroy(rec)
        elif not rec.mount_count:
            drv = self.driver(rec.driver)
            if is_mountpoint(drv.path(rec.name, rec.options)):
                log.warning("unmounting volume %s, left mounted by a process that died", rec.name)
                call_os(drv.unmount, rec.name, rec.options, doing=f"unmount {rec.name}")

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

    def find(self, name: str) -> VolumeRecord | None:
        return self.catalog.find(name)

    def get(self, name: str) -> VolumeRecord:
        validate_id(name, "volume name")
        rec = self.find(name)
        if rec is None:
            raise VolumeNotFound(f"volume {name!r} does not exist")
        return rec

    def all(self) -> list[VolumeRecord]:
        return self.catalog.all()

    def users(self, name: str) -> list[str]:
        """Containers (``<driver>:<name>``) that reference the volume."""
        return self.catalog.users(name)

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
        todo = [str(top)]  # a list, not os.walk (in 3.11 a call a level): a tree of any depth
        while todo:
            with contextlib.suppress(OSError), os.scandir(todo.pop()) as it:
                for entry in it:
                    with contextlib.suppress(OSError):
                        if entry.is_dir(follow_symlinks=False):
                            todo.append(entry.path)
                            continue
                        st = entry.stat(follow_symlinks=False)
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
        anonymous = name is None if anonymous is None else anonymous
        name = anonymous_name() if name is None else validate_id(name, "volume name")
        reserve.keep(self.root, self.dir)  # (a server opens once: made again here)
        options = dict(options or {})
        drv = self.driver(driver)
        self._check_options(drv, options)
        with self.locked():
            have = self.existing(name, driver, options)
            if have is not None:
                return have
            if drv.has_storage(name, options):  # (before a record could discard it)
                raise AlreadyExists(f"volume {name!r} has data without a record, left as it is")
            rec = VolumeRecord(
                name=name,
                driver=driver,
                state="creating",
                anonymous=anonymous,
                created=time.time(),
                labels=dict(labels or {}),
                options=options,
            )
            self.catalog.insert(rec)
            faults.point("volumes.create.after-record")
            try:
                call_os(drv.create, name, options, doing=f"create volume {name}")
                faults.point("volumes.create.after-driver")
            except BaseException as exc:
                if getattr(exc, "errno", None) == errno.EEXIST:
                    self.catalog.delete(name)  # the data was there: not this create's
                    raise AlreadyExists(
                        f"volume {name!r} has data without a record, left as it is ({exc})"
                    ) from exc
                try:
                    self._destroy(rec)
                except Exception:  # the error that got us here is the one to report
                    log.exception("rolling back volume %s failed; retried at next open", name)
                raise
            self.catalog.set_state(name, "ready")
            rec.state = "ready"
            return rec

    def existing(
        self, name: str, driver: str, options: Mapping[str, str] | None = None
    ) -> VolumeRecord | None:
        """The ready volume *name* if it has *driver* and *options*, None if there is no such
        name; AlreadyExists if the name is taken otherwise (or is being created or removed)."""
        rec = self.catalog.find(name, any_state=True)
        if rec is None:
            return None
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
        self.catalog.set_state(rec.name, "removing")
        faults.point("volumes.remove.after-mark")
        try:
            if rec.mount_count:
                with contextlib.suppress(GraphDriverError, OSError):
                    drv.unmount(rec.name, rec.options)
            call_os(drv.remove, rec.name, rec.options, doing=f"remove volume {rec.name}")
        except BaseException:
            if rec.state == "ready":
                self.catalog.set_ready_unmounted(rec.name)
            raise
        faults.point("volumes.remove.after-driver")
        self.catalog.delete(rec.name)

    def remove(self, name: str, *, force: bool = False) -> None:
        """Delete a volume and its data. Refused while a container uses it, unless *force*;
        refused even then while a mounted container has it bound in. On a full disk the
        store's reserve is given back first, to record it."""
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
            reserve.release_if_full(self.root, self.dir)
            self._destroy(rec)

    def prune(
        self, *, all_volumes: bool = False, labels: Mapping[str, str] | None = None
    ) -> list[tuple[str, int]]:
        """Remove volumes no container uses: anonymous ones, or all with *all_volumes*; only
        those carrying every label in *labels*. Returns (name, bytes reclaimed). On a full
        disk the store's reserve is given back first, to record it."""
        reserve.release_if_full(self.root, self.dir)
        removed = []
        with self.locked():
            for rec in self.catalog.all():
                if self.users(rec.name) or rec.mount_count:
                    continue
                if not (rec.anonymous or all_volumes) or not labels_match(rec, labels):
                    continue
                size = self.size(rec.name)
                self._destroy(rec)
                removed.append((rec.name, size))
        return removed

    # ---------------------------------------------------------------- references and mounts

    def add_ref(self, name: str, container: str) -> None:
        self.catalog.add_ref(name, container)

    def drop_refs(self, container: str) -> list[str]:
        """Forget every reference of *container*; return the volumes it referenced."""
        return self.catalog.drop_refs(container)

    def mount(self, name: str, container: str) -> Path:
        """The directory to bind for *name* in *container*; the driver mounts it for the first
        container. Counted once per container, so repeating it (recovery, a second mount
        point of the same volume) never counts twice."""
        with self.locked():
            rec = self.get(name)
            drv = self.driver(rec.driver)
            if rec.mount_count and rec.mountpoint and drv.mounted(name, rec.options) is False:
                log.warning("volume %s is counted as mounted but its mount is gone (a reboot?); "
                            "mounting it again", name)  # fmt: skip
                rec.mountpoint = None
            if rec.mount_count and rec.mountpoint:
                path = rec.mountpoint
            else:
                path = str(call_os(drv.mount, name, rec.options, doing=f"mount volume {name}"))
            if self.catalog.ref_mounted(name, container):
                return Path(path)
            faults.point("volumes.mount.after-driver")
            self.catalog.set_mounted(name, container, True, rec.mount_count + 1, path)
            return Path(path)

    def unmount(self, name: str, container: str) -> None:
        """Release *container*'s mount of *name* (nothing if it holds none); the last one asks
        the driver to unmount."""
        with self.locked():
            rec = self.find(name)
            if rec is None or not self.catalog.ref_mounted(name, container):
                return
            if rec.mount_count <= 1:
                drv = self.driver(rec.driver)
                call_os(drv.unmount, name, rec.options, doing=f"unmount volume {name}")
            self.catalog.set_mounted(
                name,
                container,
                False,
                max(rec.mount_count - 1, 0),
                rec.mountpoint if rec.mount_count > 1 else None,
            )

    def cleanup(self, holders: str, kept: Collection[str] = ()) -> None:
        """Release every mount that a holder whose name starts with *holders* still counts
        (one driver's containers: ``<driver>:``), but those of the holders *kept* (containers
        still mounted), the driver unmounting a volume at its last. The other holders' mounts
        stay, and their volumes mounted: another driver's containers under this root,
        dockerd's through the volume plugin (``docker:<ID>``)."""
        with self.locked():
            for name, holder in self.catalog.mounted_refs(holders):
                if holder not in kept:
                    self.unmount(name, holder)
