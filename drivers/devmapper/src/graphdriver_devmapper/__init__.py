"""devmapper: every layer a thin device in a device-mapper thin pool.

    <home>/devicemapper/data, metadata   sparse files of a loop-backed pool (development)
    <home>/devicemapper/devices.db       device ids, sizes and the pool's transaction id
    <home>/mnt/<id>                      where a layer's device is mounted; its root is rootfs/

``devicemapper/`` and ``mnt/`` are 0700: a layer's files are out of other users' reach.
Thin device 0 is the base: formatted once (``dm.fs``) at ``dm.basesize``, with an empty
``rootfs`` directory (0755, 0:0) so a layer's root is never the filesystem's lost+found level;
it is recorded as made only once both exist, so a failed mkfs is retried at the next open.
Every layer is a thin snapshot of its parent's device (of the base for a layer without parent).
Each pool message runs inside a transaction: the open transaction is written first, the pool's
transaction id is moved after the message, then the metadata commits; ``recover()`` (under the
store's lock, never ``__init__``) rolls back a transaction left open by a crash (Docker's rule).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from graphdriver import (
    Capabilities,
    CreateOpts,
    Driver,
    DriverError,
    DriverUnavailable,
    InvalidOption,
    LayerInfo,
)
from graphdriver.toolkit import (
    MS_RDONLY,
    SqliteSchema,
    device_mapper_missing,
    fault_point,
    mount,
    parse_size,
    private_dir,
    sqlite_open,
    sqlite_transaction,
    unmount,
    unmount_all_under,
)

from . import dmsetup
from .filesystem import grow_filesystem, make_filesystem
from .pool import ThinPool, create_loop_pool, is_active

log = logging.getLogger(__name__)

BASE_ID = 0
MAX_DEVICE_ID = (1 << 24) - 1
DEFAULTS = {
    "dm.loopdatasize": "100G",
    "dm.loopmetadatasize": "2G",
    "dm.basesize": "10G",
    "dm.fs": "ext4",
    "dm.min_free_space": "10%",
    "dm.use_deferred_removal": "false",
}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    layer TEXT PRIMARY KEY, dev_id INTEGER UNIQUE NOT NULL, size INTEGER NOT NULL
);
"""
#: version 1 is the schema above; a devices.db made before versions were kept holds it too
_DEVICES_DB = SqliteSchema(version=1, create=_SCHEMA, label="devmapper devices.db", unversioned=1)


class DevmapperDriver(Driver):
    """Layers as thin devices and thin snapshots in one pool."""

    name = "devmapper"
    options = {
        "dm.thinpooldev": "an existing thin pool to use (its /dev/mapper name); empty at first use",
        "dm.loopdatasize": "data file size of a loop-backed pool (default 100G)",
        "dm.loopmetadatasize": "metadata file size of a loop-backed pool (default 2G)",
        "dm.basesize": "size of the base device, the smallest a layer can be (default 10G)",
        "dm.fs": "filesystem of the base device: ext4 (default) or xfs",
        "dm.mkfsarg": "extra arguments for mkfs, space-separated",
        "dm.mountopt": "extra mount options, comma-separated",
        "dm.min_free_space": "refuse new layers when less data space is free (default 10%)",
        "dm.use_deferred_removal": "true: remove busy devices when their last user goes",
    }

    @classmethod
    def probe(cls, home: Path, options: Mapping[str, str]) -> None:
        if os.geteuid() != 0:
            raise DriverUnavailable("devmapper needs root")
        missing = device_mapper_missing()
        if missing is not None:
            raise DriverUnavailable(
                f"devmapper needs device-mapper: {missing} "
                "(modprobe dm-thin-pool, or run the tests under vm/run)"
            )
        if shutil.which("dmsetup") is None:
            raise DriverUnavailable("devmapper needs dmsetup (apt-get install dmsetup)")
        fs = options.get("dm.fs", DEFAULTS["dm.fs"])
        if fs not in ("ext4", "xfs"):
            raise InvalidOption(f"dm.fs must be ext4 or xfs, not {fs!r}")
        if shutil.which(f"mkfs.{fs}") is None:
            raise DriverUnavailable(f"devmapper with dm.fs={fs} needs mkfs.{fs}")

    def __init__(self, home: Path, options: Mapping[str, str]) -> None:
        super().__init__(home, options)
        self.probe(home, options)
        opt = {**DEFAULTS, **options}
        self.fs = opt["dm.fs"]
        self.base_size = parse_size(opt["dm.basesize"])
        self.mkfs_args = opt.get("dm.mkfsarg", "").split()
        self.mount_opts = [o for o in opt.get("dm.mountopt", "").split(",") if o]
        self.min_free = _fraction(opt["dm.min_free_space"])
        self.deferred = opt["dm.use_deferred_removal"].lower() in ("true", "1", "yes")
        self.dir = home / "devicemapper"
        tag = hashlib.sha1(str(home.resolve()).encode()).hexdigest()[:12]  # noqa: S324
        self.prefix = f"graphdriver-{tag}"
        self.external = opt.get("dm.thinpooldev")
        # the store's lock serialises every call; a diff runs in a thread of its own. Creating
        # the (empty) catalogue is the only write before recover(): it races with nobody
        private_dir(self.dir)
        self.db, _ = sqlite_open(self.dir / "devices.db", _DEVICES_DB)
        self.loop_sizes = (
            parse_size(opt["dm.loopdatasize"]),
            parse_size(opt["dm.loopmetadatasize"]),
        )
        if self.external:
            self.pool = ThinPool(self.external.removeprefix("/dev/mapper/"))
            if not self.pool.exists():
                raise DriverUnavailable(f"dm.thinpooldev {self.external!r} does not exist")
            self.pool.read_block_size()
        else:
            self.pool = ThinPool(f"{self.prefix}-pool")
        self.capabilities = Capabilities(quota=True, needs_root=True, readonly_images=True)

    def recover(self, layers: Sequence[LayerInfo]) -> None:
        """Bring the pool up, roll back a transaction a killed process left open, and make
        (or finish making) the base device: all under the store's lock, never in __init__."""
        private_dir(self.home, self.dir, self.home / "mnt")
        if self.external:
            self._check_pool_is_ours()
        else:
            self._pool_up()
            log.warning(
                "devmapper is using a loop-backed thin pool (%s): fine for development, "
                "slow and unsafe for production; give it a real pool with "
                "dm.thinpooldev",
                self.dir,
            )
        self._recover()
        self._ensure_base()

    def _check_pool_is_ours(self) -> None:
        """Refuse an external pool that someone else already uses, before we first write it."""
        if self._tid() or self._meta("open_transaction") is not None:
            return  # we have written to it
        status = self.pool.status()
        if status.transaction_id != 0 or status.data_used > 0:
            raise DriverUnavailable(
                f"dm.thinpooldev {self.pool.name} is not empty (transaction "
                f"{status.transaction_id}); give graphdriver a pool of its own"
            )

    def _pool_up(self) -> None:
        """Bring a loop-backed pool (back) up from its files; cleanup() takes it down."""
        if not self.external and not is_active(self.pool.name):
            create_loop_pool(
                self.pool.name, self.dir / "data", self.dir / "metadata", *self.loop_sizes
            )

    # ------------------------------------------------------------------ metadata

    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, key: str, value: str | None) -> None:
        if value is None:
            self.db.execute("DELETE FROM meta WHERE key=?", (key,))
        else:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def _tid(self) -> int:
        """The pool transaction id the catalogue last committed; read afresh, never cached,
        since another process may have committed since this one opened."""
        return int(self._meta("transaction_id") or 0)

    def _sql(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return sqlite_transaction(self.db)

    def _device(self, layer: str) -> tuple[int, int] | None:
        row = self.db.execute("SELECT dev_id, size FROM devices WHERE layer=?", (layer,)).fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    def _new_id(self) -> int:
        row = self.db.execute("SELECT MAX(dev_id) FROM devices").fetchone()
        dev_id = max(BASE_ID, int(row[0]) if row[0] is not None else BASE_ID) + 1
        if dev_id > MAX_DEVICE_ID:
            raise DriverError("the thin pool has no free 24-bit device id left")
        return dev_id

    # ------------------------------------------------------------------ transactions

    def _pool_op(
        self,
        dev_id: int,
        op: str,
        action: Callable[[], None],
        record: Callable[[sqlite3.Connection], None],
    ) -> None:
        """Send pool message(s) in a transaction that a crash at any point can undo."""
        old = self._tid()
        new = old + 1
        with self._sql():
            self._set_meta("open_transaction", json.dumps({"tid": new, "dev_id": dev_id, "op": op}))
        action()
        fault_point("devmapper.transaction.after-pool-message")
        self.pool.set_transaction_id(old, new)
        fault_point("devmapper.transaction.after-transaction-id")
        with self._sql() as db:
            record(db)
            self._set_meta("transaction_id", str(new))
            self._set_meta("open_transaction", None)

    def _recover(self) -> None:
        """Roll back a transaction that a crash left open, so pool and metadata agree."""
        raw = self._meta("open_transaction")
        tid = self._tid()
        pool_tid = self.pool.status().transaction_id
        if raw is not None:
            tx = json.loads(raw)
            log.warning(
                "rolling back devmapper transaction %s (%s of device %s) left open "
                "by a process that died",
                tx["tid"],
                tx["op"],
                tx["dev_id"],
            )
            if tx["op"] == "create":
                self.pool.delete(tx["dev_id"])
                if pool_tid == tx["tid"]:
                    self.pool.set_transaction_id(tx["tid"], tid)
            else:  # a delete is finished, not undone: the layer was on its way out
                self.pool.delete(tx["dev_id"])
                if pool_tid == tid:
                    self.pool.set_transaction_id(tid, tx["tid"])
                with self._sql() as db:
                    db.execute("DELETE FROM devices WHERE dev_id=?", (tx["dev_id"],))
                    self._set_meta("transaction_id", str(tx["tid"]))
                tid = tx["tid"]
            with self._sql():
                self._set_meta("open_transaction", None)
            pool_tid = self.pool.status().transaction_id
        if pool_tid != tid:
            raise DriverError(
                f"thin pool {self.pool.name} is at transaction {pool_tid} but the metadata in "
                f"{self.dir} at {tid}: the pool was changed by someone else"
            )

    # ------------------------------------------------------------------ the base device

    def _ensure_base(self) -> None:
        """Make the base device once. It is recorded as made (``base_size``) only after its
        filesystem and rootfs exist, so a failed or killed mkfs is retried at the next open."""
        recorded = self._meta("base_size")
        if recorded is not None:
            if int(recorded) != self.base_size and "dm.basesize" in self.opts:
                raise InvalidOption(
                    f"dm.basesize cannot change once the base device exists "
                    f"(it is {int(recorded)} bytes)"
                )
            self.base_size = int(recorded)
            self.fs = self._meta("fs") or self.fs
            return
        if self._meta("base_device") is None:

            def record(db: sqlite3.Connection) -> None:
                self._set_meta("base_device", str(BASE_ID))

            self._pool_op(BASE_ID, "create", lambda: self.pool.create_thin(BASE_ID), record)
        else:
            log.warning("making the filesystem of a base device that an earlier open left bare")
        name = self._name(BASE_ID)
        dev = self.pool.activate(name, BASE_ID, self.base_size)
        try:
            fault_point("devmapper.base.before-mkfs")
            make_filesystem(self.fs, self.mkfs_args, dev)
            with tempfile.TemporaryDirectory(dir=self.dir) as tmp:
                mount(dev, tmp, self.fs, 0, self._mount_data())
                try:
                    rootfs = Path(tmp, "rootfs")
                    rootfs.mkdir(0o755, exist_ok=True)
                    os.chmod(rootfs, 0o755)
                    os.chown(rootfs, 0, 0)
                finally:
                    unmount(tmp)
        finally:
            dmsetup.remove(name)
        with self._sql():
            self._set_meta("base_size", str(self.base_size))
            self._set_meta("fs", self.fs)

    def _mount_data(self) -> str | None:
        opts = list(self.mount_opts)
        if self.fs == "xfs":
            opts.append("nouuid")  # every snapshot carries the base's UUID
        return ",".join(opts) or None

    def _name(self, dev_id: int) -> str:
        return f"{self.prefix}-{dev_id}"

    # ------------------------------------------------------------------ layers

    def has_storage(self, layer: LayerInfo) -> bool:
        return self._device(layer.id) is not None

    def create(self, layer: LayerInfo, parent: LayerInfo | None, opts: CreateOpts) -> None:
        if self.has_storage(layer):  # left without the store's record: kept
            raise FileExistsError(errno.EEXIST, "the layer's thin device exists", layer.id)
        self._pool_up()
        status = self.pool.status()
        if status.data_free_fraction < self.min_free:
            raise DriverError(
                f"thin pool {self.pool.name} has {status.data_free_fraction:.0%} of its data "
                f"space free, below dm.min_free_space ({self.min_free:.0%}); remove layers or "
                f"grow the pool"
            )
        origin = self._device(parent.id) if parent is not None else (BASE_ID, self.base_size)
        if origin is None:
            raise DriverError(f"parent {parent.id if parent else ''!r} has no thin device")
        origin_id, origin_size = origin
        size = origin_size
        if opts.size is not None:
            if opts.size < self.base_size:
                raise InvalidOption(
                    f"devmapper layers cannot be smaller than the base device "
                    f"({self.base_size} bytes, dm.basesize); asked for {opts.size}"
                )
            size = max(opts.size, origin_size)
        dev_id = self._new_id()
        active = self._name(origin_id) if is_active(self._name(origin_id)) else None

        def record(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO devices VALUES (?, ?, ?)", (layer.id, dev_id, size))

        self._pool_op(
            dev_id, "create", lambda: self.pool.create_snap(dev_id, origin_id, active), record
        )
        if size > origin_size:
            self._grow(layer.id, dev_id, size)

    def _grow(self, layer_id: str, dev_id: int, size: int) -> None:
        """Grow a new layer's filesystem to its device size (resize2fs / xfs_growfs)."""
        name = self._name(dev_id)
        dev = self.pool.activate(name, dev_id, size)
        try:
            with tempfile.TemporaryDirectory(dir=self.dir) as tmp:
                mount(dev, tmp, self.fs, 0, self._mount_data())
                try:
                    grow_filesystem(self.fs, dev, tmp)
                finally:
                    unmount(tmp)
        finally:
            dmsetup.remove(name)

    def remove(self, layer: LayerInfo) -> None:
        device = self._device(layer.id)
        if device is None:
            return  # a half-made layer: nothing in the pool
        self._pool_up()
        self.unmount(layer)
        dev_id = device[0]
        dmsetup.remove(self._name(dev_id), deferred=False)

        def record(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM devices WHERE dev_id=?", (dev_id,))

        self._pool_op(dev_id, "delete", lambda: self.pool.delete(dev_id), record)

    def _mnt(self, layer: LayerInfo) -> Path:
        return self.home / "mnt" / layer.id

    def mount(self, layer: LayerInfo, chain: Sequence[LayerInfo]) -> Path:
        target = self._mnt(layer)
        if os.path.ismount(target):
            return target / "rootfs"
        device = self._device(layer.id)
        if device is None:
            raise DriverError(f"layer {layer.id!r} has no thin device")
        self._pool_up()
        name = self._name(device[0])
        dev = self.pool.activate(name, device[0], device[1])
        try:
            fault_point("devmapper.mount.after-activate")
            target.mkdir(exist_ok=True)
            mount(dev, target, self.fs, MS_RDONLY if layer.sealed else 0, self._mount_data())
        except BaseException:
            # a device left active would pin the layer's snapshot and block its removal
            with contextlib.suppress(OSError):
                target.rmdir()
            try:
                dmsetup.remove(name)
            except OSError as exc:  # the mount's own error is the one to report
                log.warning("could not deactivate %s after a failed mount: %s", name, exc)
            raise
        return target / "rootfs"

    def unmount(self, layer: LayerInfo) -> None:
        target = self._mnt(layer)
        if os.path.ismount(target):
            # what a runtime left mounted inside the layer (a volume's bind) would keep its
            # filesystem busy, and the thin device with it: off first, the host's files kept
            for where in unmount_all_under(target / "rootfs"):
                log.warning("unmounted %s, mounted inside layer %s, to unmount it", where, layer.id)
            unmount(target, retries=50, delay=0.1)
        with contextlib.suppress(OSError):
            target.rmdir()
        device = self._device(layer.id)
        if device is not None:
            dmsetup.remove(self._name(device[0]), deferred=self.deferred)

    def is_mounted(self, layer: LayerInfo) -> bool | None:
        return os.path.ismount(self._mnt(layer))

    def cleanup(self) -> None:
        """Deactivate every device; a loop-backed pool is taken down too (its files stay)."""
        for (dev_id,) in self.db.execute("SELECT dev_id FROM devices").fetchall():
            dmsetup.remove(self._name(int(dev_id)))
        dmsetup.remove(self._name(BASE_ID))
        if not self.external:
            dmsetup.remove(self.pool.name)

    def close(self) -> None:
        self.db.close()

    def stored_layers(self) -> Mapping[str, str | None]:
        """The layers of the device db (the pool agrees with it, or ``__init__`` refused);
        a thin snapshot holds all its blocks, so no parent is needed."""
        return {str(r[0]): None for r in self.db.execute("SELECT layer FROM devices")}

    def status(self) -> list[tuple[str, str]]:
        self._pool_up()
        st = self.pool.status()
        ver = dmsetup.version()
        return [
            ("Pool Name", self.pool.name),
            ("Pool Blocksize", str(self.pool.block_sectors * 512)),
            ("Base Device Size", str(self.base_size)),
            ("Backing Filesystem", self.fs),
            ("Data file", "" if self.external else str(self.dir / "data")),
            ("Metadata file", "" if self.external else str(self.dir / "metadata")),
            ("Data Space Used", str(st.data_used)),
            ("Data Space Total", str(st.data_total)),
            ("Data Space Available", str(st.data_total - st.data_used)),
            ("Metadata Space Used", str(st.meta_used)),
            ("Metadata Space Total", str(st.meta_total)),
            ("Metadata Space Available", str(st.meta_total - st.meta_used)),
            ("Thin Pool Minimum Free Space", f"{self.min_free:.0%}"),
            ("Deferred Removal Enabled", str(self.deferred).lower()),
            ("No Space Policy", st.no_space_policy),
            ("Loop-backed (development only)", str(not self.external).lower()),
            ("Library Version", ver.get("Library version", "unknown")),
        ]


def _fraction(text: str) -> float:
    value = text.strip().rstrip("%")
    try:
        number = float(value)
    except ValueError:
        raise InvalidOption(
            f"dm.min_free_space must be a percentage like 10%, not {text!r}"
        ) from None
    if not 0 <= number < 100:
        raise InvalidOption(f"dm.min_free_space must be between 0% and 99%, not {text!r}")
    return number / 100
